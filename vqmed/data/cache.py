"""On-disk cache of decoded, resized images: memory-mapped uint8 chunks, one folder per spec.

Layout: ``CACHE_DIR/<spec.key()>/chunk-*.npy`` (uint8 ``[N, C, S, S(, S)]``) with a sibling
``chunk-*.keys.json`` listing the content key of every slot (``null`` for a slot whose decode failed).
A content key is ``blake2b(file bytes)`` plus ``@format`` for files not read by PIL (DICOM, NIfTI, IDX:
their reader is chosen by the name) and ``#frame`` for multi-frame files, so an edited file is decoded
again while a renamed or copied one is not; the spec key covers the transform version.

8 bits are plenty for [0, 1] network inputs and make an epoch a memory-mapped read. Chunks are
immutable: each is written to a temporary name and atomically renamed (``.npy`` first, its key list
last, so a chunk is visible only when complete). A ``flock`` on ``.lock`` makes concurrent builders
(e.g. two DDP ranks) wait for one another instead of decoding the same files twice; if locking is
unavailable, the atomic renames still keep the cache consistent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from vqmed.atomic import atomic_write_text, commit_temporary, remove_stale_temporaries, temporary_path
from vqmed.data.transforms import ImageSpec

try:
    import fcntl
except ImportError:  # Windows: no flock; atomic renames still apply
    fcntl = None  # type: ignore[assignment]


def file_digest(path: Path) -> str:
    """blake2b-128 of the file's bytes (the content part of a cache key); for a DICOM series folder, of its
    files' names and digests (an edited, added or removed slice changes it)."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for child in sorted(p for p in path.iterdir() if p.is_file()):
            h.update(f"{child.name}\0{file_digest(child)}\0".encode())
        return h.hexdigest()
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (round to nearest)."""
    return np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def from_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return np.asarray(arr, dtype=np.float32) * np.float32(1.0 / 255.0)


class Round8Bitd(MapTransform):
    """``from_uint8(to_uint8(x))``: the values a [0, 1] image has once stored in this cache, as a MONAI transform
    (the MONAI bundle's chain ends with it so its inputs equal :class:`vqmed.data.ImageDataset`'s).

    Args:
        keys: keys of [0, 1] float arrays.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = from_uint8(to_uint8(d[key]))
        return d


class CacheStore:
    """The cache folder of one :class:`ImageSpec`.

    Args:
        cache_dir: root cache folder (created if needed).
        spec: the spec whose images live here.
    """

    def __init__(self, cache_dir: Path, spec: ImageSpec) -> None:
        self.spec = spec
        self.dir = Path(cache_dir) / spec.key()
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "spec.json"
        if not info.exists():
            atomic_write_text(info, json.dumps({"spec": spec.__dict__, "key": spec.key()}, indent=1))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock across processes for the find-missing / decode / write sequence."""
        if fcntl is None:
            yield
            return
        with open(self.dir / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            except OSError:  # e.g. a network file system without locks
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def index(self) -> dict[str, tuple[str, int]]:
        """Map content key -> (chunk file name, slot) over every complete chunk."""
        out: dict[str, tuple[str, int]] = {}
        for keys_file in sorted(self.dir.glob("chunk-*.keys.json")):
            npy = keys_file.name[: -len(".keys.json")] + ".npy"
            if not (self.dir / npy).exists():
                continue
            try:
                keys = json.loads(keys_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable index: ignore the chunk, its images are decoded again
            for slot, key in enumerate(keys):
                if key is not None and key not in out:
                    out[key] = (npy, slot)
        return out

    def remove_stale_temporaries(self) -> None:
        """Delete half-written chunks of crashed builders; call only while holding :meth:`lock`
        (every chunk writer holds it, so any temporary chunk seen then is abandoned)."""
        remove_stale_temporaries(self.dir, suffix=".npy")

    def new_chunk(self, n: int) -> tuple[np.memmap, Path]:
        """A writable memory-mapped ``.npy`` of ``n`` images under a temporary name."""
        tmp = temporary_path(self.dir / "chunk.npy")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *self.spec.shape))
        return arr, tmp

    def commit_chunk(self, arr: np.memmap, tmp: Path, keys: list[str | None]) -> str:
        """Flush, rename into place and publish the key list; returns the chunk file name."""
        arr.flush()
        del arr
        name = f"chunk-{uuid.uuid4().hex}"
        commit_temporary(tmp, self.dir / f"{name}.npy")
        atomic_write_text(self.dir / f"{name}.keys.json", json.dumps(keys))
        return f"{name}.npy"

    def open(self, chunk: str) -> np.ndarray:
        """Read-only memory map of a chunk."""
        return np.load(self.dir / chunk, mmap_mode="r")
