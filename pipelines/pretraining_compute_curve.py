"""Pretraining-compute curve: frozen-feature AUC vs pretraining steps, per objective, as ``vqmed`` CLI steps.

    python pipelines/pretraining_compute_curve.py --config configs/pipeline/compute_curve_cpu.yaml

Each objective arm is pretrained once for the longest length, keeping a model-only checkpoint at every
length of ``steps`` (0 = the random initialisation); every checkpoint is exported and probed with the same
benchmark config. The curve (CSV + plot) is written beside the runs and logged to MLflow. Steps whose
output is complete are skipped, so an interrupted curve is re-run with the same command. The checkpoints
of one run share its learning-rate schedule: an early point is a model still at a high learning rate,
not one trained for that length alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pneumonia_low_label import pipeline_config, set_flags, step

from vqmed.config import ComputeCurveConfig
from vqmed.downstream.curve import curve_table
from vqmed.tracking import compute_curve_plot, log_compute_curve


def main(argv: list[str] | None = None) -> None:
    cfg, config_path, out = pipeline_config(ComputeCurveConfig, __doc__.splitlines()[0],
                                            "configs/pipeline/compute_curve_cpu.yaml", argv)
    root = ["--data-root", cfg.data_root] if cfg.data_root else []
    steps = sorted(set(cfg.steps))
    start = time.monotonic()
    runs: dict[tuple[str, int], Path] = {}
    for i, (arm, arm_overrides) in enumerate(cfg.objectives.items()):
        pretrain_dir = out / f"pretrain_{arm}"
        if not (pretrain_dir / "summary.json").is_file():
            resume = ["--resume"] if (pretrain_dir / "run.json").is_file() else []
            overrides = [f"data.manifests=[{cfg.manifest}]", *cfg.pretrain_overrides, *arm_overrides,
                         f"train.max_steps={max(steps)}", f"train.keep_checkpoints_at={json.dumps(steps)}"]
            step(f"pretrain {arm}", ["pretrain", "--config", cfg.pretrain_config, "--out", str(pretrain_dir), *root,
                                     *resume, *set_flags(overrides)])
        # step 0 is the same random initialisation for every arm (same seed, same model): probed once
        for n in (s for s in steps if s > 0 or i == 0):
            tag = "init" if n == 0 else f"{arm}_{n:06d}"
            export_dir, bench_dir = out / f"export_{tag}", out / f"benchmark_{tag}"
            checkpoint = pretrain_dir / "checkpoints" / f"step_{n:06d}.pt"
            if not (bench_dir / "summary.json").is_file():
                step(f"export {tag}", ["export", "--model", str(checkpoint), "--manifest", cfg.manifest,
                                       "--out", str(export_dir), *root,
                                       *set_flags(cfg.export_overrides)])
                overrides = [f"export={export_dir}", *cfg.benchmark_overrides]
                step(f"benchmark {tag}", ["benchmark", "--config", cfg.benchmark_config, "--out", str(bench_dir),
                                          *set_flags(overrides)])
            runs[(arm, n)] = bench_dir
    first = next(iter(cfg.objectives))
    if 0 in steps:
        runs.update({(arm, 0): runs[(first, 0)] for arm in cfg.objectives})
    table = curve_table(runs)
    table.to_csv(out / "compute_curve.csv", index=False)
    figure = compute_curve_plot(table)
    figure.savefig(out / "compute_curve.png", dpi=120)
    params = {"config": config_path, "steps": steps, "objectives": list(cfg.objectives),
              "pretrain_config": cfg.pretrain_config, "benchmark_config": cfg.benchmark_config}
    run_id = log_compute_curve(table, out / "compute_curve.csv", figure, params, tracking_uri=None,
                               experiment=cfg.experiment, run_name=cfg.name)
    print(f"\ncompute curve finished in {(time.monotonic() - start) / 60:.1f} min; MLflow run {run_id}")
    print(f"table: {out / 'compute_curve.csv'}  plot: {out / 'compute_curve.png'}")
    print(table.pivot_table(index=["objective", "steps"], columns="budget", values="auc_mean", sort=False).round(4).to_string())


if __name__ == "__main__":
    main()
