"""3D code maps as NIfTI in the scan's world coordinates, to overlay in a viewer.

The model input's grid (display orientation, resized or resampled to ``data.spacing``) and its world affine come
from the data room's own transform chain (``facts["grid_affine"]``), so the code map lies where the loader put
the voxels, whatever the format (NIfTI, MetaImage, NRRD, DICOM series).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from vqmed.atomic import commit_temporary, temporary_path
from vqmed.data import ImageSpec, UnreadableImageError, load_image
from vqmed.data.orientation import resized_affine

__all__ = ["latent_affine", "NiftiWriter"]


def latent_affine(grid_affine: np.ndarray, grid_shape: tuple[int, ...], latent_shape: tuple[int, ...]) -> np.ndarray:
    """Affine of a code map covering the model input's grid (``grid_shape`` voxels of ``grid_affine``): each latent
    voxel summarises a block of input voxels (see :func:`vqmed.data.orientation.resized_affine`)."""
    return resized_affine(grid_affine, grid_shape, latent_shape)


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
        """The model input grid's world affine, its shape and the NIfTI space code (the source's sform code for
        NIfTI, else 1 = scanner). Loads the volume once more through the deterministic chain."""
        path = self.data_root / relative_path
        try:
            _, facts = load_image(path, self.spec)
        except UnreadableImageError:
            facts = {}
        if "grid_affine" not in facts:
            # no world geometry (e.g. a multi-frame DICOM file): the model's voxel grid
            return np.eye(4), (self.spec.image_size,) * 3, 0
        code = 1
        if facts.get("format") == "nifti":
            header = nib.load(path).header
            code = int(header["sform_code"]) if isinstance(header, nib.Nifti1Header) else 2
        return np.asarray(facts["grid_affine"]), (self.spec.image_size,) * 3, code or 2

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
