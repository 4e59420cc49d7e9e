"""The pretraining-compute curve's table, figure and config (the pipeline itself is the CLI steps it runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from vqmed.config import ComputeCurveConfig, ConfigError, load_config
from vqmed.downstream.curve import curve_table
from vqmed.tracking import compute_curve_plot

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_csv(folder: Path, aucs: dict[str, list[float]]) -> Path:
    """A benchmark.csv in the benchmark's long format: per budget and draw, an AUC row plus a row of another
    metric and of another method that the curve must ignore."""
    rows = []
    for budget, values in aucs.items():
        for draw, value in enumerate(values):
            base = {"budget": budget, "n_labels": 20.0 + draw, "draw": draw}
            rows += [{**base, "method": "vqvae", "metric": "auc", "value": value},
                     {**base, "method": "vqvae", "metric": "balanced_accuracy", "value": 0.5},
                     {**base, "method": "random_encoder", "metric": "auc", "value": 0.1}]
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "benchmark.csv", index=False)
    return folder


def test_curve_table_averages_the_methods_auc_over_draws(tmp_path):
    runs = {
        ("vicreg", 0): _benchmark_csv(tmp_path / "init", {"10/class": [0.80, 0.82], "1%": [0.85, 0.87]}),
        ("vicreg", 616): _benchmark_csv(tmp_path / "v616", {"10/class": [0.84, 0.88], "1%": [0.86, 0.90]}),
    }
    table = curve_table(runs)
    assert list(table["budget"].unique()) == ["10/class", "1%"]  # the benchmark's budget order
    row = table[(table["steps"] == 616) & (table["budget"] == "10/class")].iloc[0]
    assert row["auc_mean"] == pytest.approx(0.86) and row["n_draws"] == 2
    half = 1.959964 * np.std([0.84, 0.88], ddof=1) / np.sqrt(2)
    assert (row["auc_low"], row["auc_high"]) == pytest.approx((0.86 - half, 0.86 + half))
    with pytest.raises(ValueError, match="no AUC rows for method 'missing'"):
        curve_table(runs, method="missing")


def test_curve_figure_has_one_panel_per_budget_and_one_line_per_objective(tmp_path):
    table = pd.DataFrame([{"objective": o, "steps": s, "budget": b, "auc_mean": 0.8 + s / 1e5, "auc_low": 0.75,
                           "auc_high": 0.85} for o in ("vicreg", "reconstruction") for s in (0, 616, 2464)
                          for b in ("10/class", "1%", "10%")])
    fig = compute_curve_plot(table)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["10/class labels", "1% labels", "10% labels"]
    assert all(len(ax.get_lines()) == 2 for ax in axes)
    fig.savefig(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    with pytest.raises(KeyError, match="auc_low"):
        compute_curve_plot(table.drop(columns=["auc_low"]))


def test_committed_curve_configs_validate_and_bad_ones_name_the_key(tmp_path):
    for name in ("compute_curve_cpu.yaml", "compute_curve_gpu.yaml"):
        cfg = load_config(ComputeCurveConfig, ROOT / "configs" / "pipeline" / name)
        assert 0 in cfg.steps and "reconstruction" in cfg.objectives
    raw = yaml.safe_load((ROOT / "configs" / "pipeline" / "compute_curve_cpu.yaml").read_text())
    for change, key in (({"steps": [0]}, "steps"), ({"steps": [0, -5]}, "steps"),
                        ({"objectives": {"x": "objective.name=vicreg"}}, "objectives.x")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(ConfigError, match=key):
            load_config(ComputeCurveConfig, path)
