"""Reconstruction plus a momentum teacher: predict, from one view, the teacher's embedding of the other.

BYOL (Grill et al., NeurIPS 2020, "Bootstrap Your Own Latent"): the student's embedding of one view, passed
through a small predictor, should point the same way (cosine) as a slowly moving teacher's embedding of the
other view; the teacher is an exponential moving average of the student (model and projector) and gets no
gradient. Unlike VICReg it needs no variance or covariance term to avoid collapse (the predictor and the
moving target do that), and the target is a consolidated, smoothed encoder rather than the student itself.
The VQ bottleneck and the decoder stay: the VQ-VAE loss still trains them, so the model exports and decodes
code maps as before. The embedding is the one VICReg uses: every chosen encoder stage's mean and spread
over space (:mod:`vqmed.training.objectives.two_views`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vqmed.networks.stages import stage_outputs
from vqmed.training.objectives.two_views import TwoViewObjective, TwoViewParams, mlp

__all__ = ["MomentumTeacher", "TeacherParams"]


@dataclasses.dataclass
class TeacherParams(TwoViewParams):
    """Parameters of :class:`MomentumTeacher`: those of :class:`TwoViewParams` (``stages``, ``augmentation``,
    ``reconstruct``, ``second_view_scale``, ``decode_fraction``) and

    Args:
        projector: hidden and output widths of the projector MLP (student and teacher); BYOL: 4096, 256.
        weight: weight of the prediction term (``2 - 2 cos``, summed over both directions) against the VQ-VAE
            loss.
        momentum: the teacher's EMA momentum per step (BYOL: 0.996 for 300 epochs; a short CPU run needs a
            teacher that follows faster).
        predictor: hidden and output widths of the student's predictor MLP (its output width must equal the
            projector's).
    """

    projector: list[int] = field(default_factory=lambda: [1024, 256])
    weight: float = 0.5
    momentum: float = 0.99
    predictor: list[int] = field(default_factory=lambda: [1024, 256])

    def validate(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        super().validate()
        if not self.predictor or any(int(w) < 1 for w in self.predictor):
            raise ValueError(f"predictor must list positive widths, got {self.predictor}")
        if int(self.predictor[-1]) != int(self.projector[-1]):
            raise ValueError(f"predictor must end at the projector's width {self.projector[-1]}, got {self.predictor}")


def _prediction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(prediction, target)``, averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=1)).mean()


class MomentumTeacher(TwoViewObjective):
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

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], params: TeacherParams) -> None:
        super().__init__(model, input_shape, params)
        self.predictor = mlp(int(params.projector[-1]), params.predictor).to(next(model.parameters()).device)
        # The teacher: torch's EMA of a copy of the student (model and projector), trained by the average alone.
        # Parameters only; its buffers (BatchNorm statistics) are not read, the teacher runs in training mode.
        self.teacher = AveragedModel(self._student(model), multi_avg_fn=get_ema_multi_avg_fn(params.momentum))
        # no gradient, so the optimiser skips it and DDP expects none
        self.teacher.requires_grad_(False)

    def _student(self, model: nn.Module) -> nn.ModuleDict:
        """The modules the teacher averages, in the teacher's layout."""
        return nn.ModuleDict({"model": model, "projector": self.projector})

    @torch.no_grad()
    def _teacher_embeddings(self, views: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's projections of the first and the second views, as :meth:`embed_views` makes the
        student's (one projector pass over both, so its BatchNorm sees them together)."""
        teacher = self.teacher.module
        teacher.train(training)
        with stage_outputs(self.stages_of(teacher["model"]), self.pool) as caught:
            teacher["model"].encode(views[:, 0])
            teacher["model"].encode(self.second_view(views, masked=False))  # the targets stay whole (MSN)
        n = len(caught) // 2
        pooled = torch.cat([torch.cat(caught[:n], dim=-1), torch.cat(caught[n:], dim=-1)], dim=0)
        t1, t2 = self.project(pooled, teacher["projector"]).chunk(2)
        return t1.flatten(0, -2), t2.flatten(0, -2)

    def forward(self, model: nn.Module, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self.params
        if self.training:
            # teacher <- m teacher + (1 - m) student; the first call copies the student (as at the start)
            self.teacher.update_parameters(self._student(model))
        vq_loss, terms, z1, z2 = self.embed_views(model, views)
        t1, t2 = self._teacher_embeddings(views, model.training)
        q1, q2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        prediction = _prediction_loss(q1, t2) + _prediction_loss(q2, t1)
        loss = vq_loss + p.weight * prediction
        return loss, {"loss": loss, **terms, "teacher": prediction}
