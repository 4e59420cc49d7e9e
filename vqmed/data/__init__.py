"""vqmed.data: everything between files on disk and model-ready tensors.

Owns the data root rule, manifests (build / read / write / check; paths relative to the data root,
DICOM ids as salted hashes), NIfTI orientation to RAS+ (:mod:`.orientation`, shared with the export), DICOM handling (pydicom + pylibjpeg, VOI LUT, MONOCHROME1 inversion),
patient-grouped splits and committed patient lists, the MONAI transform chains, the cached :class:`ImageDataset` with its quarantine of unreadable files,
pretraining's batched augmentation (:mod:`.augment`),
and previews. Knows nothing of models or training.
"""

from vqmed.data.dataset import ImageDataset, Quarantine
from vqmed.data.errors import DataRootError, ManifestError, UnreadableImageError
from vqmed.data.manifest import (
    MANIFEST_COLUMNS,
    CheckReport,
    build_manifest,
    check_manifest,
    read_manifest,
    resolve_data_root,
    write_manifest,
)
from vqmed.data.preview import preview_files
from vqmed.data.splits import load_manifests, patient_groups, read_patient_list, split_by_patient
from vqmed.data.transforms import ImageSpec, load_image

__all__ = [
    "MANIFEST_COLUMNS",
    "CheckReport",
    "DataRootError",
    "ImageDataset",
    "ImageSpec",
    "ManifestError",
    "Quarantine",
    "UnreadableImageError",
    "build_manifest",
    "check_manifest",
    "load_image",
    "load_manifests",
    "patient_groups",
    "preview_files",
    "read_manifest",
    "read_patient_list",
    "resolve_data_root",
    "split_by_patient",
    "write_manifest",
]
