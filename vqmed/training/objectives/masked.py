"""Masked-input reconstruction: hide patches of the input, reconstruct the whole image.

After MAE (He et al., CVPR 2022, "Masked Autoencoders Are Scalable Vision Learners"), adapted to a
convolutional VQ-VAE as in SparK / ConvMAE-style pretraining: the hidden patches are filled with the
image's mean (a convolution cannot drop tokens), and the loss is the VQ-VAE loss against the unmasked
image, so the encoder must infer hidden anatomy from its context instead of copying pixels.

A model that can drop patches (``drops_hidden_patches``: the ViT VQ-VAE) gets the hidden patches as a token
mask instead, as in MAE itself: its encoder and quantizer process only the visible tokens and its decoder
fills the hidden places with a learned mask token, owned (trained and checkpointed) by this objective.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vqmed.networks import vqvae_loss
from vqmed.training.objectives.base import Objective, ObjectiveParams

__all__ = ["MaskedReconstruction", "MaskedParams", "fill_hidden", "patch_mask", "patch_size_for"]


@dataclasses.dataclass
class MaskedParams(ObjectiveParams):
    """Parameters of :class:`MaskedReconstruction`.

    Args:
        mask_ratio: share of the patches hidden in every image.
        patch: side of a hidden patch in pixels (voxels); ``None`` = the model's downsampling factor
            (one latent cell per patch).
    """

    mask_ratio: float = 0.5
    patch: int | None = None

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.patch is not None and self.patch < 1:
            raise ValueError(f"patch must be >= 1 or null, got {self.patch}")


def patch_mask(shape: tuple[int, ...], patch: int, ratio: float, device: torch.device) -> torch.Tensor:
    """A ``[B, 1, *spatial]`` float mask, 1 where a pixel is hidden: ``ratio`` of the ``patch``-sized cells
    of every image, chosen uniformly at random (torch's global generator, so a resumed run repeats it)."""
    b, _, *spatial = shape
    grid = [s // patch for s in spatial]
    cells = int(torch.tensor(grid).prod())
    n_hidden = max(1, int(round(ratio * cells)))
    order = torch.rand(b, cells, device=device).argsort(dim=1)
    hidden = torch.zeros(b, cells, device=device)
    hidden.scatter_(1, order[:, :n_hidden], 1.0)
    hidden = hidden.view(b, 1, *grid)
    return F.interpolate(hidden, size=tuple(spatial), mode="nearest")


def patch_size_for(model: nn.Module, patch: int | None, input_shape: tuple[int, ...], key: str = "patch") -> int:
    """The side of a hidden patch: ``patch``, or the model's downsampling factor (one latent cell per patch);
    it must divide the input size. ``key`` (the parameter) names it in the error."""
    size = int(patch or getattr(model, "downsample", None) or 8)
    if any(s % size for s in input_shape[1:]):
        raise ValueError(f"{key} {size} does not divide the input size {input_shape[1:]}")
    return size


def fill_hidden(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, *spatial]`` with the pixels where ``mask`` is 1 replaced by each image's mean per channel
    (a convolution cannot drop tokens, so hidden patches carry no content instead)."""
    fill = x.flatten(2).mean(dim=2).view(*x.shape[:2], *([1] * (x.dim() - 2)))
    return x * (1 - mask) + fill * mask


class MaskedReconstruction(Objective):
    """Reconstruct the whole image from a copy with ``mask_ratio`` of its patches filled with its mean (or,
    for a model that drops patches, from the visible patches alone).

    Args:
        model: the VQ model.
        input_shape: ``(C, *spatial)`` of one view.
        params: :class:`MaskedParams`.
    """

    name = "masked"
    Params = MaskedParams

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], params: MaskedParams) -> None:
        super().__init__(model, input_shape, params)
        self.patch = patch_size_for(model, params.patch, input_shape)
        self.drops_patches = bool(getattr(model, "drops_hidden_patches", False))
        if self.drops_patches:
            if any(self.patch % p for p in model.patch_size):
                raise ValueError(
                    f"patch {self.patch} must be a multiple of the model's patch_size "
                    f"{model.patch_size}, so that every token is wholly hidden or visible"
                )
            # the decoder's token for a hidden patch (MAE); zero-mean, small, like the position embeddings
            self.mask_token = nn.Parameter(torch.empty(model.decoder_hidden_size))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, model: nn.Module, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = views[:, 0]
        mask = patch_mask(tuple(x.shape), self.patch, self.params.mask_ratio, x.device)
        if self.drops_patches:
            # one value per token: nearest sampling at the token grid reads a pixel inside each token
            hidden = F.interpolate(mask, size=model.grid, mode="nearest")[:, 0].bool()
            loss, terms, _ = vqvae_loss(model, x, hidden=hidden, mask_token=self.mask_token)
            return loss, {"loss": loss, **terms}
        loss, terms, _ = vqvae_loss(model, fill_hidden(x, mask), target=x)
        return loss, {"loss": loss, **terms}
