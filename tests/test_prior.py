"""Prior room: a transformer prior over exported code maps of real chest X-rays.

The store is built the way tests/test_export.py builds it: 240 real Kermany rows exported by a small VQ-VAE
trained 30 steps on them. The 3D case uses the MNI152 brain template (nilearn's, real) as a tiny volume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from vqmed.config import ConfigError, PriorConfig, QAConfig, from_dict, load_config
from vqmed.data import ImageDataset, ImageSpec, read_manifest, resolve_data_root
from vqmed.export import export_manifest, load
from vqmed.models_io.checkpoint import save_checkpoint
from vqmed.networks import build_model, vqvae_loss
from vqmed.prior import PriorModel, load_prior, ordering_for, score_store, train_prior
from vqmed.prior.model import Level
from vqmed.prior.score import COLUMNS

REPO = Path(__file__).resolve().parents[1]
KERMANY = REPO / "data_manifests" / "chest_xray.csv"
SIZE = 64
SMALL = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32), num_res_layers=(1, 1),
             num_res_channels=(16, 16), downsample=4, num_embeddings=64, embedding_dim=16)
TINY_NET = {"attn_layers_dim": 32, "attn_layers_depth": 1, "attn_layers_heads": 2, "embedding_dropout_rate": 0.1}


@pytest.fixture(scope="module", autouse=True)
def _salt_and_threads(pinned_salt_and_threads):
    with pinned_salt_and_threads("vqmed-test-salt"):
        yield


def _save(model: torch.nn.Module, name: str, image_size: int, spatial_dims: int, directory: Path) -> Path:
    state = {"model_name": name, "model_config": model.config, "model_state": model.state_dict(), "step": 0,
             "config": {"data": {"image_size": image_size, "spatial_dims": spatial_dims, "channels": 1}}}
    return save_checkpoint(state, directory)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """240 real Kermany rows (200 train, 40 test), exported by a small VQ-VAE trained 30 steps on the train rows."""
    data_root = Path(resolve_data_root(None))
    kermany = read_manifest(KERMANY)
    parts = [g.sort_values("path").head(100 if split == "train" else 20) for (split, _), g in kermany.groupby(["split", "label"])]
    manifest = pd.concat(parts).sort_values("path").reset_index(drop=True)
    tmp = tmp_path_factory.mktemp("prior_store")
    manifest.to_csv(tmp / "kermany.csv", index=False)
    torch.manual_seed(0)
    model = build_model("vqvae", **SMALL)
    ds = ImageDataset(manifest[manifest["split"] == "train"], data_root, ImageSpec(SIZE), progress=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(30):
        loss, _, _ = vqvae_loss(model, images[(step * 16) % len(images):][:16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt = _save(model.eval(), "vqvae", SIZE, 2, tmp / "ckpt")
    export_manifest(ckpt, tmp / "kermany.csv", tmp / "store", data_root, batch_size=64, progress=False)
    return tmp / "store"


def _config(store: Path, out: Path, **train) -> PriorConfig:
    raw = {"name": "test-prior", "export": str(store), "out": str(out), "net": TINY_NET,
           "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "val_fraction": 0.1, "val_every": 20,
                     "log_every": 5, "checkpoint_every": 10, "threads": 1, "device": "cpu", **train},
           "sample": {"n": 4, "real": 2},
           "tracking": {"experiment": "test-prior", "tracking_uri": f"sqlite:///{out.parent / 'mlflow.db'}"}}
    cfg = from_dict(PriorConfig, raw)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def trained(store_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prior") / "run"
    summary = train_prior(_config(store_dir, out, epochs=12, val_every=50), resume=False)
    return out, summary


# ------------------------------------------------------------------------------------------ ordering
@pytest.mark.parametrize("shape", [(16, 16), (5, 7), (4, 6, 8)])
def test_raster_ordering_round_trip(shape):
    """MONAI's raster ordering turns a code map into a row-major sequence and back, 2D and 3D."""
    order = ordering_for(shape)
    codes = torch.randint(0, 512, (3, *shape))
    seq = codes.reshape(3, -1)[:, order.get_sequence_ordering()]
    assert torch.equal(seq, codes.reshape(3, -1))  # raster = row-major: the flattening itself
    back = seq[:, order.get_revert_sequence_ordering()].reshape(3, *shape)
    assert torch.equal(back, codes)
    shuffled = ordering_for(shape, "random")
    seq = codes.reshape(3, -1)[:, shuffled.get_sequence_ordering()]
    assert torch.equal(seq[:, shuffled.get_revert_sequence_ordering()].reshape(3, *shape), codes)


# ------------------------------------------------------------------------------------------ training
def test_training_beats_the_unigram_and_logs_to_mlflow(trained, store_dir):
    out, summary = trained
    assert summary["val_bits_per_code"] < summary["unigram_bits_per_code"]
    assert (out / "final.pt").is_file() and (out / "summary.json").is_file()
    store = load(store_dir)
    # validation patients come from the training split only, grouped: none of their studies is trained on
    assert summary["train_studies"] + summary["val_studies"] == int((store.index["split"] == "train").sum())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["net.attn_layers_dim"] == "32"
    assert "val/bits_per_code" in run.data.metrics and "val/unigram_bits_per_code" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/samples.png", "samples/real_vs_sample.png"} <= artifacts
    history = client.get_metric_history(run.info.run_id, "val/bits_per_code")
    assert history[-1].value < history[0].value


