"""The CUDA path of pretraining (bf16 autocast, ``torch.compile``, channels_last) on real Kermany images.

Skipped without a CUDA device. One real short run of ``configs/pretrain/cxr_64.yaml`` (a few hundred
Kermany train images at 64x64) on the GPU with ``train.amp=bf16``, ``train.compile=true`` and
``train.channels_last=true``: the Trainer really took that path, the reconstruction and the VICReg term fall,
the codebook is used, checkpoints are written and a later run resumes from them, and the bf16 forward pass of
the trained model agrees with its fp32 forward pass.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vqmed.config import PretrainConfig, load_config
from vqmed.models_io.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", ROOT.parent / "shared" / "data"))
CONFIG = ROOT / "configs" / "pretrain" / "cxr_64.yaml"

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not (DATA_ROOT / "chest_xray").is_dir(), reason="real Kermany data not found"),
]


def cuda_config(tmp: Path, cache: Path, epochs: int) -> PretrainConfig:
    """cxr_64 on 320 Kermany train images, on the GPU with bf16 autocast, torch.compile and channels_last."""
    return load_config(PretrainConfig, CONFIG, [
        f"out={tmp / 'run'}",
        f"data.manifests=[{ROOT / 'data_manifests' / 'chest_xray.csv'}]",
        f"data.data_root={DATA_ROOT}",
        f"data.cache_dir={cache}",
        "data.max_images=320",
        "data.image_size=64",
        "train.device=cuda",
        "train.amp=bf16",
        "train.compile=true",
        "train.channels_last=true",
        f"train.epochs={epochs}",
        "train.batch_size=32",
        "train.threads=2",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "train.warmup_steps=5",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment=test-cuda",
        "tracking.log_model=false",
    ])


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, pinned_salt_and_threads) -> dict:
    """Two epochs on the GPU: the run's folders, summary, metric history and what the Trainer set up."""
    from vqmed.training.engine import Trainer

    tmp, cache = tmp_path_factory.mktemp("cuda"), tmp_path_factory.mktemp("cuda-cache")
    with pinned_salt_and_threads("cuda-test"):
        trainer = Trainer(cuda_config(tmp, cache, epochs=2), resume=False)
        setup = {
            "device": trainer.rt.device.type,
            "amp_dtype": trainer.amp_dtype,
            "compiled": hasattr(trainer.net, "_orig_mod"),  # torch.compile's OptimizedModule
            "channels_last": trainer.channels_last,
            "model_device": next(trainer.model.parameters()).device.type,
        }
        summary = trainer.run()
    # Read now: the resume test continues this run and rewrites final.pt.
    final = load_checkpoint(Path(summary["checkpoint"]))
    return {"tmp": tmp, "cache": cache, "summary": summary, "setup": setup, "history": final["history"],
            "model_name": final["model_name"], "model_config": final["model_config"],
            "model_state": final["model_state"]}


def test_trainer_takes_the_cuda_path(cuda_run):
    assert cuda_run["setup"] == {"device": "cuda", "amp_dtype": torch.bfloat16, "compiled": True,
                                 "channels_last": True, "model_device": "cuda"}


def test_loss_falls_and_codebook_is_used(cuda_run):
    summary = cuda_run["summary"]
    loss = [value for _, value in cuda_run["history"]["train/loss"]]
    assert len(loss) == summary["steps"] >= 2 * 8  # ~300 training images / 32 = 9 steps an epoch
    assert all(math.isfinite(v) for v in loss), "non-finite training loss under bf16 autocast"
    # cxr_64 trains vicreg: the reconstruction falls fast, the VICReg term (most of the loss) slowly
    recon = [value for _, value in cuda_run["history"]["train/recon_mse"]]
    vicreg = [value for _, value in cuda_run["history"]["train/vicreg"]]
    assert np.mean(recon[-3:]) < 0.5 * np.mean(recon[:3]), f"reconstruction did not fall: {recon}"
    assert np.mean(vicreg[-3:]) < np.mean(vicreg[:3]), f"VICReg term did not fall: {vicreg}"
    assert np.mean(loss[-3:]) < np.mean(loss[:3]), f"training loss did not fall: {loss}"
    assert summary["codebook_usage"] >= 0.05 and summary["perplexity"] > 10, summary
    assert math.isfinite(summary["val_psnr"]) and summary["val_psnr"] > 15.0, summary


def test_checkpoint_saved_and_resumable(cuda_run, pinned_salt_and_threads):
    from vqmed.training.engine import Trainer

    tmp, cache, summary = cuda_run["tmp"], cuda_run["cache"], cuda_run["summary"]
    state, _ = latest_checkpoint(tmp / "run" / "checkpoints")
    assert state["step"] == summary["steps"] and state["epoch"] == 2
    assert {"model_state", "optimizer_state", "scheduler_state", "rng"} <= set(state)
    # Saved from the plain model, not the compiled wrapper: keys without the "_orig_mod." prefix.
    assert not any(key.startswith("_orig_mod.") for key in state["model_state"])
    # A third epoch resumes from that checkpoint (weights, optimiser, scheduler and RNG go back to the GPU).
    with pinned_salt_and_threads("cuda-test"):
        trainer = Trainer(cuda_config(tmp, cache, epochs=3), resume=True)
        assert trainer.step == summary["steps"] and trainer.epoch == 2
        assert next(iter(trainer.optimizer.state.values()))["exp_avg"].device.type == "cuda"
        resumed = trainer.run()
    assert resumed["epochs"] == 3 and resumed["steps"] > summary["steps"]
    assert resumed["mlflow_run_id"] == summary["mlflow_run_id"]
    steps = [step for step, _ in load_checkpoint(Path(resumed["checkpoint"]))["history"]["train/loss"]]
    assert steps == sorted(set(steps)) and len(steps) == resumed["steps"], "steps repeated or lost on resume"


def test_bf16_forward_matches_fp32(cuda_run):
    from vqmed.data import ImageDataset, ImageSpec, read_manifest
    from vqmed.networks import build_model

    # The model as the two-epoch run left it (the resume test may have trained it further since).
    model = build_model(cuda_run["model_name"], **cuda_run["model_config"])
    model.load_state_dict(cuda_run["model_state"])
    model = model.to("cuda").to(memory_format=torch.channels_last).eval()
    cache = cuda_run["cache"]
    manifest = read_manifest(ROOT / "data_manifests" / "chest_xray.csv")
    manifest = manifest[manifest["split"] == "test"].iloc[::20].reset_index(drop=True)  # unseen images
    ds = ImageDataset(manifest, DATA_ROOT, ImageSpec(64), cache_dir=cache, progress=False)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))]).to("cuda").contiguous(memory_format=torch.channels_last)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        # A true fp32 reference: TF32 convolutions would themselves round to 10 mantissa bits.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            recon32, _, codes32 = model(x)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                recon16, _, codes16 = model(x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    recon16 = recon16.float()
    assert recon16.shape == recon32.shape == x.shape
    # bf16 keeps 8 mantissa bits (~0.4%): a few code choices near a tie may flip, the image may not change.
    assert (codes16 == codes32).float().mean().item() >= 0.8
    assert (recon16 - recon32).abs().mean().item() < 0.02

    def psnr(recon: torch.Tensor) -> float:
        return -10 * math.log10(torch.mean((recon.clamp(0, 1) - x) ** 2).item())

    psnr32, psnr16 = psnr(recon32), psnr(recon16)
    assert abs(psnr16 - psnr32) < 0.5, (psnr16, psnr32)
