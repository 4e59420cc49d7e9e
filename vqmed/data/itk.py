"""SimpleITK readers: MetaImage (``.mha``/``.mhd``), NRRD (``.nrrd``/``.nhdr``) and DICOM series folders.

A DICOM series is one study volume: the files of a folder sharing a Series Instance UID (a folder holding
several series is split by it), read with ``ImageSeriesReader`` in the order GDCM sorts them by position, with
spacing, origin and direction from the headers; then the DICOM display chain of :mod:`vqmed.data.dicom` (VOI
LUT or window, MONOCHROME1 inverted; SimpleITK has applied Rescale Slope/Intercept). A series whose slices do
not make one regular grid (a missing slice, uneven spacing, mixed orientations or sizes) is refused with that
reason. Volumes come out in the display orientation of :mod:`vqmed.data.orientation`, as NIfTI does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_voi_lut

from vqmed.data import dicom
from vqmed.data.errors import UnreadableImageError
from vqmed.data.orientation import display_affine, display_volume, volume_view

__all__ = ["METAIMAGE_SUFFIXES", "NRRD_SUFFIXES", "image_affine", "image_header", "read_image", "read_series",
           "series_header", "series_in_folder", "series_problem"]

METAIMAGE_SUFFIXES = {".mha", ".mhd"}
NRRD_SUFFIXES = {".nrrd", ".nhdr"}
# Slice gaps may differ by this share of the spacing (plus 0.01 mm of rounding in the headers) and still be one grid.
SPACING_TOLERANCE = 0.02
# ITK reports physical points in LPS; NIfTI and the display orientation work in RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def image_affine(image: sitk.Image) -> np.ndarray:
    """The ``(4, 4)`` voxel -> RAS+ mm affine of a 3D SimpleITK image (voxel axes x, y, z)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return affine


