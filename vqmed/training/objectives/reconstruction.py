"""The VQ-VAE's own objective: reconstruct one mildly augmented view (van den Oord et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from vqmed.networks import vqvae_loss
from vqmed.training.objectives.base import Objective

__all__ = ["Reconstruction"]


class Reconstruction(Objective):
    """Reconstruction MSE plus the quantizer's commitment (and codebook) loss, on one view.

    Takes no parameters (``objective.params: {}``).
    """

    name = "reconstruction"

    def forward(self, model: nn.Module, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms, _ = vqvae_loss(model, views[:, 0])
        return loss, {"loss": loss, **terms}
