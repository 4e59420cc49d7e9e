"""The draw engine: which rows are drawn from and which are scored, and the (budget, draw, method)
tasks that fit, select and score, in this process or in a pool of worker processes.

Per budget and draw, one labeled subset and one set of patient-grouped folds are shared by every
method. Cross-validation on the labeled subset picks each candidate's hyper-parameters, then the
candidate (the simplest within one standard error of the best out-of-fold AUC, by default), then the
decision threshold (Youden's J on its out-of-fold scores). Only then is the refitted model scored on
the scored rows (the test split, or the validation patients), which never influence any choice. Each
task is seeded on its own, so the outputs do not depend on the number of jobs or the task order.
"""

from __future__ import annotations

import logging
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vqmed.config import BenchmarkConfig, ConfigError
from vqmed.downstream.inputs import Candidate
from vqmed.downstream.metrics import StratifiedBootstrap
from vqmed.downstream.probes import ProbeFit, fit_probe, make_folds, make_probe, scores_of, select
from vqmed.downstream.sampling import Budget, draw_labeled_subset

logger = logging.getLogger(__name__)

Task = tuple[Budget, int, str]

__all__ = ["DrawContext", "Task", "draw_runner", "limited_threads", "patient_numbers", "prepare_rows"]


# --------------------------------------------------------------------------------------------------
# which rows: the pool the labels are drawn from, and the scored rows
# --------------------------------------------------------------------------------------------------
def prepare_rows(index: pd.DataFrame, cfg: BenchmarkConfig, validation_keys: set[str] | None = None) -> dict[str, np.ndarray]:
    """Row positions, labels and patient groups of the pool (``train_rows``) and the scored rows (``test_rows``).

    ``evaluate_on: test``: the pool is the whole training split, the test split is scored.
    ``evaluate_on: validation``: the pool is the training split less the validation patients, whose
    training images are scored; the test split is not looked at.

    Args:
        index: one row per image with ``split``, ``label`` and ``patient_key`` (or ``patient_id``).
        cfg: the validated config.
        validation_keys: the validation patients as the index's group values (validation mode).
    """
    missing = [c for c in ("split", "label") if c not in index.columns]
    if missing:
        raise ValueError(f"benchmark index lacks column(s) {missing}; has {list(index.columns)}")
    group_col = next((c for c in ("patient_key", "patient_id") if c in index.columns), None)
    split = index["split"].astype(str).to_numpy()
    labelled = index["label"].notna().to_numpy()
    label = index["label"].astype(str).to_numpy()
    if group_col is None:
        logger.warning("index has no patient_key/patient_id: every image is treated as its own patient")
        groups = np.asarray([f"row{i}" for i in range(len(index))])
    else:
        # a missing patient key means "unknown patient": its own group, never merged with others
        raw = index[group_col]
        groups = np.where(raw.notna(), raw.astype(str), [f"row{i}" for i in range(len(index))])
    train = (split == cfg.train_split) & labelled
    if cfg.evaluate_on == "validation":
        held_out = np.isin(groups, list(validation_keys or ()))
        if not (train & held_out).any():
            raise ConfigError(
                f"validation_patients: {cfg.validation_patients} shares no patient with the {cfg.train_split!r} split "
                f"(matched by {group_col or 'row'}); is it the list of this dataset?"
            )
        train_rows, test_rows = np.flatnonzero(train & ~held_out), np.flatnonzero(train & held_out)
        names = (f"{cfg.train_split} (less the validation patients)", f"{cfg.train_split} (validation patients)")
    else:
        train_rows, test_rows = np.flatnonzero(train), np.flatnonzero((split == cfg.test_split) & labelled)
        names = (cfg.train_split, cfg.test_split)
    for name, rows in zip(names, (train_rows, test_rows)):
        classes = set(label[rows])
        if len(rows) == 0 or cfg.positive_label not in classes or len(classes) < 2:
            raise ValueError(
                f"split {name!r} needs labeled images of {cfg.positive_label!r} and of another class; found {sorted(classes)} in {len(rows)} rows"
            )
    y = (label == cfg.positive_label).astype(int)
    overlap = set(groups[train_rows]) & set(groups[test_rows])
    if overlap:
        logger.warning("%d patients have images in both %s and %s", len(overlap), *names)
    return {
        "train_rows": train_rows,
        "test_rows": test_rows,
        "y_train": y[train_rows],
        "y_test": y[test_rows],
        "groups_train": patient_numbers(groups)[train_rows],
    }