def test_constant_code_map_is_far_less_likely_than_real_ones(trained, store_dir):
    """A code map of one code the training films never use everywhere is less likely than every real map."""
    out, _ = trained
    model, _ = load_prior(out)
    store = load(store_dir)
    codes = store.array("codes").astype(np.int64)
    test = torch.from_numpy(codes[(store.index["split"] == "test").to_numpy()])
    counts = np.bincount(codes[(store.index["split"] == "train").to_numpy()].ravel(), minlength=64)
    rare = int(np.argmin(counts))
    common = int(np.argmax(counts))
    real = model.bits_per_code({"codes": test})
    constant = model.bits_per_code({"codes": torch.full((2, *test.shape[1:]), rare)})
    assert real.isfinite().all() and constant.isfinite().all()
    assert constant.min() > real.max()
    # the per-code map is MONAI's get_likelihood, reshaped to the code map
    ll = model.log_likelihood({"codes": test[:3]})["codes"]
    assert ll.shape == (3, *test.shape[1:]) and (ll <= 0).all()
    # one common code everywhere is likelier than a rare one everywhere
    assert model.bits_per_code({"codes": torch.full((1, *test.shape[1:]), common)})[0] < constant[0]


def test_sampling_gives_code_maps_of_the_store_shape(trained, store_dir, tmp_path):
    from vqmed.prior import sample_prior

    out, _ = trained
    model, _ = load_prior(out)
    torch.manual_seed(0)
    codes = model.sample(3, temperature=0.8, top_k=5)["codes"]
    assert codes.shape == (3, 16, 16) and codes.min() >= 0 and codes.max() < 64
    summary = sample_prior(out, tmp_path / "samples", n=4, temperature=0.7, top_k=10)
    assert all(Path(f).is_file() for f in summary["files"]) and summary["top_k"] == 10


# ------------------------------------------------------------------------------------------ scoring
def test_score_columns_are_written_atomically_and_idempotently(trained, store_dir, tmp_path):
    out, _ = trained
    first = score_store(out, store_dir, flag_quantile=0.1, heatmaps=2, heatmap_dir=tmp_path / "heat")
    index1 = load(store_dir).index
    assert set(COLUMNS) <= set(index1.columns)
    assert np.isfinite(index1["prior_bits_per_code"]).all() and first["studies"] == len(index1)
    train_bits = index1.loc[index1["split"] == "train", "prior_bits_per_code"]
    assert abs(index1.loc[index1["split"] == "train", "prior_flag"].mean() - 0.1) < 0.03
    assert first["flag_threshold"] == pytest.approx(float(np.quantile(train_bits, 0.9)))
    assert len(first["heatmaps"]) == 2 and all(Path(p).is_file() for p in first["heatmaps"])
    # no identifier in the heat maps' names: the salted row keys
    assert {Path(p).stem for p in first["heatmaps"]} <= set(index1["key"])
    score_store(out, store_dir, flag_quantile=0.1)
    index2 = load(store_dir).index
    pd.testing.assert_frame_equal(index1, index2)
    assert not any(p.name.startswith(".tmp-") for p in store_dir.iterdir())
    # scoring without the flag drops the earlier flag column: the command alone decides the columns
    score_store(out, store_dir)
    assert "prior_flag" not in load(store_dir).index.columns
    assert list(load(store_dir).index["prior_bits_per_code"]) == list(index1["prior_bits_per_code"])


# ------------------------------------------------------------------------------------------ resume
def _train_cli(store: Path, out: Path, *extra: str) -> subprocess.Popen:
    overrides = ["--set", "net.attn_layers_dim=32", "--set", "net.attn_layers_depth=1", "--set", "net.attn_layers_heads=2",
                 "--set", "train.epochs=1", "--set", "train.batch_size=16", "--set", "train.checkpoint_every=3",
                 "--set", "train.val_every=10", "--set", "train.threads=1", "--set", "train.device=cpu",
                 "--set", "train.warmup_steps=5", "--set", "sample.n=2", "--set", "sample.real=1",
                 "--set", f"tracking.tracking_uri=sqlite:///{out.parent / (out.name + '.db')}"]  # one store per run: two
    # processes creating one sqlite store at once race in MLflow's schema migration
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "vqmed", "prior", "train", "--config", str(REPO / "configs/prior/cxr_64.yaml"),
                             "--export", str(store), "--out", str(out), *overrides, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_ends_with_the_same_prior(store_dir, tmp_path):
    whole = _train_cli(store_dir, tmp_path / "whole")
    killed = _train_cli(store_dir, tmp_path / "killed")
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not (last.is_file() and torch.load(last, weights_only=True)["step"] >= 3):  # the first checkpoint: the most room before the run ends
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "final.pt").exists()
    # without --resume the output directory is refused
    again = _train_cli(store_dir, tmp_path / "killed")
    assert again.wait() == 2 and "--resume" in again.communicate()[0]
    resumed = _train_cli(store_dir, tmp_path / "killed", "--resume")
    log = resumed.communicate()[0]
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    assert whole.wait() == 0, whole.communicate()[0]
    a, state_a = load_prior(tmp_path / "whole")
    b, state_b = load_prior(tmp_path / "killed")
    assert state_a["step"] == state_b["step"]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    # one MLflow run, continued
    assert state_b["mlflow_run_id"] == json_run_id(tmp_path / "killed")


