"""The reader registry's SimpleITK entries on real files: DICOM series (pydicom's own CT and MR folders),
MetaImage and NRRD written by SimpleITK from real images, and series folders in manifests and datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from vqmed.data import ImageDataset, ImageSpec, UnreadableImageError, build_manifest, check_manifest, itk, load_image
from vqmed.data.dicom import read_pixels as read_dicom_file
from vqmed.data.readers import READERS, detect_format, read_header, read_pixels

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", REPO.parent / "shared" / "data"))
DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
CT5 = DICOMDIR_TESTS / "98892001" / "CT5N"  # 5 axial CT slices, 0.488 mm pixels, 2.5 mm apart
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


@pytest.fixture
def salt(monkeypatch) -> str:
    monkeypatch.setenv("VQMED_ID_SALT", "vqmed-itk-test")
    return "vqmed-itk-test"


def _by_height(folder: Path) -> list[Path]:
    """The folder's slices from inferior to superior (position along the slice normal), read by pydicom alone."""
    files = [p for p in folder.iterdir() if p.is_file()]
    def depth(p: Path) -> float:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        o = np.array(ds.ImageOrientationPatient, dtype=float)
        return float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), np.cross(o[:3], o[3:])))
    return sorted(files, key=depth)


def test_registry_has_one_entry_per_format_and_detects_each() -> None:
    assert list(READERS) == ["nifti", "idx", "image", "metaimage", "nrrd", "dicom", "dicom_series"]
    assert detect_format(CT5) == "dicom_series"
    assert detect_format(next(CT5.iterdir())) == "dicom"  # no suffix: found by the DICM magic
    assert detect_format(Path("x.mha")) == "metaimage" and detect_format(Path("x.nrrd")) == "nrrd"
    assert detect_format(NIBABEL_DATA / "anatomical.nii") == "nifti"


def test_ct_series_loads_as_one_volume_with_spacing_and_orientation() -> None:
    vol, facts = read_pixels(CT5, None, spatial_dims=3)
    assert vol.shape == (1, 16, 16, 5)
    assert facts["format"] == "dicom_series" and facts["modality"] == "CT" and facts["slices"] == 5
    assert facts["spacing"] == "0.4883x0.4883x2.5"
    # geometry from SimpleITK: axial slices (identity direction cosines), x/y spacing from PixelSpacing, z from positions
    image = sitk.ReadImage([str(p) for p in _by_height(CT5)])
    np.testing.assert_allclose(image.GetSpacing(), (0.488281, 0.488281, 2.5), atol=1e-5)
    np.testing.assert_allclose(itk.image_affine(image)[:3, :3], np.diag([-0.488281, -0.488281, 2.5]), atol=1e-5)
    # display orientation: slice k (inferior -> superior) is that file's own 2D display (rows anterior -> posterior,
    # the patient's right on the left), through the same DICOM display chain
    for k, path in enumerate(_by_height(CT5)):
        ref, _ = read_dicom_file(path, None, 2, 1 << 29)
        np.testing.assert_allclose(vol[0, :, :, k], ref[0], rtol=1e-5, atol=1e-3)
    # 2D use of a series: its middle axial slice
    mid, _ = read_pixels(CT5, None, spatial_dims=2)
    np.testing.assert_array_equal(mid[0], vol[0, :, :, 2])


def test_series_that_are_not_volumes_are_refused_with_the_reason(tmp_path) -> None:
    # pydicom's MR folders: a radial series (7 slices rotating about one axis) and 3-plane localisers
    with pytest.raises(UnreadableImageError, match="differ in orientation"):
        read_pixels(DICOMDIR_TESTS / "98892003" / "MR700", None, 3)
    # a CT folder whose first slice lies 20 cm from the others
    with pytest.raises(UnreadableImageError, match="missing slice"):
        read_pixels(DICOMDIR_TESTS / "77654033" / "CT2", None, 3)
    # a real series with its middle slice taken away
    gap = tmp_path / "ct_gap"
    shutil.copytree(CT5, gap)
    (gap / _by_height(CT5)[2].name).unlink()
    with pytest.raises(UnreadableImageError, match=r"missing slice\(s\): 1 missing"):
        read_pixels(gap, None, 3)
    # uneven spacing that is no whole number of slices
    uneven = tmp_path / "ct_uneven"
    shutil.copytree(CT5, uneven)
    moved = uneven / _by_height(CT5)[4].name
    ds = pydicom.dcmread(moved)
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], float(ds.ImagePositionPatient[2]) + 1.0]
    ds.save_as(moved)
    with pytest.raises(UnreadableImageError, match="inconsistent slice spacing"):
        read_pixels(uneven, None, 3)