def patient_numbers(groups: np.ndarray) -> np.ndarray:
    """Each row's patient as a number in order of first appearance in the index (the manifest's order).

    The draws and the cross-validation folds order patients by these numbers, not by the store's patient
    keys: those are hashes salted per installation, and sorting them would give every machine (every id
    salt) other label draws for the same seed, so a benchmark would not repeat on another machine.
    """
    _, first_row, patient = np.unique(np.asarray(groups).astype(str), return_index=True, return_inverse=True)
    number_of = np.empty(len(first_row), dtype=np.int64)
    number_of[np.argsort(first_row, kind="stable")] = np.arange(len(first_row))
    return number_of[patient.reshape(-1)]


def _derive_seed(*parts: Any) -> int:
    """A 31-bit seed from the config seed and names: independent of budget order and method set."""
    words = [zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


@contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """Fix torch and BLAS/OpenMP thread counts (reproducible sums), restoring them afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with threadpool_limits(limits=int(threads)):
            yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# one draw, and the workers that run draws side by side
# --------------------------------------------------------------------------------------------------
@dataclass
class DrawContext:
    """What every draw task needs besides its budget, draw and method: sent once per worker process."""

    methods: dict[str, list[Candidate]]
    data: dict[str, np.ndarray]
    boot: StratifiedBootstrap
    cfg: BenchmarkConfig


#: the context of this process's draw tasks (set by ``draw_runner``, in the parent or in each worker).
#: Module state because the feature matrices are hundreds of MB: they reach a worker once, as
#: memory-mapped files, not once per task.
_CONTEXT: DrawContext | None = None


def _set_context(ctx: DrawContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def _open_context(spec: dict[str, list[tuple[str, str, str, np.ndarray | None]]], data: dict[str, np.ndarray], boot: StratifiedBootstrap, cfg: BenchmarkConfig) -> None:
    """Worker initializer: the context, its feature matrices memory-mapped from the parent's ``.npy`` files."""
    opened: dict[str, np.ndarray] = {}
    methods = {
        method: [Candidate(name, probe, opened.setdefault(path, np.load(path, mmap_mode="r")), codebook) for name, probe, path, codebook in cands]
        for method, cands in spec.items()
    }
    _set_context(DrawContext(methods, data, boot, cfg))


def _run_task(budget: Budget, draw: int, method: str) -> tuple[list[dict[str, Any]], float]:
    """One method on one draw: its records and the CPU seconds they took."""
    if _CONTEXT is None:
        raise RuntimeError("draw task run outside draw_runner")
    ctx = _CONTEXT
    t0 = time.process_time()
    with limited_threads(ctx.cfg.threads):
        records = _run_draw(budget, draw, method, ctx.methods[method], ctx.data, ctx.boot, ctx.cfg)
    return records, time.process_time() - t0


@contextmanager
def draw_runner(ctx: DrawContext) -> Iterator[Callable[[list[Task]], Iterator[tuple[list[dict[str, Any]], float]]]]:
    """``run(tasks)``: an iterator over ``_run_task(*task)`` in task order, on ``cfg.jobs`` processes
    (see :func:`_largest_first`).

    With ``jobs > 1`` the feature matrices go to a temporary folder as ``.npy`` files that every worker
    memory-maps once, in its initializer (one copy in the page cache, whatever the number of workers);
    the tasks themselves carry only a budget, a draw index and a method name.
    """
    jobs = ctx.cfg.jobs
    if jobs <= 1:
        _set_context(ctx)
        try:
            yield lambda tasks: (_run_task(*task) for task in tasks)
        finally:
            _set_context(None)
        return
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with tempfile.TemporaryDirectory(prefix="vqmed-bench-") as tmp:
        paths: dict[int, str] = {}
        spec: dict[str, list[tuple[str, str, str, np.ndarray | None]]] = {}
        for method, candidates in ctx.methods.items():
            for cand in candidates:
                if id(cand.X) not in paths:  # the classifiers of one variant share one matrix
                    paths[id(cand.X)] = str(Path(tmp) / f"x{len(paths)}.npy")
                    np.save(paths[id(cand.X)], cand.X)
                spec.setdefault(method, []).append((cand.name, cand.probe, paths[id(cand.X)], cand.codebook))
        # spawn, not fork: the parent has torch's and OpenMP's thread pools running
        pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=get_context("spawn"), initializer=_open_context, initargs=(spec, ctx.data, ctx.boot, ctx.cfg)
        )
        with pool:
            yield lambda tasks: _largest_first(pool, tasks, ctx)


