"""Malformed inputs: a corpus of 70+ bad files made in the test from the real data (truncated and
bit-flipped DICOM, JPEG, PNG and NIfTI; zero-byte files; headers claiming absurd sizes; DICOM without
pixels; wrong extensions; broken links; a file without read permission; NUL bytes and over-long names),
mixed with good files under paths with spaces and non-ASCII characters.

Every file goes through ``ImageDataset`` in a child process (as user ``nobody`` when the test runs as
root, so that file permissions apply): each is either decoded to a valid image or quarantined with a
reason, none crashes or hangs (time per file is bounded), peak memory stays bounded, and a manifest of
all of them yields exactly the files that decode.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import UID

REPO = Path(__file__).resolve().parents[2]
NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
SEED = 1234
MAX_SECONDS_PER_FILE = 5.0  # no hang: the slowest real decode (a 2128 x 2000 JPEG 2000 DICOM) takes ~1 s
MAX_RSS_GROWTH_MB = 400  # bounded memory: a bomb under the old limits took 3.8 GB (see readers.MAX_2D_PIXELS)
NOBODY = 65534

# What each file must give: "good" decodes, "bad" is quarantined, "either" may do both (a flipped bit in
# entropy-coded data gives a valid but altered image; that is not a failure, a crash or hang would be).
GOOD, BAD, EITHER = "good", "bad", "either"


def _flip(data: bytes, rng: random.Random, n: int, lo: int = 0, hi: int | None = None) -> bytes:
    b = bytearray(data)
    hi = len(b) if hi is None else min(hi, len(b))
    for _ in range(n):
        i = rng.randrange(lo, hi)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _cut(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png(width: int, height: int) -> bytes:
    """A valid PNG whose IHDR claims width x height, with a tiny IDAT (one row's worth of zeros)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


def _jpeg_with_size(data: bytes, height: int, width: int) -> bytes:
    """The same JPEG with its SOF header claiming another size (entropy data unchanged)."""
    b = bytearray(data)
    i = 2
    while i < len(b):
        marker, length = b[i + 1], struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            b[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(b)
        i += 2 + length
    raise ValueError("no SOF marker")


def _data_offset(dicom_bytes: bytes) -> int:
    """Byte offset of the PixelData element's value (to flip bits in pixels, not in the header)."""
    return dicom_bytes.rfind(b"\xe0\x7f\x10\x00") + 12


def build_corpus(root: Path, data_root: Path, kermany) -> list[dict]:
    """Write the corpus under ``root``; returns one ``{"path", "expect", "kind"}`` per manifest row."""
    rng = random.Random(SEED)
    rows: list[dict] = []

    def put(rel: str, data: bytes | None, expect: str, kind: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        rows.append({"path": rel, "expect": expect, "kind": kind})

    chest = data_root / "dicom" / "chest"
    jpeg_a = (data_root / kermany["path"].iloc[0]).read_bytes()
    jpeg_b = (data_root / kermany["path"].iloc[4000]).read_bytes()
    png = next((data_root / "stl10").rglob("*.png")).read_bytes()
    rsna = (chest / "cr_chest_pa_rsna_jpeg_baseline.dcm").read_bytes()
    jpegls = (chest / "cr_chest_pa_mono1_jpegls_near_lossless.dcm").read_bytes()
    j2k = (chest / "dx_chest_pa_mono1_j2k_lossless.dcm").read_bytes()
    ct = (data_root / "dicom" / "other" / "ct_small.dcm").read_bytes()
    rle = (data_root / "dicom" / "other" / "MR_small_RLE.dcm").read_bytes()
    nii = (NIB_DATA / "anatomical.nii").read_bytes()
    niigz = (NIB_DATA / "example4d.nii.gz").read_bytes()

    # --- good files, some under names with spaces and non-ASCII characters -----------------------
    for i, rel in enumerate(kermany["path"].iloc[[10, 1500, 3000, 5000]]):
        name = ["plain.jpeg", "Röntgen Thorax 肺 #1.jpeg", "ünïcødé dir/a b.jpeg", "x.jpeg"][i]
        put(f"good ones/{name}", (data_root / rel).read_bytes(), GOOD, "good jpeg")
    put("good ones/stl 10 ✈.png", png, GOOD, "good png")
    put("good ones/rsna chest.dcm", rsna, GOOD, "good dicom")
    put("good ones/ct.dcm", ct, GOOD, "good dicom")
    put("good ones/anatomical ä.nii", nii, GOOD, "good nifti")
    put("good ones/4d.nii.gz", niigz, GOOD, "good nifti")
    put("good ones/jpeg named .png.png", jpeg_a, GOOD, "wrong extension (content decides)")
    (root / "good ones" / "link to plain.jpeg").symlink_to(root / "good ones" / "plain.jpeg")
    rows.append({"path": "good ones/link to plain.jpeg", "expect": GOOD, "kind": "symlink inside the root"})

    # --- truncated --------------------------------------------------------------------------------
    for f in (0.1, 0.5, 0.9, 0.99):
        put(f"bad files/truncated ü/röntgen {int(f * 100)}%.jpeg", _cut(jpeg_a, f), BAD, "truncated jpeg")
    put("bad files/truncated ü/jpeg header only.jpeg", jpeg_a[:20], BAD, "truncated jpeg")
    for f in (0.1, 0.5, 0.95):
        put(f"bad files/truncated ü/stl {int(f * 100)}.png", _cut(png, f), BAD, "truncated png")
    put("bad files/truncated ü/png signature only.png", png[:8], BAD, "truncated png")
    put("bad files/truncated ü/rsna header cut.dcm", rsna[:300], BAD, "truncated dicom")
    put("bad files/truncated ü/rsna 50.dcm", _cut(rsna, 0.5), BAD, "truncated dicom")
    put("bad files/truncated ü/rsna 95.dcm", _cut(rsna, 0.95), BAD, "truncated dicom")
    put("bad files/truncated ü/ct 50.dcm", _cut(ct, 0.5), BAD, "truncated dicom")
    put("bad files/truncated ü/ct 99.dcm", _cut(ct, 0.99), BAD, "truncated dicom")
    put("bad files/truncated ü/rle 60.dcm", _cut(rle, 0.6), BAD, "truncated dicom")
    put("bad files/truncated ü/jpeg-ls 50.dcm", _cut(jpegls, 0.5), BAD, "truncated dicom")
    put("bad files/truncated ü/j2k 50.dcm", _cut(j2k, 0.5), BAD, "truncated dicom")
    put("bad files/truncated ü/nifti header cut.nii", nii[:100], BAD, "truncated nifti")
    put("bad files/truncated ü/nifti 50.nii", _cut(nii, 0.5), BAD, "truncated nifti")
    put("bad files/truncated ü/nifti 95.nii", _cut(nii, 0.95), BAD, "truncated nifti")
    for f in (0.1, 0.5):
        put(f"bad files/truncated ü/4d {int(f * 100)}.nii.gz", _cut(niigz, f), BAD, "truncated nifti")
    # Cut inside the second volume: the first one, the only one read for a 2D input, is whole.
    put("bad files/truncated ü/4d 95.nii.gz", _cut(niigz, 0.95), EITHER, "truncated nifti")

    # --- bit flips (seeded) -------------------------------------------------------------------------
    for n, (lo, hi) in {1: (700, None), 8: (700, None), 64: (700, None), 4: (2, 600)}.items():
        put(f"bad files/flipped/jpeg {n} bits.jpeg", _flip(jpeg_b, rng, n, lo, hi), EITHER, "bit-flipped jpeg")
    put("bad files/flipped/png idat 1 bit.png", _flip(png, rng, 1, 60), EITHER, "bit-flipped png")
    put("bad files/flipped/png 8 bits.png", _flip(png, rng, 8, 8), EITHER, "bit-flipped png")
    put("bad files/flipped/png ihdr 2 bits.png", _flip(png, rng, 2, 16, 29), EITHER, "bit-flipped png")
    px = _data_offset(rsna)
    put("bad files/flipped/rsna pixels 1 bit.dcm", _flip(rsna, rng, 1, px + 700), EITHER, "bit-flipped dicom")
    put("bad files/flipped/rsna pixels 32 bits.dcm", _flip(rsna, rng, 32, px), EITHER, "bit-flipped dicom")
    put("bad files/flipped/rsna header 8 bits.dcm", _flip(rsna, rng, 8, 132, px), EITHER, "bit-flipped dicom")
    put("bad files/flipped/rsna jpeg header 3 bits.dcm", _flip(rsna, rng, 3, px, px + 600), EITHER, "bit-flipped dicom")
    put("bad files/flipped/ct header 6 bits.dcm", _flip(ct, rng, 6, 132, _data_offset(ct)), EITHER, "bit-flipped dicom")
    put("bad files/flipped/ct pixels 50 bits.dcm", _flip(ct, rng, 50, _data_offset(ct)), EITHER, "bit-flipped dicom")
    put("bad files/flipped/j2k 16 bits.dcm", _flip(j2k, rng, 16, _data_offset(j2k)), EITHER, "bit-flipped dicom")
    put("bad files/flipped/nifti header 6 bits.nii", _flip(nii, rng, 6, 0, 348), EITHER, "bit-flipped nifti")
    put("bad files/flipped/nifti data 40 bits.nii", _flip(nii, rng, 40, 352), EITHER, "bit-flipped nifti")
    put("bad files/flipped/nifti dim 1 bit.nii", _flip(nii, rng, 1, 42, 48), EITHER, "bit-flipped nifti")
    put("bad files/flipped/4d gz 1 bit.nii.gz", _flip(niigz, rng, 1, 40), EITHER, "bit-flipped nifti")
    put("bad files/flipped/4d gz 20 bits.nii.gz", _flip(niigz, rng, 20, 40), EITHER, "bit-flipped nifti")

    # --- empty files --------------------------------------------------------------------------------
    for ext in ("jpeg", "png", "dcm", "nii", "nii.gz"):
        put(f"bad files/empty/zero bytes.{ext}", b"", BAD, "zero-byte file")

    # --- absurd sizes ---------------------------------------------------------------------------------
    put("bad files/huge/100000 x 100000.png", _huge_png(100_000, 100_000), BAD, "header claims 1e10 pixels")
    put("bad files/huge/sof 12000.jpeg", _jpeg_with_size(jpeg_a, 12_000, 12_000), BAD, "header claims 1.4e8 pixels")
    put("bad files/huge/sof 65000.jpeg", _jpeg_with_size(jpeg_a, 65_000, 65_000), BAD, "header claims 4.2e9 pixels")
    ds = pydicom.dcmread(data_root / "dicom" / "other" / "ct_small.dcm")
    ds.Rows = ds.Columns = 60_000
    ds.save_as(root / "tmp.dcm")
    put("bad files/huge/ct 60000.dcm", (root / "tmp.dcm").read_bytes(), BAD, "header claims 3.6e9 pixels")
    ds = pydicom.dcmread(chest / "cr_chest_pa_rsna_jpeg_baseline.dcm")
    fragment = b"".join(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([_jpeg_with_size(fragment, 12_000, 12_000)])
    ds.Rows = ds.Columns = 12_000
    ds.save_as(root / "tmp.dcm")
    put("bad files/huge/rsna 12000.dcm", (root / "tmp.dcm").read_bytes(), BAD, "header and codestream claim 1.4e8 pixels")
    img = nib.load(NIB_DATA / "anatomical.nii")
    for name, shape in (("2000 cubed", (2000, 2000, 2000)), ("300 cubed, data for 33x41x25", (300, 300, 300))):
        header = img.header.copy()
        header.set_data_shape(shape)
        blob = header.binaryblock + b"\x00" * (int(header.get_data_offset()) - len(header.binaryblock)) + nii[352:]
        put(f"bad files/huge/{name}.nii", blob, BAD, "nifti header claims more voxels than it has")
    (root / "tmp.dcm").unlink()

    # --- DICOM oddities -------------------------------------------------------------------------------
    (root / "bad files" / "dicom").mkdir()
    ds = pydicom.dcmread(chest / "cr_chest_pa_rsna_jpeg_baseline.dcm")
    del ds.PixelData
    ds.save_as(root / "bad files" / "dicom" / "no pixel data.dcm")
    rows.append({"path": "bad files/dicom/no pixel data.dcm", "expect": BAD, "kind": "dicom without pixel data"})
    ds = pydicom.dcmread(chest / "cr_chest_pa_rsna_jpeg_baseline.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder exists
    ds.save_as(root / "bad files" / "dicom" / "mpeg2.dcm")
    rows.append({"path": "bad files/dicom/mpeg2.dcm", "expect": BAD, "kind": "dicom with unsupported encoding"})
    put("bad files/dicom/preamble only.dcm", b"\x00" * 128 + b"DICM", BAD, "dicom preamble only")
    put("bad files/dicom/real corrupt j2k.dcm", (data_root / "dicom" / "broken" / "dx_chest_j2k_corrupt_codestream.dcm").read_bytes(),
        BAD, "real corrupt JPEG 2000 dicom")
    put("bad files/dicom/random bytes.dcm", random.Random(SEED).randbytes(4096), BAD, "random bytes")

    # --- wrong extensions -------------------------------------------------------------------------------
    put("bad files/wrong ext/png.dcm", png, BAD, "wrong extension")
    put("bad files/wrong ext/dicom.jpeg", rsna, BAD, "wrong extension")
    put("bad files/wrong ext/nifti.png", nii, BAD, "wrong extension")
    put("bad files/wrong ext/jpeg.nii.gz", jpeg_a, BAD, "wrong extension")
    put("bad files/wrong ext/dicom.nii", rsna, BAD, "wrong extension")
    put("bad files/wrong ext/png.nii", png, BAD, "wrong extension")
    put("bad files/wrong ext/html.jpeg", b"<!doctype html><html><body>not an image</body></html>\n", BAD, "wrong extension")
    put("bad files/wrong ext/gzip text.nii.gz", gzip.compress(b"hello " * 100), BAD, "wrong extension")

    # --- file system oddities ---------------------------------------------------------------------------
    (root / "bad files" / "fs").mkdir()
    (root / "bad files" / "fs" / "dangling inside.jpeg").symlink_to(root / "bad files" / "fs" / "gone.jpeg")
    (root / "bad files" / "fs" / "dangling outside.dcm").symlink_to("/nonexistent/vqmed/scan.dcm")
    rows += [{"path": "bad files/fs/dangling inside.jpeg", "expect": BAD, "kind": "broken symlink"},
             {"path": "bad files/fs/dangling outside.dcm", "expect": BAD, "kind": "broken symlink"}]
    (root / "bad files" / "fs" / "a folder.jpeg").mkdir()
    rows.append({"path": "bad files/fs/a folder.jpeg", "expect": BAD, "kind": "directory"})
    put("bad files/fs/no permission.jpeg", jpeg_a, BAD, "unreadable permissions")
    rows.append({"path": "bad files/fs/nul\x00byte.jpeg", "expect": BAD, "kind": "NUL byte in path"})
    rows.append({"path": "bad files/fs/" + "x" * 300 + ".jpeg", "expect": BAD, "kind": "name too long"})
    rows.append({"path": "bad files/fs/missing.dcm", "expect": BAD, "kind": "missing file"})
    return rows


CHILD = r'''
import json, os, resource, sys, time
import torch
torch.set_num_threads(1)
import pandas as pd
from pathlib import Path
from vqmed.data import ImageDataset, ImageSpec

root, rows_file, out_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
rows = json.loads(rows_file.read_text())
spec = ImageSpec(32)
frame = lambda sub: pd.DataFrame([{"study_id": f"s{i}", "path": r["path"]} for i, r in sub])
# Warm-up on one real file of every format and encoding: imports, decoder plug-ins and allocator pools
# are in place before the measurement (and before privileges are dropped: the interpreter's own files
# may be unreadable to nobody).
warm = json.loads(sys.argv[5])
warm_ds = ImageDataset(pd.DataFrame({"study_id": [str(i) for i in range(len(warm))], "path": warm}), Path("/"), spec,
                       progress=False, allow_outside_root=True)
assert len(warm_ds) == len(warm), warm_ds.quarantine.entries
ImageDataset(frame([(i, r) for i, r in enumerate(rows) if r["expect"] == "good"]), root, spec, progress=False)
dropped = False
if os.geteuid() == 0:
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)  # nobody: file permissions apply from here on
        dropped = True
    except OSError:
        pass
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = []
for i, row in enumerate(rows):
    start = time.perf_counter()
    ds = ImageDataset(frame([(i, row)]), root, spec, progress=False)
    entry = {"seconds": time.perf_counter() - start, "kept": len(ds),
             "reason": ds.quarantine.entries[0][1] if len(ds.quarantine) else None}
    if len(ds):
        img = ds[0]["image"]
        entry.update(shape=list(img.shape), finite=bool(torch.isfinite(img).all()), lo=float(img.min()), hi=float(img.max()))
    results.append(entry)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# All rows at once, through the on-disk cache: the manifest yields exactly the files that decode.
start = time.perf_counter()
ds = ImageDataset(frame(list(enumerate(rows))), root, spec, cache_dir=Path(sys.argv[4]), progress=False)
ds.quarantine.write(Path(sys.argv[4]) / "quarantine.csv")
combined = {"kept_rows": ds.rows.tolist(), "quarantine": ds.quarantine.entries, "seconds": time.perf_counter() - start}
out_file.write_text(json.dumps({"results": results, "rss_base_kb": base, "rss_peak_kb": peak, "dropped": dropped,
                                "rss_final_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "combined": combined}))
'''


def _run_child(root: Path, rows: list[dict], env: dict, warm: list[str]) -> tuple[dict, bool]:
    """Run the checks in a fresh interpreter (clean peak-RSS counter) that, when started as root, drops
    to ``nobody`` after its warm-up; returns (report, whether file permissions applied)."""
    rows_file, out_file, cache = root / "rows.json", root / "report.json", root / "cache"
    rows_file.write_text(json.dumps(rows))
    cache.mkdir()
    if os.geteuid() == 0:
        for path in [root, *root.rglob("*")]:  # nobody must traverse, read and write here
            if not path.is_symlink():
                os.chown(path, NOBODY, NOBODY)
        os.chown(root / "bad files" / "fs" / "no permission.jpeg", 0, 0)
        env = {**env, "HOME": str(root), "XDG_CACHE_HOME": str(root / ".cache"), "MPLCONFIGDIR": str(root / ".mpl")}
    cmd = [sys.executable, "-c", CHILD, str(root), str(rows_file), str(out_file), str(cache), json.dumps(warm)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, f"the child crashed:\n{result.stderr[-4000:]}"
    report = json.loads(out_file.read_text())
    return report, report["dropped"] or os.geteuid() != 0


@pytest.fixture(scope="module")
def corpus_report(kermany, data_root, env_for_child):
    root = Path(tempfile.mkdtemp(prefix="vqmed-bad-files-"))
    try:
        root.chmod(0o755)
        rows = build_corpus(root, data_root, kermany)
        (root / "bad files" / "fs" / "no permission.jpeg").chmod(0)
        warm = [str(data_root / kermany["path"].iloc[0])] + [
            str(p) for p in (next((data_root / "stl10").rglob("*.png")), NIB_DATA / "anatomical.nii", NIB_DATA / "example4d.nii.gz",
                             *sorted((data_root / "dicom" / "chest").glob("*.dcm")), data_root / "dicom" / "other" / "ct_small.dcm",
                             data_root / "dicom" / "other" / "MR_small_RLE.dcm")]
        report, permissions_apply = _run_child(root, rows, env_for_child(), warm)
        yield rows, report, permissions_apply
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_corpus_is_large_and_varied(corpus_report):
    rows, _, _ = corpus_report
    bad = [r for r in rows if r["expect"] != GOOD]
    assert len(bad) >= 50
    kinds = {r["kind"] for r in bad}
    for kind in ("truncated jpeg", "truncated png", "truncated dicom", "truncated nifti", "bit-flipped jpeg",
                 "bit-flipped png", "bit-flipped dicom", "bit-flipped nifti", "zero-byte file",
                 "header claims 1e10 pixels", "dicom without pixel data", "wrong extension", "broken symlink",
                 "unreadable permissions", "NUL byte in path"):
        assert kind in kinds, kind


def test_every_file_decodes_or_is_quarantined_with_a_reason(corpus_report):
    rows, report, permissions_apply = corpus_report
    counts = {"quarantined": 0, "decoded": 0}
    problems = []
    for row, res in zip(rows, report["results"]):
        expect = row["expect"]
        if row["kind"] == "unreadable permissions" and not permissions_apply:
            expect = EITHER  # root that cannot drop privileges reads anything
        if res["kept"]:
            counts["decoded"] += 1
            # A decoded file is a valid model input, never garbage.
            if not (res["shape"] == [1, 32, 32] and res["finite"] and 0.0 <= res["lo"] <= res["hi"] <= 1.0):
                problems.append((row["path"], "invalid image", res))
            if expect == BAD:
                problems.append((row["path"], f"decoded but must be quarantined ({row['kind']})", res))
        else:
            counts["quarantined"] += 1
            reason = res["reason"] or ""
            if not reason.strip() or "\n" in reason:
                problems.append((row["path"], "no one-line reason", res))
            if expect == GOOD:
                problems.append((row["path"], f"good file quarantined: {reason}", res))
        if res["seconds"] > MAX_SECONDS_PER_FILE:
            problems.append((row["path"], f"took {res['seconds']:.1f}s", res))
    bad_rows = [(r, res) for r, res in zip(rows, report["results"]) if r["expect"] != GOOD]
    decoded = sorted(r["path"].rsplit("/", 1)[-1] for r, res in bad_rows if res["kept"])
    print(f"\n{len(bad_rows)} bad files: {sum(not res['kept'] for _, res in bad_rows)} quarantined, "
          f"{len(decoded)} decoded {decoded}; "
          f"{len(rows) - len(bad_rows)} good files; slowest {max(r['seconds'] for r in report['results']):.2f}s; "
          f"permissions applied: {permissions_apply}")
    assert not problems, "\n".join(map(str, problems))
    # Specific reasons for the cases with one obvious cause.
    reason = {r["path"]: res["reason"] for r, res in zip(rows, report["results"])}
    assert reason["bad files/empty/zero bytes.dcm"] == "empty file (0 bytes)"
    assert "absurd" in reason["bad files/huge/100000 x 100000.png"]
    assert "2D limit" in reason["bad files/huge/sof 12000.jpeg"]
    assert "no pixel data" in reason["bad files/dicom/no pixel data.dcm"]
    assert reason["bad files/fs/dangling inside.jpeg"] == "broken symbolic link"
    assert reason["bad files/fs/nul\x00byte.jpeg"] == "path contains a NUL byte"
    if permissions_apply:
        assert reason["bad files/fs/no permission.jpeg"] == "permission denied"


def test_bounded_memory(corpus_report):
    _, report, _ = corpus_report
    growth_mb = (report["rss_peak_kb"] - report["rss_base_kb"]) / 1024
    print(f"\npeak RSS growth over the corpus: {growth_mb:.0f} MB (base {report['rss_base_kb'] / 1024:.0f} MB)")
    assert growth_mb < MAX_RSS_GROWTH_MB


def test_manifest_of_all_files_yields_exactly_the_decodable_ones(corpus_report):
    rows, report, _ = corpus_report
    decodable = [i for i, res in enumerate(report["results"]) if res["kept"]]
    combined = report["combined"]
    assert combined["kept_rows"] == decodable  # exactly the good ones (and bit flips that decode), in order
    assert {i for i, r in enumerate(rows) if r["expect"] == GOOD} <= set(decodable)
    quarantined = {path for path, _ in combined["quarantine"]}
    assert quarantined == {rows[i]["path"] for i in range(len(rows)) if i not in set(decodable)}
    assert all(reason for _, reason in combined["quarantine"])