def test_mixed_folder_is_split_by_series_instance_uid() -> None:
    folder = DICOMDIR_TESTS / "98892003" / "MR2"
    found = itk.series_in_folder(folder)
    assert len(found) == 3 and sum(map(len, found)) == len([p for p in folder.iterdir() if p.is_file()])
    for files in found:
        uids = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}
        assert len(uids) == 1
    assert read_header(folder)["frames"] == 3  # a manifest row's frame picks one of the three
    with pytest.raises(UnreadableImageError, match="3 DICOM series"):
        read_pixels(folder, None, 3)


@pytest.mark.parametrize("source", [NIBABEL_DATA / "anatomical.nii", NIBABEL_DATA / "reoriented_anat_moved.nii"])
@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_metaimage_and_nrrd_written_by_simpleitk_load_like_the_source_volume(source, suffix, tmp_path) -> None:
    target = tmp_path / f"volume{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(target))
    want, _ = read_pixels(source, None, 3)  # nibabel's reader
    got, facts = read_pixels(target, None, 3)
    np.testing.assert_array_equal(got, want)
    assert facts["format"] == ("nrrd" if suffix == ".nrrd" else "metaimage")
    np.testing.assert_array_equal(read_pixels(target, 3, 2)[0], read_pixels(source, 3, 2)[0])


