"""vqmed.data on the real data: data root, manifests, DICOM display pipeline, loaders, preview."""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from vqmed.data import (
    ImageSpec,
    ManifestError,
    UnreadableImageError,
    build_manifest,
    check_manifest,
    load_image,
    preview_files,
    read_manifest,
    resolve_data_root,
    write_manifest,
)
from vqmed.data.errors import DataRootError
from vqmed.data.manifest import MANIFEST_COLUMNS, kermany_patient_id
from vqmed.data.privacy import resolve_salt, salt_file, salted_id

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "data_manifests"
CHEST_DICOMS = ["cr_chest_pa_mono1_jpegls_near_lossless.dcm", "dx_chest_pa_mono1_j2k_lossless.dcm", "cr_chest_pa_rsna_jpeg_baseline.dcm"]
MNI = Path(__import__("nilearn").__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="module")
def data_root() -> Path:
    return resolve_data_root()


@pytest.fixture(scope="module")
def chest_built(data_root):
    return build_manifest(Path("chest_xray"), data_root, progress=False, keep_paths=True)


# ----------------------------------------------------------------------------------- data root


def test_data_root_order_and_errors(monkeypatch, tmp_path, data_root):
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv("VQMED_DATA_ROOT", str(other))
    assert resolve_data_root() == other  # env beats the default
    assert resolve_data_root(data_root) == data_root  # --data-root beats env
    with pytest.raises(DataRootError, match="--data-root"):
        resolve_data_root(tmp_path / "missing")
    monkeypatch.setenv("VQMED_DATA_ROOT", str(tmp_path / "missing"))
    with pytest.raises(DataRootError, match="VQMED_DATA_ROOT"):
        resolve_data_root()
    monkeypatch.delenv("VQMED_DATA_ROOT")
    monkeypatch.chdir(REPO)
    assert resolve_data_root() == Path(os.path.abspath(REPO / ".." / "shared" / "data"))


# ----------------------------------------------------------------------------------- Kermany


def test_kermany_patient_ids():
    assert kermany_patient_id("person1946_bacteria_4875.jpeg") == "person1946_bacteria"
    assert kermany_patient_id("person1_virus_6.jpeg") == "person1_virus"
    assert kermany_patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert kermany_patient_id("IM-0429-0001-0002.jpeg") == "IM-0429"
    assert kermany_patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert kermany_patient_id("0000.jpg") is None


def test_chest_xray_manifest(chest_built, data_root):
    df, report = chest_built
    assert list(df.columns) == MANIFEST_COLUMNS
    counts = df.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", "NORMAL"): 1341, ("train", "PNEUMONIA"): 3875, ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390}
    assert len(df) == 5840 and report["rows"] == 5840
    assert report["skipped_junk"] == 2 and all(p.endswith(".DS_Store") for p in report["junk_files"])
    assert report["quarantined_headers"] == 0
    # Paths are relative to the data root and resolve there.
    assert not any(p.startswith(("/", "..")) for p in df["path"])
    assert (data_root / df["path"].iloc[0]).is_file()
    row = df[df["path"] == "chest_xray/train/PNEUMONIA/person1000_bacteria_2931.jpeg"].iloc[0]
    assert row["patient_id"] == "person1000_bacteria" and row["label"] == "PNEUMONIA" and row["split"] == "train"
    # The committed manifest is exactly what a scan of the real data gives.
    committed = read_manifest(MANIFESTS / "chest_xray.csv")
    pd.testing.assert_frame_equal(committed, df)
    report = check_manifest(committed, data_root, progress=False)
    assert report.ok, report.summary()
    assert report.split_leaks == {} and report.n_files == 5840


def test_check_catches_kermany_leak_with_bare_numbers(chest_built, data_root):
    """Bare numbers (person1 / IM-0001 without their family) collide across the official split:
    the check must report those patients, which is why the family is part of the id."""
    df = chest_built[0].copy()
    df["patient_id"] = df["patient_id"].str.replace(r"^(person\d+)_\w+$", r"\1", regex=True).str.replace("NORMAL2-", "")
    leaks = check_manifest(df, data_root, progress=False).split_leaks
    assert len(leaks) == 264 and leaks["person1"] == ["test", "train"]


