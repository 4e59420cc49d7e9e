"""Volume orientation: the one place that knows how a volume's voxel axes map to RAS+ and to the display.

The readers (NIfTI, MetaImage, NRRD, DICOM series) reorient voxels with it before resizing; the export places
NIfTI code maps on the same reoriented grid from the header alone. Both must agree exactly, so both use these
functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from vqmed.data.errors import UnreadableImageError

__all__ = ["canonical_grid", "display_affine", "display_volume", "ras_transform", "resized_affine", "volume_view"]


def ras_transform(affine: np.ndarray) -> np.ndarray:
    """The orientation transform from a volume's voxel axes to RAS+ (as nibabel's
    ``as_closest_canonical`` and MONAI's ``Orientationd("RAS")`` do); apply it with
    ``nib.orientations.apply_orientation``."""
    ornt = nib.orientations.io_orientation(np.asarray(affine))
    return nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))


def canonical_grid(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape of the volume reoriented to RAS+, as the data loader reorients it before resizing.

    Same result as ``nibabel.as_closest_canonical`` but from the header alone (no voxels read).
    """
    to_ras = ras_transform(affine)
    new_affine = np.asarray(affine) @ nib.orientations.inv_ornt_aff(to_ras, shape)
    new_shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(to_ras):
        new_shape[int(target)] = shape[axis]
    return new_affine, tuple(new_shape)


def display_volume(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A volume ``[X,Y,Z]`` (voxel axes of ``affine``, voxel -> RAS+ mm) as ``[H,W,D]`` axial slices in
    radiological display (anterior up, the patient's right on the viewer's left), stacked inferior -> superior:
    slice k of a volume is exactly its 2D view."""
    # Reorient to RAS+ (as nibabel's as_closest_canonical and MONAI's Orientationd("RAS") do).
    arr = nib.orientations.apply_orientation(arr, ras_transform(affine))
    return arr[::-1, ::-1, :].transpose(1, 0, 2)


def display_affine(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The voxel -> world affine of :func:`display_volume`'s output for a volume of ``shape`` (its voxel axes)."""
    canonical, (nx, ny, _) = canonical_grid(np.asarray(affine, dtype=np.float64), tuple(int(s) for s in shape[:3]))
    # display [h, w, d] is RAS voxel [nx - 1 - w, ny - 1 - h, d]
    to_ras = np.array([[0, -1, 0, nx - 1], [-1, 0, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    return canonical @ to_ras


def resized_affine(affine: np.ndarray, shape: tuple[int, ...], new_shape: tuple[int, ...]) -> np.ndarray:
    """Affine of a grid of ``new_shape`` voxels covering the same field of view as ``shape`` voxels of ``affine``.

    Each new voxel spans ``f = shape / new_shape`` old voxels per axis (an area resize, or a code map's latent
    cell): the voxel size grows by ``f`` and the first new voxel's centre sits at old voxel ``(f - 1) / 2``, so
    the two grids share their outer edges.
    """
    factors = np.asarray(shape[:3], dtype=np.float64) / np.asarray(new_shape[:3], dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = (factors - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def volume_view(path: Path, arr: np.ndarray, frame: int | None, spatial_dims: int, facts: dict[str, Any],
                what: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``[1,H,W,D]`` of a display volume (3D) or its axial slice ``frame`` (2D; ``None`` = the middle one)."""
    if spatial_dims == 3:
        if arr.shape[2] < 2:
            raise UnreadableImageError(path, f"2D {what} cannot make a 3D input")
        facts["frame"] = None
        return np.ascontiguousarray(arr[None]), facts
    k = arr.shape[2] // 2 if frame is None else int(frame)
    if not 0 <= k < arr.shape[2]:
        raise UnreadableImageError(path, f"slice {k} out of range (volume has {arr.shape[2]})")
    facts["frame"] = k
    return np.ascontiguousarray(arr[:, :, k][None]), facts
