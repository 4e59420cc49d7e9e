"""The reader registry: what a file (or a DICOM series folder) is, its cheap header facts, and its pixels.

``READERS`` holds one :class:`Reader` per format, each backed by the library that owns the format: PIL for
PNG/JPEG/TIFF/BMP, pydicom for DICOM files (:mod:`vqmed.data.dicom`), nibabel for NIfTI, numpy for MNIST-style
IDX files, SimpleITK for MetaImage, NRRD and DICOM series (:mod:`vqmed.data.itk`). A reader says whether a path
is its format (``detect``), gives non-identifying header facts without decoding (``header``) and the pixels in
display orientation (``pixels``): float32 ``[C,H,W]`` (2D) or ``[C,H,W,D]`` (3D, axial slices inferior to
superior) in the file's own intensity units; scaling and resizing happen in the MONAI chain
(:mod:`vqmed.data.transforms`). A new format is one entry here and its tests. Every failure is an
:class:`UnreadableImageError` with a one-line reason.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vqmed.data import dicom, itk
from vqmed.data.errors import UnreadableImageError
from vqmed.data.orientation import display_affine, display_volume, volume_view

# 2**29 pixels (e.g. a 23,000^2 image or a 512x512x2048 volume): larger headers are refused unread.
DEFAULT_MAX_PIXELS = 1 << 29
# One 2D image or frame may declare at most 2**25 pixels (e.g. 5,792^2), whatever ``max_pixels`` says.
# Decoding keeps several full-size copies (decoder output, float32, resize: ~26 bytes per pixel), so
# a 20 KB JPEG whose header claims 12,000 x 12,000 pixels cost 3.8 GB and 15 s under the 3D-sized
# limit above. Real 2D scans are far smaller (a mammogram is ~4,096 x 5,120 = 21 M pixels).
# The value lives in vqmed.data.dicom (imported by this module), which applies it to DICOM frames.
MAX_2D_PIXELS = dicom.MAX_2D_PIXELS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
IDX_NAME = re.compile(r"-idx[1-9]-ubyte(\.gz)?$", re.IGNORECASE)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_ERRORS = (OSError, EOFError, zlib.error, ValueError)
_NIFTI_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError, TypeError)


def detect_format(path: Path) -> str | None:
    """The name of the first reader in :data:`READERS` that recognises ``path`` (by name, magic or folder); else ``None``."""
    path = Path(path)
    for reader in READERS.values():
        if reader.detect(path):
            return reader.name
    return None


def check_source(path: Path) -> None:
    """:func:`check_file` for files; a DICOM series folder must exist and be readable."""
    try:
        is_folder = Path(path).is_dir()
    except (OSError, ValueError):  # e.g. ENAMETOOLONG: check_file gives the reason
        is_folder = False
    if is_folder:
        if not os.access(path, os.R_OK | os.X_OK):
            raise UnreadableImageError(path, "permission denied")
        return
    check_file(path)


def check_file(path: Path) -> None:
    """Raise a clear reason for files that cannot even be opened (missing, broken link, empty, no permission)."""
    try:
        if path.is_symlink() and not path.exists():
            raise UnreadableImageError(path, "broken symbolic link")
        if not path.exists():
            raise UnreadableImageError(path, "file not found")
        if path.is_dir():
            raise UnreadableImageError(path, "is a directory, not a file")
        if not os.access(path, os.R_OK):
            raise UnreadableImageError(path, "permission denied")
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "empty file (0 bytes)")
    except (OSError, ValueError) as exc:
        # e.g. a name longer than the file system allows (ENAMETOOLONG) or a NUL byte in the path
        # (ValueError): a bad manifest row, not a crash of the whole dataset.
        raise UnreadableImageError(path, f"cannot access file: {getattr(exc, 'strerror', None) or exc}") from exc


def safe_path(data_root: Path, rel: str, allow_outside_root: bool = False) -> Path:
    """``data_root / rel``, refusing paths that escape the data root (``..``, absolute paths, or
    symbolic links pointing outside) unless ``allow_outside_root``."""
    if not rel:
        raise UnreadableImageError(rel, "empty path in manifest")
    if "\x00" in rel:  # os.path.realpath and every file call would raise ValueError on it
        raise UnreadableImageError(rel.replace("\x00", "\\x00"), "path contains a NUL byte")
    path = Path(data_root) / rel
    if not allow_outside_root:
        root = os.path.realpath(data_root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise UnreadableImageError(rel, "path escapes the data root (not allowed)")
    return path


# ----------------------------------------------------------------------------------- headers


def read_header(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """Cheap header facts (format, size, frames, modality, ...) without decoding pixels."""
    path = Path(path)
    check_source(path)
    return _reader(path, fmt).header(path)


def _reader(path: Path, fmt: str | None = None) -> Reader:
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        what = "folder without DICOM series" if path.is_dir() else f"file type {path.suffix or '(no suffix)'}"
        raise UnreadableImageError(path, f"unsupported {what}")
    return READERS[fmt]


def _idx_facts(path: Path) -> dict[str, Any]:
    dtype, shape = idx_header(path)
    return {"format": "idx", "size": "x".join(map(str, shape[1:])), "frames": shape[0],
            "channels": 1, "encoding": f"IDX {np.dtype(dtype).name}", "modality": "", "photometric": ""}


def _image_header(path: Path) -> dict[str, Any]:
    try:
        with Image.open(path) as im:
            w, h = im.size
            return {"format": (im.format or "").lower(), "size": f"{h}x{w}", "frames": getattr(im, "n_frames", 1),
                    "channels": len(im.getbands()), "encoding": f"{im.format} {im.mode}", "modality": "",
                    "photometric": im.mode}
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, f"refused: declared image size is absurd ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(path, f"unreadable image header: {exc}") from exc


def _nifti_header(path: Path) -> dict[str, Any]:
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        dtype = img.get_data_dtype()
    except _NIFTI_ERRORS as exc:
        raise UnreadableImageError(path, f"unreadable NIfTI header: {exc}") from exc
    return {"format": "nifti", "size": "x".join(map(str, shape)), "frames": shape[2] if len(shape) > 2 else 1,
            "channels": 1, "encoding": f"NIfTI {np.dtype(dtype).name}", "modality": "", "photometric": ""}


def idx_header(path: Path) -> tuple[str, tuple[int, ...]]:
    """dtype and shape declared by an IDX(.gz) header (MNIST format)."""
    try:
        with _open_idx(path) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise UnreadableImageError(path, "not an IDX file (bad magic number)")
            ndim = head[3]
            dims = fh.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise UnreadableImageError(path, "truncated IDX header")
    except _IDX_ERRORS as exc:
        raise UnreadableImageError(path, f"unreadable IDX file: {exc}") from exc
    return _IDX_DTYPES[head[2]], tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def idx_labels_path(images: Path) -> Path | None:
    """The labels file next to an IDX images file (``X-images-idx3-ubyte`` -> ``X-labels-idx1-ubyte``)."""
    if "-images-idx3-" not in images.name:
        return None
    candidate = images.with_name(images.name.replace("-images-idx3-", "-labels-idx1-"))
    return candidate if candidate.exists() else None


def read_idx(path: Path) -> np.ndarray:
    """The whole IDX array (memoised per file version, so 10,000 frame reads decompress once)."""
    st = path.stat()
    return _read_idx_cached(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_idx_cached(path_str: str, size: int, mtime_ns: int) -> np.ndarray:
    path = Path(path_str)
    dtype, shape = idx_header(path)
    offset = 4 + 4 * len(shape)
    try:
        with _open_idx(path) as fh:
            raw = fh.read()
    except _IDX_ERRORS as exc:
        raise UnreadableImageError(path, f"unreadable IDX file: {exc}") from exc
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) - offset < expected:
        raise UnreadableImageError(path, f"truncated IDX data ({len(raw) - offset} of {expected} bytes)")
    arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    arr.flags.writeable = False
    return arr


# ----------------------------------------------------------------------------------- pixels


def read_pixels(
    path: Path, frame: int | None = None, spatial_dims: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw pixels of any supported file, channel first, plus non-identifying header facts.

    Args:
        path: the file.
        frame: frame / slice index for multi-frame files (DICOM frame, NIfTI axial slice, IDX image,
            TIFF page); ``None`` = the middle one (IDX: required).
        spatial_dims: 2 -> ``[C,H,W]``; 3 -> ``[C,H,W,D]``, a stack of 2D views (NIfTI: axial slices
            of the RAS-reoriented volume, inferior to superior; DICOM: the frames; MetaImage/NRRD/DICOM
            series: as NIfTI).
        max_pixels: refuse files whose header declares more pixels than this, before decoding.

    Raises:
        UnreadableImageError: with a one-line reason.
    """
    path = Path(path)
    check_source(path)
    arr, facts = _reader(path).pixels(path, frame, spatial_dims, max_pixels)
    if arr.shape[0] not in (1, 3) or arr.ndim != spatial_dims + 1:
        raise UnreadableImageError(path, f"unexpected pixel array shape {arr.shape}")
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return arr, facts


