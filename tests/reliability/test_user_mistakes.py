"""What a new user trips over, on real files: every usage or environment mistake gives one line and exit
status 2; ``preview`` and ``export`` do not hide failures; ``manifest check`` decodes and lists exactly the
files a run would quarantine; reasons say what is wrong (truncated, not a DICOM) without library noise on
stderr; degenerate images are quarantined by a documented rule; class folders label DICOMs too.

Real data throughout (Kermany JPEGs, the corrupt JPEG 2000 chest DX, pydicom's JPEG 2000 MR); the only
synthesised files are what real data cannot show (a file cut short, a 1x1 PNG, a constant image).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from vqmed.cli import main
from vqmed.data import ImageSpec, UnreadableImageError, build_manifest, check_manifest, load_image, write_manifest
from vqmed.data.transforms import DEGENERATE_RULE

BROKEN = "dicom/broken/dx_chest_j2k_corrupt_codestream.dcm"


def _one_error_line(result, command: str) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"vqmed {command}: error: "), result.stderr
    return lines[0]


def _in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``vqmed ARGS`` in this process (the CLI's own main; a child per case would cost seconds each)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, info.value.code, out.out, out.err)


@pytest.fixture(scope="module")
def small_manifest(kermany, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mistakes") / "small.csv"
    write_manifest(kermany.iloc[::600].reset_index(drop=True), path)
    return path


def test_usage_and_environment_errors_are_one_line_exit_2(tmp_path, data_root, small_checkpoint, small_manifest,
                                                          capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(data_root / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg", elsewhere / "x.jpeg")
    jpeg = data_root / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg"
    cases = {
        # images outside the data root: the first thing a new user hits (was a 13-line ValueError)
        ("manifest", "build", elsewhere, "--data-root", data_root, "--out", tmp_path / "m.csv"): ("manifest", "--data-root"),
        ("manifest", "build", "chest_xray/test", "--data-root", data_root, "--out", tmp_path): ("manifest", "is a folder"),
        ("manifest", "build", "chest_xray/test", "--data-root", data_root, "--out", "/proc/vqmed/m.csv"): ("manifest", "not writable"),
        ("export", "--model", small_checkpoint, "--manifest", small_manifest, "--out", a_file): ("export", "existing file"),
        ("export", "--model", small_checkpoint, "--manifest", small_manifest, "--out", "/proc/vqmed"): ("export", "not writable"),
        ("preview", jpeg, "--out", a_file): ("preview", "existing file"),
        ("preview", jpeg, "--out", "/proc/vqmed"): ("preview", "not writable"),
        ("preview", jpeg, "--out", tmp_path / "p0", "--image-size", "0"): ("preview", "--image-size must be"),
        ("preview", jpeg, "--out", tmp_path / "p1", "--image-size", "-5"): ("preview", "--image-size must be"),
        ("preview", jpeg, "--out", tmp_path / "p2", "--image-size", "100000"): ("preview", "--image-size must be"),
    }
    monkeypatch.chdir(tmp_path)
    for args, (command, says) in cases.items():
        line = _one_error_line(_in_process(capsys, *args), command)
        assert says in line, (args, line)
    assert not (tmp_path / "p0").exists() and a_file.read_text() == "x"


def test_preview_exit_status_counts_failed_inputs(tmp_path, data_root, capsys):
    good = data_root / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg"
    result = _in_process(capsys, "preview", good, data_root / BROKEN, "--out", tmp_path / "p", "--image-size", "32")
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    # one line, no pydicom decoder log on stderr
    assert lines == [f"vqmed preview: 1 of 2 file(s) could not be read; reasons in {tmp_path / 'p' / 'preview.tsv'}"], result.stderr
    assert _in_process(capsys, "preview", good, "--out", tmp_path / "q", "--image-size", "32").returncode == 0


def test_export_refuses_duplicated_study_ids_before_writing(tmp_path, kermany, data_root, small_checkpoint, capsys):
    rows = kermany.iloc[[0, 1, 2]].copy().reset_index(drop=True)
    rows.loc[2, "study_id"] = rows.loc[1, "study_id"]  # two images under one id
    manifest = tmp_path / "dup.csv"
    write_manifest(rows, manifest)
    out = tmp_path / "store"
    line = _one_error_line(_in_process(capsys, "export", "--model", small_checkpoint, "--manifest", manifest, "--out", out,
                                       "--data-root", data_root, "--quiet"), "export")
    assert rows.loc[1, "study_id"] in line and "1 study id(s)" in line
    assert not out.exists() or not any(out.rglob("*"))


def test_manifest_check_decodes_and_lists_exactly_the_broken_files(tmp_path, kermany, data_root, run_cli, capsys):
    assert [p.name for p in (data_root / "dicom" / "broken").iterdir()] == [Path(BROKEN).name]  # all of dicom/broken
    good = kermany.iloc[:: len(kermany) // 100].head(100)
    broken = pd.DataFrame([{"study_id": "broken-dx", "path": BROKEN, "split": "", "label": "", "patient_id": "p",
                            "modality": "DX"}])
    df = pd.concat([good.iloc[:50], broken, good.iloc[50:]], ignore_index=True)
    report = check_manifest(df, data_root, progress=False, decode=ImageSpec(64), workers=2)
    assert [(row, path) for row, path, _ in report.unreadable] == [(50, BROKEN)]
    assert "cannot be decoded" in report.unreadable[0][2] and not report.missing and not report.ok
    # The old header-only pass says OK for the same manifest: that was the defect.
    assert check_manifest(df, data_root, progress=False).ok
    manifest = tmp_path / "m.csv"
    write_manifest(df, manifest)
    result = run_cli("manifest", "check", manifest, "--data-root", data_root, "--workers", "2")
    assert result.returncode == 1 and "files that would be quarantined: 1" in result.stdout
    assert "line 52: pixel data cannot be decoded" in result.stdout and BROKEN not in result.stdout
    assert not [ln for ln in result.stderr.splitlines() if ln.strip()], result.stderr  # no library noise
    kept = _in_process(capsys, "manifest", "check", manifest, "--data-root", data_root, "--keep-paths", "--headers-only")
    assert kept.returncode == 0 and "headers only" in kept.stdout
    assert f"line 52: {BROKEN}: pixel data cannot be decoded" in report.summary(keep_paths=True)


def test_reasons_say_what_is_wrong(tmp_path, data_root):
    mr = Path(get_testdata_file("MR_small_jp2klossless.dcm"))  # a real MR, JPEG 2000 lossless
    blob = mr.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(blob[: int(len(blob) * 0.6)])
    with pytest.raises(UnreadableImageError) as info:
        load_image(tmp_path / "cut.dcm", ImageSpec(32))
    assert info.value.reason.startswith("truncated DICOM") and "modality MR" in info.value.reason
    assert "JPEG 2000" in info.value.reason and "bytes" in info.value.reason
    shutil.copy(data_root / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg", tmp_path / "scan.dcm")
    with pytest.raises(UnreadableImageError, match=r"it is a JPEG image .* rename it to \.jpeg") as info:
        load_image(tmp_path / "scan.dcm", ImageSpec(32))
    assert "force" not in info.value.reason
    # A library message quoting the path keeps no file or folder name.
    (tmp_path / "Doe_John_MRN12345").mkdir()
    (tmp_path / "Doe_John_MRN12345" / "scan.png").write_bytes(b"not a png at all")
    with pytest.raises(UnreadableImageError) as info:
        load_image(tmp_path / "Doe_John_MRN12345" / "scan.png", ImageSpec(32))
    assert "MRN12345" not in info.value.reason and "<file>" in info.value.reason


def test_degenerate_images_are_quarantined_by_the_rule(tmp_path, data_root):
    real = np.asarray(Image.open(data_root / "chest_xray" / "test" / "NORMAL" / "IM-0001-0001.jpeg").convert("L"))
    Image.fromarray(real[:1, :1]).save(tmp_path / "one.png")
    Image.fromarray(np.full_like(real, real[100, 100])).save(tmp_path / "constant.png")
    Image.fromarray(np.tile(real[:, :4], (1, 1))).save(tmp_path / "strip.png")  # 224 x 4
    Image.fromarray(np.tile(real[:10], (1, 1))).save(tmp_path / "band.png")  # 10 x 224: 22-fold
    expected = {"one.png": "a side is under 8", "constant.png": "constant", "strip.png": "a side is under 8",
                "band.png": "differ more than 20-fold"}
    for name, says in expected.items():
        with pytest.raises(UnreadableImageError, match="degenerate image") as info:
            load_image(tmp_path / name, ImageSpec(32))
        assert says in info.value.reason, (name, info.value.reason)
    Image.fromarray(real[:100]).save(tmp_path / "wide.png")  # 100 x 224: loads
    assert load_image(tmp_path / "wide.png", ImageSpec(32))[0].shape == (1, 32, 32)
    assert "same value" in DEGENERATE_RULE


def test_class_folders_label_dicoms_too_and_unlabeled_rows_warn(tmp_path, data_root):
    root = tmp_path / "root"
    for label in ("NORMAL", "PNEUMONIA"):
        (root / "cxr" / label).mkdir(parents=True)
        shutil.copy(data_root / "dicom" / "chest" / "cr_chest_pa_rsna_jpeg_baseline.dcm", root / "cxr" / label / "x.dcm")
        shutil.copy(data_root / "chest_xray" / "test" / label / sorted(p.name for p in (data_root / "chest_xray" / "test" / label).iterdir())[0],
                    root / "cxr" / label / "x.jpeg")
    df, report = build_manifest(root / "cxr", root, salt="s", progress=False)
    labels = dict(zip(df["path"], df["label"]))
    assert labels == {"cxr/NORMAL/x.dcm": "NORMAL", "cxr/NORMAL/x.jpeg": "NORMAL",
                      "cxr/PNEUMONIA/x.dcm": "PNEUMONIA", "cxr/PNEUMONIA/x.jpeg": "PNEUMONIA"}
    assert "warning" not in report
    # An archive's deeper folders (patient / study, often named after the patient) are never labels.
    (root / "archive" / "Doe_John" / "20011109").mkdir(parents=True)
    shutil.copy(data_root / "dicom" / "chest" / "cr_chest_pa_rsna_jpeg_baseline.dcm", root / "archive" / "Doe_John" / "20011109" / "1.dcm")
    df, report = build_manifest(root / "archive", root, salt="s", progress=False)
    assert df["label"].tolist() == [""] and "1 of 1 rows have no label" in report["warning"]
