"""The cached image dataset and its quarantine of unreadable files."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from vqmed.data.cache import CacheStore, file_digest, from_uint8, to_uint8
from vqmed.data.errors import UnreadableImageError
from vqmed.data.privacy import resolve_salt, salted_id
from vqmed.data.progress import progress_bar
from vqmed.data.readers import DEFAULT_MAX_PIXELS, check_source, detect_format, safe_path
from vqmed.data.transforms import ImageSpec, deterministic_transform, run_transform


@dataclass
class Quarantine:
    """Files that could not become model inputs, one ``(path, reason)`` per bad file.

    Args:
        entries: ``(path, reason)`` pairs; paths as written in the manifest (relative to the data root).
        study_ids: path -> the manifest's study id of that file (salted when written).
    """

    entries: list[tuple[str, str]] = field(default_factory=list)
    study_ids: dict[str, str] = field(default_factory=dict)

    def add(self, path: str, reason: str, study_id: str = "") -> None:
        """Record a bad file once (several frames of one corrupt file give one line)."""
        entry = (str(path), " ".join(str(reason).split()))
        if entry not in self.entries:
            self.entries.append(entry)
        if study_id:
            self.study_ids.setdefault(str(path), str(study_id))

    def merge(self, other: Quarantine) -> None:
        """Add every entry of ``other`` (with its study ids)."""
        for path, reason in other.entries:
            self.add(path, reason, other.study_ids.get(path, ""))

    def __len__(self) -> int:
        return len(self.entries)

    def write(self, csv_path: Path, keep_paths: bool = False) -> None:
        """Write ``study_id,reason`` lines (``path`` too with ``keep_paths``; CSV-quoted where needed).

        ``study_id`` is the salted id the export's index gives the study (``salted_id("study", id)``), or a
        salted id of the path for files outside a manifest: file and folder names may identify a patient.
        """
        salt = resolve_salt()
        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["study_id", "reason"] + (["path"] if keep_paths else []))
            for path, reason in self.entries:
                study = self.study_ids.get(path)
                sid = salted_id("study", study, salt) if study else salted_id("file", path, salt)
                writer.writerow([sid, reason] + ([path] if keep_paths else []))


class ImageDataset(Dataset):
    """Images of a manifest as the model sees them, decoded once and cached.

    On construction every row is read once (or found in the cache by the hash of its bytes and the
    spec); unreadable files are quarantined (or raise with ``fail_fast``). ``ds[i]`` returns
    ``{"image": float32 tensor [C,H,W(,D)] in [0, 1], "row": position of the row in the manifest}``, as it is:
    pretraining augments whole batches on their device (:class:`vqmed.data.augment.BatchAugmentation`).

    Args:
        manifest: manifest table (needs ``path``; ``frame`` used when present).
        data_root: folder that manifest paths are relative to.
        spec: output size / dimensionality / channels.
        cache_dir: cache folder (``None`` = keep the decoded images in memory only).
        fail_fast: raise :class:`UnreadableImageError` at the first bad file instead of quarantining.
        progress: show tqdm bars (also off when the ``CI`` environment variable is set).
        max_pixels: refuse files whose header declares more pixels than this, before decoding.
        allow_outside_root: allow manifest paths that resolve outside ``data_root``.

    Attributes:
        rows: ``np.ndarray`` of manifest row positions kept (``len(rows) == len(ds)``).
        quarantine: :class:`Quarantine` of the bad files.
        stats: counts: ``rows``, ``kept``, ``decoded`` (this construction), ``cached`` (found in the cache).
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        data_root: Path,
        spec: ImageSpec,
        cache_dir: Path | None = None,
        fail_fast: bool = False,
        progress: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allow_outside_root: bool = False,
    ) -> None:
        if "path" not in manifest.columns:
            raise ValueError("manifest has no 'path' column")
        self.spec = spec
        self.data_root = Path(data_root)
        self.fail_fast = fail_fast
        self.quarantine = Quarantine()
        self._max_pixels = max_pixels
        self._progress = progress

        paths = manifest["path"].astype(str).tolist()
        studies = manifest["study_id"].astype(str).tolist() if "study_id" in manifest.columns else [""] * len(paths)
        self._study_of = dict(zip(paths, studies))
        frames = _frames(manifest)
        # 1) Resolve and hash every row (the content key); bad paths are quarantined here.
        row_keys: list[str | None] = []
        key_source: dict[str, tuple[Path, str, int | None]] = {}
        digests: dict[Path, str] = {}
        for rel, frame in progress_bar(zip(paths, frames), total=len(paths), desc="hash files", enable=progress):
            try:
                path = safe_path(self.data_root, rel, allow_outside_root)
                if path not in digests:
                    check_source(path)  # a file, or a DICOM series folder
                    try:
                        digest = file_digest(path)
                    except OSError as exc:
                        raise UnreadableImageError(rel, f"cannot read file: {exc.strerror or exc}") from exc
                    # The name picks the reader (PIL alone goes by content): the same bytes as a.png and
                    # a.dcm decode differently, so without the format in the key a wrongly named copy
                    # would share (or spoil) the image of the good file.
                    fmt = detect_format(path)
                    digests[path] = digest if fmt == "image" else f"{digest}@{fmt}"
            except UnreadableImageError as exc:
                self._reject(rel, exc.reason)
                row_keys.append(None)
                continue
            key = digests[path] if frame is None else f"{digests[path]}#{frame}"
            row_keys.append(key)
            key_source.setdefault(key, (path, rel, frame))

        # 2) Decode what the cache lacks.
        self.stats = {"rows": len(paths), "decoded": 0, "cached": 0}
        self._failed: dict[str, str] = {}
        located = self._locate(key_source, cache_dir)

        # 3) Keep the rows whose image exists.
        kept, chunk_of, slot_of = [], [], []
        for i, key in enumerate(row_keys):
            if key is not None and key in located:
                chunk, slot = located[key]
                kept.append(i)
                chunk_of.append(chunk)
                slot_of.append(slot)
            elif key is not None:  # its decode failed (reason recorded per content key)
                self.quarantine.add(paths[i], self._failed.get(key, "not decoded"), studies[i])
        self.rows = np.asarray(kept, dtype=np.int64)
        self._chunk_of = np.asarray(chunk_of, dtype=np.int32)
        self._slot_of = np.asarray(slot_of, dtype=np.int64)
        self.stats["kept"] = len(kept)

    # ------------------------------------------------------------------ construction helpers

    def _reject(self, path: str, reason: str) -> None:
        if self.fail_fast:
            raise UnreadableImageError(path, reason)
        self.quarantine.add(path, reason, self._study_of.get(path, ""))

    def _locate(
        self, key_source: dict[str, tuple[Path, str, int | None]], cache_dir: Path | None
    ) -> dict[str, tuple[int, int]]:
        """Map every decodable content key to (array index, slot), decoding the missing ones."""
        transform = deterministic_transform(self.spec, self._max_pixels)
        if cache_dir is None:
            arr = np.zeros((len(key_source), *self.spec.shape), dtype=np.uint8)
            good = self._decode_into(arr, list(key_source.items()), transform)
            self._store, self._chunk_names, self._arrays = None, ["<memory>"], [arr]
            return {key: (0, slot) for slot, key in enumerate(key_source) if key in good}

        store = CacheStore(Path(cache_dir), self.spec)
        with store.lock():
            store.remove_stale_temporaries()
            index = store.index()
            missing = [(k, v) for k, v in key_source.items() if k not in index]
            if missing:
                arr, tmp = store.new_chunk(len(missing))
                try:
                    good = self._decode_into(arr, missing, transform)
                except BaseException:
                    del arr
                    tmp.unlink(missing_ok=True)
                    raise
                if good:
                    chunk = store.commit_chunk(arr, tmp, [k if k in good else None for k, _ in missing])
                    for slot, (k, _) in enumerate(missing):
                        if k in good:
                            index[k] = (chunk, slot)
                else:
                    del arr
                    tmp.unlink(missing_ok=True)
        self.stats["cached"] = sum(1 for k in key_source if k in index) - self.stats["decoded"]
        names = sorted({index[k][0] for k in key_source if k in index})
        number = {name: i for i, name in enumerate(names)}
        self._store, self._chunk_names, self._arrays = store, names, None
        return {k: (number[index[k][0]], index[k][1]) for k in key_source if k in index}

    def _decode_into(self, arr: np.ndarray, items: list, transform) -> set[str]:
        """Decode ``items`` (key -> (path, rel, frame)) into consecutive slots of ``arr``."""
        good: set[str] = set()
        bar = progress_bar(items, total=len(items), desc=f"decode {self.spec.key()}", enable=self._progress)
        for slot, (key, (path, rel, frame)) in enumerate(bar):
            try:
                img, _ = run_transform(transform, path, frame)
                if img.shape != self.spec.shape:
                    raise UnreadableImageError(rel, f"transform produced shape {img.shape}, expected {self.spec.shape}")
            except UnreadableImageError as exc:
                if self.fail_fast:
                    raise UnreadableImageError(rel, exc.reason) from exc
                self._failed[key] = exc.reason
                continue
            arr[slot] = to_uint8(img)
            good.add(key)
            self.stats["decoded"] += 1
        return good

    # ------------------------------------------------------------------ access

    def _array(self, chunk: int) -> np.ndarray:
        if self._arrays is None:  # opened lazily so that DataLoader workers map the files themselves
            self._arrays = [self._store.open(name) for name in self._chunk_names]
        return self._arrays[chunk]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._store is not None:
            state["_arrays"] = None  # memory maps are re-opened in the receiving process
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = torch.from_numpy(from_uint8(self._array(int(self._chunk_of[i]))[self._slot_of[i]]))
        return {"image": img, "row": int(self.rows[i])}


def _frames(manifest: pd.DataFrame) -> list[int | None]:
    if "frame" not in manifest.columns:
        return [None] * len(manifest)
    return [None if pd.isna(f) or f == "" else int(f) for f in manifest["frame"].tolist()]
