"""Export room: code maps and pooled embeddings of real chest X-rays into a sharded, resumable store.

Real data only: Kermany chest X-rays through the data room's manifest, a real RSNA chest DICOM with
identifiers written into its header, and the MNI152 brain template as a 3D NIfTI volume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from vqmed.data import ImageDataset, ImageSpec, build_manifest, load_image, read_manifest, resolve_data_root
from vqmed.export import StoreError, compute_features, export_manifest, load
from vqmed.networks import build_model, vqvae_loss
from vqmed.models_io import CheckpointError
from vqmed.models_io.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
KERMANY = ROOT / "data_manifests" / "chest_xray.csv"
REPO = Path(__file__).resolve().parents[1]
SIZE = 64
# A small, fast 2D model: 64x64 -> 16x16 codes from a 64-entry codebook.
SMALL = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32), num_res_layers=(1, 1),
             num_res_channels=(16, 16), downsample=4, num_embeddings=64, embedding_dim=16)


@pytest.fixture(scope="module", autouse=True)
def _salt_and_threads(pinned_salt_and_threads):
    with pinned_salt_and_threads("vqmed-test-salt"):
        yield


@pytest.fixture(scope="module")
def data_root() -> Path:
    return Path(resolve_data_root(None))


@pytest.fixture(scope="module")
def kermany() -> pd.DataFrame:
    return read_manifest(KERMANY)


@pytest.fixture(scope="module")
def small_manifest(kermany, tmp_path_factory) -> Path:
    """300 real Kermany rows: 75 of each (split, label), with the manifest's own columns."""
    parts = [g.sort_values("path").head(75) for _, g in kermany.groupby(["split", "label"], sort=True)]
    subset = pd.concat(parts).sort_values("path").reset_index(drop=True)
    path = tmp_path_factory.mktemp("manifests") / "kermany_300.csv"
    subset.to_csv(path, index=False)
    return path


def _save(model: torch.nn.Module, name: str, image_size: int, spatial_dims: int, directory: Path) -> Path:
    state = {
        "model_name": name,
        "model_config": model.config,
        "model_state": model.state_dict(),
        "step": 0,
        "config": {"data": {"image_size": image_size, "spatial_dims": spatial_dims, "channels": 1}},
    }
    return save_checkpoint(state, directory)


