"""Reconstruction plus a momentum teacher: predict, from one view, the teacher's embedding of the other.

BYOL (Grill et al., NeurIPS 2020, "Bootstrap Your Own Latent"): the student's embedding of one view, passed
through a small predictor, should point the same way (cosine) as a slowly moving teacher's embedding of the
other view; the teacher is an exponential moving average of the student (model and projector) and gets no
gradient. Unlike VICReg it needs no variance or covariance term to avoid collapse (the predictor and the
moving target do that), and the target is a consolidated, smoothed encoder rather than the student itself.
The VQ bottleneck and the decoder stay: the VQ-VAE loss still trains them, so the model exports and decodes
code maps as before. The embedding is the one VICReg uses: every chosen encoder stage's mean and spread
over space, the statistics the export's ``encoder_stats`` probes pool on a grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vqmed.data.augment import AUGMENTATIONS
from vqmed.networks import vqvae_loss
from vqmed.networks.stages import stage_outputs
from vqmed.training.objectives.base import Objective, ObjectiveParams
from vqmed.training.objectives.vicreg import mlp, pool_stats

__all__ = ["MomentumTeacher", "TeacherParams"]


@dataclasses.dataclass
class TeacherParams(ObjectiveParams):
    """Parameters of :class:`MomentumTeacher`.

    Args:
        weight: weight of the prediction term (``2 - 2 cos``, summed over both directions) against the VQ-VAE
            loss.
        momentum: the teacher's EMA momentum per step (BYOL: 0.996 for 300 epochs; a short CPU run needs a
            teacher that follows faster).
        projector: hidden and output widths of the projector MLP (student and teacher).
        predictor: hidden and output widths of the student's predictor MLP (its output width must equal the
            projector's).
        stages: which encoder stages make the embedding: ``last`` (the deepest) or ``all``.
        augmentation: the augmentation chain of the two views (see ``vqmed.data.augment``).
        reconstruct: which views the VQ-VAE loss decodes: ``both``, or ``first`` (the second view only goes
            through the encoder; one decoder pass fewer a step).
    """

    weight: float = 0.5
    momentum: float = 0.99
    projector: list[int] = field(default_factory=lambda: [1024, 256])
    predictor: list[int] = field(default_factory=lambda: [1024, 256])
    stages: str = "all"
    augmentation: str = "views"
    reconstruct: str = "both"

    def validate(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        for key in ("projector", "predictor"):
            widths = getattr(self, key)
            if not widths or any(int(w) < 1 for w in widths):
                raise ValueError(f"{key} must list positive widths, got {widths}")
        if int(self.predictor[-1]) != int(self.projector[-1]):
            raise ValueError(f"predictor must end at the projector's width {self.projector[-1]}, got {self.predictor}")
        if self.stages not in ("last", "all"):
            raise ValueError(f"stages must be 'last' or 'all', got {self.stages!r}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {tuple(AUGMENTATIONS)}, got {self.augmentation!r}")
        if self.reconstruct not in ("both", "first"):
            raise ValueError(f"reconstruct must be 'both' or 'first', got {self.reconstruct!r}")


def _prediction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(prediction, target)``, averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=1)).mean()


class MomentumTeacher(Objective):
    """VQ-VAE loss plus ``weight`` x BYOL between the student's prediction and an EMA teacher's projection.

    The teacher (``torch.optim.swa_utils.AveragedModel`` of the model and the projector) is part of this
    objective's state, so the engine checkpoints and resumes it with the rest (its count of updates
    included); its parameters never get a gradient. It moves towards the student at the start of every
    training forward pass, i.e. after the optimiser step that the previous pass led to, so the engine needs no
    hook.

    Args:
        model: the VQ model (must expose ``feature_stages()``).
        input_shape: ``(C, *spatial)`` of one view.
        params: :class:`TeacherParams`.
    """

    name = "teacher"
    Params = TeacherParams
    views = 2

    @classmethod
    def augmentation_of(cls, params: TeacherParams) -> str:
        return params.augmentation

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], params: TeacherParams) -> None:
        super().__init__(model, input_shape, params)
        if not model.feature_stages():
            raise ValueError(f"objective 'teacher' needs a model with encoder stages; {type(model).__name__} has none")
        device = next(model.parameters()).device
        with torch.no_grad(), stage_outputs(self._stages(model)) as caught:
            model.encode(torch.zeros(2, *input_shape, device=device))
        width = sum(pool_stats(f).shape[1] for f in caught)
        self.projector = mlp(width, params.projector).to(device)
        self.predictor = mlp(int(params.projector[-1]), params.predictor).to(device)
        # The teacher: torch's EMA of a copy of the student (model and projector), trained by the average alone.
        # Parameters only; its buffers (BatchNorm statistics) are not read, the teacher runs in training mode.
        self.teacher = AveragedModel(self._student(model), multi_avg_fn=get_ema_multi_avg_fn(params.momentum))
        # no gradient, so the optimiser skips it and DDP expects none
        self.teacher.requires_grad_(False)

    def _student(self, model: nn.Module) -> nn.ModuleDict:
        """The modules the teacher averages, in the teacher's layout."""
        return nn.ModuleDict({"model": model, "projector": self.projector})

    def _stages(self, model: nn.Module) -> list[nn.Module]:
        stages = model.feature_stages()
        return stages[-1:] if self.params.stages == "last" else stages

    def _embed(self, model: nn.Module, projector: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with stage_outputs(self._stages(model), pool_stats) as caught:
            model.encode(images)
        return projector(torch.cat(caught, dim=1))

    def forward(self, model: nn.Module, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self.params
        if self.training:
            # teacher <- m teacher + (1 - m) student; the first call copies the student (as at the start)
            self.teacher.update_parameters(self._student(model))
        stages = self._stages(model)
        first, second = views[:, 0], views[:, 1]
        if p.reconstruct == "both":
            with stage_outputs(stages, pool_stats) as caught:
                vq_loss, terms, _ = vqvae_loss(model, views.reshape(-1, *views.shape[2:]))
            z = self.projector(torch.cat(caught, dim=1))
            z1, z2 = z[0::2], z[1::2]
        else:
            with stage_outputs(stages, pool_stats) as caught:
                vq_loss, terms, _ = vqvae_loss(model, first)
                model.encode(second)
            n = len(stages)
            z1, z2 = self.projector(torch.cat([torch.cat(caught[i : i + n], dim=1) for i in (0, n)], dim=0)).chunk(2)
        with torch.no_grad():
            teacher = self.teacher.module
            teacher.train(model.training)
            t = self._embed(teacher["model"], teacher["projector"], torch.cat([first, second]))
            t1, t2 = t.chunk(2)
        q1, q2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        prediction = _prediction_loss(q1, t2) + _prediction_loss(q2, t1)
        loss = vq_loss + p.weight * prediction
        return loss, {"loss": loss, **terms, "teacher": prediction}
