"""Benchmark inputs: the export store, the images for the pixel baselines, the random-encoder control,
the validation patients, and the methods' candidate feature matrices built from them.

Everything a benchmark reads from disk is read here, once per run; the draw engine
(:mod:`vqmed.downstream.engine`) only ever sees in-memory arrays. The image geometry (size, 2D/3D,
channels) comes from the export's ``store.json`` (the model's pretraining config), never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vqmed.config import BenchmarkConfig, ConfigError
from vqmed.downstream.features import FEATURE_ARRAYS, feature_variant
from vqmed.downstream.probes import SKLEARN_PROBES

__all__ = [
    "Candidate",
    "FeatureSource",
    "build_methods",
    "load_images",
    "load_inputs",
    "random_encoder_features",
    "standardize_on_pool",
    "store_validation_keys",
]


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
class Candidate:
    """One classifier on one feature matrix: a method is a list of these, chosen between by CV."""

    name: str
    probe: str
    X: np.ndarray  # every index row; sliced per draw
    codebook: np.ndarray | None = None  # for code_cnn: the source's codebook


# --------------------------------------------------------------------------------------------------
# the store and the images
# --------------------------------------------------------------------------------------------------
def load_inputs(cfg: BenchmarkConfig) -> tuple[Any, pd.DataFrame, dict[str, FeatureSource], np.ndarray | None]:
    """The store, its index, the feature sources (pretrained and random encoder) and the pixels.

    With ``evaluate_on: validation`` only the rows of the training split are kept (arrays sliced
    alike): the test split's images are then never decoded, let alone scored.
    """
    from vqmed.export import load

    store = load(cfg.export)
    index = store.index.reset_index(drop=True)
    keep = None
    if cfg.evaluate_on == "validation":
        keep = np.flatnonzero(index["split"].astype(str).to_numpy() == cfg.train_split)
        index = index.iloc[keep].reset_index(drop=True)
    names = [n for n in FEATURE_ARRAYS if n in store.array_names]
    arrays = {n: store.array(n) if keep is None else store.array(n)[keep] for n in names}
    sources = {"vqvae": FeatureSource(arrays, store.codebook)}
    spec = _store_spec(store.meta, cfg)
    b = cfg.baselines
    pixels = None
    if b.raw_pixels or b.pca or b.cnn_scratch or b.random_encoder:
        index = with_paths(index, store.meta)
    if b.raw_pixels or b.pca or b.cnn_scratch:
        images = load_images(index, cfg.data_root, {**spec, "image_size": cfg.image_size}, cfg.cache_dir)
        # grey images as (N, *spatial), the pixel baselines' layout; colour keeps its channel axis
        pixels = images[:, 0] if spec["channels"] == 1 else images
    if b.random_encoder:
        size = spec["image_size"]
        if pixels is not None and size == cfg.image_size:
            images = pixels[:, None] if spec["channels"] == 1 else pixels
        else:
            images = load_images(index, cfg.data_root, spec, cfg.cache_dir)
        sources["random_encoder"] = random_encoder_features(store.meta["model_name"], store.meta["model_config"], images,
                                                            cfg.seed, grid=store.grid)
    return store, index, sources, pixels


def with_paths(index: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
    """``index`` with each row's ``path`` (and ``frame``) looked up in the export's manifest by the row key.

    Stores hold no paths unless exported with ``keep_paths`` (names may identify patients); the manifest
    the export read (``store.json`` ``manifest``) does, and its salted row keys are the index's ``key``.
    """
    if "path" in index.columns:
        return index
    from vqmed.data import read_manifest
    from vqmed.data.privacy import resolve_salt
    from vqmed.export.writer import row_keys

    source = meta.get("manifest")
    if not source or not Path(source).is_file():
        raise ConfigError(f"the export holds no image paths and its manifest ({source}) is not there; the pixel "
                          "baselines need it (or export with --keep-paths)")
    manifest = read_manifest(Path(source))
    by_key = dict(zip(row_keys(manifest, resolve_salt()), range(len(manifest))))
    rows = [by_key.get(k) for k in index["key"]]
    if any(r is None for r in rows):
        raise ConfigError(f"{sum(r is None for r in rows)} exported rows are not in the export's manifest {source} "
                          "(was it edited since?)")
    out = index.copy()
    out["path"] = manifest["path"].iloc[rows].to_numpy()
    if "frame" not in out.columns:
        out["frame"] = manifest["frame"].iloc[rows].to_numpy()
    return out


def _store_spec(meta: dict[str, Any], cfg: BenchmarkConfig) -> dict[str, Any]:
    """The model's input geometry from ``store.json`` (older stores: the model config, then 2D grey)."""
    spec = dict(meta.get("image_spec") or {})
    model_cfg = meta.get("model_config") or {}
    return {
        "image_size": int(spec.get("image_size", cfg.image_size)),
        "spatial_dims": int(spec.get("spatial_dims", model_cfg.get("spatial_dims", 2))),
        "channels": int(spec.get("channels", model_cfg.get("in_channels", 1))),
        "resize": str(spec.get("resize", "squeeze")),
        "intensity": str(spec.get("intensity", "minmax")),
    }


