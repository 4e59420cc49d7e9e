"""What a pretraining run measures and shows: validation metrics, codebook statistics, the final figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vqmed.models_io.runtime import Runtime

__all__ = ["codebook_stats", "final_figures", "validate"]


def codebook_stats(quantizers: Sequence[nn.Module]) -> dict[str, Any]:
    """Usage fraction, perplexity and usage counts of every quantizer since its last ``reset_stats``."""
    out: dict[str, Any] = {}
    for level, quantizer in enumerate(quantizers):
        stats = quantizer.stats()
        suffix = "" if level == 0 else f"_level{level}"
        out[f"codebook/usage{suffix}"] = float(stats["usage_fraction"])
        out[f"codebook/perplexity{suffix}"] = float(stats["perplexity"])
        out[f"usage_counts{suffix}"] = np.asarray(stats["usage_counts"], dtype=np.float64)
    return out


@torch.no_grad()
def validate(model: nn.Module, dataset: Dataset, rt: Runtime, batch_size: int, spatial_dims: int,
             channels_last: bool, n_show: int) -> dict[str, Any]:
    """Mean MSE, PSNR and SSIM over the validation images (MONAI's metrics), plus images to show.

    Each rank validates every ``world_size``-th image; the squared errors are all-reduced and MONAI's
    metrics gather their buffers, so every rank returns the same numbers. The model is put back in
    training mode afterwards.

    Returns:
        ``{"metrics": {val_mse, val_psnr, val_ssim}, "originals": [n_show, ...], "reconstructions": [n_show, ...]}``.
    """
    from monai.metrics import PSNRMetric, SSIMMetric

    model.eval()
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=spatial_dims, data_range=1.0)
    originals, reconstructions = [], []
    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)  # squared error, element count
    shard = torch.utils.data.Subset(dataset, range(rt.rank, len(dataset), rt.world_size))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    for batch in loader:
        images = batch["image"].to(rt.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        recon = model(images)[0].float().clamp(0, 1)
        totals[0] += torch.sum((recon - images) ** 2).double()
        totals[1] += images.numel()
        psnr(recon, images)
        ssim(recon, images)
        if sum(len(o) for o in originals) < n_show:
            originals.append(images.cpu().numpy())
            reconstructions.append(recon.cpu().numpy())
    if rt.distributed:
        torch.distributed.all_reduce(totals)
    model.train()
    return {
        "metrics": {
            "val_mse": (totals[0] / totals[1].clamp(min=1)).item(),
            "val_psnr": float(psnr.aggregate().item()),
            "val_ssim": float(ssim.aggregate().item()),
        },
        "originals": np.concatenate(originals)[:n_show],
        "reconstructions": np.concatenate(reconstructions)[:n_show],
    }


def final_figures(folder: Path, frames: list[np.ndarray], history: Mapping[str, list[list[float]]],
                  stats: dict[str, Any], val: dict[str, Any], n_show: int) -> None:
    """The end-of-run figures, written to ``folder`` and logged to the active MLflow run: the per-epoch
    reconstruction animation, loss curves, codebook usage and the last validation reconstructions."""
    from vqmed.tracking import (log_artifact, log_figure, loss_curves, reconstruction_gif, reconstruction_grid,
                                usage_histogram)

    folder.mkdir(exist_ok=True)
    if frames:
        gif = reconstruction_gif(frames, folder / "reconstruction_progress.gif",
                                 labels=[f"epoch {i + 1}" for i in range(len(frames))])
        log_artifact(gif, artifact_path="figures")
    figures = {
        "loss_curves.png": loss_curves({k: [tuple(p) for p in v] for k, v in history.items()}),
        "codebook_usage.png": usage_histogram(stats["usage_counts"]),
        "reconstructions.png": reconstruction_grid(val["originals"], val["reconstructions"], n=n_show),
    }
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=120)  # beside the run too, for reports that do not open MLflow
        log_figure(fig, f"figures/{name}")
