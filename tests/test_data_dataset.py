"""vqmed.data.ImageDataset on the real data: cache, quarantine of bad files, hardening, loaders."""

from __future__ import annotations

import csv
import multiprocessing
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.uid import UID

from vqmed.data import ImageDataset, ImageSpec, UnreadableImageError, load_image, read_manifest, resolve_data_root

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root() -> Path:
    return resolve_data_root()


@pytest.fixture(scope="module")
def kermany() -> pd.DataFrame:
    return read_manifest(REPO / "data_manifests" / "chest_xray.csv")


def _spread(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """n rows spread over both splits and labels."""
    return df.iloc[np.linspace(0, len(df) - 1, n).astype(int)].reset_index(drop=True)


def _copy_rows(df: pd.DataFrame, src_root: Path, dst_root: Path) -> None:
    for rel in df["path"]:
        (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / rel, dst_root / rel)


def _bad_row(path: str, study: str) -> dict:
    return {"study_id": study, "path": path, "split": "train", "label": "", "patient_id": study, "modality": "",
            "format": "", "series_id": "", "instance": None, "frame": None}


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR claims width x height (and nothing else): a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------- cache


def test_cache_second_pass_decodes_nothing(kermany, data_root, tmp_path):
    df = _spread(kermany, 60)
    spec = ImageSpec(32)
    first = ImageDataset(df, data_root, spec, cache_dir=tmp_path / "cache", progress=False)
    assert len(first) == 60 and first.stats["decoded"] == 60 and first.stats["cached"] == 0
    second = ImageDataset(df, data_root, spec, cache_dir=tmp_path / "cache", progress=False)
    assert second.stats["decoded"] == 0 and second.stats["cached"] == 60
    uncached = ImageDataset(df, data_root, spec, cache_dir=None, progress=False)
    for i in (0, 17, 59):
        a, b, c = first[i], second[i], uncached[i]
        assert a["row"] == b["row"] == c["row"] == i
        assert a["image"].dtype == torch.float32 and a["image"].shape == (1, 32, 32)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        # 8-bit cache: within half a grey level of the float image the model would otherwise get.
        direct, _ = load_image(data_root / df["path"][i], spec)
        assert np.abs(a["image"].numpy() - direct).max() <= 0.5 / 255 + 1e-6
    assert list((tmp_path / "cache").iterdir())[0].name == spec.key()


def test_cache_key_covers_content_and_spec(kermany, data_root, tmp_path):
    df = _spread(kermany, 4)
    root = tmp_path / "root"
    _copy_rows(df, data_root, root)
    cache = tmp_path / "cache"
    ImageDataset(df, root, ImageSpec(32), cache_dir=cache, progress=False)
    # Same bytes under a new name: found in the cache. Edited bytes: decoded again.
    shutil.copy(data_root / kermany["path"][3000], root / df["path"][0])
    edited = ImageDataset(df, root, ImageSpec(32), cache_dir=cache, progress=False)
    assert edited.stats["decoded"] == 1 and edited.stats["cached"] == 3
    expected, _ = load_image(data_root / kermany["path"][3000], ImageSpec(32))
    assert np.abs(edited[0]["image"].numpy() - expected).max() <= 0.5 / 255 + 1e-6
    bigger = ImageDataset(df, root, ImageSpec(48), cache_dir=cache, progress=False)
    assert bigger.stats["decoded"] == 4 and bigger[0]["image"].shape == (1, 48, 48)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # one folder per spec


def _rank(df: pd.DataFrame, data_root: Path, cache: Path, out: Path, queue) -> None:
    ds = ImageDataset(df, data_root, ImageSpec(32), cache_dir=cache, progress=False)
    np.save(out, np.stack([ds[i]["image"].numpy() for i in range(len(ds))]))
    queue.put(ds.stats)


def test_cache_two_processes_at_once(kermany, data_root, tmp_path):
    """Two DDP-like ranks build the same cache at the same time: both succeed with identical
    images, the files are decoded once in total, and no temporary file is left behind."""
    df = _spread(kermany, 80)
    ctx = multiprocessing.get_context("fork")  # the test process has torch loaded: no import cost
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(df, data_root, tmp_path / "cache", tmp_path / f"rank{r}.npy", queue))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    stats = [queue.get(timeout=5) for _ in procs]
    assert sorted(s["decoded"] for s in stats) == [0, 80] and all(s["kept"] == 80 for s in stats)
    assert np.array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))
    folder = tmp_path / "cache" / ImageSpec(32).key()
    assert len(list(folder.glob("chunk-*.npy"))) == 1 and not list(folder.glob(".tmp-*"))
    assert ImageDataset(df, data_root, ImageSpec(32), cache_dir=tmp_path / "cache", progress=False).stats["decoded"] == 0


