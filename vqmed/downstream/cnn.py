"""Tiny torch CNNs as scikit-learn classifiers: on code maps (frozen encoder) and on raw pixels.

Both are ordinary estimators (``fit`` / ``predict_proba`` / ``decision_function``, ``clone``-able,
all state in ``fit``-created attributes), so the benchmark cross-validates them exactly like the
scikit-learn probes. Training is seeded by ``random_state`` inside a forked RNG (the global torch
RNG is left untouched) and uses deterministic algorithms, so refitting gives identical scores at a
fixed thread count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn


def _conv_stack(in_channels: int, channels: tuple[int, ...] | list[int], first_stride: int) -> nn.Sequential:
    """3x3 convolutions with GroupNorm + ReLU; the first uses ``first_stride``, the others stride 2.

    GroupNorm rather than BatchNorm: no running statistics, so a model trained on ten images
    behaves the same in training and evaluation.
    """
    layers: list[nn.Module] = []
    prev = in_channels
    for i, ch in enumerate(channels):
        layers += [
            nn.Conv2d(prev, ch, kernel_size=3, stride=first_stride if i == 0 else 2, padding=1),
            nn.GroupNorm(min(8, ch) if ch % min(8, ch) == 0 else 1, ch),
            nn.ReLU(inplace=True),
        ]
        prev = ch
    return nn.Sequential(*layers)


class _ImageNet(nn.Module):
    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.features = _conv_stack(1, channels, first_stride=2)
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


class _CodeNet(nn.Module):
    def __init__(self, n_codes: int, embed_dim: int, channels: list[int], codebook: np.ndarray | None, freeze: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_codes, embed_dim)
        if codebook is not None:
            with torch.no_grad():
                cb = torch.as_tensor(np.asarray(codebook), dtype=torch.float32)
                # unit overall scale: codebooks come at arbitrary scales, the conv init assumes ~1
                self.embed.weight.copy_(cb / cb.std().clamp_min(1e-8))
        self.embed.weight.requires_grad_(not freeze)
        # code maps are already downsampled by the encoder: keep full resolution in the first layer
        self.features = _conv_stack(embed_dim, channels, first_stride=1)
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch inside a forked RNG, with deterministic algorithms, restoring both afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


class _TorchBinaryClassifier(ClassifierMixin, BaseEstimator):
    """Shared fit / predict logic of the binary CNN classifiers (labels: any two values)."""

    def _build(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _to_tensor(self, X: np.ndarray) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, X: np.ndarray, y: np.ndarray) -> _TorchBinaryClassifier:
        """Train on ``X`` / ``y`` for ``min(max_steps, epochs * batches)`` AdamW steps."""
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) != 2:
            raise ValueError(f"{type(self).__name__} is binary; got classes {self.classes_.tolist()}")
        target = torch.as_tensor((y == self.classes_[1]).astype(np.float32))
        inputs = self._to_tensor(X)
        n = len(target)
        batch = min(int(self.batch_size), n)
        steps = int(min(self.max_steps, self.epochs * math.ceil(n / batch)))
        with _seeded(int(self.random_state)):
            model = self._build()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            # one-cycle warm-up/decay; too few steps for a schedule -> constant rate
            sched = (
                torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.2)
                if steps >= 10
                else None
            )
            # "balanced": positives weighted n_neg / n_pos, so a 1:3 subset does not collapse to the majority
            n_pos = float(target.sum())
            pos_weight = torch.tensor((n - n_pos) / n_pos) if self.class_weight == "balanced" else None
            loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
            gen = torch.Generator().manual_seed(int(self.random_state))
            order = torch.randperm(n, generator=gen)
            pos = 0
            model.train()
            losses = []
            for _ in range(steps):
                if pos + batch > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos:pos + batch]
                pos += batch
                loss = loss_fn(model(inputs[idx]), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                losses.append(float(loss.detach()))
        model.eval()
        self.model_ = model
        self.n_steps_ = steps
        self.loss_curve_ = losses
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits of the positive class (``classes_[1]``)."""
        check_is_fitted(self, "model_")
        inputs = self._to_tensor(X)
        out = []
        with torch.no_grad():
            for start in range(0, len(inputs), 512):
                out.append(self.model_(inputs[start:start + 512]))
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(N, 2)`` class probabilities, columns ordered as ``classes_``."""
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels at probability 0.5 (the benchmark picks its own threshold instead)."""
        return self.classes_[(self.decision_function(X) >= 0).astype(int)]


