"""DDP: two gloo CPU processes train on different shards of real X-rays and end with identical codebooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", REPO.parent / "shared" / "data"))
WORKER = Path(__file__).with_name("ddp_networks_worker.py")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict:
    if not list((DATA_ROOT / "chest_xray" / "train").glob("*/*.jpeg")):
        pytest.skip(f"Kermany images not found under {DATA_ROOT}")
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        "--out",
        str(out),
        "--data-root",
        str(DATA_ROOT),
        "--steps",
        "20",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = {}
    for f in sorted(out.glob("rank*_*.pt")):
        rank, tag = f.stem.split("_", 1)
        results.setdefault(tag, {})[rank] = torch.load(f, weights_only=True)
    return results


@pytest.mark.parametrize("tag", ["ema", "learned_cosine_lowdim", "vqvae2", "vit"])
def test_ddp_ranks_end_bit_identical(ddp_results, tag):
    r0, r1 = ddp_results[tag]["rank0"], ddp_results[tag]["rank1"]
    assert r0["batch_means"] != r1["batch_means"]  # the ranks really saw different images
    assert r0["state"].keys() == r1["state"].keys()
    different = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
    assert not different, f"weights/codebooks differ between ranks: {different}"
    for s0, s1 in zip(r0["stats"], r1["stats"]):
        assert s0["restarts"] > 0  # restarts (and k-means) happened and were synchronised
        assert torch.equal(s0["usage_counts"], s1["usage_counts"])  # epoch statistics are global
    assert sum(r0["losses"][-5:]) < sum(r0["losses"][:5])


def test_ddp_without_quantizer_sync_codebooks_drift(ddp_results):
    """Control: DDP alone (buffers not broadcast) does not keep EMA codebooks equal; the quantizer's sync does."""
    r0, r1 = ddp_results["ema_unsynced"]["rank0"], ddp_results["ema_unsynced"]["rank1"]
    assert not torch.equal(r0["state"]["quantizer.embed"], r1["state"]["quantizer.embed"])
