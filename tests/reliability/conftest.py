"""Shared fixtures of the fault-injection suite (``tests/reliability``).

Everything runs on the real data under the data root (``VQMED_DATA_ROOT`` or ``../shared/data``):
Kermany chest X-rays, the real chest DICOMs, nibabel's NIfTI test volumes. Faults are real too
(SIGKILL, truncated and bit-flipped files, closed ports, pickles that run code); the only fake is
the ``OSError(ENOSPC)`` injected into one write function where a full disk cannot be arranged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from vqmed.data import ImageDataset, ImageSpec, read_manifest, resolve_data_root
from vqmed.networks import build_model, vqvae_loss
from vqmed.models_io.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", REPO.parent / "shared" / "data"))
KERMANY = REPO / "data_manifests" / "chest_xray.csv"
SALT = "vqmed-reliability-salt"
# The tiny but real model of tests/test_training.py: 32x32 inputs, 8x8 codes from 64 entries.
TINY_MODEL = {"channels": [16, 32], "num_res_channels": [16, 32], "num_embeddings": 64, "embedding_dim": 16}

if not (DATA_ROOT / "chest_xray").is_dir():  # pragma: no cover - depends on the machine
    pytest.skip("real data not found (set VQMED_DATA_ROOT)", allow_module_level=True)


@pytest.fixture(scope="session", autouse=True)
def _salt_and_threads(pinned_salt_and_threads):
    with pinned_salt_and_threads(SALT):
        yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    return Path(resolve_data_root(str(DATA_ROOT)))


@pytest.fixture(scope="session")
def kermany() -> pd.DataFrame:
    return read_manifest(KERMANY)


def child_env(**extra: str) -> dict[str, str]:
    """Environment of every child process: quiet progress bars, one thread, the test salt."""
    return {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "VQMED_ID_SALT": SALT, **extra}


@pytest.fixture(scope="session")
def env_for_child() -> Callable[..., dict[str, str]]:
    """``env_for_child(**extra)``: the environment of a child process (see :func:`child_env`)."""
    return child_env


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args, log=PATH, env=..., cwd=..., timeout=...)``: ``python -m vqmed ARGS`` in a child.

    ``log`` (optional) receives the child's stdout and stderr, so that tests can scan them later.
    """

    def run(*args: str, log: Path | None = None, env: dict | None = None, cwd: Path = REPO,
            timeout: float = 300) -> subprocess.CompletedProcess:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "vqmed", *map(str, args)], capture_output=True, text=True,
                                check=False, cwd=cwd, env=child_env(**(env or {})), timeout=timeout)
        result.seconds = time.monotonic() - start  # type: ignore[attr-defined]
        if log is not None:
            Path(log).write_text(f"$ vqmed {' '.join(map(str, args))}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        return result

    return run


def tiny_pretrain_config(tmp: Path, manifests: list[Path], data_root: Path, **sections: dict) -> Path:
    """A real but small pretraining config (written to ``tmp/tiny.yaml``); ``sections`` update its parts."""
    cfg = {
        "name": "tiny-cxr",
        "seed": 0,
        "out": str(tmp / "run"),
        "data": {"manifests": [str(m) for m in manifests], "splits": ["train"], "image_size": 32, "max_images": 320,
                 "val_fraction": 0.1, "cache_dir": str(tmp / "cache"), "data_root": str(data_root)},
        "model": {"name": "vqvae", "params": dict(TINY_MODEL)},
        "train": {"epochs": 2, "batch_size": 16, "threads": 1, "checkpoint_every": 2, "log_every": 2,
                  "warmup_steps": 5},
        "tracking": {"experiment": "reliability", "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    for section, values in sections.items():
        if isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def make_config() -> Callable[..., Path]:
    return tiny_pretrain_config


@pytest.fixture(scope="session")
def small_checkpoint(kermany, data_root, tmp_path_factory) -> Path:
    """The tiny model trained 20 steps on 64 real X-rays (32x32), saved as a vqmed checkpoint.

    Export tests use it so that they do not depend on the (slower) pretraining tests.
    """
    torch.manual_seed(0)
    params = {**TINY_MODEL, "spatial_dims": 2, "in_channels": 1, "out_channels": 1}
    model = build_model("vqvae", **params)
    rows = kermany.iloc[:: len(kermany) // 64].head(64)
    ds = ImageDataset(rows, data_root, ImageSpec(32), progress=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(20):
        batch = images[(step * 16) % len(images):][:16]
        loss, _, _ = vqvae_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # model.config: every constructor argument, defaults included.
    state = {"model_name": "vqvae", "model_config": getattr(model, "config", params),
             "model_state": model.eval().state_dict(), "step": 20,
             "config": {"data": {"image_size": 32, "spatial_dims": 2, "channels": 1}}}
    return save_checkpoint(state, tmp_path_factory.mktemp("small_ckpt"))


def temp_files(folder: Path) -> list[Path]:
    """Temporary files our atomic writers use (``.NAME.tmp-PID``, ``.tmp-*``) anywhere under ``folder``."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and (".tmp-" in p.name or p.name.startswith(".tmp")))


@pytest.fixture(scope="session")
def find_temp_files() -> Callable[[Path], list[Path]]:
    return temp_files
