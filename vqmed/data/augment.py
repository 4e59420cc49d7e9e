"""Random augmentation of pretraining batches, drawn for the whole batch at once on its own device.

The chains are MONAI's (``RandAffine``, ``RandAdjustContrast``, ``RandScaleIntensity``, ``RandShiftIntensity``,
``RandBiasField``, ``RandGaussianSmooth``, ``RandGaussianNoise``) with the same ranges and probabilities, but
applied to a batch ``[B, C, *spatial]`` rather than image by image in the DataLoader: one affine grid and one
``grid_sample`` for every view (MONAI's :class:`~monai.networks.layers.AffineTransform`), elementwise intensity
changes, MONAI's polynomial bias fields as one product of small matrices, and MONAI's separable Gaussian filter.
Why: MONAI's random transforms cost ~1.5 ms of Python per 64x64 view; on 2 cores that work either waits in line
with the training step or, in a worker process, starves torch's threads (the CPU demo's step took 406 ms that
way against 249 ms now), while the batched form costs ~7 ms (``mild``) to ~11 ms (``views``) for 64 views, and on
a GPU it runs there. No flips: left and right matter on a chest film.

Draws come from a ``torch.Generator`` the caller seeds (the engine: one per step, from the run seed, the rank and
the step), so a resumed run repeats the interrupted one's views exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from monai.networks.layers import AffineTransform, separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from torch import nn

__all__ = ["AUGMENTATIONS", "AugmentationRanges", "BatchAugmentation"]


@dataclass(frozen=True)
class AugmentationRanges:
    """The ranges and probabilities of one augmentation chain (MONAI's argument names in brackets).

    Args:
        affine_prob: probability of the random affine (``RandAffine.prob``).
        degrees: rotation up to +- this many degrees, about every axis in 3D (``rotate_range``).
        zoom: scale by ``1 + U(-zoom, zoom)`` per axis (``scale_range``); above 1 zooms out, with border padding,
            below 1 crops like a random resized crop.
        shift: translate by up to +- this fraction of the side (``translate_range``).
        gamma_prob, gamma: ``RandAdjustContrast``: ``((x - min) / range) ** U(*gamma) * range + min`` per image.
        scale_prob, scale: ``RandScaleIntensity``: ``x * (1 + U(-scale, scale))``.
        offset_prob, offset: ``RandShiftIntensity``: ``x + U(-offset, offset)``.
        bias_prob, bias_degree, bias_coeff: ``RandBiasField``: ``x * exp(field)``, the field a sum of products of
            Legendre polynomials up to ``bias_degree`` with coefficients ``U(*bias_coeff)`` (MONAI's terms): a
            smooth exposure that varies across the film.
        blur_prob, blur_sigma: ``RandGaussianSmooth``: sigma ``U(*blur_sigma)`` per axis (MONAI's erf kernel,
            truncated at 4 sigma, zero padding).
        noise_prob, noise_std: ``RandGaussianNoise``: Gaussian noise of standard deviation ``U(0, noise_std)``.
    """

    affine_prob: float
    degrees: float
    zoom: float
    shift: float
    gamma_prob: float
    gamma: tuple[float, float]
    scale_prob: float = 0.0
    scale: float = 0.0
    offset_prob: float = 0.0
    offset: float = 0.0
    bias_prob: float = 0.0
    bias_degree: int = 3
    bias_coeff: tuple[float, float] = (0.0, 0.1)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    noise_prob: float = 0.0
    noise_std: float = 0.0


_VIEWS = AugmentationRanges(affine_prob=1.0, degrees=10.0, zoom=0.25, shift=0.08, gamma_prob=0.8, gamma=(0.7, 1.4),
                            scale_prob=0.5, scale=0.2, offset_prob=0.5, offset=0.1, blur_prob=0.2,
                            blur_sigma=(0.5, 1.0), noise_prob=0.3, noise_std=0.02)

AUGMENTATIONS: dict[str, AugmentationRanges] = {
    # Reconstruction keeps the image as it is: a small affine, gamma and noise.
    "mild": AugmentationRanges(affine_prob=0.8, degrees=5.0, zoom=0.05, shift=0.03, gamma_prob=0.3,
                               gamma=(0.85, 1.15), noise_prob=0.2, noise_std=0.01),
    # The two views of an invariance objective: zoom, shift, rotation, stronger intensity changes, blur, noise.
    "views": _VIEWS,
    # Screened against "views" on the validation patients and lost (docs/objective_selection.md, session 21):
    # weaker intensity changes, stronger ones, a bias field, wider geometry (each -0.002 to -0.005 avg4). Kept so
    # that the table reproduces.
    "views_soft": replace(_VIEWS, gamma_prob=0.3, gamma=(0.85, 1.15), scale_prob=0.0, scale=0.0, offset_prob=0.0,
                          offset=0.0, blur_prob=0.0, noise_prob=0.2, noise_std=0.01),
    "views_intense": replace(_VIEWS, gamma_prob=1.0, gamma=(0.5, 2.0), scale_prob=0.8, scale=0.3, offset_prob=0.8,
                             offset=0.2, blur_prob=0.5, blur_sigma=(0.5, 1.5), noise_prob=0.5, noise_std=0.05),
    "views_bias": replace(_VIEWS, bias_prob=0.5),
    "views_wide": replace(_VIEWS, degrees=15.0, zoom=0.4, shift=0.15),
}


class BatchAugmentation(nn.Module):
    """Independent random views of every image in a batch, clamped to [0, 1].

    Args:
        spatial_dims: 2 or 3; the images are square (cubes), as :class:`vqmed.data.ImageSpec` makes them.
        name: the chain, a key of :data:`AUGMENTATIONS` (``mild`` for reconstruction, ``views`` for the two views
            of an invariance objective).
    """

    def __init__(self, spatial_dims: int, name: str = "mild") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if name not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {tuple(AUGMENTATIONS)}, got {name!r}")
        self.spatial_dims = spatial_dims
        self.name = name
        self.ranges = AUGMENTATIONS[name]
        # Bilinear, border padding: a zoomed-out film keeps its edge intensity instead of black bars.
        self.warp = AffineTransform(normalized=True, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, images: torch.Tensor, views: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """``images [B, C, *spatial]`` in [0, 1] -> ``[B, views, C, *spatial]``, every view drawn independently.

        ``generator`` must live on the images' device; ``None`` draws from torch's global generator.
        """
        if images.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected [B, C, *spatial] with {self.spatial_dims} spatial dims, got {tuple(images.shape)}")
        b = images.shape[0]
        x = images.repeat_interleave(views, dim=0)  # [B * views, C, *spatial], the views of an image adjacent
        x = self._affine(x, generator)
        x = self._intensity(x, generator)
        return x.clamp_(0.0, 1.0).view(b, views, *images.shape[1:])

    # ------------------------------------------------------------------------------------------ draws
    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor, g: torch.Generator | None,
                 *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=g, device=like.device, dtype=like.dtype) * (high - low) + low

    def _chosen(self, n: int, prob: float, like: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """Which of ``n`` images a transform of probability ``prob`` applies to, shaped to broadcast."""
        hit = torch.rand(n, generator=g, device=like.device) < prob
        return hit.view(n, *([1] * (like.dim() - 1)))

    # ------------------------------------------------------------------------------------ transforms
    def _affine(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        r, n, nd = self.ranges, x.shape[0], self.spatial_dims
        # MONAI's RandAffineGrid order: scale, then translate, then rotate the sampling grid. In normalized
        # coordinates (align_corners=False, a square side of s pixels) a shift of t pixels is 2t/s, and a shift
        # of `shift` of the side is 2 * shift.
        scale = torch.diag_embed(self._uniform(n, 1 - r.zoom, 1 + r.zoom, x, g, nd))
        shift = self._uniform(n, -2 * r.shift, 2 * r.shift, x, g, nd)
        angles = self._uniform(n, -math.radians(r.degrees), math.radians(r.degrees), x, g, 1 if nd == 2 else 3)
        rotation = _rotation(angles, nd)
        theta = torch.cat([rotation @ scale, (rotation @ shift.unsqueeze(-1))], dim=-1)  # [n, nd, nd + 1]
        identity = torch.eye(nd, nd + 1, device=x.device, dtype=x.dtype).expand_as(theta)
        theta = torch.where(self._chosen(n, r.affine_prob, theta, g), theta, identity)
        return self.warp(x, theta)

    def _intensity(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        r, n = self.ranges, x.shape[0]
        # RandAdjustContrast: gamma on the image's own min-max range, which it keeps.
        flat = x.flatten(1)
        low = flat.min(1).values.view(n, *([1] * (x.dim() - 1)))
        span = flat.max(1).values.view_as(low) - low
        gamma = self._uniform(n, *r.gamma, x, g).view_as(low)
        adjusted = ((x - low) / (span + 1e-7)).clamp_min(0.0) ** gamma * span + low
        x = torch.where(self._chosen(n, r.gamma_prob, x, g), adjusted, x)
        if r.scale_prob:
            factor = 1 + self._uniform(n, -r.scale, r.scale, x, g).view_as(low)
            x = torch.where(self._chosen(n, r.scale_prob, x, g), x * factor, x)
        if r.offset_prob:
            offset = self._uniform(n, -r.offset, r.offset, x, g).view_as(low)
            x = torch.where(self._chosen(n, r.offset_prob, x, g), x + offset, x)
        if r.bias_prob:
            x = torch.where(self._chosen(n, r.bias_prob, x, g), x * self._bias_field(x, g).exp(), x)
        if r.blur_prob:
            x = self._blur(x, g)
        if r.noise_prob:
            std = self._uniform(n, 0.0, r.noise_std, x, g).view_as(low)
            noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * std
            x = torch.where(self._chosen(n, r.noise_prob, x, g), x + noise, x)
        return x

    def _bias_field(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """MONAI's ``RandBiasField._generate_random_field`` for every image at once: ``[n, 1, *spatial]``."""
        r, n, nd, side = self.ranges, x.shape[0], self.spatial_dims, x.shape[-1]
        d = r.bias_degree
        # Legendre polynomials P_0..P_d on MONAI's coordinates, linspace(-1, 1) along each (square) axis.
        legendre = np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, side), d)  # [side, d + 1]
        basis = torch.as_tensor(legendre.T, dtype=x.dtype, device=x.device)  # [d + 1, side]
        # MONAI's terms: in 2D the lower triangle of the (d + 1)^2 coefficient matrix, in 3D the degrees i+j+k <= d.
        degrees = np.indices((d + 1,) * nd).reshape(nd, -1).T
        used = degrees[:, 1] <= degrees[:, 0] if nd == 2 else degrees.sum(1) <= d
        mask = torch.as_tensor(used.reshape((d + 1,) * nd), dtype=x.dtype, device=x.device)
        coeff = self._uniform(n, *r.bias_coeff, x, g, *((d + 1,) * nd)) * mask
        if nd == 2:
            return torch.einsum("nij,ih,jw->nhw", coeff, basis, basis).unsqueeze(1)
        return torch.einsum("nijk,ih,jw,kz->nhwz", coeff, basis, basis, basis).unsqueeze(1)

    def _blur(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        r, n = self.ranges, x.shape[0]
        sigmas = self._uniform(n, *r.blur_sigma, x, g, self.spatial_dims)
        chosen = self._chosen(n, r.blur_prob, x, g).flatten().nonzero().flatten().tolist()
        if not chosen:
            return x
        x = x.clone()
        # A fifth of the views, each with its own sigmas: one small separable filter per chosen view.
        for i in chosen:
            kernels = [gaussian_1d(s, truncated=4.0, approx="erf", normalize=False) for s in sigmas[i]]
            x[i:i + 1] = separable_filtering(x[i:i + 1], kernels)
        return x


def _rotation(angles: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Rotation matrices ``[n, d, d]`` from angles ``[n, 1]`` (2D) or ``[n, 3]`` (3D, about each axis in turn)."""
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def about(axis: int) -> torch.Tensor:
        c, s = cos[:, axis], sin[:, axis]
        rows = {0: [[one, zero, zero], [zero, c, -s], [zero, s, c]],
                1: [[c, zero, s], [zero, one, zero], [-s, zero, c]],
                2: [[c, -s, zero], [s, c, zero], [zero, zero, one]]}[axis]
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    if spatial_dims == 2:
        c, s = cos[:, 0], sin[:, 0]
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return about(0) @ about(1) @ about(2)