def test_other_committed_manifests(data_root):
    stl = read_manifest(MANIFESTS / "stl10.csv")
    assert len(stl) == 246 and stl["label"].nunique() == 26 and "train" in set(stl["label"])
    # stl10/train is the class "train" (no split folder above it), not a split.
    assert set(stl.loc[stl["label"] == "train", "split"]) == {""} and set(stl["split"]) == {""}
    assert set(stl["format"]) == {"png"}

    cifar = read_manifest(MANIFESTS / "cifar10_test.csv")
    assert len(cifar) == 10000 and set(cifar["split"]) == {"test"}
    assert cifar["label"].value_counts().to_dict() == {c: 1000 for c in cifar["label"].unique()} and cifar["label"].nunique() == 10

    mnist = read_manifest(MANIFESTS / "mnist_test.csv")
    assert len(mnist) == 10000 and set(mnist["path"]) == {"mnist/t10k-images-idx3-ubyte.gz"}
    assert mnist["frame"].tolist() == list(range(10000)) and set(mnist["split"]) == {"test"}
    digits = mnist["label"].astype(int).value_counts().sort_index().tolist()
    assert digits == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

    for name, root in [("stl10", "stl10"), ("mnist_test", "mnist/t10k-images-idx3-ubyte.gz")]:
        rebuilt, _ = build_manifest(Path(root), data_root, progress=False, keep_paths=True)
        pd.testing.assert_frame_equal(read_manifest(MANIFESTS / f"{name}.csv"), rebuilt)
    for df in (stl, mnist):
        assert check_manifest(df, data_root, progress=False).ok


def test_cifar_manifest_rebuilds_identically(data_root):
    rebuilt, report = build_manifest(Path("cifar10/test"), data_root, progress=False, keep_paths=True)
    pd.testing.assert_frame_equal(read_manifest(MANIFESTS / "cifar10_test.csv"), rebuilt)
    assert report["by_format"] == {"jpeg": 10000}


# ----------------------------------------------------------------------------------- DICOM manifests


def test_dicom_manifest_is_salted_and_has_no_identifiers(data_root, tmp_path):
    df, report = build_manifest(data_root / "dicom" / "chest", data_root, salt="test-salt", progress=False)
    assert len(df) == 3 and set(df["format"]) == {"dicom"} and set(df["modality"]) == {"CR", "DX"}
    assert set(df["split"]) == {""} and set(df["label"]) == {""}
    for _, row in df.iterrows():
        ds = pydicom.dcmread(data_root / row["path"], stop_before_pixels=True)
        assert row["study_id"] == salted_id("study", ds.StudyInstanceUID, "test-salt")
        assert row["series_id"] == salted_id("series", ds.SeriesInstanceUID, "test-salt")
        assert row["patient_id"] == salted_id("patient", ds.PatientID, "test-salt")
        assert row["instance"] == int(ds.InstanceNumber)
    other, _ = build_manifest(data_root / "dicom" / "chest", data_root, salt="another", progress=False)
    assert not set(other["study_id"]) & set(df["study_id"])  # the salt matters

    committed = read_manifest(MANIFESTS / "dicom_chest.csv")
    assert committed["path"].tolist() == df["path"].tolist()
    assert committed[["modality", "instance"]].equals(df[["modality", "instance"]])
    write_manifest(df, tmp_path / "m.csv")
    text = (MANIFESTS / "dicom_chest.csv").read_text() + (tmp_path / "m.csv").read_text()
    for path in df["path"]:
        ds = pydicom.dcmread(data_root / path, stop_before_pixels=True)
        for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, str(ds.PatientID),
                      str(ds.PatientName), ds.get("StudyDate", ""), ds.get("AccessionNumber", "")):
            if value:
                assert str(value) not in text
    for col in ("study_id", "series_id", "patient_id"):
        assert committed[col].str.fullmatch(r"[0-9a-f]{16}").all()
    assert check_manifest(committed, data_root, progress=False).ok