@pytest.fixture(scope="module")
def checkpoint(small_manifest, data_root, tmp_path_factory) -> Path:
    """The small model trained 30 steps on real X-rays (k-means initialised codebook), saved as a checkpoint."""
    torch.manual_seed(0)
    model = build_model("vqvae", **SMALL)
    rows = read_manifest(small_manifest).iloc[::2]
    ds = ImageDataset(rows, data_root, ImageSpec(SIZE), progress=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(30):
        batch = images[(step * 16) % len(images):][:16]
        loss, _, _ = vqvae_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _save(model.eval(), "vqvae", SIZE, 2, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def exported(checkpoint, small_manifest, data_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("store") / "kermany"
    summary = export_manifest(checkpoint, small_manifest, out, data_root, batch_size=32, progress=False,
                              shard_size=64)
    return out, summary


def _paths(store, manifest_path: Path) -> list[str]:
    """The stored images' paths, from the manifest (the store holds none: names may identify patients)."""
    return read_manifest(manifest_path)["path"].iloc[store.index["row"].to_numpy()].tolist()


def _images(manifest_path: Path, data_root: Path, paths: list[str]) -> torch.Tensor:
    rows = read_manifest(manifest_path).set_index("path").loc[paths].reset_index()
    ds = ImageDataset(rows, data_root, ImageSpec(SIZE), progress=False)
    assert len(ds) == len(paths)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


# ------------------------------------------------------------------------------------------ the store
def test_export_writes_sharded_store_with_index_and_features(exported, small_manifest, checkpoint):
    out, summary = exported
    manifest = read_manifest(small_manifest)
    assert summary["exported"] == 300 and summary["skipped"] == 0 and summary["quarantined"] == 0
    assert summary["index_rows"] == 300 and summary["studies_per_s"] > 0

    # Sharded: 300 images in 5 shard pairs of <= 64, never a file per study.
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert len([s for s in shards if s.endswith(".npz")]) == 5 == len([s for s in shards if s.endswith(".parquet")])

    store = load(out)
    index = store.index
    assert len(index) == 300 and index["key"].is_unique
    for column in ("study_id", "row", "split", "label", "patient_key", "codes_shape", "model_id",
                   "codebook_hash", "export_time", "shard", "shard_row"):
        assert column in index.columns, column
    assert "path" not in index.columns  # names may identify a patient; `row` leads back to the manifest
    # Labels and splits come from the manifest, row for row.
    merged = index.merge(manifest.reset_index(names="row"), on="row", suffixes=("", "_manifest"))
    assert len(merged) == 300
    assert (merged["label"] == merged["label_manifest"]).all() and (merged["split"] == merged["split_manifest"]).all()
    assert set(index["split"]) == {"train", "test"} and set(index["label"]) == {"NORMAL", "PNEUMONIA"}
    # Ids are salted hashes: no raw study or patient id survives.
    assert not set(index["study_id"]) & set(manifest["study_id"].astype(str))
    assert not set(index["patient_key"]) & set(manifest["patient_id"].dropna().astype(str))
    assert "patient_id" not in index.columns
    # Images of one patient share a patient key (grouping works without the raw id).
    per_patient = merged.groupby("patient_id")["patient_key"].nunique()
    assert (per_patient == 1).all()

    codes = store.array("codes")
    assert codes.dtype == np.uint16 and codes.shape == (300, 16, 16)
    assert (index["codes_shape"] == "16x16").all()
    k, d = store.codebook.shape
    assert (k, d) == (64, 16) and int(codes.max()) < k
    assert len(np.unique(codes)) >= 8  # a used codebook, not one collapsed code

    hist = store.array("code_histogram")
    assert hist.shape == (300, k) and np.allclose(hist.sum(1), 1.0)
    np.testing.assert_allclose(hist[5], np.bincount(codes[5].ravel(), minlength=k) / codes[5].size, rtol=1e-6)
    qmean = store.array("quantized_mean")
    np.testing.assert_allclose(qmean[7], store.codebook[codes[7].astype(np.int64)].reshape(-1, d).mean(0), rtol=1e-5, atol=1e-6)
    assert store.array("continuous_mean").shape == (300, d)

    meta = store.meta
    assert meta["model_name"] == "vqvae" and meta["model_config"]["num_embeddings"] == 64
    assert meta["image_spec"] == {"image_size": SIZE, "spatial_dims": 2, "channels": 1, "resize": "squeeze", "intensity": "minmax"}
    assert meta["model_ref"] == str(checkpoint.resolve()) and (index["model_id"] == meta["model_id"]).all()


def test_codes_match_the_model_and_decode_exactly(exported, small_manifest, data_root, checkpoint):
    """Acceptance: decoding an exported code map equals the model's own reconstruction, bit for bit."""
    out, _ = exported
    store = load(out)
    index = store.index
    first = index.index[:32]  # one export batch (same batch composition as the export)
    paths = _paths(store, small_manifest)[:32]
    images = _images(small_manifest, data_root, paths)
    model = store.model()
    codes = store.array("codes")[first]
    with torch.no_grad():
        own_codes = model.index_quantize(images)
        own_recon = model.decode_indices(own_codes)
        forward_recon, _, forward_codes = model(images)
    assert torch.equal(torch.from_numpy(codes.astype(np.int64)), own_codes)
    assert torch.equal(forward_codes, own_codes)
    decoded = store.decode(codes)
    assert decoded.shape == images.shape
    assert torch.equal(decoded, own_recon)
    # Acceptance: decoding an exported code map equals the model's own reconstruction exactly.
    assert torch.equal(decoded, forward_recon)
    # A single map without the batch axis decodes too (exact against a batch of one: CPU kernels
    # may round differently for other batch sizes).
    with torch.no_grad():
        single = model.decode_indices(own_codes[:1])
    assert torch.equal(store.decode(codes[0]), single)


def test_encoder_grid_pools_every_encoder_stage(exported, small_manifest, data_root):
    """``encoder_grid`` / ``encoder_grid_std`` = each encoder stage (stem, level change, residual units; not
    the 1x1 projection) mean- / std-pooled on a 4x4 grid, concatenated in order, stored as float16."""
    store = load(exported[0])
    first = store.index.index[:32]
    images = _images(small_manifest, data_root, _paths(store, small_manifest)[:32])
    model = store.model().eval()
    means, stds, h = [], [], images
    with torch.no_grad():
        for block in model.encoder.blocks:
            h = block(h)
            # split each stage map into 4x4 cells of (H/4) x (W/4) positions: per-cell mean and population std
            n, c = h.shape[:2]
            cells = h.reshape(n, c, 4, h.shape[2] // 4, 4, h.shape[3] // 4).permute(0, 1, 2, 4, 3, 5).flatten(4)
            means.append(cells.mean(dim=4).flatten(1))
            stds.append(cells.std(dim=4, unbiased=False).flatten(1))
    # SMALL: stem 16 ch, residual 16, level change 32, residual 32 -> (16 + 16 + 32 + 32) x 16 cells
    stored_arrays = {name: store.array(name) for name in ("encoder_grid", "encoder_grid_std")}
    for name, stages in (("encoder_grid", means), ("encoder_grid_std", stds)):
        expected = torch.cat(stages[:-1], dim=1).numpy()
        stored = stored_arrays[name]
        assert stored.dtype == np.float16 and stored.shape == (300, (16 + 16 + 32 + 32) * 16), name
        np.testing.assert_allclose(stored[first].astype(np.float32), expected, rtol=2e-3, atol=2e-3, err_msg=name)
        assert stored.std(axis=0).mean() > 0, name  # images differ: not a constant block
    assert (stored_arrays["encoder_grid_std"] >= 0).all() and stored_arrays["encoder_grid_std"].max() > 0


def test_second_run_exports_nothing_and_changes_nothing(exported, checkpoint, small_manifest, data_root):
    out, _ = exported
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    summary = export_manifest(checkpoint, small_manifest, out, data_root, progress=False, shard_size=64)
    assert summary["exported"] == 0 and summary["skipped"] == 300 and summary["index_rows"] == 300
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before


def test_export_is_deterministic_and_never_changes_the_codebook(exported, checkpoint, small_manifest, data_root, tmp_path):
    out, _ = exported
    first = load(out)
    state_before = {k: v.clone() for k, v in torch.load(checkpoint, weights_only=True)["model_state"].items()}
    again = tmp_path / "again"
    export_manifest(checkpoint, small_manifest, again, data_root, batch_size=32, progress=False, shard_size=100)
    second = load(again)
    assert second.meta["model_id"] == first.meta["model_id"]
    assert first.index["key"].tolist() == second.index["key"].tolist() and "path" not in first.index.columns
    for name in ("codes", "code_histogram", "quantized_mean", "continuous_mean"):
        assert np.array_equal(first.array(name), second.array(name)), name
    # Checkpoint untouched, and the stored codebook is the checkpoint's, bit for bit.
    state_after = torch.load(checkpoint, weights_only=True)["model_state"]
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    assert np.array_equal(first.codebook, first.model().quantizer.codebook.numpy())

    # compute_features on a model left in train mode: switched to eval, no codebook/EMA update.
    model = first.model()
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images(small_manifest, data_root, _paths(first, small_manifest)[:16])
    features = compute_features(model, images)
    assert not model.training
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
    assert np.array_equal(features["codes"], first.array("codes")[:16])


def test_store_reads_the_parts_when_the_merged_index_is_stale(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported[0], copy)
    (copy / "index.parquet").unlink()
    store = load(copy)
    assert len(store.index) == 300 and store.index["key"].is_unique
    assert np.array_equal(store.array("codes"), load(exported[0]).array("codes"))


# ------------------------------------------------------------------------------- kill and resume
def _export_in_subprocess(checkpoint: Path, manifest: Path, out: Path, data_root: Path, batch: int, shard: int) -> subprocess.Popen:
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from vqmed.export import export_manifest\n"
        "export_manifest(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], batch_size=int(sys.argv[5]),\n"
        "                progress=False, shard_size=int(sys.argv[6]))\n"
    )
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, str(checkpoint), str(manifest), str(out), str(data_root),
                             str(batch), str(shard)], cwd=ROOT, env=env)


def _kill_when_committed(proc: subprocess.Popen, out: Path, parts: int, timeout: float = 300) -> None:
    """SIGKILL the export once ``parts`` shards are committed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(list((out / "shards").glob("part-*.parquet"))) if (out / "shards").is_dir() else 0
        if done >= parts:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"export finished (rc {proc.returncode}) before it could be killed")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("export too slow to reach the kill point")


def _check_resumed(out: Path, manifest: pd.DataFrame, reference: Path | None = None) -> None:
    store = load(out)
    n = len(manifest)
    assert len(store.index) == n and store.index["key"].is_unique
    assert sorted(manifest["path"].iloc[store.index["row"].to_numpy()]) == sorted(manifest["path"])
    # Every part is complete and listed once: raw parts hold no duplicate either.
    raw = pd.concat([pd.read_parquet(p) for p in (out / "shards").glob("*.parquet")])
    assert len(raw) == n and raw["key"].is_unique
    assert not [p for p in out.rglob(".tmp-*")]
    assert len(list((out / "shards").glob("*.npz"))) == len(list((out / "shards").glob("*.parquet")))
    codes = store.array("codes")
    assert codes.shape[0] == n
    if reference is not None:
        # Same codes as an uninterrupted export, aligned by path. That export ran with other batches and
        # another thread count, where oneDNN sums in another order: a latent lying within float rounding
        # of two codes may flip (bit-identical codes for identical batching are tested separately).
        # A misaligned or duplicated row would agree on only a few percent of its codes.
        ref = load(reference)
        position = pd.Series(np.arange(len(ref.index)), index=ref.index["key"])  # salted (study, path, frame)
        expected = ref.array("codes")[position.loc[store.index["key"]].to_numpy()]
        per_image = (codes == expected).reshape(len(codes), -1).mean(axis=1)
        assert per_image.min() > 0.98 and per_image.mean() > 0.999, (per_image.min(), per_image.mean())


def test_sigkill_halfway_then_resume_gives_complete_unduplicated_store(exported, checkpoint, small_manifest, data_root, tmp_path):
    out = tmp_path / "killed"
    proc = _export_in_subprocess(checkpoint, small_manifest, out, data_root, batch=8, shard=16)
    _kill_when_committed(proc, out, parts=9)  # ~150 of 300 images
    assert proc.returncode == -signal.SIGKILL
    committed = len(load(out).index)
    assert 144 <= committed < 300 and committed % 16 == 0 and load(out).index["key"].is_unique

    # What a kill between the two renames of a shard, or inside a write, leaves (if this kill did not).
    (out / "shards" / "part-orphan-00000.npz").write_bytes(b"arrays whose index part never came")
    (out / "shards" / ".tmp-1234-part-orphan-00001.npz").write_bytes(b"half-written")

    summary = export_manifest(checkpoint, small_manifest, out, data_root, batch_size=8, progress=False, shard_size=16)
    assert summary["exported"] == 300 - committed and summary["skipped"] == committed
    assert not list((out / "shards").glob("*orphan*"))
    _check_resumed(out, read_manifest(small_manifest), reference=exported[0])
    assert export_manifest(checkpoint, small_manifest, out, data_root, progress=False)["exported"] == 0


@pytest.mark.slow
def test_full_kermany_export_killed_and_resumed(checkpoint, data_root, tmp_path):
    """Acceptance: 5,840 Kermany images; SIGKILL halfway; resume -> exactly 5,840 entries; rerun -> nothing new."""
    manifest = read_manifest(KERMANY)
    assert len(manifest) == 5840
    out = tmp_path / "kermany_full"
    proc = _export_in_subprocess(checkpoint, KERMANY, out, data_root, batch=32, shard=256)
    _kill_when_committed(proc, out, parts=11, timeout=600)  # ~2,800 images
    assert proc.returncode == -signal.SIGKILL
    committed = len(load(out).index)
    assert 11 * 256 <= committed < 5840 and load(out).index["key"].is_unique

    summary = export_manifest(checkpoint, KERMANY, out, data_root, batch_size=32, progress=False, shard_size=256)
    assert summary["exported"] == 5840 - committed and summary["quarantined"] == 0
    _check_resumed(out, manifest)
    store = load(out)
    assert store.index["label"].notna().all() and store.index["split"].notna().all()
    counts = store.index.groupby(["split", "label"]).size().to_dict()
    assert counts == manifest.groupby(["split", "label"]).size().to_dict()
    again = export_manifest(checkpoint, KERMANY, out, data_root, progress=False, shard_size=256)
    assert again["exported"] == 0 and again["skipped"] == 5840 and again["index_rows"] == 5840


# ------------------------------------------------------------------------------------------ privacy
PRIVATE = {
    "PatientName": "Zzyzx^Quintavious",
    "PatientID": "PID-93817264-QX",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACC77441199Z",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.98765432101234567890",
    "StudyDate": "20011109",
}


def test_no_dicom_identifier_reaches_the_store(checkpoint, data_root, tmp_path):
    """Acceptance: identifiers written into a real chest DICOM appear nowhere under the store."""
    import pydicom

    ds = pydicom.dcmread(data_root / "dicom" / "chest" / "cr_chest_pa_rsna_jpeg_baseline.dcm")
    for keyword, value in PRIVATE.items():
        setattr(ds, keyword, value)
    root = tmp_path / "root"
    (root / "scans").mkdir(parents=True)
    ds.save_as(root / "scans" / "image0001.dcm")
    # Row 1: the data room's manifest builder (ids already salted). Row 2: the same file listed with
    # the raw identifiers as ids (a hand-made manifest, the worst case): the export must hash them.
    built, _ = build_manifest(root / "scans", root, progress=False)
    raw = pd.DataFrame([{
        "study_id": PRIVATE["StudyInstanceUID"], "path": "scans/image0001.dcm", "split": "", "label": "",
        "patient_id": PRIVATE["PatientID"], "modality": "CR", "series_id": PRIVATE["StudyInstanceUID"] + ".1",
    }])
    manifest = pd.concat([built, raw], ignore_index=True)
    manifest_path = tmp_path / "dicom.csv"
    manifest.to_csv(manifest_path, index=False)
    out = tmp_path / "store"
    summary = export_manifest(checkpoint, manifest_path, out, root, progress=False)
    assert summary["exported"] == 2
    store = load(out)
    assert store.array("codes").shape == (2, 16, 16)
    assert np.array_equal(store.array("codes")[0], store.array("codes")[1])  # same pixels, same codes

    secrets = [v.encode() for v in PRIVATE.values()] + [PRIVATE["PatientName"].split("^")[1].encode()]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 6  # store.json, codebook, shard arrays + part, merged index, lock
    for path in files:
        blob = path.read_bytes()
        for secret in secrets:
            assert secret not in blob, f"{secret!r} found in {path}"
    # keep_ids keeps the manifest's study id but still never the patient id.
    kept = tmp_path / "kept"
    export_manifest(checkpoint, manifest_path, kept, root, progress=False, keep_ids=True)
    assert load(kept).index["study_id"].tolist() == [built.loc[0, "study_id"], PRIVATE["StudyInstanceUID"]]
    assert PRIVATE["PatientID"] not in set(load(kept).index.astype(str).to_numpy().ravel())


# ------------------------------------------------------------------------------------------ 3D NIfTI
def test_3d_code_maps_as_nifti_overlay_the_scan(tmp_path):
    import nilearn

    template = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    source = nib.load(template)
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), num_res_layers=(1, 1),
                        num_res_channels=(8, 8), downsample=4, num_embeddings=32, embedding_dim=8)
    ckpt = _save(model, "vqvae", 32, 3, tmp_path / "ckpt3d")
    manifest = tmp_path / "mni.csv"
    pd.DataFrame([{"study_id": "mni152", "path": template.name, "split": "unlabeled", "label": None,
                   "patient_id": None, "modality": "MR"}]).to_csv(manifest, index=False)
    out = tmp_path / "store3d"
    summary = export_manifest(ckpt, manifest, out, template.parent, progress=False, write_nifti=True)
    assert summary["exported"] == 1
    store = load(out)
    codes = store.array("codes")
    assert codes.shape == (1, 8, 8, 8) and codes.dtype == np.uint16

    written = nib.load(out / store.index.loc[0, "nifti"])
    assert written.shape == (8, 8, 8)
    assert np.array_equal(np.asarray(written.dataobj), codes[0])
    # The code map covers the model input's grid, which overlays the scan in world coordinates (checked in
    # tests/test_data_itk.py): its voxels are 4 input voxels wide and the outer corners of both grids coincide.
    _, facts = load_image(template, ImageSpec(32, 3))
    grid = np.asarray(facts["grid_affine"])
    np.testing.assert_allclose(np.abs(np.linalg.det(written.affine[:3, :3])), np.abs(np.linalg.det(grid[:3, :3])) * 4**3, rtol=1e-5)

    def corners(affine, shape):
        pts = np.array([[a, b, c, 1.0] for a in (-0.5, shape[0] - 0.5) for b in (-0.5, shape[1] - 0.5) for c in (-0.5, shape[2] - 0.5)])
        return np.array(sorted(map(tuple, np.round((pts @ np.asarray(affine).T)[:, :3], 4))))

    np.testing.assert_allclose(corners(written.affine, (8, 8, 8)), corners(source.affine, source.shape[:3]), atol=1e-3)
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    # Decoding the 3D code map gives a volume of the model's input size.
    assert store.decode(codes).shape == (1, 1, 32, 32, 32)


# ------------------------------------------------------------------------------------ errors, progress
def test_clear_errors(checkpoint, small_manifest, data_root, exported, tmp_path):
    with pytest.raises(CheckpointError, match="no-such-model"):
        export_manifest(tmp_path / "no-such-model.pt", small_manifest, tmp_path / "a", data_root, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        export_manifest(checkpoint, tmp_path / "missing.csv", tmp_path / "a", data_root, progress=False)
    bad = tmp_path / "bad.csv"
    read_manifest(small_manifest).drop(columns=["study_id"]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="study_id"):
        export_manifest(checkpoint, bad, tmp_path / "a", data_root, progress=False)
    # A store belongs to one model: another model's export into it is refused.
    other = build_model("vqvae", **SMALL)
    other_ckpt = _save(other, "vqvae", SIZE, 2, tmp_path / "other")
    with pytest.raises(StoreError, match="another directory"):
        export_manifest(other_ckpt, small_manifest, exported[0], data_root, progress=False)
    with pytest.raises(StoreError, match="not an export store"):
        load(tmp_path)


def test_export_yaml_config_flags_override_it_and_arrays_select(checkpoint, small_manifest, data_root, exported, tmp_path):
    """``configs/export/default.yaml`` holds ExportConfig's defaults; ``vqmed export --config`` with flags
    overriding it writes only the chosen feature arrays (the code maps always), and the old flags still work."""
    from vqmed.cli import main
    from vqmed.config import ConfigError, ExportConfig, load_config

    default = REPO / "configs" / "export" / "default.yaml"
    required = ["model=m", "manifest=x.csv", "out=o"]
    assert load_config(ExportConfig, default, required) == load_config(ExportConfig, None, required)
    assert ExportConfig().batch_size == export_manifest.__defaults__[1]  # one default for the batch size
    with pytest.raises(ConfigError, match="model: is required"):
        load_config(ExportConfig, default)
    with pytest.raises(ConfigError, match=r"arrays\[0\]: must be one of"):
        load_config(ExportConfig, default, [*required, "arrays=[pixels]"])

    few = tmp_path / "few.csv"
    read_manifest(small_manifest).head(12).to_csv(few, index=False)
    out = tmp_path / "store"
    args = ["export", "--config", str(default), "--model", str(checkpoint), "--manifest", str(few), "--out", str(out),
            "--data-root", str(data_root), "--batch-size", "5", "--arrays", "encoder_grid,code_histogram", "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    store = load(out)
    assert set(store.array_names) == {"codes", "encoder_grid", "code_histogram"} and len(store.index) == 12
    full = load(exported[0])
    # the same codes as the complete export of the same rows (batch size and array choice change nothing)
    position = pd.Series(np.arange(len(full.index)), index=full.index["key"].to_numpy())
    np.testing.assert_array_equal(store.array("codes"), full.array("codes")[position.loc[store.index["key"]].to_numpy()])
    # the flags alone (no --config) still make a complete export
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(checkpoint), "--manifest", str(few), "--out", str(tmp_path / "flags"),
              "--data-root", str(data_root), "--quiet"])
    assert exit_info.value.code == 0
    assert set(load(tmp_path / "flags").array_names) == set(full.array_names)


def test_export_grid_is_a_setting_the_store_and_the_control_follow(checkpoint, small_manifest, data_root, exported, tmp_path):
    """``--set grid=2`` pools the stage statistics on a 2x2 grid: the same numbers as the 4x4 export's cells
    merged (``encoder_stats_2x2``), recorded in the store, read by the random-encoder control; a store is not
    resumed on another grid, and a grid finer than the code map is refused."""
    from vqmed.cli import main
    from vqmed.downstream.features import feature_variant
    from vqmed.downstream.inputs import random_encoder_features

    few = tmp_path / "few.csv"
    read_manifest(small_manifest).head(40).to_csv(few, index=False)
    out = tmp_path / "grid2"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(checkpoint), "--manifest", str(few), "--out", str(out), "--data-root",
              str(data_root), "--set", "grid=2", "--quiet"])
    assert exit_info.value.code == 0
    store, full = load(out), load(exported[0])
    assert store.grid == 2 and full.grid == 4
    assert store.array("continuous_grid").shape == (40, 16, 2, 2)
    rows = pd.Series(np.arange(len(full.index)), index=full.index["key"].to_numpy()).loc[store.index["key"]].to_numpy()
    names = ("encoder_grid", "encoder_grid_std", "continuous_grid")
    merged = feature_variant("encoder_stats_2x2", {n: full.array(n)[rows] for n in names}, None)
    direct = feature_variant("encoder_stats", {n: store.array(n) for n in names}, None)
    np.testing.assert_allclose(merged, direct, rtol=5e-3, atol=5e-3)  # both from float16 stores
    assert direct.std(axis=0).mean() > 0
    images = _images(few, data_root, _paths(store, few)).numpy()
    control = random_encoder_features(store.meta["model_name"], store.meta["model_config"], images, seed=0,
                                      grid=store.grid)
    assert control.arrays["encoder_grid"].shape == store.array("encoder_grid").shape
    with pytest.raises(StoreError, match="written with grid=2; use the same grid"):
        export_manifest(checkpoint, few, out, data_root, progress=False)  # the default grid, 4
    with pytest.raises(ValueError, match="grid 32: needs 1 to 16 cells per axis"):
        export_manifest(checkpoint, few, tmp_path / "too_fine", data_root, progress=False, grid=32)
    assert not (tmp_path / "too_fine").exists()  # refused before anything is written


def test_export_reads_the_image_cache_the_pretraining_filled(checkpoint, small_manifest, data_root, exported, tmp_path,
                                                            monkeypatch):
    """The pipelines export with ``--set cache_dir=.vqmed_cache``, the pretraining's decoded images: the export
    decodes nothing again (the cache gains no chunk) and writes the same store as decoding the files."""
    import vqmed.data.dataset
    from vqmed.cli import main

    cache = tmp_path / "cache"
    rows = read_manifest(small_manifest)
    ImageDataset(rows, data_root, ImageSpec(SIZE), cache_dir=cache, progress=False)  # as the pretraining fills it
    chunks = sorted(p.name for p in cache.rglob("chunk-*.npy"))
    assert chunks

    def decode(*args, **kwargs):
        raise AssertionError("the export decoded an image the cache holds")

    monkeypatch.setattr(vqmed.data.dataset, "run_transform", decode)
    out = tmp_path / "cached"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(checkpoint), "--manifest", str(small_manifest), "--out", str(out), "--data-root",
              str(data_root), "--set", "batch_size=32", "--set", f"cache_dir={cache}", "--quiet"])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in cache.rglob("chunk-*.npy")) == chunks
    store, decoded = load(out), load(exported[0])
    assert store.index["key"].tolist() == decoded.index["key"].tolist() and len(store.index) == len(rows)
    for name in decoded.array_names:
        np.testing.assert_array_equal(store.array(name), decoded.array(name), err_msg=name)


def test_progress_bar_shown_and_quiet(checkpoint, small_manifest, data_root, tmp_path, capsys, monkeypatch):
    few = tmp_path / "few.csv"
    read_manifest(small_manifest).head(8).to_csv(few, index=False)
    monkeypatch.delenv("CI", raising=False)
    export_manifest(checkpoint, few, tmp_path / "shown", data_root, progress=True)
    assert "export" in capsys.readouterr().err
    monkeypatch.setenv("CI", "1")
    export_manifest(checkpoint, few, tmp_path / "ci", data_root, progress=True)
    assert "export" not in capsys.readouterr().err
    monkeypatch.delenv("CI")
    export_manifest(checkpoint, few, tmp_path / "off", data_root, progress=False)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------- distributed
def test_torchrun_ranks_write_disjoint_shards_merged_at_load(exported, checkpoint, small_manifest, data_root, tmp_path):
    """Two gloo ranks under torchrun: rank r exports rows i % 2 == r into its own shards; one index at load."""
    few = tmp_path / "few.csv"
    read_manifest(small_manifest).head(96).to_csv(few, index=False)
    script = tmp_path / "ddp_export.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from vqmed.export import export_manifest\n"
        "s = export_manifest(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], batch_size=16, progress=False,\n"
        "                    shard_size=20, device='cpu')\n"
        # One file per rank: two ranks printing to one pipe interleave their lines.
        "with open(sys.argv[5] + '-' + os.environ['RANK'] + '.json', 'w') as f:\n"
        "    json.dump({'exported': s['exported'], 'index_rows': s['index_rows']}, f)\n"
    )
    out = tmp_path / "ddp"
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(checkpoint), str(few), str(out), str(data_root), str(tmp_path / "summary")]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((tmp_path / f"summary-{rank}.json").read_text()) for rank in (0, 1)]
    # counts are all-reduced over ranks; only rank 0 writes (and counts) the merged index
    assert summaries == [{"exported": 96, "index_rows": 96}, {"exported": 96, "index_rows": None}]

    store = load(out)
    index = store.index
    assert len(index) == 96 and index["key"].is_unique and index["row"].tolist() == list(range(96))
    rank = index["shard"].str.extract(r"-r(\d{3})-")[0].astype(int)
    assert set(rank) == {0, 1} and (rank == index["row"] % 2).all()
    assert (out / "index.parquet").is_file() and set(pd.read_parquet(out / "index.parquet")["key"]) == set(index["key"])
    # Same codes as the single-process export.
    ref = load(exported[0])
    position = pd.Series(np.arange(len(ref.index)), index=ref.index["key"])
    assert np.array_equal(store.array("codes"), ref.array("codes")[position.loc[index["key"]].to_numpy()])


# ---------------------------------------------------------------------------------------- streaming
def test_memory_stays_flat_whatever_the_manifest_size(checkpoint, small_manifest, data_root, tmp_path):
    """Peak Python/NumPy memory of an export does not grow with the number of images (shards stream out)."""
    import tracemalloc

    state = torch.load(checkpoint, weights_only=True)
    state["config"]["data"]["image_size"] = 128  # same fully convolutional weights at 128x128: bigger images
    ckpt = save_checkpoint(state, tmp_path / "ckpt128")
    manifest = read_manifest(small_manifest)
    peaks = {}
    for n in (48, 300):
        rows = tmp_path / f"rows{n}.csv"
        manifest.head(n).to_csv(rows, index=False)
        tracemalloc.start()
        try:
            summary = export_manifest(ckpt, rows, tmp_path / f"store{n}", data_root, batch_size=16, progress=False,
                                      shard_size=16)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert summary["exported"] == n
    held = 300 * 128 * 128  # what keeping 300 decoded images (uint8) alone would take
    assert peaks[300] - peaks[48] < held / 4, peaks


# ------------------------------------------------------------------------------------ two levels
def test_two_level_model_exports_both_code_maps_and_decodes_exactly(small_manifest, data_root, tmp_path):
    torch.manual_seed(0)
    model = build_model("vqvae2", spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32),
                        num_res_layers=(1, 1), num_res_channels=(16, 16), downsample=4, top_downsample=2,
                        top_channels=32, num_embeddings=(64, 32), embedding_dim=16)
    ckpt = _save(model.eval(), "vqvae2", SIZE, 2, tmp_path / "ckpt2")
    few = tmp_path / "few.csv"
    read_manifest(small_manifest).head(24).to_csv(few, index=False)
    export_manifest(ckpt, few, tmp_path / "store2", data_root, batch_size=24, progress=False)
    store = load(tmp_path / "store2")
    codes, top = store.array("codes"), store.array("codes_top")
    assert codes.shape == (24, 16, 16) and top.shape == (24, 8, 8) and top.dtype == np.uint16
    assert store.codebook.shape == (64, 16) and store.codebook_top.shape == (32, 16)
    assert np.allclose(store.array("code_histogram_top").sum(1), 1.0)
    assert (store.index["codes_top_shape"] == "8x8").all()
    images = _images(few, data_root, _paths(store, few))
    with torch.no_grad():
        own = model.index_quantize(images)
        recon = model.decode_indices(own)
    assert torch.equal(torch.from_numpy(codes.astype(np.int64)), own[0])
    assert torch.equal(torch.from_numpy(top.astype(np.int64)), own[1])
    assert torch.equal(store.decode(codes, top), recon)
    with pytest.raises(ValueError, match="codes_top"):
        store.decode(codes)


def test_unreadable_files_are_quarantined_and_retried(checkpoint, small_manifest, data_root, tmp_path):
    """A truncated JPEG and a zero-byte file (synthesised: real data has none) next to real images."""
    root = tmp_path / "root"
    rows = read_manifest(small_manifest).head(6).copy()
    for rel in rows["path"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / rel, root / rel)
    blob = (root / rows["path"].iloc[0]).read_bytes()
    (root / rows["path"].iloc[0]).write_bytes(blob[: len(blob) // 3])
    (root / rows["path"].iloc[1]).write_bytes(b"")
    manifest = tmp_path / "with_bad.csv"
    rows.to_csv(manifest, index=False)
    out = tmp_path / "store"
    summary = export_manifest(checkpoint, manifest, out, root, progress=False, keep_paths=True)  # paths for this test
    assert (summary["exported"], summary["quarantined"]) == (4, 2)
    assert sorted(load(out).index["path"]) == sorted(rows["path"].iloc[2:])
    listed = pd.read_csv(out / "quarantine.csv")
    assert sorted(listed["path"]) == sorted(rows["path"].iloc[:2]) and listed["reason"].str.len().min() > 0
    # Fixed files are picked up by the next run; the quarantine list is rewritten (now empty: removed).
    for rel in rows["path"].iloc[:2]:
        shutil.copy(data_root / rel, root / rel)
    again = export_manifest(checkpoint, manifest, out, root, progress=False, keep_paths=True)
    assert (again["exported"], again["skipped"], again["quarantined"]) == (2, 4, 0)
    assert len(load(out).index) == 6 and not (out / "quarantine.csv").exists()
