"""The label-budget benchmark: every method on the same patient-grouped draws, scored on the test split.

``run_benchmark`` reads an export store (plus the images, for the pixel baselines and the random
encoder) and hands plain arrays to ``run_benchmark_on_features``, the engine, which can also be fed
features computed any other way.

Per budget and draw, one labeled subset and one set of patient-grouped folds are shared by every
method. Each method is a set of *candidates* (classifiers on one feature variant; ``vqvae`` also the
CNN on the code maps, and each further variant is a method ``vqvae:VARIANT``); cross-validation on the
labeled subset picks each candidate's hyper-parameters, then the candidate (the simplest within one
standard error of the best out-of-fold AUC, by default), then the decision threshold (Youden's J on its
out-of-fold scores). Only then is the refitted model scored on the test split, which never influences
any choice. Feature scales come from the whole training split with its labels unused (the unlabeled
archive), for every method alike. With ``jobs > 1`` the (budget, draw, method) tasks run in worker
processes; each task is seeded on its own, so the outputs do not depend on the number of jobs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vqmed.config import BenchmarkConfig, to_dict
from vqmed.downstream.features import FEATURE_ARRAYS, feature_variant
from vqmed.downstream.metrics import METRICS, StratifiedBootstrap
from vqmed.downstream.probes import (
    ProbeFit,
    fit_probe,
    make_folds,
    make_probe,
    scores_of,
    select,
)
from vqmed.downstream.sampling import Budget, draw_labeled_subset, make_budgets

logger = logging.getLogger(__name__)

#: How summary.json's ``auc_ci_low``/``auc_ci_high`` are computed (also written into the file).
CI_METHOD = (
    "auc_ci_low/auc_ci_high: two-level percentile bootstrap of the mean AUC over draws: each replicate "
    "resamples the draws with replacement and the test images (stratified by class, the same test "
    "resample for every draw and method) and averages the draws' AUCs. It covers both the variation "
    "between label draws and the finite test set. auc_draw_ci_low/high: mean over draws of each "
    "draw's own test-bootstrap CI (test-set uncertainty of a single draw). auc_std: standard deviation "
    "across draws (ddof=1; null for a single draw)."
)

SKLEARN_PROBES = ("logreg", "linsvm", "knn", "mlp")
PRIMARY_ORDER = ("vqvae", "random_encoder", "raw_pixels_logreg", "pca_logreg", "cnn_scratch")


@dataclass
class FeatureSource:
    """Frozen features of one encoder, aligned with the rows of the benchmark's index.

    Args:
        arrays: export arrays by name (any of ``FEATURE_ARRAYS``), each with one row per index row.
        codebook: ``(K, D)`` codebook of the finest level (for the code-map variants and the CNN).
    """

    arrays: dict[str, np.ndarray]
    codebook: np.ndarray | None = None


@dataclass
class _Candidate:
    name: str
    probe: str
    X: np.ndarray  # every index row; sliced per draw
    codebook: np.ndarray | None = None  # for code_cnn: the source's codebook


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------
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
    with _limited_threads(cfg.threads):
        store, index, sources, pixels = _load_inputs(cfg)
    meta = {
        "export": str(cfg.export),
        "model_ref": store.meta.get("model_ref"),
        "model_name": store.meta.get("model_name"),
        "model_id": store.meta.get("model_id"),
        "pretrain_run_id": store.meta.get("pretrain_run_id"),
        "load_seconds": round(time.perf_counter() - t0, 1),
    }
    return run_benchmark_on_features(index, sources, pixels, cfg, Path(out_dir), meta=meta)


def _load_inputs(cfg: BenchmarkConfig) -> tuple[Any, pd.DataFrame, dict[str, FeatureSource], np.ndarray | None]:
    """The store, its index, the feature sources (pretrained and random encoder) and the pixels."""
    from vqmed.export import load

    store = load(cfg.export)
    index = store.index.reset_index(drop=True)
    names = [n for n in FEATURE_ARRAYS if n in store.array_names]
    sources = {"vqvae": FeatureSource({n: store.array(n) for n in names}, store.codebook)}
    spec = dict(store.meta.get("image_spec") or {})
    b = cfg.baselines
    pixels = None
    if b.raw_pixels or b.pca or b.cnn_scratch:
        pixels = load_images(index, cfg.data_root, cfg.image_size, cfg.cache_dir)
    if b.random_encoder:
        size = int(spec.get("image_size", cfg.image_size))
        images = pixels if pixels is not None and size == cfg.image_size else load_images(index, cfg.data_root, size, cfg.cache_dir)
        sources["random_encoder"] = random_encoder_features(store.meta["model_name"], store.meta["model_config"], images, cfg.seed)
    return store, index, sources, pixels


def load_images(index: pd.DataFrame, data_root: str | None, image_size: int, cache_dir: str | None) -> np.ndarray:
    """Every index row's image as ``(N, H, W)`` float32 in [0, 1] (grey), read once per run.

    Uses :class:`vqmed.data.ImageDataset`, i.e. exactly the pretraining/export preprocessing.

    Raises:
        ValueError: when some rows cannot be read (the export read them, so the data changed).
    """
    from vqmed.data import ImageDataset, ImageSpec, resolve_data_root

    spec = ImageSpec(image_size=image_size, spatial_dims=2, channels=1)
    ds = ImageDataset(index, resolve_data_root(data_root), spec, cache_dir=Path(cache_dir) if cache_dir else None)
    rows = np.asarray(ds.rows)
    if len(rows) != len(index):
        missing = sorted(set(range(len(index))) - set(rows.tolist()))
        paths = index["path"].iloc[missing[:5]].tolist()
        raise ValueError(f"{len(missing)} exported images could not be read for the pixel baselines, e.g. {paths}")
    out = np.empty((len(index), image_size, image_size), dtype=np.float32)
    for i in range(len(ds)):
        item = ds[i]
        out[int(item["row"])] = np.asarray(item["image"], dtype=np.float32)[0]
    return out


def random_encoder_features(model_name: str, model_config: dict[str, Any], images: np.ndarray, seed: int, batch_size: int = 256) -> FeatureSource:
    """Features of an untrained model of the pretrained architecture (the "no pretraining" control).

    Args:
        model_name: ``store.meta["model_name"]``.
        model_config: ``store.meta["model_config"]``.
        images: ``(N, H, W)`` images in [0, 1] at the model's input size.
        seed: seeds the random initialisation.
        batch_size: images per forward pass.
    """
    import torch

    from vqmed.export import compute_features
    from vqmed.export.features import codebooks
    from vqmed.networks import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = build_model(model_name, **model_config)
    model.eval()
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(images[start:start + batch_size]).unsqueeze(1)
        parts.append(compute_features(model, batch))
    keys = [k for k in FEATURE_ARRAYS if k in parts[0]]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    return FeatureSource(arrays, codebooks(model)["codebook"])


def run_benchmark_on_features(
    index: pd.DataFrame,
    sources: dict[str, FeatureSource],
    pixels: np.ndarray | None,
    cfg: BenchmarkConfig,
    out_dir: Path,
    meta: dict[str, Any] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """The benchmark engine on in-memory arrays: draws, probes, baselines, metrics, outputs, MLflow.

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

    Returns:
        the summary dictionary written to ``summary.json``.
    """
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    data = _prepare(index, cfg)
    methods, skipped = _build_methods(sources, pixels, cfg, len(index))
    if cfg.probes.standardize == "pool":
        _standardize_on_pool(methods, data["train_rows"])
    if not methods:
        raise ValueError("nothing to benchmark: no feature source and every pixel baseline disabled or without pixels")
    budgets = make_budgets(cfg.budgets.fractions, cfg.budgets.per_class)
    boot = StratifiedBootstrap(data["y_test"], cfg.metrics.bootstrap, cfg.metrics.ci, seed=cfg.seed)
    records: list[dict[str, Any]] = []
    timings: Counter[str] = Counter()

    # one task per budget, draw and method (the 100% budget is one draw: its methods still run side by side)
    tasks = [(b, d, m) for b in budgets for d in range(cfg.budgets.full_draws if b.is_full else cfg.budgets.draws) for m in methods]
    context = _DrawContext(methods, data, boot, cfg)
    with _limited_threads(cfg.threads), _mlflow_parent(cfg, meta, out_dir) as tracker, _draw_runner(context) as run_tasks:
        # results come back in task order, whatever the number of jobs: a budget is logged once its last task is in
        pending = Counter(b.name for b, _, _ in tasks)
        worker_cpu = 0.0  # CPU seconds spent in worker processes (with jobs > 1)
        for (budget, _, method), (task_records, task_cpu) in zip(tasks, run_tasks(tasks)):
            records += task_records
            timings[method] += task_cpu
            worker_cpu += task_cpu if cfg.jobs > 1 else 0.0
            pending[budget.name] -= 1
            if pending[budget.name]:
                continue
            budget_records = [r for r in records if r["budget"] == budget.name]
            tracker.log_budget(budget, budget_records, boot, cfg)
            if verbose:
                best = {r["method"]: r for r in budget_records if not r["candidate"]}
                aucs = ", ".join(
                    f"{m}={np.mean([r['metrics']['auc'][0] for r in budget_records if r['method'] == m]):.3f}" for m in best
                )
                n_draws = len({r["draw"] for r in budget_records})
                print(
                    f"[benchmark] {budget.name:>8} x{n_draws} draws (total {time.perf_counter() - t_start:6.1f}s): {aucs}",
                    file=sys.stderr,
                    flush=True,
                )

        table = _long_table(records)
        summary_rows = _summarise(records, boot, cfg.seed)
        table.to_csv(out_dir / "benchmark.csv", index=False)
        summary = {
            "name": cfg.name,
            "seed": cfg.seed,
            "meta": meta,
            "n_train": len(data["y_train"]),
            "n_test": len(data["y_test"]),
            "test_positives": int(data["y_test"].sum()),
            "positive_label": cfg.positive_label,
            "ci_method": CI_METHOD,
            "threshold_method": "Youden's J on out-of-fold scores of the labeled subset (never the test set)",
            "selection_method": (
                "per method, budget and draw, on patient-grouped folds of the labeled subset: "
                + (
                    "the simplest candidate (classifier order of the config) whose pooled out-of-fold AUC is within one "
                    "standard error (Hanley-McNeil) of the best; hyper-parameters likewise (strongest regularisation first)"
                    if cfg.probes.selection == "one_se"
                    else "the candidate (feature variant x classifier) with the best pooled out-of-fold AUC; hyper-parameters likewise"
                )
            ),
            "standardization": (
                "feature mean/std of the whole training split, labels unused (every method alike)"
                if cfg.probes.standardize == "pool"
                else "feature mean/std of the labeled subset"
            ),
            "skipped_variants": skipped,
            "cpu_seconds_per_method": {k: round(v, 1) for k, v in sorted(timings.items())},
            "results": summary_rows,
            "config": to_dict(cfg),
        }
        summary["runtime_seconds"] = round(time.perf_counter() - t_start, 1)
        # CPU time of this process and its draw workers: what the run costs on an idle machine (wall time depends on load)
        summary["cpu_seconds"] = round(time.process_time() - cpu_start + worker_cpu, 1)
        summary["mlflow_parent_run_id"] = tracker.run_id
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        (out_dir / "summary.md").write_text(_markdown(summary_rows, summary))
        figures = _plots(summary_rows)
        for name, fig in figures.items():
            fig.savefig(out_dir / name, dpi=120, bbox_inches="tight", facecolor="white")
        tracker.finish(out_dir, summary_rows, figures)
    return summary


# --------------------------------------------------------------------------------------------------
# preparation
# --------------------------------------------------------------------------------------------------
def _prepare(index: pd.DataFrame, cfg: BenchmarkConfig) -> dict[str, np.ndarray]:
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
    train_rows = np.flatnonzero((split == cfg.train_split) & labelled)
    test_rows = np.flatnonzero((split == cfg.test_split) & labelled)
    for name, rows in ((cfg.train_split, train_rows), (cfg.test_split, test_rows)):
        classes = set(label[rows])
        if len(rows) == 0 or cfg.positive_label not in classes or len(classes) < 2:
            raise ValueError(
                f"split {name!r} needs labeled images of {cfg.positive_label!r} and of another class; found {sorted(classes)} in {len(rows)} rows"
            )
    y = (label == cfg.positive_label).astype(int)
    overlap = set(groups[train_rows]) & set(groups[test_rows])
    if overlap:
        logger.warning("%d patients have images in both %s and %s", len(overlap), cfg.train_split, cfg.test_split)
    return {
        "train_rows": train_rows,
        "test_rows": test_rows,
        "y_train": y[train_rows],
        "y_test": y[test_rows],
        "groups_train": groups[train_rows],
    }


def _build_methods(
    sources: dict[str, FeatureSource], pixels: np.ndarray | None, cfg: BenchmarkConfig, n_rows: int
) -> tuple[dict[str, list[_Candidate]], dict[str, list[str]]]:
    """Methods and their candidates, the feature matrices computed once for every row."""
    methods: dict[str, list[_Candidate]] = {}
    skipped: dict[str, list[str]] = {}
    for source_name, source in sources.items():
        if source_name == "random_encoder" and not cfg.baselines.random_encoder:
            continue
        for key, arr in source.arrays.items():
            if len(arr) != n_rows:
                raise ValueError(f"source {source_name!r}: array {key!r} has {len(arr)} rows, the index {n_rows}")
        matrices: dict[str, np.ndarray] = {}
        for variant in cfg.probes.variants:
            try:
                matrices[variant] = feature_variant(variant, source.arrays, source.codebook)
            except KeyError as exc:
                skipped.setdefault(source_name, []).append(f"{variant}: {exc.args[0]}")
        # The method itself: the first available variant with every classifier, in config order (the
        # one-standard-error rule prefers earlier, simpler ones), plus the CNN on the code maps. The other
        # variants are methods of their own (``vqvae:code_histogram``): with a few dozen labels,
        # cross-validation cannot tell feature designs apart, so the table compares them instead.
        # The random encoder, a control for the method, gets the first variant only (and, if the config says
        # so, fewer classifiers: cross-validation picks logistic regression for it at almost every budget).
        variants = list(matrices.items())
        control = source_name == "random_encoder"
        extra = variants[1:] if not control else []
        classifiers = cfg.baselines.random_encoder_classifiers if control and cfg.baselines.random_encoder_classifiers else cfg.probes.classifiers
        for variant, X in variants[:1] + extra:
            name = source_name if variant == variants[0][0] else f"{source_name}:{variant}"
            methods[name] = [_Candidate(f"{variant}+{c}", c, X) for c in classifiers if c in SKLEARN_PROBES]
        if "code_cnn" in classifiers:
            codes = source.arrays.get("codes")
            if codes is None or source.codebook is None or codes.ndim != 3:
                skipped.setdefault(source_name, []).append("codes+code_cnn: needs 2D 'codes' and a codebook")
            else:
                methods.setdefault(source_name, []).append(_Candidate("codes+code_cnn", "code_cnn", np.asarray(codes), source.codebook))
        for name in [n for n, c in methods.items() if not c]:
            del methods[name]  # e.g. only code_cnn asked for and the source has no code maps
    b = cfg.baselines
    if pixels is not None:
        if len(pixels) != n_rows:
            raise ValueError(f"pixels have {len(pixels)} rows, the index {n_rows}")
        flat = pixels.reshape(len(pixels), -1).astype(np.float32)
        if b.raw_pixels:
            methods["raw_pixels_logreg"] = [_Candidate("pixels+logreg", "logreg", flat)]
        if b.pca:
            methods["pca_logreg"] = [_Candidate("pixels+pca_logreg", "pca_logreg", flat)]
        if b.cnn_scratch:
            methods["cnn_scratch"] = [_Candidate("pixels+image_cnn", "image_cnn", pixels.astype(np.float32))]
    return methods, skipped


def _standardize_on_pool(methods: dict[str, list[_Candidate]], pool_rows: np.ndarray) -> None:
    """Scale every scikit-learn candidate's features by the mean and standard deviation of the whole
    training split (labels unused), in place; the probes then skip their own scaler.

    This is the unlabeled archive at work: with 10 labeled images, per-feature scales estimated on
    those 10 rows are mostly noise, while the archive gives them almost exactly. Every method gets
    the same treatment, raw pixels included. The test split never enters the statistics.
    """
    # the classifiers of one variant share one matrix; the original stays referenced so its id is not reused
    scaled: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for candidates in methods.values():
        for cand in candidates:
            if cand.probe not in (*SKLEARN_PROBES, "pca_logreg"):
                continue  # the CNNs see code maps / images, not feature vectors
            if id(cand.X) not in scaled:
                X = cand.X.reshape(len(cand.X), -1).astype(np.float32, copy=False)
                mean = X[pool_rows].mean(axis=0, dtype=np.float64)
                std = X[pool_rows].std(axis=0, dtype=np.float64)
                # constant features (e.g. a never-used code) stay 0 rather than dividing by zero
                scaled[id(cand.X)] = (cand.X, ((X - mean) / np.where(std > 1e-8, std, 1.0)).astype(np.float32))
            cand.X = scaled[id(cand.X)][1]


def _derive_seed(*parts: Any) -> int:
    """A 31-bit seed from the config seed and names: independent of budget order and method set."""
    words = [zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


# --------------------------------------------------------------------------------------------------
# one draw, and the workers that run draws side by side
# --------------------------------------------------------------------------------------------------
@dataclass
class _DrawContext:
    """What every draw task needs besides its budget, draw and method: sent once per worker process."""

    methods: dict[str, list[_Candidate]]
    data: dict[str, np.ndarray]
    boot: StratifiedBootstrap
    cfg: BenchmarkConfig


#: the context of this process's draw tasks (set by ``_draw_runner``, in the parent or in each worker).
#: Module state because the feature matrices are hundreds of MB: they reach a worker once, as
#: memory-mapped files, not once per task.
_CONTEXT: _DrawContext | None = None


def _set_context(ctx: _DrawContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def _open_context(spec: dict[str, list[tuple[str, str, str, np.ndarray | None]]], data: dict[str, np.ndarray], boot: StratifiedBootstrap, cfg: BenchmarkConfig) -> None:
    """Worker initializer: the context, its feature matrices memory-mapped from the parent's ``.npy`` files."""
    opened: dict[str, np.ndarray] = {}
    methods = {
        method: [_Candidate(name, probe, opened.setdefault(path, np.load(path, mmap_mode="r")), codebook) for name, probe, path, codebook in cands]
        for method, cands in spec.items()
    }
    _set_context(_DrawContext(methods, data, boot, cfg))


