"""The label-budget benchmark's entry points: every method on the same patient-grouped draws.

``run_benchmark`` reads an export store through :mod:`.inputs` (plus the images, for the pixel
baselines and the random encoder) and hands plain arrays to ``run_benchmark_on_features``, which can
also be fed features computed any other way. That function wires the three rooms of the benchmark:
:mod:`.inputs` (feature matrices of every method), :mod:`.engine` (which rows are drawn from and scored;
the draws, in this process or in worker processes) and :mod:`.report` (tables, figures, MLflow).

``evaluate_on: test`` (default) draws labels from the whole training split and scores the test split;
``evaluate_on: validation`` draws from the training split less the committed validation patients and
scores those patients' images, never reading the test split. Choices of classifier, hyper-parameters
and threshold are made inside each labeled subset either way; the validation split is where the
project chooses objectives and feature variants (``docs/objective_selection.md``).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vqmed.config import BenchmarkConfig
from vqmed.downstream.engine import DrawContext, draw_runner, limited_threads, prepare_rows
from vqmed.downstream.inputs import FeatureSource, build_methods, load_inputs, standardize_on_pool, store_validation_keys
from vqmed.downstream.metrics import StratifiedBootstrap
from vqmed.downstream.report import build_summary, long_table, mlflow_parent, summarise, write_outputs
from vqmed.downstream.sampling import make_budgets

__all__ = ["FeatureSource", "run_benchmark", "run_benchmark_on_features"]


def run_benchmark(cfg: BenchmarkConfig, out_dir: Path) -> dict[str, Any]:
    """Run the benchmark on an export store (``cfg.export``) and write the outputs to ``out_dir``.

    Loads the store's arrays and codebook, the images of its index (once, for the raw-pixel, PCA and
    scratch-CNN baselines) and, if asked, the features of a randomly initialised encoder of the
    pretrained architecture; then calls :func:`run_benchmark_on_features`.

    Args:
        cfg: the validated benchmark config.
        out_dir: output directory (created).

    Returns:
        the summary (also written to ``out_dir/summary.json``).
    """
    t0 = time.perf_counter()
    with limited_threads(cfg.threads):
        store, index, sources, pixels = load_inputs(cfg)
    keys = store_validation_keys(cfg, store.meta) if cfg.evaluate_on == "validation" else None
    meta = {
        "export": str(cfg.export),
        "model_ref": store.meta.get("model_ref"),
        "model_name": store.meta.get("model_name"),
        "model_id": store.meta.get("model_id"),
        "pretrain_run_id": store.meta.get("pretrain_run_id"),
        "load_seconds": round(time.perf_counter() - t0, 1),
    }
    return run_benchmark_on_features(index, sources, pixels, cfg, Path(out_dir), meta=meta, validation_keys=keys)


def run_benchmark_on_features(
    index: pd.DataFrame,
    sources: dict[str, FeatureSource],
    pixels: np.ndarray | None,
    cfg: BenchmarkConfig,
    out_dir: Path,
    meta: dict[str, Any] | None = None,
    verbose: bool = True,
    validation_keys: set[str] | None = None,
) -> dict[str, Any]:
    """The benchmark on in-memory arrays: draws, probes, baselines, metrics, outputs, MLflow.

    Args:
        index: one row per image with ``split``, ``label`` and ``patient_key`` (or ``patient_id``);
            rows of other splits or without a label are ignored.
        sources: frozen features by method name; ``"vqvae"`` is the pretrained encoder,
            ``"random_encoder"`` the untrained control (both optional), aligned with ``index``.
        pixels: ``(N, H, W)`` images in [0, 1] aligned with ``index`` for the pixel baselines
            (``None`` skips them).
        cfg: the validated benchmark config.
        out_dir: where ``benchmark.csv``, ``summary.json``, ``summary.md`` and
            ``label_efficiency.png`` are written.
        meta: provenance (``pretrain_run_id``, ``model_ref``, ...) for the outputs and MLflow tags.
        verbose: print one progress line per budget to stderr.
        validation_keys: with ``evaluate_on: validation``, the validation patients as values of the
            index's patient column; ``None`` reads ``cfg.validation_patients`` and matches its ids as they are.

    Returns:
        the summary dictionary written to ``summary.json``.
    """
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if cfg.evaluate_on == "validation" and validation_keys is None:
        from vqmed.data import read_patient_list

        validation_keys = set(read_patient_list(cfg.validation_patients))
    data = prepare_rows(index, cfg, validation_keys)
    methods, skipped = build_methods(sources, pixels, cfg, len(index))
    if cfg.probes.standardize == "pool":
        standardize_on_pool(methods, data["train_rows"])
    if not methods:
        raise ValueError("nothing to benchmark: no feature source and every pixel baseline disabled or without pixels")
    budgets = make_budgets(cfg.budgets.fractions, cfg.budgets.per_class)
    boot = StratifiedBootstrap(data["y_test"], cfg.metrics.bootstrap, cfg.metrics.ci, seed=cfg.seed)
    records: list[dict[str, Any]] = []
    timings: Counter[str] = Counter()

    # one task per budget, draw and method (the 100% budget is one draw: its methods still run side by side)
    tasks = [(b, d, m) for b in budgets for d in range(cfg.budgets.full_draws if b.is_full else cfg.budgets.draws) for m in methods]
    with limited_threads(cfg.threads), mlflow_parent(cfg, meta, out_dir) as tracker, draw_runner(DrawContext(methods, data, boot, cfg)) as run_tasks:
        # results come back in task order, whatever the number of jobs: a budget is logged once its last task is in
        pending = Counter(b.name for b, _, _ in tasks)
        worker_cpu = 0.0  # CPU seconds spent in worker processes (with jobs > 1)
        for (budget, _, method), (task_records, task_cpu) in zip(tasks, run_tasks(tasks)):
            records += task_records
            timings[method] += task_cpu
            worker_cpu += task_cpu if cfg.jobs > 1 else 0.0
            pending[budget.name] -= 1
            if not pending[budget.name]:
                budget_records = [r for r in records if r["budget"] == budget.name]
                tracker.log_budget(budget, budget_records, boot, cfg)
                if verbose:
                    _progress_line(budget.name, budget_records, time.perf_counter() - t_start)

        summary = build_summary(cfg, data, meta, summarise(records, boot, cfg.seed), skipped, timings)
        summary["runtime_seconds"] = round(time.perf_counter() - t_start, 1)
        # CPU time of this process and its draw workers: what the run costs on an idle machine (wall time depends on load)
        summary["cpu_seconds"] = round(time.process_time() - cpu_start + worker_cpu, 1)
        summary["mlflow_parent_run_id"] = tracker.run_id
        figures = write_outputs(out_dir, long_table(records), summary)
        tracker.finish(out_dir, summary["results"], figures)
    return summary


def _progress_line(budget: str, records: list[dict[str, Any]], elapsed: float) -> None:
    """``[benchmark]   10/class x5 draws (total  12.3s): vqvae=0.912, ...`` on stderr."""
    methods = {r["method"]: r for r in records if not r["candidate"]}
    aucs = ", ".join(f"{m}={np.mean([r['metrics']['auc'][0] for r in records if r['method'] == m]):.3f}" for m in methods)
    n_draws = len({r["draw"] for r in records})
    print(f"[benchmark] {budget:>8} x{n_draws} draws (total {elapsed:6.1f}s): {aucs}", file=sys.stderr, flush=True)
