"""Pretraining engine on real Kermany images: tracking, checkpoints, kill-and-resume, DDP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from vqmed.models_io.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", ROOT.parent / "shared" / "data"))

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "chest_xray").is_dir(), reason="real Kermany data not found")


def tiny_config(tmp: Path, cache: Path, **train: object) -> Path:
    """A real but small run: 320 Kermany train images at 32x32, a narrow model, 2 epochs."""
    cfg = {
        "name": "tiny-cxr",
        "seed": 0,
        "out": str(tmp / "run"),
        "data": {"manifests": [str(ROOT / "data_manifests" / "chest_xray.csv")], "splits": ["train"], "image_size": 32,
                 "max_images": 320, "val_fraction": 0.1, "cache_dir": str(cache), "data_root": str(DATA_ROOT)},
        "model": {"name": "vqvae", "params": {"channels": [16, 32], "num_res_channels": [16, 32],
                                             "num_embeddings": 64, "embedding_dim": 16}},
        "train": {"epochs": 2, "batch_size": 16, "threads": 1, "checkpoint_every": 4, "log_every": 2,
                  "warmup_steps": 5, **train},
        "tracking": {"experiment": "test-pretrain", "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_pretrain(config: Path, *extra: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vqmed", "pretrain", "--config", str(config), *extra],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CI": "1", **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def wait_for_checkpoint(process: subprocess.Popen, ckpt_dir: Path, step: int) -> None:
    """Return once the running ``process`` has a checkpoint of at least ``step``; fail if it ended first."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        found = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
        if found and found[0]["step"] >= step:
            break
        time.sleep(0.2)
    assert process.poll() is None, "run ended before it could be stopped: " + process.stderr.read()[-2000:]