def _run_task(budget: Budget, draw: int, method: str) -> tuple[list[dict[str, Any]], float]:
    """One method on one draw: its records and the CPU seconds they took."""
    if _CONTEXT is None:
        raise RuntimeError("draw task run outside _draw_runner")
    ctx = _CONTEXT
    t0 = time.process_time()
    with _limited_threads(ctx.cfg.threads):
        records = _run_draw(budget, draw, method, ctx.methods[method], ctx.data, ctx.boot, ctx.cfg)
    return records, time.process_time() - t0


@contextmanager
def _draw_runner(ctx: _DrawContext) -> Iterator[Any]:
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


def _largest_first(pool: Any, tasks: list[tuple[Budget, int, str]], ctx: _DrawContext) -> Iterator[tuple[list[dict[str, Any]], float]]:
    """Submit the costliest tasks first (most labels, then most candidates), yield results in task order.

    In task order the 100% budget comes last, and its single draw of the method (~4 CPU-min at 12k
    features) would run alone at the end while the other workers idle; started first, it runs beside
    the many small tasks. The results, and so every output, do not depend on the submission order.
    """
    from tqdm.auto import tqdm

    classes = dict(zip(*np.unique(ctx.data["y_train"], return_counts=True)))

    def cost(task: tuple[Budget, int, str]) -> tuple[int, int]:
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
    candidates: list[_Candidate],
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
    fits: list[tuple[ProbeFit, _Candidate]] = []
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