def _info(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UnreadableImageError(path, f"unreadable {path.suffix.lstrip('.')} header: {_itk_reason(exc)}") from exc
    return reader


def _itk_reason(exc: Exception) -> str:
    # ITK exceptions span several lines (file, line, description): keep the description.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return next((ln.split(":", 1)[-1].strip() for ln in lines if "escription" in ln), lines[-1] if lines else repr(exc))


def image_header(path: Path) -> dict[str, Any]:
    """Header facts of a MetaImage or NRRD file (size, slices, channels, pixel type, spacing); no pixels read."""
    reader = _info(path)
    size = reader.GetSize()
    fmt = "nrrd" if path.suffix.lower() in NRRD_SUFFIXES else "metaimage"
    return {"format": fmt, "size": "x".join(map(str, size[:2][::-1] + size[2:])), "frames": size[2] if len(size) > 2 else 1,
            "channels": reader.GetNumberOfComponents(), "encoding": f"{fmt} {sitk.GetPixelIDValueAsString(reader.GetPixelID())}",
            "modality": "", "photometric": "", "spacing": "x".join(f"{s:g}" for s in reader.GetSpacing())}


def read_image(path: Path, frame: int | None, spatial_dims: int, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixels of a MetaImage or NRRD file: 2D as stored (rows = height), 3D as a display volume (see module docstring)."""
    facts = image_header(path)
    size = _info(path).GetSize()
    if int(np.prod(size)) > max_pixels:
        raise UnreadableImageError(path, f"header declares {int(np.prod(size)):,} voxels, more than max_pixels={max_pixels:,}")
    if len(size) == 2 and size[0] * size[1] > dicom.MAX_2D_PIXELS:
        raise UnreadableImageError(path, f"header declares {size[1]}x{size[0]} pixels, more than the 2D limit of {dicom.MAX_2D_PIXELS:,}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UnreadableImageError(path, f"cannot read {facts['format']} data: {_itk_reason(exc)}") from exc
    arr = sitk.GetArrayFromImage(image).astype(np.float32)  # [rows, cols(, comp)] or [z, y, x(, comp)]
    components = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() == 2:
        if spatial_dims == 3:
            raise UnreadableImageError(path, f"2D {facts['format']} cannot make a 3D input")
        if components not in (1, 3, 4):
            raise UnreadableImageError(path, f"{components} components per pixel are not an image")
        arr = arr[None] if components == 1 else np.moveaxis(arr[..., :3], -1, 0)
        facts["frame"] = None
        return np.ascontiguousarray(arr), facts
    if image.GetDimension() != 3 or components != 1:
        raise UnreadableImageError(path, f"{image.GetDimension()}-D image with {components} components is not supported")
    return volume_view(path, _display(arr, image, facts), frame, spatial_dims, facts, facts["format"])


def _display(arr_zyx: np.ndarray, image: sitk.Image, facts: dict[str, Any]) -> np.ndarray:
    """The display volume of SimpleITK's ``[z, y, x]`` array; its world affine goes to ``facts["affine"]``."""
    xyz = arr_zyx.transpose(2, 1, 0)
    affine = image_affine(image)
    facts["affine"] = display_affine(affine, xyz.shape).tolist()
    return display_volume(xyz, affine)


# ----------------------------------------------------------------------------------- DICOM series


def series_in_folder(folder: Path) -> list[list[str]]:
    """The DICOM series of one folder (not its sub-folders): per Series Instance UID, sorted by UID, the file
    names in GDCM's order (by position along the slice normal)."""
    reader = sitk.ImageSeriesReader()
    try:
        uids = sorted(reader.GetGDCMSeriesIDs(str(folder)))
        return [list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids]
    except RuntimeError as exc:
        raise UnreadableImageError(folder, f"cannot list DICOM series: {_itk_reason(exc)}") from exc


def _headers(folder: Path, files: list[str]) -> list[pydicom.Dataset]:
    out = []
    for name in files:
        try:
            out.append(pydicom.dcmread(name, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError) as exc:
            raise UnreadableImageError(folder, f"unreadable DICOM header in series: {exc}") from exc
    return out


def series_problem(headers: list[pydicom.Dataset]) -> str | None:
    """Why these slices do not make one regular volume (``None`` when they do).

    Checks: at least two slices, all with the same size and orientation, positions along the slice normal
    evenly spaced (a gap of k spacings is k - 1 missing slices; other uneven gaps are inconsistent spacing).
    """
    if len(headers) < 2:
        return "a single slice is not a volume"
    sizes = {(int(h.get("Rows", 0) or 0), int(h.get("Columns", 0) or 0)) for h in headers}
    if len(sizes) > 1:
        return f"slices differ in size ({len(sizes)} sizes)"
    try:
        orients = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        return "slices lack Image Position/Orientation (Patient)"
    if np.abs(orients - orients[0]).max() > 1e-4:
        return "slices differ in orientation"
    normal = np.cross(orients[0, :3], orients[0, 3:])
    depth = np.sort(positions @ normal)
    gaps = np.diff(depth)
    if gaps.min() < 1e-3:
        return "two slices at the same position"
    step = gaps.min()
    ratios = gaps / step
    uneven = np.abs(gaps - step) > SPACING_TOLERANCE * step + 0.01
    if not uneven.any():
        return None
    whole = np.abs(ratios - np.rint(ratios)) < 0.1
    if whole[uneven].all():
        missing = int(np.rint(ratios[uneven]).sum() - uneven.sum())
        return f"missing slice(s): {missing} missing between {len(depth)} slices spaced {step:.3g} mm"
    return f"inconsistent slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm"


def _series(folder: Path, index: int | None) -> tuple[int, list[str], int]:
    found = series_in_folder(folder)
    if not found:
        raise UnreadableImageError(folder, "folder holds no DICOM series")
    if index is None:
        if len(found) > 1:
            raise UnreadableImageError(folder, f"folder holds {len(found)} DICOM series; the manifest's frame picks one")
        index = 0
    if not 0 <= index < len(found):
        raise UnreadableImageError(folder, f"series {index} out of range (folder has {len(found)})")
    return index, found[index], len(found)


def series_header(folder: Path, index: int | None = None) -> dict[str, Any]:
    """Header facts of one series of a folder (``index`` among its series sorted by UID; ``None`` = the only or
    first one). ``frames`` counts the folder's series, which a manifest row's ``frame`` selects; ``slices`` the
    chosen series' slices."""
    found = series_in_folder(folder)
    if not found:
        raise UnreadableImageError(folder, "folder holds no DICOM series")
    files = found[index or 0] if 0 <= (index or 0) < len(found) else found[0]
    facts = dicom.header_facts(_headers(folder, files[:1])[0])
    facts.update(format="dicom_series", frames=len(found), slices=len(files))
    return facts


def read_series(folder: Path, frame: int | None, spatial_dims: int, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One series of a folder as a display volume ``[1,H,W,D]`` (3D) or its middle axial slice (2D).

    Args:
        folder: the folder of slices.
        frame: which of the folder's series (sorted by Series Instance UID); ``None`` when it holds one.
        spatial_dims: 3 for the volume, 2 for its middle axial slice.
        max_pixels: refuse series declaring more voxels than this, before decoding.

    Raises:
        UnreadableImageError: no series, a series that is not one regular grid (missing slice, uneven spacing,
            mixed orientations), an unreadable slice.
    """
    index, files, count = _series(folder, frame)
    headers = _headers(folder, files)
    problem = series_problem(headers)
    if problem:
        raise UnreadableImageError(folder, problem)
    middle = headers[len(headers) // 2]
    facts = dicom.header_facts(middle)
    rows, cols = int(middle.Rows), int(middle.Columns)
    declared = rows * cols * len(files)
    if declared > max_pixels:
        raise UnreadableImageError(folder, f"series declares {declared:,} voxels, more than max_pixels={max_pixels:,}")
    if facts["channels"] != 1:
        raise UnreadableImageError(folder, f"colour DICOM series ({facts['photometric']}) are not supported")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()  # Rescale Slope/Intercept applied
    except RuntimeError as exc:
        raise UnreadableImageError(folder, f"cannot read DICOM series: {_itk_reason(exc)}") from exc
    arr = sitk.GetArrayFromImage(image).astype(np.float32)  # [z, y, x]
    try:
        arr = np.asarray(apply_voi_lut(arr, middle, index=0), dtype=np.float32)  # VOI LUT, else window
    except Exception as exc:
        raise UnreadableImageError(folder, f"cannot apply VOI LUT/window: {exc}") from exc
    if facts["photometric"] == "MONOCHROME1":
        arr = arr.max() - arr  # air dark, as in vqmed.data.dicom
    facts.update(format="dicom_series", frames=count, slices=len(files), series=index,
                 spacing="x".join(f"{s:.4g}" for s in image.GetSpacing()), inverted=facts["photometric"] == "MONOCHROME1")
    return volume_view(folder, _display(arr, image, facts), None, spatial_dims, facts, "DICOM series")

