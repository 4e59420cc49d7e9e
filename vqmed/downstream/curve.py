"""Pretraining-compute curves: the probe benchmark's AUC of one objective at several pretraining lengths."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

__all__ = ["curve_table"]


def curve_table(runs: dict[tuple[str, int], Path], method: str = "vqvae", ci: float = 0.95) -> pd.DataFrame:
    """Mean AUC per (objective, pretraining steps, budget) from the benchmarks' ``benchmark.csv`` files.

    Args:
        runs: ``(objective, steps) -> benchmark output directory``.
        method: the benchmark method whose AUC is read (the frozen pretrained features).
        ci: level of the normal-approximation interval of the mean over draws.

    Returns:
        columns ``objective, steps, budget, n_labels, n_draws, auc_mean, auc_std, auc_low, auc_high``, budgets
        in the benchmark's order (per-class budgets first, then fractions).
    """
    z = NormalDist().inv_cdf(0.5 + ci / 2)
    rows = []
    for (objective, steps), directory in runs.items():
        table = pd.read_csv(Path(directory) / "benchmark.csv")
        auc = table[(table["metric"] == "auc") & (table["method"] == method)]
        if auc.empty:
            raise ValueError(f"{directory}: benchmark.csv has no AUC rows for method {method!r}")
        for budget, sub in auc.groupby("budget", sort=False):
            values = sub["value"].to_numpy(float)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            half = z * std / np.sqrt(len(values))
            rows.append({"objective": objective, "steps": int(steps), "budget": str(budget),
                         "n_labels": float(sub["n_labels"].mean()), "n_draws": len(values),
                         "auc_mean": float(values.mean()), "auc_std": std,
                         "auc_low": float(values.mean() - half), "auc_high": float(values.mean() + half)})
    return pd.DataFrame(rows)