# --------------------------------------------------------------------------------------------------
# summaries and outputs
# --------------------------------------------------------------------------------------------------
def _long_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """``benchmark.csv``: one row per method, budget, draw and metric."""
    rows = []
    for r in records:
        for metric in METRICS:
            value, lo, hi = r["metrics"][metric]
            rows.append(
                {
                    "method": r["method"],
                    "budget": r["budget"],
                    "n_labels": r["n_labels"],
                    "n_pos": r["n_pos"],
                    "n_neg": r["n_neg"],
                    "n_patients": r["n_patients"],
                    "draw": r["draw"],
                    "metric": metric,
                    "value": value,
                    "ci_low": lo,
                    "ci_high": hi,
                    "selected": r["selected"],
                    "cv_auc": r["cv_auc"],
                    "threshold": r["threshold"],
                    "params": json.dumps(r["params"], default=_json_default, sort_keys=True),
                }
            )
    return pd.DataFrame(rows)


def _summarise(records: list[dict[str, Any]], boot: StratifiedBootstrap, seed: int) -> list[dict[str, Any]]:
    """One row per method and budget: means, spreads and CIs over draws (see :data:`CI_METHOD`)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    alpha = (1.0 - boot.ci) / 2.0
    out = []
    for (method, budget), rs in groups.items():
        aucs = np.array([r["metrics"]["auc"][0] for r in rs])
        mat = np.stack([r["auc_boot"] for r in rs])  # (draws, resamples), same test resamples in every row
        rng = np.random.default_rng([int(seed), zlib.crc32(f"{method}|{budget}".encode())])
        pick = rng.integers(0, len(rs), size=(mat.shape[1], len(rs)))
        means = mat[pick, np.arange(mat.shape[1])[:, None]].mean(axis=1)
        lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
        n_labels = np.array([r["n_labels"] for r in rs])
        row: dict[str, Any] = {
            "method": method,
            "candidate": bool(rs[0]["candidate"]),
            "budget": budget,
            "budget_kind": rs[0]["budget_kind"],
            "n_labels": float(n_labels.mean()),
            "n_labels_min": int(n_labels.min()),
            "n_labels_max": int(n_labels.max()),
            "n_draws": len(rs),
            "auc_mean": float(aucs.mean()),
            "auc_ci_low": float(lo),
            "auc_ci_high": float(hi),
            "auc_std": float(aucs.std(ddof=1)) if len(rs) > 1 else None,  # undefined for one draw
            "auc_draw_ci_low": float(np.mean([r["metrics"]["auc"][1] for r in rs])),
            "auc_draw_ci_high": float(np.mean([r["metrics"]["auc"][2] for r in rs])),
            "auc_per_draw": aucs.tolist(),
            "cv_auc_mean": float(np.mean([r["cv_auc"] for r in rs])),
        }
        for metric in METRICS[1:]:
            vals = np.array([r["metrics"][metric][0] for r in rs])
            row[f"{metric}_mean"] = float(vals.mean())
            row[f"{metric}_std"] = float(vals.std(ddof=1)) if len(rs) > 1 else None
        if not row["candidate"]:
            row["selected"] = dict(Counter(r["selected"] for r in rs).most_common())
        out.append(row)

    def order(row: dict[str, Any]) -> tuple:
        base = row["method"].split("[")[0].split(":")[0]
        rank = PRIMARY_ORDER.index(base) if base in PRIMARY_ORDER else len(PRIMARY_ORDER)
        return (row["candidate"], rank, row["method"], row["n_labels"])

    return sorted(out, key=order)


def _budget_columns(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Budgets as table columns: the balanced k-per-class ones first, then the fractions, each ascending."""
    seen: dict[str, tuple[int, float]] = {}
    for r in rows:
        seen.setdefault(r["budget"], (0 if r["budget_kind"] == "per_class" else 1, r["n_labels"]))
    return [(b, n) for b, (_, n) in sorted(seen.items(), key=lambda kv: kv[1])]


