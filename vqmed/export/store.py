"""The export store on disk and ``load`` to read it back.

Layout of a store directory::

    store.json          what made it: model id/name/config/ref, codebook hash, image spec, format
    codebook.npy        (K, D) float32 codebook of the finest level (codebook_top.npy for two levels)
    shards/NAME.npz     arrays of up to ``shard_size`` images (codes, pooled embeddings), uncompressed
    shards/NAME.parquet the shard's index part; written (atomically) only AFTER its arrays, so a part
                        file is the shard's commit mark: arrays without a part are orphans of a killed
                        run and are ignored, then removed by the next export
    index.parquet       merged view of every part (rewritten at the end of each export; rebuilt from
                        the parts at load if it is stale)
    quarantine.csv      files the last export could not read, with the reason
    nifti/KEY.nii.gz    optional code maps of 3D volumes as NIfTI on the scan's grid

A million studies is about a thousand shard pairs, never one file per study.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vqmed.atomic import TMP_PREFIX

FORMAT = "vqmed-export-v1"
META_FILE = "store.json"
INDEX_FILE = "index.parquet"
SHARDS_DIR = "shards"
QUARANTINE_FILE = "quarantine.csv"
# The pooled grid of stores written before ``grid`` was an export setting (their store.json has no ``grid``).
GRID_BEFORE_SETTING = 4

__all__ = ["ExportStore", "load", "StoreError"]


class StoreError(RuntimeError):
    """A store directory is missing, incomplete or was written by another model."""


# ------------------------------------------------------------------------------------------ reading
def shard_parts(directory: Path) -> list[Path]:
    """Committed index parts (their arrays are on disk), in name order."""
    shards = Path(directory) / SHARDS_DIR
    if not shards.is_dir():
        return []
    return sorted(p for p in shards.glob("*.parquet") if not p.name.startswith(TMP_PREFIX))


def read_parts(directory: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Concatenate every committed index part (optionally only some columns)."""
    parts = shard_parts(directory)
    if not parts:
        return pd.DataFrame(columns=columns or [])
    return pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True)


def order_index(index: pd.DataFrame) -> pd.DataFrame:
    """Manifest order, then commit order; one row per key (the first committed wins)."""
    if index.empty:
        return index.reset_index(drop=True)
    index = index.sort_values(["row", "shard", "shard_row"], kind="stable")
    return index.drop_duplicates("key", keep="first").reset_index(drop=True)


def merged_index(directory: Path) -> pd.DataFrame:
    """The merged index: ``index.parquet`` when it covers exactly the committed parts, else rebuilt."""
    directory = Path(directory)
    parts = {p.stem for p in shard_parts(directory)}
    merged = directory / INDEX_FILE
    if merged.is_file():
        index = pd.read_parquet(merged)
        if set(index["shard"].unique() if "shard" in index.columns else ()) == parts:
            return index
    return order_index(read_parts(directory))