def json_run_id(out: Path) -> str:
    import json

    return json.loads((out / "run.json").read_text())["mlflow_run_id"]


# ------------------------------------------------------------------------------------------ 3D
def test_3d_code_maps_train_score_and_sample(tmp_path):
    """A tiny volume (the MNI152 template at 16^3 -> 4x4x4 codes), exported three times as three studies."""
    import nilearn

    template = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=3, in_channels=1, out_channels=1, channels=(8,), num_res_layers=1,
                        num_res_channels=8, downsample=4, num_embeddings=16, embedding_dim=8)
    ckpt = _save(model.eval(), "vqvae", 16, 3, tmp_path / "ckpt3d")
    manifest = tmp_path / "mni.csv"
    pd.DataFrame([{"study_id": f"mni{i}", "path": template.name, "split": "train", "label": None,
                   "patient_id": f"p{i}", "modality": "MR"} for i in range(3)]).to_csv(manifest, index=False)
    export_manifest(ckpt, manifest, tmp_path / "store3d", template.parent, progress=False)
    assert load(tmp_path / "store3d").array("codes").shape == (3, 4, 4, 4)
    cfg = _config(tmp_path / "store3d", tmp_path / "prior3d", epochs=3, batch_size=1, val_fraction=0.3)
    summary = train_prior(cfg)
    assert summary["levels"] == [{"array": "codes", "shape": [4, 4, 4], "num_codes": 16}]
    scored = score_store(tmp_path / "prior3d", tmp_path / "store3d")
    assert scored["studies"] == 3
    index = load(tmp_path / "store3d").index
    assert np.isfinite(index["prior_bits_per_code"]).all()
    assert all(len(c.split(",")) == 3 for c in index["prior_worst_cell"])
    prior, _ = load_prior(tmp_path / "prior3d")
    assert prior.sample(2)["codes"].shape == (2, 4, 4, 4)


# ------------------------------------------------------------------------------------------ two levels
def test_two_level_prior_scores_both_levels():
    """VQ-VAE-2: one transformer per level, the code lengths of both levels add."""
    torch.manual_seed(0)
    prior = PriorModel([Level("codes", (8, 8), 32), Level("codes_top", (4, 4), 16)], 16, 1, 2).eval()
    batch = {"codes": torch.randint(0, 32, (2, 8, 8)), "codes_top": torch.randint(0, 16, (2, 4, 4))}
    ll = prior.log_likelihood(batch)
    total = -(ll["codes"].flatten(1).sum(1) + ll["codes_top"].flatten(1).sum(1)) / (80 * np.log(2))
    torch.testing.assert_close(prior.bits_per_code(batch), total)
    loss, parts = prior.loss(batch)
    assert set(parts) == {"nats/codes", "nats/codes_top"}
    torch.testing.assert_close(loss, (parts["nats/codes"] * 64 + parts["nats/codes_top"] * 16) / 80)
    samples = prior.sample(2)
    assert samples["codes"].shape == (2, 8, 8) and samples["codes_top"].shape == (2, 4, 4)


# ------------------------------------------------------------------------------------------ configs
def test_configs_validate_with_clear_errors(tmp_path):
    cfg = load_config(PriorConfig, REPO / "configs/prior/cxr_64.yaml", ["export=somewhere"])
    assert cfg.net.ordering == "raster_scan"
    with pytest.raises(ConfigError, match="net.attn_layers_heads"):
        load_config(PriorConfig, REPO / "configs/prior/cxr_64.yaml", ["export=x", "net.attn_layers_heads=5"])
    with pytest.raises(ConfigError, match="split"):
        load_config(PriorConfig, REPO / "configs/prior/cxr_64.yaml", ["export=x", "split=test"])
    with pytest.raises(ConfigError, match="export"):
        load_config(PriorConfig, REPO / "configs/prior/cxr_64.yaml")
    qa = load_config(QAConfig, REPO / "configs/benchmark/qa.yaml")
    assert set(qa.non_chest) == {"mnist", "cifar10", "stl10", "dicom"}
    with pytest.raises(ConfigError, match="corruptions"):
        load_config(QAConfig, REPO / "configs/benchmark/qa.yaml", ["corruptions=[upside_down]"])
    with pytest.raises(ConfigError, match="non_chest.x"):
        load_config(QAConfig, REPO / "configs/benchmark/qa.yaml", ["non_chest={x: {}}"])