def _markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """``summary.md``: a wide AUC table (methods x budgets), the details, the candidates."""
    primary = [r for r in rows if not r["candidate"]]
    cands = [r for r in rows if r["candidate"]]
    budgets = _budget_columns(primary)
    lines = [
        f"# Low-label benchmark: {summary['name']}",
        "",
        (
            f"Test split: {summary['n_test']} images ({summary['test_positives']} {summary['positive_label']}), never used "
            f"for any choice. Training split: {summary['n_train']} images. Seed {summary['seed']}."
        ),
    ]
    if summary["meta"].get("pretrain_run_id"):
        lines.append(f"Pretraining MLflow run: `{summary['meta']['pretrain_run_id']}`.")
    lines += [
        "",
        "## Test ROC AUC (mean over draws [95% CI], ± std across draws)",
        "",
        "| method | " + " | ".join(f"{b} (n={n:g})" for b, n in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for r in primary:
        by_method.setdefault(r["method"], {})[r["budget"]] = r
    for method, cells in by_method.items():
        vals = []
        for b, _ in budgets:
            r = cells.get(b)
            vals.append("" if r is None else f"{r['auc_mean']:.3f} [{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}]{_pm(r['auc_std'])}")
        lines.append(f"| {method} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "## All metrics (mean ± std across draws; threshold from out-of-fold scores of the labeled subset)",
        "",
        "| method | budget | labels | draws | AUC | AUC 95% CI | CV AUC | balanced acc. | sensitivity | specificity | accuracy | most selected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in primary:
        sel = r.get("selected") or {}
        top = next(iter(sel.items()), ("", 0))
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['n_labels']:g} | {r['n_draws']} | {r['auc_mean']:.3f}{_pm(r['auc_std'])} | "
            f"[{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}] | {r['cv_auc_mean']:.3f} | "
            f"{r['balanced_accuracy_mean']:.3f}{_pm(r['balanced_accuracy_std'])} | {r['sensitivity_mean']:.3f} | "
            f"{r['specificity_mean']:.3f} | {r['accuracy_mean']:.3f} | {top[0]} ({top[1]}/{r['n_draws']}) |"
        )
    if cands:
        cb = _budget_columns(cands)
        lines += [
            "",
            "## Every candidate (test AUC, mean over draws; for analysis only: the method rows above never look at these)",
            "",
            "| candidate | " + " | ".join(b for b, _ in cb) + " |",
            "|---|" + "---|" * len(cb),
        ]
        by_cand: dict[str, dict[str, float]] = {}
        for r in cands:
            by_cand.setdefault(r["method"], {})[r["budget"]] = r["auc_mean"]
        for name, cells in by_cand.items():
            lines.append(f"| {name} | " + " | ".join(f"{cells[b]:.3f}" if b in cells else "" for b, _ in cb) + " |")
    lines += ["", "## How to read this", "", summary["ci_method"], "", summary["selection_method"] + ".", ""]
    return "\n".join(lines)


def _pm(std: float | None) -> str:
    return "" if std is None else f" ±{std:.3f}"


def _plots(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``label_efficiency.png`` over the fraction budgets (the split's own class balance) and, when
    both kinds are run, ``label_efficiency_per_class.png`` over the balanced k-per-class budgets:
    the two protocols differ in class balance, so one line through both would zigzag."""
    from vqmed.tracking import label_efficiency_plot

    primary = [r for r in rows if not r["candidate"]]
    kinds = [k for k in ("fraction", "per_class") if any(r["budget_kind"] == k for r in primary)]
    figures = {}
    for i, kind in enumerate(kinds):
        df = pd.DataFrame(
            [
                {"method": r["method"], "n_labels": r["n_labels"], "auc_mean": r["auc_mean"], "auc_low": r["auc_ci_low"], "auc_high": r["auc_ci_high"]}
                for r in primary
                if r["budget_kind"] == kind
            ]
        )
        what = "share of the training split" if kind == "fraction" else "k labels per class (balanced)"
        name = "label_efficiency.png" if i == 0 else "label_efficiency_per_class.png"
        figures[name] = label_efficiency_plot(df, title=f"Test ROC AUC vs labels, {what}")
    return figures


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------------
# threads and MLflow
# --------------------------------------------------------------------------------------------------
@contextmanager
def _limited_threads(threads: int) -> Iterator[None]:
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


def _metric_key(text: str) -> str:
    # MLflow metric names: letters, digits, _ - . / and spaces
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in text)


class _Tracker:
    """The parent MLflow run and its nested runs (one per method and budget)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_budget(self, budget: Budget, records: list[dict[str, Any]], boot: StratifiedBootstrap, cfg: BenchmarkConfig) -> None:
        import mlflow

        from vqmed.tracking import log_metrics, log_params

        rows = _summarise(records, boot, cfg.seed)
        candidates = [r for r in rows if r["candidate"]]
        for row in (r for r in rows if not r["candidate"]):
            method = row["method"]
            with mlflow.start_run(run_name=f"{method} @ {budget.name}", nested=True):
                mlflow.set_tags({"vqmed.stage": "benchmark", "vqmed.method": method, "vqmed.budget": budget.name})
                log_params(
                    {
                        "method": method,
                        "budget": budget.name,
                        "budget_kind": budget.kind,
                        "budget_value": budget.value,
                        "n_draws": row["n_draws"],
                        "n_labels_mean": row["n_labels"],
                    }
                )
                for r in (r for r in records if r["method"] == method):
                    log_metrics({f"draw/{m}": r["metrics"][m][0] for m in METRICS} | {"draw/cv_auc": r["cv_auc"], "draw/n_labels": r["n_labels"]}, step=r["draw"])
                log_metrics({k: row[k] for k in row if isinstance(row[k], float) and not k.startswith("n_labels")} | {"n_labels": row["n_labels"]}, step=0)
                prefix = f"{method}["
                log_metrics({_metric_key(f"candidate/{c['method'][len(prefix):-1]}/auc_mean"): c["auc_mean"] for c in candidates if c["method"].startswith(prefix)}, step=0)
                if row.get("selected"):
                    mlflow.log_dict(row["selected"], "selected_candidates.json")

    def finish(self, out_dir: Path, rows: list[dict[str, Any]], figures: dict[str, Any]) -> None:
        import mlflow

        from vqmed.tracking import log_figure, log_metrics

        for row in (r for r in rows if not r["candidate"]):
            step = round(row["n_labels"])
            log_metrics({_metric_key(f"auc_mean/{row['method']}"): row["auc_mean"]}, step=step)
        for name in ("benchmark.csv", "summary.json", "summary.md"):
            mlflow.log_artifact(str(out_dir / name))
        for name, fig in figures.items():
            log_figure(fig, name)


@contextmanager
def _mlflow_parent(cfg: BenchmarkConfig, meta: dict[str, Any], out_dir: Path) -> Iterator[_Tracker]:
    import mlflow

    from vqmed.tracking import log_params, setup_mlflow

    setup_mlflow(cfg.tracking.tracking_uri, cfg.tracking.experiment)
    with mlflow.start_run(run_name=cfg.name) as run:
        tags = {"vqmed.stage": "benchmark", "vqmed.out_dir": str(out_dir.resolve())}
        for key in ("pretrain_run_id", "model_ref", "model_id", "export"):
            if meta.get(key):
                tags[f"vqmed.{key}"] = str(meta[key])
        if meta.get("pretrain_run_id"):
            tags["mlflow.note.content"] = (
                f"Low-label benchmark of the encoder pretrained in MLflow run `{meta['pretrain_run_id']}` "
                f"(export `{meta.get('export', '?')}`). Nested runs: one per method and label budget."
            )
        mlflow.set_tags(tags)
        log_params(to_dict(cfg))
        yield _Tracker(run.info.run_id)
