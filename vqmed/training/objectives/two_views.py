"""What the two-view objectives (``vicreg``, ``teacher``) share: the VQ-VAE loss on the views they decode and
an embedding of both views, the projected mean and spread of the encoder's stages over space (the statistics
the export's ``encoder_stats`` probes pool on a grid).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn

from vqmed.data.augment import AUGMENTATIONS
from vqmed.networks import vqvae_loss
from vqmed.networks.stages import grid_mean_std, stage_outputs
from vqmed.training.objectives.base import Objective, ObjectiveParams
from vqmed.training.objectives.masked import fill_hidden, patch_mask, patch_size_for

__all__ = ["TwoViewObjective", "TwoViewParams", "mlp", "pool_stats"]


@dataclasses.dataclass
class TwoViewParams(ObjectiveParams):
    """Parameters every two-view objective has.

    Args:
        projector: hidden and output widths of the projector MLP (Linear-BatchNorm-ReLU between layers).
        stages: which encoder stages make the embedding: ``last`` (the deepest) or ``all``.
        augmentation: the augmentation chain of the two views (see ``vqmed.data.augment``).
        reconstruct: which views the VQ-VAE loss decodes: ``both``, or ``first`` (the second view only
            goes through the encoder, which the embedding needs; one decoder pass fewer a step).
        second_view_scale: side of the second view relative to the first, area-resized before the encoder (a
            small crop as in SwAV's multi-crop, Caron et al., NeurIPS 2020): 0.5 costs a quarter of its encoder
            pass. Below 1 only with ``reconstruct: first`` (the decoder's target is full size).
        decode_fraction: share of the batch whose first view the VQ-VAE loss decodes, with ``reconstruct:
            first``; the other first views only go through the encoder (the embedding still sees every
            image). The decoder is most of a step's cost at 64x64 (0.2 s of 0.32 for 32 images on 2 cores).
        second_view_mask: share of the second view's patches hidden (filled with the view's mean) before the
            encoder, with ``reconstruct: first``: the masked view must still agree with the whole first view,
            as in Masked Siamese Networks (Assran et al., ECCV 2022, "Masked Siamese Networks for
            Label-Efficient Learning"). 0 hides nothing.
        mask_patch: side in pixels (voxels) of a hidden patch of the second view; ``None`` = the model's
            downsampling factor (one latent cell per patch).
        embedding_grid: cells per axis the stages' mean and spread are pooled on before the projector: 1 pools
            over the whole image; 2 keeps a 2x2 grid of cells (after VICRegL, Bardes et al., NeurIPS 2022,
            which matches local features too), so each region's statistics, the kind the ``encoder_stats``
            probes read on a 4x4 grid, must carry what the two views share. The views' geometric
            augmentation moves a cell's content by a fraction of a cell, so cells stay roughly aligned.
        cell_embedding: with ``embedding_grid`` > 1, embed each cell on its own (one projector shared by the
            cells, which sees a cell's statistics and not where the cell is) and match it to the same cell of
            the other view, as VICRegL's local term does (Bardes et al., NeurIPS 2022); the embedding's
            statistics (VICReg's variance and covariance) then run over batch x cells rows, not over the 32
            images of a CPU batch. ``False`` concatenates the cells into one embedding per view.
    """

    projector: list[int] = field(default_factory=lambda: [1024, 1024])
    stages: str = "all"
    augmentation: str = "views"
    reconstruct: str = "both"
    second_view_scale: float = 1.0
    decode_fraction: float = 1.0
    second_view_mask: float = 0.0
    mask_patch: int | None = None
    embedding_grid: int = 1
    cell_embedding: bool = False

    def validate(self) -> None:
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
        if not 0 <= self.second_view_mask < 1:
            raise ValueError(f"second_view_mask must be in [0, 1), got {self.second_view_mask}")
        # a masked second view is no decoder target (MSN masks only the view that is matched, never decoded)
        if self.second_view_mask > 0 and self.reconstruct != "first":
            raise ValueError(f"second_view_mask > 0 needs reconstruct: first, got reconstruct: {self.reconstruct!r}")
        if self.mask_patch is not None and self.mask_patch < 1:
            raise ValueError(f"mask_patch must be >= 1 or null, got {self.mask_patch}")
        if self.embedding_grid < 1:
            raise ValueError(f"embedding_grid must be >= 1, got {self.embedding_grid}")
        if self.cell_embedding and self.embedding_grid < 2:
            raise ValueError(f"cell_embedding needs embedding_grid >= 2, got {self.embedding_grid}")


def pool_stats(x: torch.Tensor, cells: int = 1, per_cell: bool = False) -> torch.Tensor:
    """Mean and standard deviation of ``[B, C, *spatial]`` over every spatial axis (``cells`` 1) -> ``[B, 2C]``,
    or in each cell of a ``cells`` x ... x ``cells`` grid -> ``[B, 2C * cells**n]``, or with ``per_cell`` each
    cell's own statistics -> ``[B, cells**n, 2C]``."""
    if cells > 1:
        mean, std = grid_mean_std(x.float(), cells, eps=1e-6)
        if per_cell:
            b, c = x.shape[:2]
            return torch.cat([mean.view(b, c, -1), std.view(b, c, -1)], dim=1).transpose(1, 2)
        return torch.cat([mean, std], dim=1)
    # the whole-image statistics the demo was chosen with (two-pass, unbiased spread)
    flat = x.float().flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2)], dim=1)


def mlp(in_features: int, widths: list[int]) -> nn.Sequential:
    """Linear layers to ``widths``, BatchNorm and ReLU between them (not after the last): the projector of
    VICReg and BYOL, and BYOL's predictor."""
    layers: list[nn.Module] = []
    for i, out in enumerate(widths):
        layers.append(nn.Linear(in_features, int(out)))
        if i < len(widths) - 1:
            layers += [nn.BatchNorm1d(int(out)), nn.ReLU(inplace=True)]
        in_features = int(out)
    return nn.Sequential(*layers)


class TwoViewObjective(Objective):
    """Base of the objectives that compare two views of an image through a projector.

    Args:
        model: the VQ model (must expose ``feature_stages()``).
        input_shape: ``(C, *spatial)`` of one view.
        params: the objective's :class:`TwoViewParams` subclass.
    """

    Params = TwoViewParams
    views = 2

    @classmethod
    def augmentation_of(cls, params: TwoViewParams) -> str:
        return params.augmentation

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], params: TwoViewParams) -> None:
        super().__init__(model, input_shape, params)
        if not model.feature_stages():
            raise ValueError(f"needs a model with encoder stages; {type(model).__name__} has none")
        # One dry encoder pass sizes the projector (no codebook update: encode() does not quantize).
        device = next(model.parameters()).device
        with torch.no_grad(), stage_outputs(self.stages_of(model)) as caught:
            model.encode(torch.zeros(2, *input_shape, device=device))
        width = sum(self.pool(f).shape[-1] for f in caught)
        self.projector = mlp(width, params.projector).to(device)
        # the side of the second view's hidden patches (None when nothing is hidden)
        self.mask_patch = (
            patch_size_for(model, params.mask_patch, input_shape, "mask_patch") if params.second_view_mask > 0 else None
        )

    def pool(self, stage_output: torch.Tensor) -> torch.Tensor:
        """A stage's output ``[B, C, *spatial]`` -> its statistics ``[B, S]`` (``embedding_grid``), or
        ``[B, cells, S]`` with ``cell_embedding``; stages concatenate along the last axis."""
        return pool_stats(stage_output, self.params.embedding_grid, self.params.cell_embedding)

    def project(self, pooled: torch.Tensor, projector: nn.Module | None = None) -> torch.Tensor:
        """The projector (``self.projector`` unless given) on pooled statistics ``[N, S]`` or ``[N, cells, S]``
        (every cell alone, one batch for all) -> ``[N, D]`` or ``[N, cells, D]``."""
        projector = self.projector if projector is None else projector
        return projector(pooled.flatten(0, -2)).unflatten(0, pooled.shape[:-1])

    def stages_of(self, model: nn.Module) -> list[nn.Module]:
        """The encoder stages the embedding pools (of the student, or of a copy of it)."""
        stages = model.feature_stages()
        return stages[-1:] if self.params.stages == "last" else stages

    def second_view(self, views: torch.Tensor, masked: bool = True) -> torch.Tensor:
        """The second views ``[B, C, *spatial]`` as the encoder sees them (``second_view_mask`` unless not
        ``masked``, e.g. for a teacher's targets, which MSN keeps whole; then ``second_view_scale``)."""
        second = views[:, 1]
        if masked and self.params.second_view_mask > 0:
            mask = patch_mask(tuple(second.shape), self.mask_patch, self.params.second_view_mask, second.device)
            second = fill_hidden(second, mask)
        if self.params.second_view_scale < 1:
            second = F.interpolate(second, scale_factor=self.params.second_view_scale, mode="area")
        return second

    def embed_views(
        self, model: nn.Module, views: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(vq_loss, vq_terms, z1, z2)``: the VQ-VAE loss on the views ``reconstruct`` decodes, and the
        projected embeddings ``[B, D]`` of the first and the second views of ``views`` ``[B, 2, C, *spatial]``."""
        p = self.params
        stages = self.stages_of(model)
        if p.reconstruct == "both":
            # rows 2i and 2i+1 are the two views of image i; one pass for both (a view, no copy)
            with stage_outputs(stages, self.pool) as caught:
                vq_loss, terms, _ = vqvae_loss(model, views.reshape(-1, *views.shape[2:]))
            z = self.project(torch.cat(caught, dim=-1))
            # cells (with ``cell_embedding``) become rows: cell k of image i is matched to cell k of its other view
            return vq_loss, terms, z[0::2].flatten(0, -2), z[1::2].flatten(0, -2)
        decoded = max(1, round(len(views) * p.decode_fraction))
        with stage_outputs(stages, self.pool) as caught:
            vq_loss, terms, _ = vqvae_loss(model, views[:decoded, 0])
            if decoded < len(views):
                model.encode(views[decoded:, 0])
            model.encode(self.second_view(views))
        # caught: each pass's stages in call order (the decoded first views, the other first views, the
        # second views); one projector pass, so its BatchNorm sees both views together as with ``both``
        n = len(stages)
        passes = [torch.cat(caught[i : i + n], dim=-1) for i in range(0, len(caught), n)]
        z1, z2 = self.project(torch.cat(passes, dim=0)).chunk(2)
        return vq_loss, terms, z1.flatten(0, -2), z2.flatten(0, -2)