def _read_image(path: Path, frame: int | None, spatial_dims: int, max_pixels: int) -> tuple[np.ndarray, dict]:
    if spatial_dims == 3:
        raise UnreadableImageError(path, "2D image file cannot make a 3D input")
    facts = _image_header(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise UnreadableImageError(path, f"header declares {w}x{h} pixels, more than max_pixels={max_pixels:,}")
            if w * h > dicom.MAX_2D_PIXELS:
                raise UnreadableImageError(
                    path, f"header declares {w}x{h} pixels, more than the 2D limit of {dicom.MAX_2D_PIXELS:,}"
                )
            if frame is not None and getattr(im, "n_frames", 1) > 1:
                im.seek(int(frame))
            # Respect EXIF orientation like every viewer; np.asarray keeps rows = height (no transpose).
            im = ImageOps.exif_transpose(im)
            im.load()  # truncated files fail here (PIL's LOAD_TRUNCATED_IMAGES stays False)
            if im.mode in ("1", "L", "LA", "P;L"):
                im = im.convert("L")
            elif im.mode.startswith("I") or im.mode == "F":
                pass  # 16/32-bit grey: keep the full range
            else:
                im = im.convert("RGB")  # RGB(A), palette, CMYK, YCbCr...; alpha dropped
            arr = np.asarray(im, dtype=np.float32)
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, f"refused: declared image size is absurd ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnreadableImageError(path, f"cannot decode image: {exc}") from exc
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return np.ascontiguousarray(arr), facts


def _read_nifti(path: Path, frame: int | None, spatial_dims: int, max_pixels: int) -> tuple[np.ndarray, dict]:
    facts = _nifti_header(path)
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        if len(shape) > 4 or len(shape) < 2:
            raise UnreadableImageError(path, f"NIfTI with {len(shape)} dimensions is not supported")
        declared = int(np.prod(shape[:3]))
        if declared > max_pixels:
            raise UnreadableImageError(path, f"header declares {declared:,} voxels, more than max_pixels={max_pixels:,}")
        # 4D (e.g. fMRI): the first volume only.
        data = img.dataobj[..., 0] if len(shape) == 4 else img.dataobj[...]
        arr = np.asarray(data, dtype=np.float32)
    except UnreadableImageError:
        raise
    except _NIFTI_ERRORS as exc:
        raise UnreadableImageError(path, f"cannot read NIfTI data: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    facts["affine"] = display_affine(img.affine, arr.shape).tolist()
    return volume_view(path, display_volume(arr, img.affine), frame, spatial_dims, facts, "NIfTI")


def _read_idx_frame(path: Path, frame: int | None, spatial_dims: int) -> tuple[np.ndarray, dict]:
    if spatial_dims == 3:
        raise UnreadableImageError(path, "IDX images are 2D and cannot make a 3D input")
    arr = read_idx(path)
    if arr.ndim != 3:
        raise UnreadableImageError(path, f"IDX file holds {arr.ndim}-D data, expected N x H x W images")
    k = arr.shape[0] // 2 if frame is None else int(frame)
    if not 0 <= k < arr.shape[0]:
        raise UnreadableImageError(path, f"frame {k} out of range (file has {arr.shape[0]})")
    facts = {"format": "idx", "size": f"{arr.shape[1]}x{arr.shape[2]}", "frames": arr.shape[0], "channels": 1,
             "encoding": f"IDX {arr.dtype.name}", "modality": "", "photometric": "", "frame": k}
    return arr[k][None].astype(np.float32), facts


# ----------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Reader:
    """One format of the registry.

    Args:
        name: the format's name (the manifest's ``format`` column, the cache key's suffix).
        detect: whether a path is this format (cheap: name, magic bytes, folder).
        header: non-identifying header facts without decoding pixels.
        pixels: ``(path, frame, spatial_dims, max_pixels) -> (float32 [C,H,W(,D)], facts)`` in display orientation.
    """

    name: str
    detect: Callable[[Path], bool]
    header: Callable[[Path], dict[str, Any]]
    pixels: Callable[[Path, int | None, int, int], tuple[np.ndarray, dict[str, Any]]]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or (path.is_file() and dicom.is_dicom_file(path))


#: Tried in order by :func:`detect_format`: names first, then the DICOM magic, then folders.
READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        Reader("nifti", _is_nifti, _nifti_header, _read_nifti),
        Reader("idx", lambda p: bool(IDX_NAME.search(p.name.lower())), _idx_facts,
               lambda p, f, n, m: _read_idx_frame(p, f, n)),
        Reader("image", _is_image, _image_header, _read_image),
        Reader("metaimage", lambda p: p.suffix.lower() in itk.METAIMAGE_SUFFIXES, itk.image_header,
               itk.read_image),
        Reader("nrrd", lambda p: p.suffix.lower() in itk.NRRD_SUFFIXES, itk.image_header,
               itk.read_image),
        Reader("dicom", _is_dicom, lambda p: dicom.header_facts(dicom.read_header(p)), dicom.read_pixels),
        Reader("dicom_series", lambda p: p.is_dir(), itk.series_header,
               itk.read_series),
    )
}
