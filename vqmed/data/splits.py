"""Which manifest rows a run uses, and patient-grouped hold-outs: no patient is ever on both sides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vqmed.data.errors import ManifestError
from vqmed.data.manifest import read_manifest

__all__ = ["load_manifests", "patient_groups", "read_patient_list", "split_by_patient"]


def load_manifests(
    paths: list[str | Path], splits: list[str] | None = None, max_images: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """All rows of the manifests, filtered to ``splits`` (empty = all) and capped at ``max_images``.

    Raises:
        ManifestError: no row has one of ``splits``.
    """
    manifest = pd.concat([read_manifest(Path(path)) for path in paths], ignore_index=True)
    if splits:
        manifest = manifest[manifest["split"].isin(splits)]
        if manifest.empty:
            raise ManifestError(f"splits {list(splits)}: no manifest row has one of these splits")
    if max_images is not None and len(manifest) > max_images:
        manifest = manifest.sample(n=max_images, random_state=seed).sort_index()
    return manifest.reset_index(drop=True)


def patient_groups(manifest: pd.DataFrame) -> pd.Series:
    """The grouping key of every row: its patient, or its study when the patient is unknown."""
    return manifest["patient_id"].fillna(manifest["study_id"]).astype(str)


def split_by_patient(manifest: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``val_fraction`` of the patients (all their images) for validation, deterministically."""
    groups = patient_groups(manifest)
    patients = np.array(sorted(groups.unique()))
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_fraction * len(patients))))
    val_patients = set(rng.choice(patients, size=n_val, replace=False).tolist())
    is_val = groups.isin(val_patients).to_numpy()
    return manifest[~is_val].reset_index(drop=True), manifest[is_val].reset_index(drop=True)


def read_patient_list(path: str | Path) -> list[str]:
    """The patient ids of a committed patient list (e.g. ``data_manifests/chest_xray_validation_patients.csv``).

    The file is a CSV whose ``#`` lines are comments, with a ``patient_id`` column.

    Raises:
        FileNotFoundError: no such file.
        ManifestError: no ``patient_id`` column, or no patient in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: patient list not found")
    table = pd.read_csv(path, comment="#", dtype=str)
    if "patient_id" not in table.columns:
        raise ManifestError(f"{path}: a patient list needs a 'patient_id' column (has {list(table.columns)})")
    patients = table["patient_id"].dropna().str.strip()
    patients = patients[patients != ""].tolist()
    if not patients:
        raise ManifestError(f"{path}: the patient list is empty")
    return patients
