"""NIfTI orientation: the one place that knows how a volume's voxel axes map to RAS+.

The reader reorients voxels with it before resizing; the export places NIfTI code maps on the same
reoriented grid from the header alone. Both must agree exactly, so both use these two functions.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

__all__ = ["canonical_grid", "ras_transform"]


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
