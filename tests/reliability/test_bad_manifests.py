"""Manifests: paths that escape the data root are refused unless explicitly allowed, and malformed
manifest files give a ``ManifestError`` naming the file, the line and the problem (never a traceback)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from vqmed.data import ImageDataset, ImageSpec, ManifestError, check_manifest, read_manifest
from vqmed.export import export_manifest, load

ESCAPES = "path escapes the data root (not allowed)"
HEADER = "study_id,path,split,label,patient_id,modality\n"


@pytest.fixture()
def small_root(tmp_path, kermany, data_root):
    """A data root holding 4 real X-rays, a real X-ray outside it and a symbolic link pointing there."""
    root = tmp_path / "root"
    good = kermany.iloc[[0, 2000, 4000, 5500]].reset_index(drop=True)
    for rel in good["path"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / rel, root / rel)
    outside = tmp_path / "outside" / "elsewhere.jpeg"
    outside.parent.mkdir()
    shutil.copy(data_root / kermany["path"].iloc[100], outside)
    (root / "link out.jpeg").symlink_to(outside)
    return root, good, outside


def _rows(paths: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"study_id": [f"s{i}" for i in range(len(paths))], "path": paths})


def test_paths_escaping_the_root_are_refused_unless_allowed(small_root):
    root, good, outside = small_root
    inside_detour = f"{good['path'][0].split('/')[0]}/../{good['path'][0]}"  # '..' that stays inside: fine
    escapes = ["../../etc/passwd", "/etc/passwd", str(outside), "../outside/elsewhere.jpeg", "link out.jpeg",
               f"{good['path'][1]}/../../../../../etc/passwd"]
    manifest = pd.concat([_rows(list(good["path"]) + [inside_detour]), _rows(escapes)], ignore_index=True)
    ds = ImageDataset(manifest, root, ImageSpec(32), progress=False)
    assert len(ds) == 5 and manifest["path"].iloc[ds.rows].tolist() == list(good["path"]) + [inside_detour]
    assert dict(ds.quarantine.entries) == {p: ESCAPES for p in escapes}
    with pytest.raises(Exception, match="escapes the data root"):
        ImageDataset(manifest, root, ImageSpec(32), progress=False, fail_fast=True)
    # check_manifest reports them too.
    report = check_manifest(manifest.assign(split="", label="", patient_id="", modality=""), root, progress=False)
    assert sorted(r[1] for r in report.unreadable) == sorted(escapes) and not report.ok

    # Explicitly allowed: the real X-ray outside the root (by absolute path, relative path and link)
    # decodes; the passwd paths are then refused for what they are (not an image, or no such file
    # this far up from the root), no longer for where they are.
    allowed = ImageDataset(manifest, root, ImageSpec(32), progress=False, allow_outside_root=True)
    assert len(allowed) == 8
    reasons = dict(allowed.quarantine.entries)
    assert set(reasons) == {"../../etc/passwd", "/etc/passwd", escapes[-1]}
    assert reasons["/etc/passwd"] == "unsupported file type (no suffix)"
    assert all(r in ("file not found", "unsupported file type (no suffix)") for r in reasons.values()), reasons


def test_export_quarantines_escaping_rows(small_root, small_checkpoint, tmp_path):
    root, good, outside = small_root
    manifest = pd.concat([good, _rows(["../../etc/passwd", str(outside)]).assign(split="train", label="",
                                                                                   patient_id="p", modality="")])
    path = tmp_path / "escapes.csv"
    manifest.to_csv(path, index=False)
    summary = export_manifest(small_checkpoint, path, tmp_path / "store", root, progress=False, keep_paths=True)
    assert (summary["exported"], summary["quarantined"]) == (4, 2)
    assert sorted(load(tmp_path / "store").index["path"]) == sorted(good["path"])
    listed = pd.read_csv(tmp_path / "store" / "quarantine.csv")
    assert sorted(listed["path"]) == sorted(["../../etc/passwd", str(outside)]) and set(listed["reason"]) == {ESCAPES}


MALFORMED = {
    # name: (file bytes, what the error must say)
    "missing columns": (b"study_id,path,split\nA,a.jpeg,train\n", r"missing required column\(s\) \['label', 'patient_id', 'modality'\]"),
    "latin-1 bytes": (HEADER.encode() + "A,caf\u00e9.jpeg,train,,p,\n".encode("latin-1"), r"line 2 is not valid UTF-8"),
    "a JPEG, not a CSV": (None, r"line 1 is not valid UTF-8"),
    "UTF-16 text": (HEADER.encode("utf-16-le") + b"A\x00", r"line 1 contains a NUL byte"),
    "NUL byte in a row": (HEADER.encode() + b"A,a\x00b.jpeg,train,,p,\n", r"line 2 contains a NUL byte"),
    "random bytes": (None, r"not valid UTF-8|NUL byte|missing required column"),
    "wrong number of fields": (HEADER.encode() + b"A,a.jpeg,train,,p,CR\nB,b.jpeg,train\n", r"row at line 3 has 3 fields, the header has 6"),
    "empty path": (HEADER.encode() + b"A,a.jpeg,train,,p,\nB,,train,,p,\n", r"row at line 3 has an empty 'path'"),
    "bad frame": ((HEADER.strip() + ",frame\n").encode() + b"A,a.jpeg,train,,p,,two\n", r"line 2, column 'frame': 'two' is not a non-negative integer"),
    "duplicate columns": (b"study_id,path,path,split,label,patient_id,modality\n", r"duplicate column names"),
    "empty file": (b"", r"empty file \(no header\)"),
    "huge field": (HEADER.encode() + b"A," + b"x" * 200_000 + b",train,,p,\n", r"line 2 is not valid CSV \(field larger"),
    "unterminated quote": (HEADER.encode() + b'"A,a.jpeg,train,,p,\n', r"row at line 2 has 1 fields"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_names_the_problem(case, tmp_path, kermany, data_root):
    blob, message = MALFORMED[case]
    if case == "a JPEG, not a CSV":
        blob = (data_root / kermany["path"].iloc[0]).read_bytes()
    elif case == "random bytes":
        blob = __import__("random").Random(3).randbytes(3000)
    path = tmp_path / f"{case}.csv"
    path.write_bytes(blob)
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_cli_reports_a_malformed_manifest_in_one_line(tmp_path, run_cli):
    path = tmp_path / "latin1.csv"
    path.write_bytes(HEADER.encode() + "A,r\u00f6ntgen.jpeg,train,,p,\n".encode("latin-1"))
    result = run_cli("manifest", "check", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    byte = path.read_bytes().index(b"\xf6")
    assert result.stderr.strip() == f"vqmed manifest: error: {path}: line 2 is not valid UTF-8 (byte {byte})"
