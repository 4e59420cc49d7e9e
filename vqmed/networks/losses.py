"""The VQ-VAE objective of van den Oord et al. (2017), written once for every caller."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["vqvae_loss"]


def vqvae_loss(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, **forward_args: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Reconstruction MSE plus the quantizer's losses (commitment, and codebook for a learned codebook).

    Args:
        model: a vqmed VQ model (``forward -> (reconstruction, quantizer losses, indices)``), possibly
            wrapped in DDP.
        x: input batch ``[B, C, *spatial]``.
        target: what the reconstruction is compared with (``x`` when ``None``; the unmasked image for
            masked-input objectives).
        forward_args: passed on to ``model(x, ...)`` (the ViT's ``hidden`` patches and ``mask_token``).

    Returns:
        ``(loss, terms, reconstruction)``: the total loss, its terms (``recon_mse`` and the quantizer's
        ``commitment`` / ``codebook``) and the reconstruction. The MSE is taken in fp32 also under
        autocast, so a bf16 reconstruction does not round the loss.
    """
    target = x if target is None else target
    reconstruction, quantizer_losses, _ = model(x, **forward_args)
    recon_mse = F.mse_loss(reconstruction.float(), target.float())
    loss = recon_mse + sum(quantizer_losses.values())
    return loss, {"recon_mse": recon_mse, **quantizer_losses}, reconstruction