def _largest_first(pool: Any, tasks: list[Task], ctx: DrawContext) -> Iterator[tuple[list[dict[str, Any]], float]]:
    """Submit the costliest tasks first (most labels, then most candidates), yield results in task order.

    In task order the 100% budget comes last, and its single draw of the method (~4 CPU-min at 12k
    features) would run alone at the end while the other workers idle; started first, it runs beside
    the many small tasks. The results, and so every output, do not depend on the submission order.
    """
    from tqdm.auto import tqdm

    classes = dict(zip(*np.unique(ctx.data["y_train"], return_counts=True)))

    def cost(task: Task) -> tuple[int, int]:
        budget, _, method = task
        return sum(budget.targets(classes).values()), len(ctx.methods[method])

    progress = tqdm(total=len(tasks), desc="benchmark tasks", unit="task", mininterval=5.0, file=sys.stderr)
    futures = {}
    for i in sorted(range(len(tasks)), key=lambda i: cost(tasks[i]), reverse=True):
        futures[i] = pool.submit(_run_task, *tasks[i])
        futures[i].add_done_callback(lambda _: progress.update())
    try:
        for i in range(len(tasks)):
            yield futures[i].result()
    finally:
        progress.close()


def _run_draw(
    budget: Budget,
    draw: int,
    method: str,
    candidates: list[Candidate],
    data: dict[str, np.ndarray],
    boot: StratifiedBootstrap,
    cfg: BenchmarkConfig,
) -> list[dict[str, Any]]:
    """One method on one labeled draw: the selected candidate's record (and every candidate's, if asked)."""
    sub = draw_labeled_subset(data["y_train"], data["groups_train"], budget, cfg.seed, draw)
    rows = data["train_rows"][sub]
    y = data["y_train"][sub]
    folds = make_folds(y, data["groups_train"][sub], cfg.probes.cv_folds, _derive_seed(cfg.seed, budget.name, draw, "folds"))
    rs = _derive_seed(cfg.seed, budget.name, draw, "model")
    base = {
        "budget": budget.name,
        "budget_kind": budget.kind,
        "budget_value": budget.value,
        "draw": draw,
        "n_labels": len(y),
        "n_pos": int(y.sum()),
        "n_neg": int(len(y) - y.sum()),
        "n_patients": len(np.unique(data["groups_train"][sub])),
        "n_folds": len(folds),
    }
    out = []
    fits: list[tuple[ProbeFit, Candidate]] = []
    for cand in candidates:
        est, grid = make_probe(
            cand.probe,
            cfg.probes,
            cfg.cnn,
            rs,
            codebook=cand.codebook,
            pca_components=cfg.baselines.pca_components,
            scale=cfg.probes.standardize == "subset",
        )
        fits.append((fit_probe(cand.name, est, grid, cand.X[rows], y, folds, refit=False, selection=cfg.probes.selection), cand))
    # the method's answer: the candidate cross-validation chooses (config order breaks ties)
    best_i = select([f.cv_auc for f, _ in fits], y, cfg.probes.selection)
    for i, (fit, cand) in enumerate(fits):
        is_best = i == best_i
        if not is_best and not (cfg.probes.report_candidates and len(fits) > 1):
            continue  # never refitted: only the selected candidate needs a final model
        model = fit.refit(cand.X[rows], y)
        scores = scores_of(model, cand.X[data["test_rows"]])
        metrics, auc_boot = boot.evaluate(scores, fit.threshold)
        record = {
            **base,
            "cv_auc": fit.cv_auc,
            "threshold": fit.threshold,
            "params": fit.params,
            "metrics": metrics,
            "auc_boot": auc_boot,
        }
        if is_best:
            out.append({**record, "method": method, "selected": fit.name, "candidate": False})
        if cfg.probes.report_candidates and len(fits) > 1:
            out.append({**record, "method": f"{method}[{fit.name}]", "selected": fit.name, "candidate": True})
    return out
