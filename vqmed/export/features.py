"""Per-batch features of a frozen VQ model: code maps and pooled embeddings."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from vqmed.config import ExportConfig
from vqmed.networks.stages import grid_mean_std, grid_pool, stage_outputs

__all__ = ["ARRAYS", "REQUIRED_ARRAYS", "compute_features", "codebooks", "codebook_hash", "select_arrays"]

#: The array registry: every array :func:`compute_features` can write (the two-level ones for ``vqvae2``,
#: the encoder ones for vqmed encoders). The export config's ``arrays`` is validated against it.
ARRAYS = (
    "codes", "codes_top", "code_histogram", "code_histogram_top", "quantized_mean", "continuous_mean",
    "continuous_grid", "encoder_grid", "encoder_grid_std",
)
#: Always exported, whatever ``arrays`` says: the code maps are the store's product (decode, priors).
REQUIRED_ARRAYS = ("codes", "codes_top")


def select_arrays(features: dict[str, np.ndarray], names: list[str] | tuple[str, ...] | None) -> dict[str, np.ndarray]:
    """The arrays of ``names`` (``None``: all) plus the code maps, in ``features``' order."""
    if names is None:
        return features
    keep = set(names) | set(REQUIRED_ARRAYS)
    return {k: v for k, v in features.items() if k in keep}

# uint16 code maps hold at most this many codebook entries.
MAX_CODES = np.iinfo(np.uint16).max + 1


def _levels(model: nn.Module) -> int:
    return int(getattr(model, "levels", 1))


# Cells per axis of the spatially pooled features by default (its one home is the export config): a 4x4 grid
# keeps where a finding lies (upper vs lower lobe, left vs right) at 16 x D numbers per study.
GRID = ExportConfig.grid


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over every spatial axis of ``[B, D, *spatial]`` -> ``[B, D]``."""
    return x.flatten(2).mean(dim=2)


def _histogram(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Normalised bag-of-codes ``[B, K]`` of code maps ``[B, *spatial]``."""
    flat = codes.reshape(codes.shape[0], -1)
    counts = torch.zeros(codes.shape[0], num_codes, dtype=torch.float32, device=codes.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts / flat.shape[1]


def _as_uint16(codes: torch.Tensor, num_codes: int) -> np.ndarray:
    if num_codes > MAX_CODES:
        raise ValueError(f"codebook of {num_codes} entries does not fit uint16 code maps (max {MAX_CODES})")
    return codes.to("cpu", torch.int32).numpy().astype(np.uint16)


def _quantized_mean(quantizer: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    # Look the vectors up in the codebook rather than reading z_q from the forward pass: in eval the
    # straight-through form z + (q - z) differs from q in the last bits, the lookup is exact.
    vectors = quantizer.codebook.detach()[codes]  # [B, *spatial, D]
    return vectors.flatten(1, -2).mean(dim=1).float()


@torch.no_grad()
def compute_features(model: nn.Module, images: torch.Tensor, grid: int = GRID) -> dict[str, np.ndarray]:
    """Code maps and pooled embeddings of one batch, with the model frozen (eval mode, no gradients).

    Args:
        model: a vqmed VQ model (``vqvae`` or the two-level ``vqvae2``); it is switched to eval mode.
        images: ``[N, C, *spatial]`` float batch on the model's device, in [0, 1].
        grid: cells per axis of the pooled grids (``continuous_grid``, ``encoder_grid``, ``encoder_grid_std``);
            at most the code map's side.

    Returns:
        ``codes`` ``(N, *latent)`` uint16 finest code map; ``codes_top`` and ``code_histogram_top``
        for two-level models; ``quantized_mean`` ``(N, D)`` mean of the quantized vectors;
        ``code_histogram`` ``(N, K)`` normalised bag-of-codes; ``continuous_mean`` ``(N, D)`` mean of
        the pre-quantization features; ``continuous_grid`` ``(N, D, grid, grid[, grid])`` their mean over a
        ``grid`` x ``grid`` (x ``grid``) partition (float32); ``encoder_grid`` ``(N, S)`` float16: the
        activations of every encoder stage before the projection to the code dimension (stem, level changes,
        residual units),
        each mean-pooled on the same grid and concatenated (vqmed encoders only); ``encoder_grid_std``
        ``(N, S)`` float16: the standard deviation of the same activations in the same cells.
    """
    model.eval()
    # The encoder's intermediate activations, caught on the way through the one encoder pass below:
    # their per-cell mean and spread on a coarse grid are the features that carry the most for
    # few-label probes (measured on Kermany, see the README; the pooled code vectors stay behind).
    with stage_outputs(model.feature_stages(), lambda out: grid_mean_std(out.float(), grid)) as stages:
        z = model.encode(images)
    # One encoder pass gives both the continuous latents and the codes; quantize() in eval mode is a
    # pure nearest-code lookup, the same one index_quantize() does.
    _, indices, _ = model.quantize(z)
    quantizers = list(model.quantizers)  # [bottom, top] for two levels
    if _levels(model) == 2:
        (bottom, top), z_bottom = indices, z[0]
    else:
        bottom, top, z_bottom = indices, None, z
    latent = tuple(z_bottom.shape[2:])
    if grid < 1 or grid > min(latent):
        # adaptive pooling would repeat cells finer than the map instead of failing
        raise ValueError(f"grid {grid}: needs 1 to {min(latent)} cells per axis for code maps of {latent}")
    bottom = bottom.long()
    k = int(quantizers[0].codebook.shape[0])
    out = {
        "codes": _as_uint16(bottom, k),
        "quantized_mean": _quantized_mean(quantizers[0], bottom).cpu().numpy(),
        "code_histogram": _histogram(bottom, k).cpu().numpy(),
        "continuous_mean": _pool(z_bottom.float()).cpu().numpy(),
        "continuous_grid": grid_pool(z_bottom.float(), grid).cpu().numpy(),
    }
    if stages:
        # float16 halves the store; pooled activations need no more precision for a linear probe
        out["encoder_grid"] = torch.cat([m for m, _ in stages], dim=1).to("cpu", torch.float16).numpy()
        out["encoder_grid_std"] = torch.cat([s for _, s in stages], dim=1).to("cpu", torch.float16).numpy()
    if top is not None:
        top = top.long()
        k_top = int(quantizers[1].codebook.shape[0])
        out["codes_top"] = _as_uint16(top, k_top)
        out["code_histogram_top"] = _histogram(top, k_top).cpu().numpy()
    return out


def codebooks(model: nn.Module) -> dict[str, np.ndarray]:
    """The codebook(s) as float32 arrays: ``codebook`` (finest level) and ``codebook_top`` (two levels)."""
    books = [q.codebook.detach().float().cpu().numpy().copy() for q in model.quantizers]
    return dict(zip(("codebook", "codebook_top"), books))


def codebook_hash(books: dict[str, np.ndarray]) -> str:
    """SHA-256 (first 16 hex digits) of the codebook array(s)."""
    h = hashlib.sha256()
    for name in sorted(books):
        arr = np.ascontiguousarray(books[name], dtype=np.float32)
        h.update(f"{name}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]
