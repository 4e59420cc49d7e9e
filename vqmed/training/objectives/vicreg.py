"""Reconstruction plus VICReg between two augmented views of the same image.

VICReg (Bardes, Ponce & LeCun, ICLR 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning"): an embedding of two views of one image should agree (invariance), every
embedding dimension should vary across the batch (variance, a hinge on its standard deviation) and the
dimensions should be decorrelated (covariance). Reconstruction alone spends the encoder on pixel
variance (Balestriero & LeCun, ICML 2024); the invariance term asks the encoder's stages for what two
crops / exposures of one film share. The VQ bottleneck and the decoder stay, so the model still exports
and decodes code maps as before. The embedding is the mean and standard deviation of the encoder's
stages over space (:mod:`vqmed.training.objectives.two_views`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vqmed.training.objectives.two_views import TwoViewObjective, TwoViewParams

__all__ = ["VICReg", "VICRegParams", "vicreg_terms"]


@dataclasses.dataclass
class VICRegParams(TwoViewParams):
    """Parameters of :class:`VICReg`: those of :class:`TwoViewParams` (``projector``, ``stages``,
    ``augmentation``, ``reconstruct``, ``second_view_scale``, ``decode_fraction``) and

    Args:
        weight: weight of the VICReg term against the VQ-VAE loss (reconstruction + quantizer).
        invariance: coefficient of the invariance (MSE between the views' projections); paper: 25.
        variance: coefficient of the variance hinge; paper: 25.
        covariance: coefficient of the off-diagonal covariance penalty; paper: 1.
    """

    weight: float = 0.5
    invariance: float = 25.0
    variance: float = 25.0
    covariance: float = 1.0

    def validate(self) -> None:
        for key in ("weight", "invariance", "variance", "covariance"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        super().validate()


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """Invariance, variance and covariance terms of VICReg for two ``[B, D]`` embeddings.

    Statistics are over this process's batch (the paper gathers them over all GPUs; with a few dozen
    images per process on CPU the local batch is what there is).
    """
    invariance = F.mse_loss(z1, z2)
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + eps)
        variance = variance + F.relu(1.0 - std).mean() / 2
        cov = (z.T @ z) / max(1, z.shape[0] - 1)
        off_diagonal = cov - torch.diag(torch.diag(cov))
        covariance = covariance + off_diagonal.pow(2).sum() / z.shape[1] / 2
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


class VICReg(TwoViewObjective):
    """VQ-VAE loss on the decoded views plus ``weight`` x VICReg between the views' pooled encoder stages.

    Args:
        model: the VQ model (must expose ``feature_stages()``).
        input_shape: ``(C, *spatial)`` of one view.
        params: :class:`VICRegParams`.
    """

    name = "vicreg"
    Params = VICRegParams

    def forward(self, model: nn.Module, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self.params
        vq_loss, terms, first, second = self.embed_views(model, views)
        parts = vicreg_terms(first, second)
        vic = p.invariance * parts["invariance"] + p.variance * parts["variance"] + p.covariance * parts["covariance"]
        loss = vq_loss + p.weight * vic
        return loss, {"loss": loss, **terms, "vicreg": vic, **{f"vicreg_{k}": v for k, v in parts.items()}}