class ImageCNN(_TorchBinaryClassifier):
    """A tiny CNN trained from scratch on grey images (the "no pretraining" baseline).

    Args:
        channels: output channels of the stride-2 3x3 convolutions, followed by global average
            pooling and a linear head.
        epochs: passes over the training images, capped by ``max_steps``.
        max_steps: at most this many optimiser steps.
        batch_size: images per step (all of them when fewer).
        lr: peak AdamW learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        class_weight: ``"balanced"`` weights positives by ``n_neg / n_pos`` in the loss; ``None``: unweighted.
        random_state: seeds initialisation and batch order.

    ``X`` is ``(N, H, W)`` or ``(N, 1, H, W)`` with intensities in [0, 1].
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64),
        epochs: int = 30,
        max_steps: int = 200,
        batch_size: int = 32,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        class_weight: str | None = "balanced",
        random_state: int = 0,
    ) -> None:
        self.channels = channels
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.class_weight = class_weight
        self.random_state = random_state

    def _build(self) -> nn.Module:
        return _ImageNet(list(self.channels))

    def _to_tensor(self, X: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"ImageCNN expects (N, H, W) or (N, 1, H, W) images, got shape {tuple(x.shape)}")
        # centre the [0, 1] intensities; GroupNorm takes care of the rest
        return x - 0.5


class CodeMapCNN(_TorchBinaryClassifier):
    """A tiny CNN on discrete code maps, its embedding initialised from the VQ-VAE codebook.

    Args:
        codebook: ``(K, D)`` codebook initialising the ``nn.Embedding`` (``None``: random, then
            ``n_codes`` and ``embed_dim`` are required).
        n_codes: codebook size when ``codebook`` is ``None``.
        embed_dim: embedding size when ``codebook`` is ``None``.
        freeze_embedding: keep the embedding fixed (train only the convolutions).
        channels: output channels of the 3x3 convolutions (the first keeps the code-map
            resolution, the rest halve it), then global average pooling and a linear head.
        epochs: passes over the training maps, capped by ``max_steps``.
        max_steps: at most this many optimiser steps.
        batch_size: maps per step (all of them when fewer).
        lr: peak AdamW learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        class_weight: ``"balanced"`` weights positives by ``n_neg / n_pos`` in the loss; ``None``: unweighted.
        random_state: seeds initialisation and batch order.

    ``X`` is ``(N, h, w)`` integer codes.
    """

    def __init__(
        self,
        codebook: np.ndarray | None = None,
        n_codes: int | None = None,
        embed_dim: int | None = None,
        freeze_embedding: bool = False,
        channels: tuple[int, ...] = (32, 64),
        epochs: int = 30,
        max_steps: int = 200,
        batch_size: int = 32,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        class_weight: str | None = "balanced",
        random_state: int = 0,
    ) -> None:
        self.codebook = codebook
        self.n_codes = n_codes
        self.embed_dim = embed_dim
        self.freeze_embedding = freeze_embedding
        self.channels = channels
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.class_weight = class_weight
        self.random_state = random_state

    def _sizes(self) -> tuple[int, int]:
        if self.codebook is not None:
            k, d = np.asarray(self.codebook).shape
            return int(k), int(d)
        if self.n_codes is None or self.embed_dim is None:
            raise ValueError("CodeMapCNN needs a codebook or both n_codes and embed_dim")
        return int(self.n_codes), int(self.embed_dim)

    def _build(self) -> nn.Module:
        k, d = self._sizes()
        return _CodeNet(k, d, list(self.channels), self.codebook, self.freeze_embedding)

    def _to_tensor(self, X: np.ndarray) -> torch.Tensor:
        x = np.asarray(X)
        if x.ndim != 3 or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"CodeMapCNN expects (N, h, w) integer code maps, got {x.dtype} {x.shape}")
        k, _ = self._sizes()
        if x.size and (int(x.max()) >= k or int(x.min()) < 0):
            raise ValueError(f"codes must lie in [0, {k}); got [{int(x.min())}, {int(x.max())}]")
        return torch.as_tensor(x.astype(np.int64))