# ----------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def mixed_root(kermany, data_root, tmp_path_factory):
    """100 good Kermany images plus one of each kind of bad file, in one data root."""
    root = tmp_path_factory.mktemp("mixed")
    good = _spread(kermany, 100)
    _copy_rows(good, data_root, root)
    bad = root / "bad"
    bad.mkdir()
    shutil.copy(data_root / "dicom" / "broken" / "dx_chest_j2k_corrupt_codestream.dcm", bad / "corrupt.dcm")
    (bad / "zero.jpeg").write_bytes(b"")
    jpeg = (data_root / good["path"][0]).read_bytes()
    (bad / "truncated.jpeg").write_bytes(jpeg[: len(jpeg) * 6 // 10])
    ds = pydicom.dcmread(data_root / "dicom" / "other" / "ct_small.dcm")
    del ds.PixelData
    ds.save_as(bad / "no_pixels.dcm")
    ds = pydicom.dcmread(data_root / "dicom" / "chest" / "cr_chest_pa_rsna_jpeg_baseline.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder exists
    ds.save_as(bad / "mpeg2.dcm")
    _png_header_only(bad / "huge.png", 100_000, 100_000)
    expected = {
        "bad/corrupt.dcm": r"pixel data cannot be decoded \(JPEG 2000",
        "bad/zero.jpeg": r"^empty file \(0 bytes\)$",
        "bad/truncated.jpeg": r"cannot decode image: image file is truncated",
        "bad/no_pixels.dcm": r"^DICOM has no pixel data",
        "bad/mpeg2.dcm": r"^unsupported encoding MPEG2",
        "bad/huge.png": r"absurd|max_pixels",
    }
    rows = [_bad_row(p, f"bad{i}") for i, p in enumerate(expected)]
    # Interleave the bad rows between the good ones.
    manifest = pd.concat([good.iloc[:50], pd.DataFrame(rows[:3]), good.iloc[50:], pd.DataFrame(rows[3:])], ignore_index=True)
    return root, manifest, good, expected


def test_bad_files_quarantined_good_kept(mixed_root, tmp_path):
    root, manifest, good, expected = mixed_root
    ds = ImageDataset(manifest, root, ImageSpec(32), progress=False)
    assert len(ds) == 100
    kept_paths = manifest["path"].iloc[ds.rows].tolist()
    assert kept_paths == good["path"].tolist()
    assert [ds[i]["row"] for i in (0, 50, 99)] == [0, 53, 102]
    assert len(ds.quarantine) == len(expected) == 6
    for path, reason in ds.quarantine.entries:
        assert path in expected and __import__("re").search(expected[path], reason), (path, reason)
    out = tmp_path / "q" / "quarantine.csv"
    ds.quarantine.write(out, keep_paths=True)
    with open(out, encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["study_id", "reason", "path"] and sorted(r[2] for r in rows[1:]) == sorted(expected)
    assert all(len(r) == 3 and r[1] for r in rows[1:])
    ds.quarantine.write(out)  # the default: salted study ids, no path (names may identify a patient)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("study_id,reason\n") and not any(Path(p).name in text for p in expected)


def test_fail_fast_raises_on_first_bad_file(mixed_root):
    root, manifest, _, _ = mixed_root
    with pytest.raises(UnreadableImageError) as info:
        ImageDataset(manifest.iloc[45:51], root, ImageSpec(32), fail_fast=True, progress=False)
    assert info.value.path == "bad/corrupt.dcm" and "cannot be decoded" in info.value.reason


def test_hardening_paths_sizes_and_names(kermany, data_root, tmp_path):
    root = tmp_path / "root"
    good = _spread(kermany, 2)
    _copy_rows(good, data_root, root)
    src = data_root / good["path"][0]
    (root / "ünïcødé 肺").mkdir()
    shutil.copy(src, root / "ünïcødé 肺" / "Röntgen, PA.jpeg")
    shutil.copy(src, tmp_path / "outside.jpeg")
    (root / "link_out.jpeg").symlink_to(tmp_path / "outside.jpeg")
    (root / "dangling.jpeg").symlink_to(root / "gone.jpeg")
    ds = pydicom.dcmread(data_root / "dicom" / "other" / "ct_small.dcm")
    ds.Rows, ds.Columns = 60000, 60000  # header lies: 3.6e9 pixels
    ds.save_as(root / "absurd.dcm")
    rows = ["ünïcødé 肺/Röntgen, PA.jpeg", "../outside.jpeg", "link_out.jpeg", "dangling.jpeg", "missing.jpeg", "absurd.dcm", ""]
    manifest = pd.concat([good, pd.DataFrame([_bad_row(p, f"x{i}") for i, p in enumerate(rows)])], ignore_index=True)
    dset = ImageDataset(manifest, root, ImageSpec(32), progress=False)
    reasons = dict(dset.quarantine.entries)
    assert len(dset) == 3 and manifest["path"][dset.rows[-1]] == "ünïcødé 肺/Röntgen, PA.jpeg"
    assert reasons == {
        "../outside.jpeg": "path escapes the data root (not allowed)",
        "link_out.jpeg": "path escapes the data root (not allowed)",
        "dangling.jpeg": "broken symbolic link",
        "missing.jpeg": "file not found",
        "absurd.dcm": "header declares 3,600,000,000 pixels, more than max_pixels=536,870,912",
        "": "empty path in manifest",
    }
    allowed = ImageDataset(manifest.iloc[:5], root, ImageSpec(32), progress=False, allow_outside_root=True)
    assert len(allowed) == 5
    small = ImageDataset(good, root, ImageSpec(32), progress=False, max_pixels=10_000)
    assert len(small) == 0 and all("224x224 pixels, more than max_pixels=10,000" in r for _, r in small.quarantine.entries)


def _quarantine_as(uid: int | None, df: pd.DataFrame, root: Path, queue) -> None:
    if uid is not None:  # drop root's privileges so that file permissions apply
        os.setgid(uid)
        os.setuid(uid)
    ds = ImageDataset(df, root, ImageSpec(32), progress=False)
    queue.put((len(ds), ds.quarantine.entries))


def test_unreadable_permissions(kermany, data_root):
    good = _spread(kermany, 2)
    root = Path(tempfile.mkdtemp(prefix="vqmed-perm-"))
    try:
        root.chmod(0o755)  # traversable by the unprivileged user below
        _copy_rows(good, data_root, root)
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (root / good["path"][0]).chmod(0)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_quarantine_as, args=(65534 if os.geteuid() == 0 else None, good, root, queue))
        proc.start()
        proc.join(timeout=120)
        assert proc.exitcode == 0
        kept, entries = queue.get(timeout=5)
        assert kept == 1 and entries == [(good["path"][0], "permission denied")]
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------- loaders, progress


def test_dataloader_workers_read_the_memory_map(kermany, data_root, tmp_path):
    df = _spread(kermany, 8)
    ds = ImageDataset(df, data_root, ImageSpec(32), cache_dir=tmp_path / "c", progress=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.stack([ds[i]["image"] for i in range(8)]))
    assert torch.cat([b["row"] for b in batches]).tolist() == list(range(8))


def test_progress_quiet_under_ci(kermany, data_root, tmp_path, monkeypatch, capfd):
    df = _spread(kermany, 5)
    monkeypatch.setenv("CI", "1")
    ImageDataset(df, data_root, ImageSpec(32), cache_dir=tmp_path / "c", progress=True)
    assert capfd.readouterr().err == ""
    monkeypatch.delenv("CI")
    ImageDataset(df, data_root, ImageSpec(40), cache_dir=tmp_path / "c", progress=True)
    assert "decode" in capfd.readouterr().err


def test_dicom_frames_and_3d_volumes(data_root, tmp_path):
    """Multi-frame DICOM rows (one per frame) and 3D inputs (NIfTI volume, multi-frame DICOM volume)."""
    from vqmed.data import build_manifest

    frames, _ = build_manifest(data_root / "dicom" / "other", data_root, salt="s", progress=False)
    ds = ImageDataset(frames, data_root, ImageSpec(32), cache_dir=tmp_path / "c", progress=False)
    assert len(ds) == len(frames) == 50 and len(ds.quarantine) == 0
    emri = np.flatnonzero(frames["path"].str.endswith("emri_small_RLE.dcm").to_numpy())
    images = torch.stack([ds[int(i)]["image"] for i in emri])
    assert len(emri) == 10 and (images[1:] - images[:-1]).abs().mean() > 0.005  # frames differ

    root = tmp_path / "vol"
    root.mkdir()
    mni = Path(__import__("nilearn").__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    shutil.copy(mni, root / "mni.nii.gz")
    shutil.copy(data_root / "dicom" / "other" / "mr_multiframe_10.dcm", root / "mr.dcm")
    shutil.copy(data_root / "dicom" / "other" / "ct_small.dcm", root / "ct.dcm")  # single frame: not a volume
    vols, _ = build_manifest(root, root, salt="s", progress=False, multiframe="volume")
    ds3 = ImageDataset(vols, root, ImageSpec(16, spatial_dims=3), cache_dir=tmp_path / "c", progress=False)
    assert len(ds3) == 2 and ds3[0]["image"].shape == (1, 16, 16, 16)
    assert ds3.quarantine.entries == [("ct.dcm", "single-frame DICOM cannot make a 3D input (series stacking is not supported)")]
