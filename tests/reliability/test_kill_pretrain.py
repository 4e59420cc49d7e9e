"""Killed pretraining: SIGKILL at three seeded random moments, a checkpoint truncated on purpose,
``--resume`` after each; the run still completes its planned steps in one MLflow run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from vqmed.atomic import TMP_PREFIX
from vqmed.models_io.checkpoint import LAST, PREVIOUS, CheckpointError, latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
KERMANY = REPO / "data_manifests" / "chest_xray.csv"
SEED = 20251124


def _latest_step(ckpt_dir: Path) -> int:
    try:
        found = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    except CheckpointError:  # both files mid-rotation in the instant we looked: try again later
        return -1
    return -1 if found is None else int(found[0]["step"])


def _kill_when(process: subprocess.Popen, ready, delay: float, what: str, log: Path, timeout: float = 240) -> float:
    """Wait until ``ready()``, then ``delay`` seconds more, then SIGKILL; returns when it was killed."""
    start = time.monotonic()
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"pretraining ended (rc {process.returncode}) before the kill point ({what}):\n"
                        + log.read_text()[-3000:])
        if time.monotonic() - start > timeout:
            process.kill()
            pytest.fail(f"kill point never reached: {what}")
        time.sleep(0.05)
    time.sleep(delay)
    if process.poll() is not None:
        pytest.fail(f"pretraining ended (rc {process.returncode}) during the extra delay of {delay:.2f}s ({what})")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return time.monotonic() - start


def _start(config: Path, resume: bool, log: Path, env: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "vqmed", "pretrain", "--config", str(config)] + (["--resume"] if resume else [])
    # Output to a file, never a pipe: a full pipe would stall the child and hide the kill point.
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _all_checkpoints_load(folder: Path) -> list[Path]:
    """Every checkpoint under ``folder`` loads. A SIGKILL inside a write leaves the atomic writer's
    ``.tmp-*`` file, never a torn checkpoint under a real name: those are not checkpoints (the next
    resume removes them, which ``test_kills_leave_no_half_written_files`` checks)."""
    files = sorted(p for p in folder.rglob("*.pt") if not p.name.startswith(TMP_PREFIX))
    for path in files:
        load_checkpoint(path)  # raises CheckpointError for a torn or unsafe file
    return files


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, data_root, make_config, env_for_child):
    """Kill 1 mid-epoch 1, kill 2 around the end of epoch 1 (validation, epoch checkpoint), then truncate
    ``last.pt`` on purpose, kill 3 in the final phase (final.pt, figures, MLflow model); resume each time."""
    tmp = tmp_path_factory.mktemp("killed_pretrain")
    config = make_config(tmp, [KERMANY], data_root)
    ckpt = tmp / "run" / "checkpoints"
    rng = random.Random(SEED)
    # About 18 steps an epoch, 2 epochs, a checkpoint every 2 steps: the step targets, then a random
    # extra delay so that the kill lands anywhere in a step, a checkpoint write or an MLflow call.
    plan = [
        ("mid-epoch-1", rng.randint(3, 12), rng.uniform(0.0, 0.3)),
        ("epoch-1-end", rng.randint(14, 22), rng.uniform(0.0, 0.5)),
        ("final-phase", None, rng.uniform(0.0, 1.0)),
    ]
    events: list[dict] = []
    truncated: dict = {}
    for number, (name, target, delay) in enumerate(plan):
        log = tmp / f"attempt{number}.log"
        process = _start(config, resume=number > 0, log=log, env=env_for_child())
        if target is None:
            ready = lambda: (tmp / "run" / "final.pt").is_file()
        else:
            # Past the checkpoint the last kill left (a fast run can overshoot a target): every restart must
            # resume, then be killed.
            target = max(target, _latest_step(ckpt) + 2)
            ready = lambda t=target: _latest_step(ckpt) >= t
        try:
            seconds = _kill_when(process, ready, delay, name, log)
        finally:
            if process.poll() is None:
                process.kill()
        step = _latest_step(ckpt)
        on_disk = _all_checkpoints_load(tmp / "run")  # every checkpoint left by a SIGKILL loads
        events.append({"kill": name, "target_step": target, "extra_delay_s": round(delay, 3),
                       "after_s": round(seconds, 1), "checkpoint_step": step, "files": [p.name for p in on_disk]})
        if number == 1:
            # Truncate the newest checkpoint on purpose (a torn write on a broken disk).
            last, prev = ckpt / LAST, ckpt / PREVIOUS
            if not last.exists():  # killed between the rotation and the write: make one to tear
                last.write_bytes(prev.read_bytes())
            blob = last.read_bytes()
            last.write_bytes(blob[: len(blob) // 2])
            with pytest.raises(CheckpointError) as info:
                load_checkpoint(last)
            state, used = latest_checkpoint(ckpt)
            truncated = {"error": str(info.value), "fallback": used.name, "fallback_step": int(state["step"])}
    # What a kill inside a write leaves (if none of the kills above landed there): temporary files.
    (ckpt / ".tmp-999999-0a1b2c3d-last.pt").write_bytes(b"half a checkpoint")
    (tmp / "run" / ".tmp-999999-0a1b2c3d-summary.json").write_text('{"half": ')
    final_log = tmp / "final.log"
    result = subprocess.run([sys.executable, "-m", "vqmed", "pretrain", "--config", str(config), "--resume"],
                            cwd=REPO, env=env_for_child(), capture_output=True, text=True, check=False, timeout=300)
    final_log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    resumed_lines = [line for f in sorted(tmp.glob("attempt*.log")) + [final_log]
                     for line in f.read_text().splitlines() if line.startswith("resumed from")]
    print("kill events:", json.dumps(events, indent=1), "truncation:", truncated, sep="\n")
    return {"tmp": tmp, "summary": summary, "events": events, "truncated": truncated, "resumed": resumed_lines}


def test_three_kills_then_resume_complete_the_planned_run(killed_run):
    tmp, summary = killed_run["tmp"], killed_run["summary"]
    assert [e["kill"] for e in killed_run["events"]] == ["mid-epoch-1", "epoch-1-end", "final-phase"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("reliability").experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one pretraining"
    run = runs[0]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    planned = int(run.data.params["resolved.total_steps"])
    assert summary["steps"] == planned and summary["epochs"] == 2
    # Metrics of every logged step reached MLflow (steps replayed after a resume are logged again).
    logged = {int(m.step) for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert logged == set(range(2, planned + 1, 2))
    assert len(client.get_metric_history(run.info.run_id, "val_psnr")) >= 2  # one per epoch at least
    # Every checkpoint on disk loads, and the newest is the last step.
    files = _all_checkpoints_load(tmp / "run")
    assert {p.name for p in files} >= {"last.pt", "last.prev.pt", "final.pt"}
    state, used = latest_checkpoint(tmp / "run" / "checkpoints")
    assert used.name == LAST and state["step"] == planned
    assert load_checkpoint(Path(summary["checkpoint"]))["step"] == planned
    # The final checkpoint logged to MLflow loads too.
    artifact = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/final.pt",
                                                        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}"))
    assert load_checkpoint(artifact)["step"] == planned
    # Each restart resumed (the first one found the checkpoint of kill 1, and so on).
    assert len(killed_run["resumed"]) == 3, killed_run["resumed"]


def test_kills_leave_no_half_written_files(killed_run, find_temp_files):
    tmp = killed_run["tmp"]
    assert find_temp_files(tmp / "run") == []
    cache = tmp / "cache"
    assert not list(cache.rglob(".tmp-*")), "a half-written image cache chunk survived"


def test_truncated_checkpoint_detected_and_previous_used(killed_run):
    info = killed_run["truncated"]
    assert "last.pt" in info["error"] and "cannot load checkpoint safely" in info["error"]
    assert info["fallback"] == PREVIOUS and info["fallback_step"] > 0
    # The resume after the truncation started from last.prev.pt, at its step.
    second_resume = killed_run["resumed"][1]
    assert f"{PREVIOUS} at step {info['fallback_step']}" in second_resume, second_resume
