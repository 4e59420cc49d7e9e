"""Batched, sharded, resumable export of a manifest through a frozen encoder."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from vqmed.data import ImageDataset, ImageSpec, ManifestError, Quarantine, read_manifest, resolve_data_root
from vqmed.data.manifest import duplicate_study_ids
from vqmed.data.privacy import resolve_salt, salted_id
from vqmed.atomic import TMP_PREFIX, atomic_write, atomic_write_json
from vqmed.config import ExportConfig
from vqmed.export.features import codebook_hash, codebooks, compute_features, select_arrays
from vqmed.export.store import (
    FORMAT,
    GRID_BEFORE_SETTING,
    INDEX_FILE,
    META_FILE,
    QUARANTINE_FILE,
    SHARDS_DIR,
    StoreError,
    order_index,
    read_parts,
)
from vqmed.models_io import load_model, model_fingerprint
from vqmed.models_io.runtime import Runtime, barrier, init_runtime, shutdown

REQUIRED_COLUMNS = ("study_id", "path")
# Manifest columns copied into the index. Anything else (free text, raw patient ids) stays behind.
COPIED_COLUMNS = ("split", "label", "modality", "format", "instance", "frame")
DEFAULT_SHARD_SIZE = 1024


def _quiet() -> bool:
    return bool(os.environ.get("CI"))


def image_spec(meta: dict[str, Any]) -> ImageSpec:
    """The image spec the model was pretrained with (``config.data`` of its checkpoint)."""
    data = (meta.get("config") or {}).get("data") or {}
    model_cfg = meta.get("model_config") or {}
    if "image_size" not in data:
        raise StoreError(
            f"{meta.get('checkpoint')}: checkpoint has no config.data.image_size; cannot tell what size to resize images to"
        )
    return ImageSpec(
        image_size=int(data["image_size"]),
        spatial_dims=int(data.get("spatial_dims", model_cfg.get("spatial_dims", 2))),
        channels=int(data.get("channels", model_cfg.get("in_channels", 1))),
        spacing=tuple(data["spacing"]) if data.get("spacing") else None,
        resize=str(data.get("resize", "squeeze")),  # checkpoints from before these modes: squeeze + minmax
        intensity=str(data.get("intensity", "minmax")),
    )


def row_keys(manifest: pd.DataFrame, salt: str) -> list[str]:
    """A salted key per manifest row: what the export resumes by (study, file, frame, series)."""
    columns = [c for c in ("study_id", "path", "frame", "series_id") if c in manifest.columns]
    values = zip(*(manifest[c].tolist() for c in columns))
    return [salted_id("export-row", "\x1f".join("" if _missing(v) else str(v) for v in row), salt) for row in values]


def salt_check(salt: str) -> str:
    """A fingerprint of the id salt, stored so that resuming with another salt is refused."""
    return salted_id("salt-check", "vqmed", salt)


@contextmanager
def _store_lock(out: Path, active: bool) -> Iterator[None]:
    """Exclusive lock on the store for one export at a time (released by the kernel if killed)."""
    if not active:
        yield
        return
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{out}: another export is writing to this store") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clean_orphans(out: Path) -> int:
    """Remove what a killed run left half-written: temp files and shard arrays without an index part."""
    removed = 0
    for folder in (out, out / SHARDS_DIR, out / "nifti"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            orphan = path.name.startswith(TMP_PREFIX) or (
                folder.name == SHARDS_DIR and path.suffix == ".npz" and not path.with_suffix(".parquet").exists()
            )
            if orphan and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _check_or_write_meta(out: Path, meta: dict[str, Any], write: bool) -> None:
    path = out / META_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("model_id") != meta["model_id"]:
            raise StoreError(
                f"{out}: holds codes of model {old.get('model_id')} ({old.get('model_ref')}), not of "
                f"{meta['model_id']} ({meta['model_ref']}); export this model to another directory"
            )
        if old.get("salt_check") != meta["salt_check"]:
            raise StoreError(f"{out}: was written with another id salt (set VQMED_ID_SALT as for the first export)")
        if bool(old.get("keep_ids")) != meta["keep_ids"]:
            raise StoreError(f"{out}: was written with keep_ids={old.get('keep_ids')}; use the same setting to resume")
        if bool(old.get("keep_paths", True)) != meta["keep_paths"]:  # stores from before the option kept paths
            raise StoreError(f"{out}: was written with keep_paths={old.get('keep_paths', True)}; use the same setting to resume")
        grid = old.get("grid", GRID_BEFORE_SETTING)
        if grid != meta["grid"]:
            raise StoreError(f"{out}: was written with grid={grid}; use the same grid to resume")
        if old.get("arrays") != meta["arrays"]:
            raise StoreError(f"{out}: array shapes differ from this export's ({old.get('arrays')} vs {meta['arrays']})")
        return
    if write:
        atomic_write_json(path, meta)


def _chunks(manifest: pd.DataFrame, mine: list[int], chunk: int, root: Path, spec: ImageSpec,
            cache_dir: Path | None) -> Iterator[tuple[list[int], ImageDataset]]:
    """Decoded datasets of consecutive ``chunk``-row slices of this rank's rows, one chunk ahead.

    :class:`ImageDataset` decodes every row when it is built, so the export builds one per chunk:
    memory holds at most two chunks of images whatever the manifest size, and the next chunk is
    decoded in a background thread while the current one is encoded.
    """
    def build(positions: list[int]) -> ImageDataset:
        subset = manifest.iloc[positions].reset_index(drop=True)
        return ImageDataset(subset, root, spec, cache_dir=cache_dir, fail_fast=False, progress=False)

    slices = [mine[i:i + chunk] for i in range(0, len(mine), chunk)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqmed-export-decode") as pool:
        pending = pool.submit(build, slices[0]) if slices else None
        for k, positions in enumerate(slices):
            ds = pending.result()
            pending = pool.submit(build, slices[k + 1]) if k + 1 < len(slices) else None
            yield positions, ds


def _batches(chunks: Iterator[tuple[list[int], ImageDataset]], batch_size: int, quarantine: Quarantine,
             bar: Any) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """``(images [B, C, *spatial], manifest positions)``; batches run across chunk borders, so the
    batching (hence every float) does not depend on the shard size. Unreadable rows are quarantined."""
    images: list[torch.Tensor] = []
    rows: list[int] = []
    for positions, ds in chunks:
        quarantine.merge(ds.quarantine)
        bar.update(len(positions) - len(ds))
        for i in range(len(ds)):
            item = ds[i]
            images.append(item["image"])
            rows.append(positions[int(item["row"])])
            if len(images) == batch_size:
                yield torch.stack(images), rows
                images, rows = [], []
    if images:
        yield torch.stack(images), rows


class _ShardWriter:
    """Buffers per-image features and commits them as shards of ``shard_size`` images."""

    def __init__(self, out: Path, shard_size: int, rank: int, fixed: dict[str, Any]) -> None:
        self.shards = out / SHARDS_DIR
        self.shard_size = shard_size
        self.token = f"{int(time.time() * 1000):013d}-r{rank:03d}-{secrets.token_hex(3)}"
        self.seq = 0
        self.fixed = fixed
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.frames: list[pd.DataFrame] = []
        self.buffered = 0
        self.committed = 0

    def add(self, features: dict[str, np.ndarray], rows: pd.DataFrame) -> None:
        for name, value in features.items():
            self.arrays.setdefault(name, []).append(value)
        self.frames.append(rows)
        self.buffered += len(rows)
        while self.buffered >= self.shard_size:
            self._commit(self.shard_size)

    def flush(self) -> None:
        if self.buffered:
            self._commit(self.buffered)

    def _commit(self, n: int) -> None:
        name = f"part-{self.token}-{self.seq:05d}"
        self.seq += 1
        merged = {k: np.concatenate(v) for k, v in self.arrays.items()}
        arrays = {k: v[:n] for k, v in merged.items()}
        self.arrays = {k: [v[n:]] for k, v in merged.items()}
        rows = pd.concat(self.frames, ignore_index=True)
        index, rest = rows.iloc[:n].reset_index(drop=True), rows.iloc[n:].reset_index(drop=True)
        self.frames, self.buffered = [rest], len(rest)
        index["shard"] = name
        index["shard_row"] = np.arange(n, dtype=np.int64)
        index["export_time"] = pd.Timestamp.now(tz="UTC")
        for key, value in self.fixed.items():
            index[key] = value
        # Arrays first, index part second: the part is the commit mark (see vqmed.export.store).
        atomic_write(self.shards / f"{name}.npz", lambda h: np.savez(h, **arrays))
        atomic_write(self.shards / f"{name}.parquet", lambda h: index.to_parquet(h, index=False))
        self.committed += n


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) or value == ""


def _index_rows(manifest: pd.DataFrame, positions: list[int], keys: list[str], salt: str, keep_ids: bool,
                shapes: dict[str, str], keep_paths: bool = False) -> pd.DataFrame:
    """Index rows of the given manifest positions: whitelisted columns, ids hashed unless ``keep_ids``,
    the path only with ``keep_paths`` (file and folder names may identify a patient; ``row`` and ``key``
    lead back to the manifest, which keeps the path)."""
    sub = manifest.iloc[positions]
    study = sub["study_id"].astype(str)
    rows = pd.DataFrame({
        "key": [keys[p] for p in positions],
        "study_id": study.to_list() if keep_ids else [salted_id("study", v, salt) for v in study],
        "row": np.asarray(positions, dtype=np.int64),
    })
    if keep_paths:
        rows.insert(2, "path", sub["path"].astype(str).to_list())
    for column in COPIED_COLUMNS:
        if column in sub.columns:
            rows[column] = sub[column].reset_index(drop=True)  # keeps nullable dtypes (Int64 frame)
    if "series_id" in sub.columns:
        rows["series_id"] = [None if _missing(v) else (str(v) if keep_ids else salted_id("series", str(v), salt))
                             for v in sub["series_id"]]
    # Patients are grouped by a salted hash only, whatever keep_ids says; no patient id: the study is its own.
    patient = sub["patient_id"] if "patient_id" in sub.columns else pd.Series([None] * len(sub), index=sub.index)
    rows["patient_key"] = [salted_id("patient", str(s if _missing(p) else p), salt)
                           for s, p in zip(sub["study_id"], patient)]
    for name, value in shapes.items():
        rows[name] = value
    return rows


def _reduce_counts(counts: list[int], runtime: Runtime) -> list[int]:
    if not runtime.distributed:
        return counts
    device = runtime.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def export_manifest(
    model_ref: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    batch_size: int = ExportConfig.batch_size,
    keep_ids: bool = ExportConfig.keep_ids,
    write_nifti: bool = ExportConfig.nifti,
    progress: bool = True,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    cache_dir: str | Path | None = ExportConfig.cache_dir,
    device: str = ExportConfig.device,
    arrays: list[str] | None = ExportConfig.arrays,
    keep_paths: bool = ExportConfig.keep_paths,
    grid: int = ExportConfig.grid,
) -> dict[str, Any]:
    """Export code maps and pooled embeddings of every manifest image into a sharded store.

    Idempotent and resumable: images already in the store (same model id) are skipped; a run killed
    at any moment leaves only whole shards, and the next run exports the rest. Under ``torchrun``
    each rank exports the manifest rows ``i`` with ``i % world_size == rank`` into its own shards.

    Args:
        model_ref: checkpoint file, pretraining run directory or MLflow run id.
        manifest_path: manifest CSV (columns ``study_id``, ``path``; ``split``, ``label``, ``patient_id``,
            ``modality``, ``frame``, ``series_id`` optional).
        out_dir: the store directory (created if needed).
        data_root: root the manifest paths are relative to (``None``: ``VQMED_DATA_ROOT`` or ``../shared/data``).
        batch_size: images per encoder call.
        keep_ids: keep the manifest's study/series ids instead of salted hashes.
        write_nifti: also write each 3D code map as NIfTI on the scan's grid (``nifti/KEY.nii.gz``).
        progress: show a progress bar (always off when ``CI`` is set).
        shard_size: images per shard file.
        cache_dir: image cache of :class:`vqmed.data.ImageDataset` (e.g. the pretraining's ``.vqmed_cache``,
            to reuse images decoded then); ``None`` decodes in memory, one shard's worth at a time.
        device: ``auto``, ``cpu`` or ``cuda``.
        arrays: feature arrays to write (names of :data:`vqmed.export.features.ARRAYS`; the code maps
            always); ``None``: every array the model gives. The defaults are :class:`vqmed.config.ExportConfig`'s.
        keep_paths: also write each image's path into the index and ``quarantine.csv``.
        grid: cells per axis of the pooled grids (``encoder_grid`` and its spread, ``continuous_grid``).

    Returns:
        summary: ``exported``, ``skipped`` (already in the store or duplicated in the manifest),
        ``quarantined`` (unreadable), ``manifest_rows``, ``index_rows``, ``seconds``, ``studies_per_s``,
        ``model_id``, ``out``.
    """
    start = time.perf_counter()
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: manifest not found")
    manifest = read_manifest(manifest_path).reset_index(drop=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"{manifest_path}: manifest lacks column(s) {missing} (has {list(manifest.columns)})")
    # Refused before anything is written: two index rows with one id would be two studies to every reader.
    dups = duplicate_study_ids(manifest)
    if dups:
        shown = ", ".join(dups[:10]) + (f" and {len(dups) - 10} more" if len(dups) > 10 else "")
        raise ManifestError(f"{manifest_path}: {len(dups)} study id(s) listed for more than one image, patient or split: "
                            f"{shown}; fix the manifest (vqmed manifest check lists them) and export again")

    was_initialized = dist.is_available() and dist.is_initialized()
    runtime = init_runtime(device)
    try:
        return _export(model_ref, manifest, Path(out_dir), data_root, batch_size, keep_ids,
                       write_nifti, progress, shard_size, None if cache_dir is None else Path(cache_dir), runtime, start,
                       None if arrays is None else tuple(arrays), keep_paths, manifest_path, grid)
    finally:
        if not was_initialized:
            shutdown(runtime)


def _export(model_ref: str | Path, manifest: pd.DataFrame, out: Path,
            data_root: str | Path | None, batch_size: int, keep_ids: bool, write_nifti: bool, progress: bool,
            shard_size: int, cache_dir: Path | None, runtime: Runtime, start: float,
            arrays: tuple[str, ...] | None, keep_paths: bool = False,
            manifest_path: Path | None = None, grid: int = ExportConfig.grid) -> dict[str, Any]:
    # One function on purpose (~85 lines): the store lock spans the meta check, the orphan clean-up, this
    # rank's rows and the index rewrite, and every rank must pass the same barriers in the same order.
    model, info = load_model(model_ref, map_location="cpu")
    spec = image_spec(info)
    if write_nifti and spec.spatial_dims != 3:
        raise ValueError("write_nifti needs a 3D model (spatial_dims 3)")
    model_id = model_fingerprint(model, info["model_name"], info["model_config"])
    books = codebooks(model)
    book_hash = codebook_hash(books)
    model = model.to(runtime.device).eval()
    root = Path(resolve_data_root(None if data_root is None else str(data_root)))
    salt = resolve_salt()

    # Feature shapes from one blank image, so every rank agrees on store.json before any data is read.
    probe = torch.zeros((1, spec.channels) + (spec.image_size,) * spec.spatial_dims, device=runtime.device)
    shapes_probe = select_arrays(compute_features(model, probe, grid), arrays)
    arrays_meta = {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in sorted(shapes_probe.items())}
    model_ref_str = str(Path(model_ref).resolve()) if Path(model_ref).exists() else str(model_ref)
    meta = {
        "format": FORMAT,
        "model_id": model_id,
        "model_ref": model_ref_str,
        "model_name": info["model_name"],
        "model_config": info["model_config"],
        "checkpoint_step": info.get("step"),
        "pretrain_run_id": info.get("mlflow_run_id"),
        "codebook_hash": book_hash,
        "levels": int(getattr(model, "levels", 1)),
        "image_spec": {"image_size": spec.image_size, "spatial_dims": spec.spatial_dims, "channels": spec.channels,
                       "resize": spec.resize, "intensity": spec.intensity,
                       **({"spacing": list(spec.spacing)} if spec.spacing else {})},
        "arrays": arrays_meta,
        "grid": int(grid),  # the random-encoder control pools on the same grid
        "keep_ids": bool(keep_ids),
        "keep_paths": bool(keep_paths),
        "salt_check": salt_check(salt),
        # where the paths are: the index holds none (unless keep_paths); the benchmark's pixel baselines read them here
        "manifest": str(manifest_path.resolve()) if manifest_path is not None else None,
    }
    shapes = {f"{k}_shape": "x".join(str(s) for s in v.shape[1:]) for k, v in shapes_probe.items() if k.startswith("codes")}

    out.mkdir(parents=True, exist_ok=True)
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    with _store_lock(out, runtime.is_main):
        _check_or_write_meta(out, meta, write=runtime.is_main)
        if runtime.is_main:
            for name, book in books.items():
                if not (out / f"{name}.npy").is_file():
                    atomic_write(out / f"{name}.npy", lambda h, b=book: np.save(h, b))
            clean_orphans(out)
        barrier(runtime)

        keys = row_keys(manifest, salt)
        done = set(read_parts(out, columns=["key"]).get("key", pd.Series(dtype=str)))
        seen: set[str] = set()
        pending = []
        for pos, key in enumerate(keys):
            if key not in done and key not in seen:
                pending.append(pos)
            seen.add(key)
        skipped = len(keys) - len(pending)
        # Rank r owns rows i with i % world == r: disjoint whatever each rank saw committed.
        mine = [pos for pos in pending if pos % runtime.world_size == runtime.rank]

        exported, quarantined = _run(model, manifest, mine, keys, root, spec, out, salt, keep_ids, shapes,
                                     write_nifti, batch_size, shard_size, cache_dir, progress, runtime,
                                     {"model_id": model_id, "codebook_hash": book_hash}, arrays, keep_paths, grid)
        if codebook_hash(codebooks(model)) != book_hash:
            raise RuntimeError("the codebook changed during export; the model is not frozen in eval mode")

        exported, quarantined = _reduce_counts([exported, quarantined], runtime)
        barrier(runtime)
        index_rows = None
        if runtime.is_main:
            index = order_index(read_parts(out))
            atomic_write(out / INDEX_FILE, lambda h: index.to_parquet(h, index=False))
            index_rows = len(index)
        barrier(runtime)
    seconds = time.perf_counter() - start
    return {
        "exported": exported,
        "skipped": skipped,
        "quarantined": quarantined,
        "manifest_rows": len(manifest),
        "index_rows": index_rows,
        "seconds": round(seconds, 3),
        "studies_per_s": round(exported / seconds, 2) if seconds > 0 else None,
        "model_id": model_id,
        "out": str(out),
    }


def _run(model: nn.Module, manifest: pd.DataFrame, mine: list[int], keys: list[str], root: Path, spec: ImageSpec,
         out: Path, salt: str, keep_ids: bool, shapes: dict[str, str], write_nifti: bool, batch_size: int,
         shard_size: int, cache_dir: Path | None, progress: bool, runtime: Runtime,
         fixed: dict[str, Any], arrays: tuple[str, ...] | None, keep_paths: bool = False,
         grid: int = ExportConfig.grid) -> tuple[int, int]:
    """Encode this rank's rows batch by batch and commit shards as they fill; returns (exported, quarantined)."""
    # Unreadable files are never committed, so every run retries them and rewrites this list.
    quarantine_csv = out / (QUARANTINE_FILE if runtime.world_size == 1 else f"quarantine-r{runtime.rank}.csv")
    quarantine_csv.unlink(missing_ok=True)
    if not mine:
        return 0, 0
    show = progress and runtime.is_main and not _quiet()
    writer = _ShardWriter(out, shard_size, runtime.rank, fixed)
    nifti = None
    if write_nifti:
        from vqmed.export.nifti import NiftiWriter

        nifti = NiftiWriter(out / "nifti", root, spec)
    quarantine = Quarantine()
    bar = tqdm(total=len(mine), desc="export", unit="img", disable=not show, dynamic_ncols=True)
    try:
        chunks = _chunks(manifest, mine, shard_size, root, spec, cache_dir)
        for images, positions in _batches(chunks, batch_size, quarantine, bar):
            features = select_arrays(compute_features(model, images.to(runtime.device), grid), arrays)
            index_rows = _index_rows(manifest, positions, keys, salt, keep_ids, shapes, keep_paths)
            if nifti is not None:
                # NIfTI files land before the shard that lists them is committed.
                paths = manifest["path"].iloc[positions].astype(str).tolist()
                index_rows["nifti"] = [nifti.write(key, codes, path) for key, codes, path in
                                       zip(index_rows["key"], features["codes"], paths)]
            writer.add(features, index_rows)
            bar.update(len(positions))
        writer.flush()
    finally:
        bar.close()
    if quarantine.entries:
        quarantine.write(quarantine_csv, keep_paths=keep_paths)
    return writer.committed, len(quarantine)