def test_dicom_tree_scan(data_root, tmp_path):
    """Recursive scan of an archive: multi-frame instances give one row per frame, non-image DICOM
    (DICOMDIR) and junk are counted, an unreadable header is quarantined, not fatal."""
    root = tmp_path / "root"
    (root / "arch" / "a" / "b").mkdir(parents=True)
    shutil.copy(data_root / "dicom" / "other" / "mr_multiframe_10.dcm", root / "arch" / "a" / "b" / "IM0001")  # no suffix
    shutil.copy(data_root / "dicom" / "other" / "ct_small.dcm", root / "arch" / "a" / "ct.dcm")
    shutil.copy(get_testdata_file("DICOMDIR"), root / "arch" / "DICOMDIR")
    (root / "arch" / ".DS_Store").write_bytes(b"junk")
    (root / "arch" / "notes.txt").write_text("not an image")
    (root / "arch" / "empty.dcm").write_bytes(b"")
    df, report = build_manifest(root / "arch", root, salt="s", progress=False)
    assert len(df) == 11 and df["path"].value_counts().to_dict() == {"arch/a/b/IM0001": 10, "arch/a/ct.dcm": 1}
    assert df.loc[df["path"] == "arch/a/b/IM0001", "frame"].tolist() == list(range(10))
    assert report["skipped_non_image"] == 1 and report["skipped_junk"] == 1 and report["skipped_unknown"] == 1
    assert report["quarantined"] == ["empty file (0 bytes)"]  # paths only with keep_paths (names may identify)
    assert build_manifest(root / "arch", root, salt="s", progress=False, keep_paths=True)[1]["quarantined"] == [
        ["arch/empty.dcm", "empty file (0 bytes)"]]
    vol, _ = build_manifest(root / "arch", root, salt="s", progress=False, multiframe="volume")
    assert len(vol) == 2 and vol["frame"].isna().all()
    assert check_manifest(df, root, progress=False).ok


def test_salt_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("VQMED_ID_SALT", raising=False)
    first = resolve_salt()
    assert salt_file() == tmp_path / "cfg" / "vqmed" / "id_salt"
    assert salt_file().stat().st_mode & 0o777 == 0o600 and len(first) == 64
    assert resolve_salt() == first  # created once, then reused
    monkeypatch.setenv("VQMED_ID_SALT", "from-env")
    assert resolve_salt() == "from-env" and resolve_salt("explicit") == "explicit"


# ----------------------------------------------------------------------------------- manifest I/O


def test_manifest_roundtrip_and_validation(tmp_path, chest_built):
    df = chest_built[0].iloc[:5].copy()
    df.loc[df.index[0], "path"] = "chest_xray/ünïcødé, with comma/肺.jpeg"
    path = tmp_path / "m.csv"
    write_manifest(df, path)
    pd.testing.assert_frame_equal(read_manifest(path), df.reset_index(drop=True))

    lines = path.read_text(encoding="utf-8").splitlines()
    def bad(text: str | bytes, match: str) -> None:
        p = tmp_path / "bad.csv"
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        with pytest.raises(ManifestError, match=match):
            read_manifest(p)

    bad("\n".join(lines[:3]).encode() + b"\n\xff\xfe,broken\n", r"line 4 is not valid UTF-8")
    bad("\n".join([lines[0].replace("patient_id", "patient")] + lines[1:]), r"missing required column.*patient_id")
    bad("\n".join(lines[:3] + [lines[3] + ",extra"]), r"line 4 has 11 fields, the header has 10")
    bad("\n".join(lines[:2] + [lines[2] + "x"]), r"line 3, column 'frame': 'x'")
    bad("\n".join(lines[:2] + ["," + lines[2].split(",", 1)[1]]), r"line 3 has an empty 'study_id'")
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(tmp_path / "nope.csv")