def load_images(index: pd.DataFrame, data_root: str | None, spec: dict[str, int], cache_dir: str | None) -> np.ndarray:
    """Every index row's image as ``(N, C, *spatial)`` float32 in [0, 1], read once per run.

    Uses :class:`vqmed.data.ImageDataset`, i.e. exactly the pretraining/export preprocessing.

    Args:
        index: rows with ``path`` (and ``frame`` where the export has it).
        data_root: root of the paths (``None``: ``VQMED_DATA_ROOT`` or ``../shared/data``).
        spec: ``image_size``, ``spatial_dims`` and ``channels`` (the store's image spec).
        cache_dir: the dataset's image cache (``None``: decode in memory).

    Raises:
        ValueError: when some rows cannot be read (the export read them, so the data changed).
    """
    from vqmed.data import ImageDataset, ImageSpec, resolve_data_root

    image_spec = ImageSpec(image_size=spec["image_size"], spatial_dims=spec["spatial_dims"], channels=spec["channels"],
                           spacing=tuple(spec["spacing"]) if spec.get("spacing") else None,
                           resize=spec.get("resize", "squeeze"), intensity=spec.get("intensity", "minmax"))
    ds = ImageDataset(index, resolve_data_root(data_root), image_spec, cache_dir=Path(cache_dir) if cache_dir else None)
    rows = np.asarray(ds.rows)
    if len(rows) != len(index):
        missing = sorted(set(range(len(index))) - set(rows.tolist()))
        ids = index["study_id"].iloc[missing[:5]].tolist() if "study_id" in index.columns else missing[:5]
        raise ValueError(f"{len(missing)} exported images could not be read for the pixel baselines, e.g. studies {ids}")
    out = np.empty((len(index), *image_spec.shape), dtype=np.float32)
    for i in range(len(ds)):
        item = ds[i]
        out[int(item["row"])] = np.asarray(item["image"], dtype=np.float32)
    return out


