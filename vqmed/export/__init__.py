"""Export room: a frozen pretrained encoder turned into per-study features on disk, and back.

Owns the writer (``export_manifest``: batched, sharded, resumable, DDP-aware, privacy-preserving
export of code maps and pooled embeddings), the per-batch features (``compute_features``) and the
store (``load`` -> :class:`ExportStore`: Parquet index, arrays gathered from shards, codebook, and
``decode`` back to images). Store layout: see :mod:`vqmed.export.store`.
"""

from vqmed.export.features import compute_features
from vqmed.export.store import ExportStore, StoreError, load
from vqmed.export.writer import export_manifest

__all__ = ["export_manifest", "compute_features", "load", "ExportStore", "StoreError"]