def test_check_reports_problems(chest_built, data_root):
    df = chest_built[0].iloc[:20].copy().reset_index(drop=True)
    extra = df.iloc[[0, 1, 2]].copy()
    extra.iloc[0, extra.columns.get_loc("path")] = "chest_xray/train/NORMAL/does-not-exist.jpeg"
    extra.iloc[0, extra.columns.get_loc("study_id")] = "new-study"
    extra.iloc[2, extra.columns.get_loc("split")] = "train"  # same study & patient now in train and test
    extra.iloc[2, extra.columns.get_loc("study_id")] = "moved-study"
    report = check_manifest(pd.concat([df, extra], ignore_index=True), data_root, progress=False)
    assert report.missing == [(20, "chest_xray/train/NORMAL/does-not-exist.jpeg")]
    assert report.duplicate_study_ids == [df.loc[1, "study_id"]]
    assert report.split_leaks == {df.loc[2, "patient_id"]: ["test", "train"]}
    assert not report.ok and report.summary().endswith("FAILED") and "does-not-exist" in report.summary(keep_paths=True)
    assert "does-not-exist" not in report.summary() and "line 22" in report.summary()


# ----------------------------------------------------------------------------------- DICOM pixels


def _border_and_centre(img: np.ndarray) -> tuple[float, float]:
    s = img.shape[0]
    b = max(1, round(0.05 * s))
    border = np.ones_like(img, dtype=bool)
    border[b:-b, b:-b] = False
    return float(img[border].mean()), float(img[s // 4 : s - s // 4, s // 4 : s - s // 4].mean())


@pytest.fixture(scope="module")
def chest_previews(data_root, tmp_path_factory):
    files = [data_root / "dicom" / "chest" / n for n in CHEST_DICOMS] + [Path(get_testdata_file("RG1_UNCR.dcm"))]
    out = tmp_path_factory.mktemp("preview")
    records = preview_files(files, out, ImageSpec(128), keep_paths=True)
    return {Path(r["file"]).name: (r, np.asarray(Image.open(out / r["png"]), dtype=np.float32) / 255) for r in records}


# Only films with air around the patient: the CR pair (cr_chest_pa_mono1_jpegls_near_lossless.dcm and
# RG1_UNCR.dcm, one image) is collimated to the chest, so its border is collimator edge and soft tissue; for
# it the right properties are the two tests below (lungs darker than the mediastinum; output anti-correlated
# with the stored MONOCHROME1 values).
@pytest.mark.parametrize("name", ["dx_chest_pa_mono1_j2k_lossless.dcm", "cr_chest_pa_rsna_jpeg_baseline.dcm"])
def test_air_dark_border_below_centre(chest_previews, name):
    record, img = chest_previews[name]
    border, centre = _border_and_centre(img)
    assert border < centre, f"{name}: border {border:.3f} >= centre {centre:.3f}"


@pytest.mark.parametrize("name", CHEST_DICOMS + ["RG1_UNCR.dcm"])
def test_air_dark_lungs_below_mediastinum(chest_previews, name):
    """Air dark, bone bright on every chest radiograph: both lung fields darker than the mediastinum/spine."""
    record, img = chest_previews[name]
    s = img.shape[0]
    rows = slice(int(0.3 * s), int(0.6 * s))
    lungs = np.r_[img[rows, int(0.2 * s) : int(0.35 * s)].ravel(), img[rows, int(0.65 * s) : int(0.8 * s)].ravel()].mean()
    mediastinum = img[rows, int(0.45 * s) : int(0.55 * s)].mean()
    assert lungs + 0.15 < mediastinum, f"{name}: lungs {lungs:.3f} vs mediastinum {mediastinum:.3f}"
    assert record["status"] == "ok" and record["modality"] in ("CR", "DX")


@pytest.mark.parametrize("name,expected_sign", [(CHEST_DICOMS[0], -1), (CHEST_DICOMS[1], -1), (CHEST_DICOMS[2], 1),
                                                ("RG1_UNCR.dcm", -1)])
def test_monochrome1_inverted_against_raw_pixels(data_root, name, expected_sign):
    """MONOCHROME1 output anti-correlates with the stored values, MONOCHROME2 correlates."""
    path = data_root / "dicom" / "chest" / name
    if name == "RG1_UNCR.dcm":  # the collimated CR, uncompressed (pydicom-data)
        path = Path(get_testdata_file(name))
    img, facts = load_image(path, ImageSpec(64))
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    h, w = raw.shape
    raw_small = raw[: h - h % 64, : w - w % 64].reshape(64, (h - h % 64) // 64, 64, (w - w % 64) // 64).mean(axis=(1, 3))
    r = np.corrcoef(img[0].ravel(), raw_small.ravel())[0, 1]
    assert expected_sign * r > 0.9, f"{name}: correlation {r:.3f}"
    assert facts["inverted"] == (expected_sign < 0)


def test_voi_window_applied(data_root):
    """MR_small_RLE has Window 600/1600: everything at or above 1400 saturates to white."""
    path = data_root / "dicom" / "other" / "MR_small_RLE.dcm"
    img, facts = load_image(path, ImageSpec(64))  # native size: resize is the identity
    raw = pydicom.dcmread(path).pixel_array
    assert facts["voi"] == "window" and raw.max() > 1500
    assert np.all(img[0][raw >= 1400] == 1.0) and np.all(img[0][raw < 1390] < 1.0)


def test_png_and_dicom_same_orientation(data_root, tmp_path):
    path = data_root / "dicom" / "chest" / "cr_chest_pa_rsna_jpeg_baseline.dcm"
    png = tmp_path / "rsna.png"
    Image.fromarray(pydicom.dcmread(path).pixel_array).save(png)
    spec = ImageSpec(64)
    from_dicom, _ = load_image(path, spec)
    from_png, facts = load_image(png, spec)
    assert facts["format"] == "png"
    assert np.abs(from_dicom - from_png).max() < 1e-5
    assert np.abs(from_dicom[0] - from_png[0].T).mean() > 0.05  # a transposed read would be caught


def test_dicom_other_encodings_and_frames(data_root):
    other = data_root / "dicom" / "other"
    for path in sorted(other.glob("*.dcm")):
        img, facts = load_image(path, ImageSpec(32))
        assert img.shape == (1, 32, 32) and img.dtype == np.float32 and img.min() == 0.0 and img.max() == 1.0, path.name
        assert "PatientName" not in str(facts) and set(facts) >= {"modality", "photometric", "size", "encoding", "frames"}
    rgb, facts = load_image(other / "SC_rgb_rle.dcm", ImageSpec(32, channels=3))
    assert rgb.shape == (3, 32, 32) and facts["colour"] == "rgb" and not np.allclose(rgb[0], rgb[1])
    pal, facts = load_image(other / "OBXXXX1A_rle.dcm", ImageSpec(32, channels=3))
    assert facts["photometric"] == "PALETTE COLOR" and facts["colour"] == "rgb"
    f0, _ = load_image(other / "emri_small_RLE.dcm", ImageSpec(32), frame=0)
    f9, facts = load_image(other / "emri_small_RLE.dcm", ImageSpec(32), frame=9)
    assert facts["frames"] == 10 and facts["encoding"] == "RLE Lossless" and np.abs(f0 - f9).mean() > 0.01
    vol, _ = load_image(other / "mr_multiframe_10.dcm", ImageSpec(16, spatial_dims=3))
    assert vol.shape == (1, 16, 16, 16) and vol.min() == 0.0 and vol.max() == 1.0
    with pytest.raises(UnreadableImageError, match="out of range"):
        load_image(other / "emri_small_RLE.dcm", ImageSpec(32), frame=10)
    with pytest.raises(UnreadableImageError, match="cannot make a 3D input"):
        load_image(other / "ct_small.dcm", ImageSpec(16, spatial_dims=3))


# ----------------------------------------------------------------------------------- other formats


def test_nifti_2d_and_3d(tmp_path):
    vol, facts = load_image(MNI, ImageSpec(32, spatial_dims=3))
    assert vol.shape == (1, 32, 32, 32) and vol.min() == 0.0 and vol.max() == 1.0
    assert facts["format"] == "nifti" and facts["size"] == "197x233x189"
    mid, facts = load_image(MNI, ImageSpec(64))
    assert mid.shape == (1, 64, 64) and facts["frame"] == 189 // 2
    # The volume is a stack of the 2D views: its middle slice matches the 2D middle slice.
    cube, _ = load_image(MNI, ImageSpec(64, spatial_dims=3))
    assert np.corrcoef(cube[0, :, :, 32].ravel(), mid[0].ravel())[0, 1] > 0.95
    # A real 2D slice saved as a 2D NIfTI loads as an image, not as a volume.
    img = nib.load(MNI)
    slice2d = np.asarray(img.dataobj[:, :, 94], dtype=np.float32)
    nib.save(nib.Nifti1Image(slice2d, img.affine), tmp_path / "slice.nii.gz")
    flat, _ = load_image(tmp_path / "slice.nii.gz", ImageSpec(64))
    assert np.abs(flat - mid).max() < 1e-5
    with pytest.raises(UnreadableImageError, match="2D NIfTI cannot make a 3D input"):
        load_image(tmp_path / "slice.nii.gz", ImageSpec(16, spatial_dims=3))
    shutil.copy(MNI, tmp_path / "mni.nii.gz")
    df, report = build_manifest(tmp_path, tmp_path, progress=False, keep_paths=True)
    assert df["path"].tolist() == ["mni.nii.gz", "slice.nii.gz"] and set(df["format"]) == {"nifti"}
    assert df["study_id"].tolist() == ["mni", "slice"]


def test_mnist_idx_frames(data_root):
    path = data_root / "mnist" / "t10k-images-idx3-ubyte.gz"
    assert hashlib.md5(path.read_bytes()).hexdigest() == "9fb629c4189551a2d022fa330f9573f3"
    raw = np.frombuffer(gzip.open(path).read(), dtype=np.uint8, offset=16).reshape(10000, 28, 28)
    for k in (0, 1234, 9999):
        img, facts = load_image(path, ImageSpec(28), frame=k)
        expected = (raw[k] - raw[k].min()) / float(raw[k].max() - raw[k].min())
        assert np.abs(img[0] - expected).max() < 1e-6 and facts["frames"] == 10000


def test_colour_and_grey_conversion(data_root):
    jpeg = data_root / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg"
    grey, facts = load_image(jpeg, ImageSpec(224))
    rgb, _ = load_image(jpeg, ImageSpec(224, channels=3))
    assert facts["colour"] == "rgb-grey" and np.array_equal(grey[0], rgb[0]) and np.array_equal(rgb[1], rgb[2])
    raw = np.asarray(Image.open(jpeg), dtype=np.float32)[..., 0]
    assert np.abs(grey[0] - (raw - raw.min()) / (raw.max() - raw.min())).max() < 1e-6  # rows = height, not transposed
    png = next((data_root / "stl10" / "bear").glob("*.png"))
    colour, facts = load_image(png, ImageSpec(96, channels=3))
    assert facts["colour"] == "rgb" and np.abs(colour[0] - colour[2]).mean() > 0.01
    luminance, _ = load_image(png, ImageSpec(96))
    lum = np.tensordot([0.299, 0.587, 0.114], np.asarray(Image.open(png).convert("RGB"), dtype=np.float32), axes=([0], [2]))
    assert np.abs(luminance[0] - (lum - lum.min()) / (lum.max() - lum.min())).max() < 1e-4


# ----------------------------------------------------------------------------------- preview


def test_preview_writes_model_view_and_facts(data_root, tmp_path):
    files = [
        data_root / "dicom" / "chest" / "cr_chest_pa_rsna_jpeg_baseline.dcm",
        data_root / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg",
        data_root / "dicom" / "broken" / "dx_chest_j2k_corrupt_codestream.dcm",
        MNI,
    ]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    out = tmp_path / "preview"
    records = preview_files(files + [empty], out, ImageSpec(64))
    assert [r["status"] for r in records] == ["ok", "ok", "quarantined", "ok", "quarantined"]
    assert "cannot be decoded" in records[2]["reason"] and records[4]["reason"] == "empty file (0 bytes)"
    png = np.asarray(Image.open(out / records[0]["png"]), dtype=np.float32) / 255
    img, _ = load_image(files[0], ImageSpec(64))
    assert png.shape == (64, 64) and np.abs(png - img[0]).max() <= 0.5 / 255 + 1e-6
    with Image.open(out / records[3]["png"]) as im:
        assert records[3]["format"] == "nifti" and im.size == (64, 64)
    volume = preview_files([MNI], tmp_path / "preview3d", ImageSpec(32, spatial_dims=3))[0]
    with Image.open(tmp_path / "preview3d" / volume["png"]) as im:
        assert im.size == (96, 32)  # three orthogonal slices
    with open(out / "preview.tsv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 5 and rows[0]["modality"] == "CR" and rows[0]["photometric"] == "MONOCHROME2"
    assert rows[0]["encoding"] == "JPEG Baseline (Process 1)" and rows[0]["size"] == "1024x1024"
    assert rows[1]["format"] == "jpeg" and rows[1]["size"] == "224x224"
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    tsv = (out / "preview.tsv").read_text()
    for value in (str(ds.PatientID), ds.StudyInstanceUID, ds.SOPInstanceUID):
        assert value not in tsv
    quarantine = (out / "quarantine.csv").read_text().splitlines()
    assert quarantine[0] == "study_id,reason" and len(quarantine) == 3
    # No file or folder name in any output by default (names may identify a patient); keep_paths puts them back.
    names = [f.name for f in files + [empty]] + ["chest_xray", "NORMAL"]
    blobs = [p.name.encode() + p.read_bytes() for p in out.iterdir()]
    assert not [n for n in names for b in blobs if n.encode() in b]
    kept = preview_files(files[2:3], tmp_path / "kept", ImageSpec(64), keep_paths=True)[0]
    assert kept["file"] == str(files[2]) and "dx_chest_j2k_corrupt_codestream.dcm" in (tmp_path / "kept" / "quarantine.csv").read_text()


def test_resize_modes_keep_the_aspect_ratio(data_root, tmp_path):
    """``squeeze`` (the default, unchanged) stretches; ``pad`` keeps the aspect ratio with black bars;
    ``crop`` keeps it by cutting the long side (a real 4:1 strip cut from the RSNA chest film)."""
    raw = pydicom.dcmread(data_root / "dicom" / "chest" / "cr_chest_pa_rsna_jpeg_baseline.dcm").pixel_array
    wide = raw[384:640, :]  # 256 x 1024
    Image.fromarray(wide).save(tmp_path / "wide.png")
    squeeze, _ = load_image(tmp_path / "wide.png", ImageSpec(64))
    scaled = np.asarray(Image.fromarray(wide.astype(np.float32)).resize((64, 64), Image.BOX))
    assert np.corrcoef(squeeze[0].ravel(), scaled.ravel())[0, 1] > 0.99  # the old behaviour is the default
    pad, _ = load_image(tmp_path / "wide.png", ImageSpec(64, resize="pad"))
    assert pad.shape == (1, 64, 64) and np.all(pad[0, :24] == 0) and np.all(pad[0, 40:] == 0)
    band = np.asarray(Image.fromarray(wide.astype(np.float32)).resize((64, 16), Image.BOX))
    assert np.corrcoef(pad[0, 24:40].ravel(), band.ravel())[0, 1] > 0.99  # 4:1 content, not squeezed
    crop, _ = load_image(tmp_path / "wide.png", ImageSpec(64, resize="crop"))
    centre = np.asarray(Image.fromarray(wide.astype(np.float32)).resize((256, 64), Image.BOX))[:, 96:160]
    assert np.corrcoef(crop[0].ravel(), centre.ravel())[0, 1] > 0.99


def test_percentile_window_ignores_a_burned_in_marker(data_root, tmp_path):
    """Min-max after downsampling lets a small bright marker set the brightness; the percentile window does not."""
    film = np.asarray(Image.open(data_root / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg").convert("L")).copy()
    Image.fromarray(film).save(tmp_path / "film.png")
    film[8:14, 8:14] = 255  # an "R" marker's worth of burned-in white
    film[8:14, 16:22] = 0
    Image.fromarray(film).save(tmp_path / "marked.png")
    shift = {}
    for mode in ("minmax", "percentile"):
        a, _ = load_image(tmp_path / "film.png", ImageSpec(64, intensity=mode))
        b, _ = load_image(tmp_path / "marked.png", ImageSpec(64, intensity=mode))
        assert 0.0 <= b.min() and b.max() <= 1.0
        shift[mode] = abs(float(a[0, 8:].mean() - b[0, 8:].mean()))  # away from the marker
    assert shift["percentile"] < 0.01 and shift["percentile"] < shift["minmax"], shift
