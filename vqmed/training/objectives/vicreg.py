"""Reconstruction plus VICReg between two augmented views of the same image.

VICReg (Bardes, Ponce & LeCun, ICLR 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning"): an embedding of two views of one image should agree (invariance), every
embedding dimension should vary across the batch (variance, a hinge on its standard deviation) and the
dimensions should be decorrelated (covariance). Reconstruction alone spends the encoder on pixel
variance (Balestriero & LeCun, ICML 2024); the invariance term asks the encoder's stages for what two
crops / exposures of one film share. The VQ bottleneck and the decoder stay, so the model still exports
and decodes code maps as before. The embedding is the mean and standard deviation of the encoder's
stages over space, the statistics the export's ``encoder_stats`` probes pool on a grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn

from vqmed.data.augment import AUGMENTATIONS
from vqmed.networks import vqvae_loss
from vqmed.networks.stages import stage_outputs
from vqmed.training.objectives.base import Objective, ObjectiveParams

__all__ = ["VICReg", "VICRegParams", "mlp", "pool_stats", "vicreg_terms"]


@dataclasses.dataclass
class VICRegParams(ObjectiveParams):
    """Parameters of :class:`VICReg`.

    Args:
        weight: weight of the VICReg term against the VQ-VAE loss (reconstruction + quantizer).
        invariance: coefficient of the invariance (MSE between the views' projections); paper: 25.
        variance: coefficient of the variance hinge; paper: 25.
        covariance: coefficient of the off-diagonal covariance penalty; paper: 1.
        projector: hidden and output widths of the projector MLP (Linear-BatchNorm-ReLU between layers).
        stages: which encoder stages make the embedding: ``last`` (the deepest) or ``all``.
        augmentation: the augmentation chain of the two views (see ``vqmed.data.augment``).
        reconstruct: which views the VQ-VAE loss decodes: ``both``, or ``first`` (the second view only
            goes through the encoder, which the VICReg term needs; one decoder pass fewer a step).
        second_view_scale: side of the second view relative to the first, area-resized before the encoder (a
            small crop as in SwAV's multi-crop, Caron et al., NeurIPS 2020): 0.5 costs a quarter of its encoder
            pass. Below 1 only with ``reconstruct: first`` (the decoder's target is full size).
        decode_fraction: share of the batch whose first view the VQ-VAE loss decodes, with ``reconstruct:
            first``; the other first views only go through the encoder (the VICReg term still sees every
            image). The decoder is most of a step's cost at 64x64 (0.2 s of 0.32 for 32 images on 2 cores).
    """

    weight: float = 0.5
    invariance: float = 25.0
    variance: float = 25.0
    covariance: float = 1.0
    projector: list[int] = field(default_factory=lambda: [1024, 1024])
    stages: str = "all"
    augmentation: str = "views"
    reconstruct: str = "both"
    second_view_scale: float = 1.0
    decode_fraction: float = 1.0

    def validate(self) -> None:
        for key in ("weight", "invariance", "variance", "covariance"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.projector or any(int(w) < 1 for w in self.projector):
            raise ValueError(f"projector must list positive widths, got {self.projector}")
        if self.stages not in ("last", "all"):
            raise ValueError(f"stages must be 'last' or 'all', got {self.stages!r}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {tuple(AUGMENTATIONS)}, got {self.augmentation!r}")
        if self.reconstruct not in ("both", "first"):
            raise ValueError(f"reconstruct must be 'both' or 'first', got {self.reconstruct!r}")
        # both shrink what ``reconstruct: first`` leaves undecoded; with ``both`` every view is a decoder target
        for key in ("second_view_scale", "decode_fraction"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                raise ValueError(f"{key} must be in (0, 1], got {value}")
            if value < 1 and self.reconstruct != "first":
                raise ValueError(f"{key} < 1 needs reconstruct: first, got reconstruct: {self.reconstruct!r}")


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


def pool_stats(x: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation over every spatial axis of ``[B, C, *spatial]`` -> ``[B, 2C]``."""
    flat = x.float().flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2)], dim=1)


def mlp(in_features: int, widths: list[int]) -> nn.Sequential:
    """Linear layers to ``widths``, BatchNorm and ReLU between them (not after the last): the projector
    of VICReg and BYOL."""
    layers: list[nn.Module] = []
    for i, out in enumerate(widths):
        layers.append(nn.Linear(in_features, int(out)))
        if i < len(widths) - 1:
            layers += [nn.BatchNorm1d(int(out)), nn.ReLU(inplace=True)]
        in_features = int(out)
    return nn.Sequential(*layers)


class VICReg(Objective):
    """VQ-VAE loss on both views plus ``weight`` x VICReg between their pooled encoder stages.

    Args:
        model: the VQ model (must expose ``feature_stages()``).
        input_shape: ``(C, *spatial)`` of one view.
        params: :class:`VICRegParams`.
    """

    name = "vicreg"
    Params = VICRegParams
    views = 2

    @classmethod
    def augmentation_of(cls, params: VICRegParams) -> str:
        return params.augmentation

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], params: VICRegParams) -> None:
        super().__init__(model, input_shape, params)
        if not model.feature_stages():
            raise ValueError(f"objective 'vicreg' needs a model with encoder stages; {type(model).__name__} has none")
        # One dry encoder pass sizes the projector (no codebook update: encode() does not quantize).
        device = next(model.parameters()).device
        with torch.no_grad(), stage_outputs(self._stages(model)) as caught:
            model.encode(torch.zeros(2, *input_shape, device=device))
        width = sum(pool_stats(f).shape[1] for f in caught)
        self.projector = mlp(width, params.projector).to(device)

    def _stages(self, model: nn.Module) -> list[nn.Module]:
        stages = model.feature_stages()
        return stages[-1:] if self.params.stages == "last" else stages

    def forward(self, model: nn.Module, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self.params
        stages = self._stages(model)
        if p.reconstruct == "both":
            # rows 2i and 2i+1 are the two views of image i; one pass for both (a view, no copy)
            with stage_outputs(stages, pool_stats) as caught:
                vq_loss, terms, _ = vqvae_loss(model, views.reshape(-1, *views.shape[2:]))
            z = self.projector(torch.cat(caught, dim=1))
            first, second = z[0::2], z[1::2]
        else:
            decoded = max(1, round(len(views) * p.decode_fraction))
            second = views[:, 1]
            if p.second_view_scale < 1:
                second = F.interpolate(second, scale_factor=p.second_view_scale, mode="area")
            with stage_outputs(stages, pool_stats) as caught:
                vq_loss, terms, _ = vqvae_loss(model, views[:decoded, 0])
                if decoded < len(views):
                    model.encode(views[decoded:, 0])
                model.encode(second)
            # caught: each pass's stages in call order (the decoded first views, the other first views, the
            # second views); one projector pass, so its BatchNorm sees both views together as with ``both``
            n = len(stages)
            passes = [torch.cat(caught[i : i + n], dim=1) for i in range(0, len(caught), n)]
            z = self.projector(torch.cat(passes, dim=0))
            first, second = z.chunk(2)
        parts = vicreg_terms(first, second)
        vic = p.invariance * parts["invariance"] + p.variance * parts["variance"] + p.covariance * parts["covariance"]
        loss = vq_loss + p.weight * vic
        return loss, {"loss": loss, **terms, "vicreg": vic, **{f"vicreg_{k}": v for k, v in parts.items()}}