@pytest.mark.skipif(not (DATA_ROOT / "chest_xray").is_dir(), reason="Kermany chest X-rays not found")
@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_2d_metaimage_and_nrrd_load_like_the_source_xray(suffix, tmp_path) -> None:
    source = sorted((DATA_ROOT / "chest_xray" / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    target = tmp_path / f"xray{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(target))
    want, _ = read_pixels(source, None, 2)
    got, _ = read_pixels(target, None, 2)
    np.testing.assert_array_equal(got, want)


def test_manifest_learns_series_folders_and_datasets_read_them(tmp_path, salt) -> None:
    root = tmp_path / "data"
    shutil.copytree(DICOMDIR_TESTS / "98892001", root / "archive" / "98892001")
    shutil.copytree(DICOMDIR_TESTS / "98892003" / "MR2", root / "archive" / "MR2")
    gap = root / "archive" / "ct_gap"
    shutil.copytree(CT5, gap)
    (gap / _by_height(CT5)[2].name).unlink()
    # keep_paths: the report names the quarantined folders (by default it gives the reasons only)
    manifest, report = build_manifest(root / "archive", root, progress=False, multiframe="volume", keep_paths=True)
    _, private = build_manifest(root / "archive", root, progress=False, multiframe="volume")
    assert "ct_gap" not in str(private) and any("missing slice" in r for r in private["quarantined"])
    series = manifest[manifest["format"] == "dicom_series"]
    assert series["path"].tolist() == ["archive/98892001/CT5N"] and series["frame"].tolist() == [0]
    # salted ids only: no raw UID anywhere in the manifest
    uid = pydicom.dcmread(next(CT5.iterdir()), stop_before_pixels=True)
    text = manifest.to_csv(index=False)
    assert uid.SeriesInstanceUID not in text and uid.StudyInstanceUID not in text and str(uid.PatientID) not in text
    assert len(series["series_id"].iloc[0]) == 16
    reasons = dict((p, r) for p, r in report["quarantined"] if "ct_gap" in p)
    assert "missing slice" in reasons["archive/ct_gap"]
    assert sum("MR2" in p and "orientation" in r for p, r in report["quarantined"]) == 2  # two localiser series
    assert not any(manifest["path"].str.startswith("archive/ct_gap"))
    # the frames mode (2D) keeps one row per instance
    frames, _ = build_manifest(root / "archive", root, progress=False)
    assert "dicom_series" not in set(frames["format"])

    assert check_manifest(series, root, progress=False).ok

    spec = ImageSpec(image_size=8, spatial_dims=3)
    ds = ImageDataset(series, root, spec, cache_dir=tmp_path / "cache", progress=False)
    assert len(ds) == 1 and not len(ds.quarantine)
    assert tuple(ds[0]["image"].shape) == (1, 8, 8, 8)
    again = ImageDataset(pd.concat([series]), root, spec, cache_dir=tmp_path / "cache", progress=False)
    assert again.stats["cached"] == 1  # the folder's content digest finds the cached volume


def _overlay_correlation(volume: np.ndarray, grid_affine: np.ndarray, source: Path) -> float:
    """Correlation between the model input's voxels and the source scan sampled (nearest voxel) at the same
    world points: high only when the input grid's affine puts each voxel where it came from."""
    img = nibabel.load(source)
    data = np.asarray(img.dataobj, dtype=np.float32)
    shape = volume.shape[1:]
    ijk = np.stack(np.meshgrid(*[np.arange(0, s, 2) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = np.c_[ijk, np.ones(len(ijk))] @ grid_affine.T
    src = np.rint((world @ np.linalg.inv(img.affine).T)[:, :3]).astype(int)
    inside = np.all((src >= 0) & (src < np.array(data.shape[:3])), axis=1)
    a = volume[0][tuple(ijk[inside].T)]
    b = data[tuple(src[inside].T)]
    return float(np.corrcoef(a, b)[0, 1])


MNI = Path(nibabel.__file__).parents[1] / "nilearn" / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.mark.skipif(not MNI.is_file(), reason="nilearn's MNI152 template not installed")
@pytest.mark.parametrize("spacing", [None, (3.0, 3.0, 3.0)])
def test_model_input_overlays_its_source_in_world_coordinates(spacing) -> None:
    spec = ImageSpec(48, 3, spacing=spacing)
    volume, facts = load_image(MNI, spec)
    assert volume.shape == (1, 48, 48, 48)
    grid = np.asarray(facts["grid_affine"])
    right = _overlay_correlation(volume, grid, MNI)
    # wrong grids (rows and columns swapped; upside down; slices reversed) overlay worse: the check can fail
    n = volume.shape[1] - 1
    flips = [np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
             np.array([[-1, 0, 0, n], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
             np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, n], [0, 0, 0, 1]])]
    wrong = [_overlay_correlation(volume, grid @ f, MNI) for f in flips]
    assert right > 0.95 and right > max(wrong) + 0.05, (right, wrong)
    if spacing:
        np.testing.assert_allclose(np.linalg.norm(grid[:3, :3], axis=0), spacing, rtol=1e-5)
        assert ImageSpec(48, 3, spacing=spacing).key() != ImageSpec(48, 3).key()


def test_spacing_config_is_validated() -> None:
    from vqmed.config import ConfigError, DataConfig

    with pytest.raises(ConfigError, match="data.spacing"):
        DataConfig(manifests=["m.csv"], spacing=[1.0, 1.0, 1.0]).validate()  # a 2D config
    with pytest.raises(ConfigError, match="data.spacing"):
        DataConfig(manifests=["m.csv"], spatial_dims=3, spacing=[1.0, 0.0, 1.0]).validate()
    DataConfig(manifests=["m.csv"], spatial_dims=3, spacing=[1.0, 1.0, 2.0]).validate()


def test_a_3d_config_reaches_the_image_spec_whole() -> None:
    """The engine and the speed benchmarks build the spec from ``data:`` in one place: every reading field
    arrives (a dropped spacing would resize each volume to the cube instead of resampling it, silently)."""
    from vqmed.config import PretrainConfig, load_config

    config = REPO / "configs" / "pretrain" / "toy_3d_vit.yaml"
    overrides = ["data.spacing=[3.0,3.0,2.5]", "data.resize=pad", "data.intensity=percentile"]
    cfg = load_config(PretrainConfig, config, overrides)
    spec = ImageSpec.from_config(cfg.data)
    assert spec == ImageSpec(cfg.data.image_size, 3, cfg.data.channels, spacing=(3.0, 3.0, 2.5), resize="pad",
                             intensity="percentile")
    assert spec.key() != ImageSpec.from_config(load_config(PretrainConfig, config).data).key()