def random_encoder_features(model_name: str, model_config: dict[str, Any], images: np.ndarray, seed: int,
                            grid: int, batch_size: int = 256) -> FeatureSource:
    """Features of an untrained model of the pretrained architecture (the "no pretraining" control).

    Args:
        model_name: ``store.meta["model_name"]``.
        model_config: ``store.meta["model_config"]``.
        images: ``(N, C, *spatial)`` images in [0, 1] at the model's input size.
        seed: seeds the random initialisation.
        grid: cells per axis of the pooled grids: the export's (``store.grid``), so the control reads what
            the method reads.
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
        parts.append(compute_features(model, torch.as_tensor(images[start:start + batch_size]), grid))
    keys = [k for k in FEATURE_ARRAYS if k in parts[0]]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    return FeatureSource(arrays, codebooks(model)["codebook"])


def store_validation_keys(cfg: BenchmarkConfig, meta: dict[str, Any]) -> set[str]:
    """The listed validation patients as the store's ``patient_key`` values.

    The store groups patients by a salted hash only (raw ids never leave the data room), so the list's
    ids are hashed with this machine's id salt, after checking it is the salt the export used.

    Raises:
        ConfigError: the store was exported with another id salt (no listed patient could match).
    """
    from vqmed.data import read_patient_list
    from vqmed.data.privacy import resolve_salt, salted_id
    from vqmed.export.writer import salt_check

    salt = resolve_salt()
    if meta.get("salt_check") and meta["salt_check"] != salt_check(salt):
        raise ConfigError(
            f"validation_patients: the export {cfg.export} was written with another id salt, so its patient keys "
            "cannot be matched to the list; set VQMED_ID_SALT as for the export"
        )
    return {salted_id("patient", p, salt) for p in read_patient_list(cfg.validation_patients)}


# --------------------------------------------------------------------------------------------------
# methods: candidate feature matrices for every row
# --------------------------------------------------------------------------------------------------
def build_methods(
    sources: dict[str, FeatureSource], pixels: np.ndarray | None, cfg: BenchmarkConfig, n_rows: int
) -> tuple[dict[str, list[Candidate]], dict[str, list[str]]]:
    """Methods and their candidates, the feature matrices computed once for every row; and what was skipped."""
    methods: dict[str, list[Candidate]] = {}
    skipped: dict[str, list[str]] = {}
    for source_name, source in sources.items():
        if source_name == "random_encoder" and not cfg.baselines.random_encoder:
            continue
        _source_methods(source_name, source, cfg, n_rows, methods, skipped)
    b = cfg.baselines
    if pixels is not None:
        if len(pixels) != n_rows:
            raise ValueError(f"pixels have {len(pixels)} rows, the index {n_rows}")
        flat = pixels.reshape(len(pixels), -1).astype(np.float32)
        if b.raw_pixels:
            methods["raw_pixels_logreg"] = [Candidate("pixels+logreg", "logreg", flat)]
        if b.pca:
            methods["pca_logreg"] = [Candidate("pixels+pca_logreg", "pca_logreg", flat)]
        if b.cnn_scratch and pixels.ndim != 3:
            skipped.setdefault("cnn_scratch", []).append(f"image_cnn: needs 2D grey images, got {pixels.shape[1:]}")
        elif b.cnn_scratch:
            methods["cnn_scratch"] = [Candidate("pixels+image_cnn", "image_cnn", pixels.astype(np.float32))]
    return methods, skipped


def _source_methods(
    source_name: str,
    source: FeatureSource,
    cfg: BenchmarkConfig,
    n_rows: int,
    methods: dict[str, list[Candidate]],
    skipped: dict[str, list[str]],
) -> None:
    """Add one feature source's methods (``vqvae``, ``vqvae:VARIANT``, ...) to ``methods``."""
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
        methods[name] = [Candidate(f"{variant}+{c}", c, X) for c in classifiers if c in SKLEARN_PROBES]
    if "code_cnn" in classifiers:
        codes = source.arrays.get("codes")
        if codes is None or source.codebook is None or codes.ndim != 3:
            skipped.setdefault(source_name, []).append("codes+code_cnn: needs 2D 'codes' and a codebook")
        else:
            methods.setdefault(source_name, []).append(Candidate("codes+code_cnn", "code_cnn", np.asarray(codes), source.codebook))
    for name in [n for n, c in methods.items() if not c]:
        del methods[name]  # e.g. only code_cnn asked for and the source has no code maps


def standardize_on_pool(methods: dict[str, list[Candidate]], pool_rows: np.ndarray) -> None:
    """Scale every scikit-learn candidate's features by the mean and standard deviation of the pool rows
    (the training split, or its non-validation patients; labels unused), in place; the probes then skip
    their own scaler.

    This is the unlabeled archive at work: with 10 labeled images, per-feature scales estimated on
    those 10 rows are mostly noise, while the archive gives them almost exactly. Every method gets
    the same treatment, raw pixels included. The scored rows never enter the statistics.
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
