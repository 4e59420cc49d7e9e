"""3D code maps as NIfTI on the scan's own world grid, to overlay in a viewer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from vqmed.atomic import commit_temporary, temporary_path
from vqmed.data import ImageSpec
from vqmed.data.orientation import canonical_grid

__all__ = ["latent_affine", "NiftiWriter"]


def latent_affine(source_affine: np.ndarray, source_shape: tuple[int, ...], latent_shape: tuple[int, ...]) -> np.ndarray:
    """Affine of a latent grid covering the same field of view as the source volume.

    The volume of ``source_shape`` voxels is resized to the model's input and downsampled to
    ``latent_shape``, so each latent voxel spans ``f = source / latent`` source voxels per axis: the
    voxel size grows by ``f`` and the first latent voxel's centre sits at source voxel ``(f - 1) / 2``
    (the centre of the block it summarises), so the two grids share their outer edges.

    Args:
        source_affine: ``(4, 4)`` voxel-to-world affine of the source volume.
        source_shape: the source volume's spatial shape (3 axes).
        latent_shape: the code map's shape (3 axes).
    """
    factors = np.asarray(source_shape[:3], dtype=np.float64) / np.asarray(latent_shape[:3], dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = (factors - 1.0) / 2.0
    return np.asarray(source_affine, dtype=np.float64) @ scale


class NiftiWriter:
    """Writes code maps of 3D volumes as ``DIR/KEY.nii.gz`` (uint16) with the latent-grid affine.

    Args:
        directory: where the files go (``STORE/nifti``).
        data_root: root of the manifest paths, to read each source volume's header.
        spec: the image spec the volumes were resized to.
    """

    def __init__(self, directory: Path, data_root: Path, spec: ImageSpec) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_root = Path(data_root)
        self.spec = spec

    def source_grid(self, relative_path: str) -> tuple[np.ndarray, tuple[int, ...], int]:
        """The source volume's affine, spatial shape and sform code (header only, no voxels read)."""
        path = self.data_root / relative_path
        try:
            image = nib.load(path)
        except Exception:
            # Not a format nibabel reads (e.g. a DICOM series): fall back to the model's voxel grid.
            return np.eye(4), (self.spec.image_size,) * 3, 0
        code = int(image.header["sform_code"]) if isinstance(image, nib.Nifti1Image) else 2
        affine, shape = canonical_grid(np.asarray(image.affine), tuple(int(s) for s in image.shape[:3]))
        return affine, shape, code or 2

    def write(self, key: str, codes: np.ndarray, relative_path: str) -> str:
        """Write one code map; returns its path relative to the store."""
        affine, shape, code = self.source_grid(relative_path)
        grid = latent_affine(affine, shape, codes.shape)
        image = nib.Nifti1Image(np.asarray(codes, dtype=np.uint16), grid)
        # Same space as the scan (e.g. scanner or MNI), so viewers place both identically.
        image.set_sform(grid, code=code)
        image.set_qform(grid, code=code)
        image.header.set_xyzt_units("mm")
        target = self.directory / f"{key}.nii.gz"
        tmp = temporary_path(target)
        try:
            nib.save(image, tmp)
            commit_temporary(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return f"{self.directory.name}/{target.name}"