class ExportStore:
    """Read access to an export store written by :func:`vqmed.export.export_manifest`.

    Args:
        directory: the store directory (the export's ``--out``).

    Attributes:
        index: one row per exported image (frame / volume): ``study_id`` (salted hash unless the
            export kept ids), ``path`` (relative to the data root, as in the manifest), ``split``,
            ``label``, ``modality``, ``format``, ``instance``, ``frame``, ``series_id`` (hashed) when
            the manifest has them, ``patient_key`` (salted hash of the patient id, for grouping),
            ``codes_shape`` (and ``codes_top_shape``), ``model_id``, ``codebook_hash``,
            ``export_time``, ``key`` (salted row key the export resumes by), ``row`` (position in
            the exporting manifest), ``nifti`` (3D with NIfTI output) and where the arrays live
            (``shard``, ``shard_row``). Ordered by manifest position, then commit order.
        meta: ``store.json``: ``model_ref``, ``model_name``, ``model_config``, ``model_id``,
            ``codebook_hash``, ``pretrain_run_id``, ``image_spec``, ``arrays``, ``grid``.
        codebook: ``(K, D)`` float32 codebook of the finest level; ``codebook_top`` for two levels.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise StoreError(f"{self.directory}: not an export store (no {META_FILE})")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise StoreError(f"{meta_path}: unknown store format {self.meta.get('format')!r} (expected {FORMAT})")
        self.index: pd.DataFrame = merged_index(self.directory)
        self.codebook: np.ndarray = np.load(self.directory / "codebook.npy")
        top = self.directory / "codebook_top.npy"
        self.codebook_top: np.ndarray | None = np.load(top) if top.is_file() else None
        self._model: torch.nn.Module | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def grid(self) -> int:
        """Cells per axis of the store's pooled grids (``encoder_grid``, ``continuous_grid``)."""
        return int(self.meta.get("grid", GRID_BEFORE_SETTING))

    @property
    def array_names(self) -> list[str]:
        return sorted(self.meta.get("arrays", {}))

    def array(self, name: str) -> np.ndarray:
        """Array ``name`` for every index row, in index order (gathered from the shards).

        Args:
            name: ``codes``, ``codes_top``, ``quantized_mean``, ``code_histogram``(``_top``) or
                ``continuous_mean``.
        """
        info = self.meta.get("arrays", {}).get(name)
        if info is None:
            raise KeyError(f"{self.directory}: no array {name!r}; available: {self.array_names}")
        out = np.empty((len(self.index), *info["shape"]), dtype=np.dtype(info["dtype"]))
        if out.shape[0] == 0:
            return out
        shards = self.directory / SHARDS_DIR
        positions = np.arange(len(self.index))
        for shard, group in self.index.groupby("shard", sort=False):
            with np.load(shards / f"{shard}.npz") as arrays:
                # npz members load one at a time: only this array of the shard is read.
                out[positions[group.index]] = arrays[name][group["shard_row"].to_numpy()]
        return out

    def model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The exporting model (loaded once from ``meta['model_ref']``), checked against the model id."""
        if self._model is None:
            from vqmed.models_io import load_model, model_fingerprint

            model, info = load_model(self.meta["model_ref"], map_location="cpu")
            found = model_fingerprint(model, info["model_name"], info["model_config"])
            if found != self.meta["model_id"]:
                raise StoreError(
                    f"{self.meta['model_ref']}: model id {found} differs from the store's {self.meta['model_id']}; "
                    "the checkpoint changed since the export"
                )
            self._model = model
        return self._model.to(device)

    @torch.no_grad()
    def decode(self, codes: np.ndarray | torch.Tensor, codes_top: np.ndarray | torch.Tensor | None = None,
               device: str | torch.device = "cpu") -> torch.Tensor:
        """Images reconstructed by the model's decoder from exported code maps.

        Args:
            codes: ``(N, *latent)`` code maps (e.g. ``store.array('codes')[:8]``); one map without the
                batch axis is accepted too.
            codes_top: the top-level maps for a two-level model (defaults to none, required there).
            device: where to run the decoder.

        Returns:
            ``(N, C, *spatial)`` float tensor, equal to the model's own reconstruction of the images.
        """
        model = self.model(device)
        latent = tuple(self.meta["arrays"]["codes"]["shape"])

        def as_long(c: np.ndarray | torch.Tensor, shape: tuple) -> torch.Tensor:
            t = torch.as_tensor(np.asarray(c).astype(np.int64)) if not torch.is_tensor(c) else c.long()
            return (t.unsqueeze(0) if t.dim() == len(shape) else t).to(device)

        indices: Any = as_long(codes, latent)
        if int(getattr(model, "levels", 1)) == 2:
            if codes_top is None:
                raise ValueError("this two-level model needs codes_top as well (store.array('codes_top'))")
            indices = (indices, as_long(codes_top, tuple(self.meta["arrays"]["codes_top"]["shape"])))
        return model.decode_indices(indices)


def load(directory: str | Path) -> ExportStore:
    """Open an export store: ``store.index``, ``store.array(name)``, ``store.codebook``, ``store.decode``."""
    return ExportStore(directory)