def sigkill_after_checkpoint(config: Path, ckpt_dir: Path, step: int, *extra: str) -> None:
    """Start ``vqmed pretrain`` and SIGKILL it once a checkpoint of at least ``step`` exists."""
    process = subprocess.Popen([sys.executable, "-m", "vqmed", "pretrain", "--config", str(config), *extra], cwd=ROOT,
                               env={**os.environ, "CI": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(process, ckpt_dir, step)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("pretrain")
    config = tiny_config(tmp, cache)
    run_pretrain(config)
    return tmp, json.loads((tmp / "run" / "summary.json").read_text())


def test_summary_and_checkpoint(finished_run):
    tmp, summary = finished_run
    for key in ("val_psnr", "val_mse", "codebook_usage", "perplexity", "epochs", "steps",
                "train_images_per_second", "mlflow_run_id", "checkpoint"):
        assert key in summary, key
    # 288 training images / batch 16 = 18 steps an epoch (patients held out for validation vary the count).
    assert summary["epochs"] == 2 and summary["steps"] >= 2 * 14
    assert summary["train_images_per_second"] > 0 and 0 < summary["codebook_usage"] <= 1
    final = load_checkpoint(Path(summary["checkpoint"]))
    assert final["step"] == summary["steps"] and "optimizer_state" not in final
    state, _ = latest_checkpoint(tmp / "run" / "checkpoints")
    assert state["step"] == summary["steps"]
    assert not (tmp / "run" / "tracking_backlog").exists()  # tracking took everything: no empty backlog folder


def test_mlflow_run_holds_params_metrics_figures_model(finished_run):
    tmp, summary = finished_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.batch_size"] == "16" and run.data.params["data.image_size"] == "32"
    assert {"val_psnr", "val_ssim", "codebook/usage", "codebook/perplexity", "train/loss", "train/lr",
            "train/images_per_second"} <= set(run.data.metrics)
    loss = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert loss[-1] < loss[0], "training loss did not fall"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reconstructions", "figures", "checkpoints", "summary.json"} <= artifacts
    # MLflow 3 keeps logged models as LoggedModels linked to the run as its outputs.
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["model"]
    assert json.loads(models[0].model_uri and mlflow.models.get_model_info(models[0].model_uri).metadata["model_config"])
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/loss_curves.png", "figures/codebook_usage.png", "figures/reconstruction_progress.gif"} <= figures
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")}
    assert grids == {"reconstructions/epoch_001.png", "reconstructions/epoch_002.png"}
    assert run.inputs.dataset_inputs, "the manifest was not logged as the run's input dataset"
    logged = json.dumps(list(run.data.params.values()) + [d.dataset.source for d in run.inputs.dataset_inputs])
    assert "person" not in logged.lower(), "a Kermany patient id leaked into MLflow"


def test_refuses_to_overwrite_a_run_without_resume(finished_run):
    tmp, _ = finished_run
    result = run_pretrain(tmp / "tiny.yaml", check=False)
    assert result.returncode == 2 and "--resume" in result.stderr


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, cache, finished_run):
    _, reference = finished_run
    config = tiny_config(tmp_path, cache)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    sigkill_after_checkpoint(config, ckpt_dir, step=8)  # mid-epoch: step 8 of ~18
    killed_at = latest_checkpoint(ckpt_dir)[0]["step"]
    assert 0 < killed_at < reference["steps"]
    run_pretrain(config, "--resume")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == reference["steps"] and summary["epochs"] == reference["epochs"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    for checkpoint in ckpt_dir.glob("*.pt"):
        load_checkpoint(checkpoint)
    # Resumed at the exact batch: same data order, so the same weights as the uninterrupted run.
    a = load_checkpoint(Path(summary["checkpoint"]))["model_state"]
    b = load_checkpoint(Path(reference["checkpoint"]))["model_state"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)


def test_sigterm_to_the_process_group_checkpoints_then_resumes(tmp_path, cache, finished_run):
    """A batch scheduler's stop: SIGTERM to the whole process group, DataLoader workers included. The run
    checkpoints at a step boundary, exits 128 + SIGTERM, and ``--resume`` ends where an uninterrupted run ends."""
    _, reference = finished_run
    config = tiny_config(tmp_path, cache, num_workers=1)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    process = subprocess.Popen([sys.executable, "-m", "vqmed", "pretrain", "--config", str(config)], cwd=ROOT,
                               env={**os.environ, "CI": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        wait_for_checkpoint(process, ckpt_dir, step=4)
        # The group's signal reaches the worker before the main process has acted on its own copy (what decides
        # the race when a step is long): the worker must survive it rather than take the run down.
        workers = [int(pid) for tasks in Path(f"/proc/{process.pid}/task").glob("*/children")
                   for pid in tasks.read_text().split()]
        assert workers, "no DataLoader worker found"
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "DataLoader worker" not in stderr
    stopped = re.search(r"stopped by signal 15 at step (\d+)", stdout)
    assert stopped, stdout[-2000:]
    assert latest_checkpoint(ckpt_dir)[0]["step"] == int(stopped.group(1)) < reference["steps"]
    run_pretrain(config, "--resume")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == reference["steps"] and summary["epochs"] == reference["epochs"]
    # Workers do not change what a batch holds: the weights match the single-process, uninterrupted run.
    a = load_checkpoint(Path(summary["checkpoint"]))["model_state"]
    b = load_checkpoint(Path(reference["checkpoint"]))["model_state"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)


def test_ddp_two_cpu_processes_hold_identical_weights(tmp_path, cache):
    config = tiny_config(tmp_path, cache, epochs=1, max_steps=6, checkpoint_every=None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "vqmed",
         "pretrain", "--config", str(config), "--set", "train.batch_size=8"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id])
    assert len(runs) == 1, "only rank 0 may log"
    # Each rank hashed its own weights and codebooks after the last step: they must agree bit for bit.
    hashes = summary["rank_state_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]


def test_a_diverging_run_stops_with_a_clear_error_and_no_nan_weights(tmp_path):
    """A learning rate far too high makes the loss infinite / NaN within a few steps: the run stops at the first
    non-finite loss with a one-line error naming the step and the remedy, before the optimiser applies it,
    so no checkpoint on disk holds a NaN weight."""
    config = tiny_config(tmp_path, tmp_path / "cache", lr=1.0e12, warmup_steps=0, checkpoint_every=1)
    result = run_pretrain(config, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("vqmed pretrain: error: step ") and "the loss is not finite" in error, error
    assert "lower train.lr or set train.grad_clip" in error
    found = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert found is not None and found[0]["step"] >= 1, "the steps before the divergence were checkpointed"
    assert f"the checkpoint of step {found[0]['step']} in" in error
    assert all(torch.isfinite(t).all() for t in found[0]["model_state"].values() if t.is_floating_point())
