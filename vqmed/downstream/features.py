"""Feature variants of an export: pooled vectors, bags of codes and spatially pooled code maps.

Owns the variant names (:data:`VARIANTS` and the grid-variant parser), which the config validates against.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DIRECT_VARIANTS = (
    "quantized_mean", "code_histogram", "continuous_mean", "continuous_grid", "encoder_grid", "encoder_grid_std",
)
#: Variants that concatenate export arrays: ``encoder_stats`` = per-cell mean and spread of every encoder stage.
COMBINED_VARIANTS = {"encoder_stats": ("encoder_grid", "encoder_grid_std")}
#: The variant registry: every fixed variant name a config may list (besides the parsed
#: ``codes_grid_hist_GxG`` / ``codes_grid_mean_GxG``, see :func:`parse_grid_variant`). The config validates
#: ``probes.variants`` against these names; they are written nowhere else.
VARIANTS = (*DIRECT_VARIANTS, *COMBINED_VARIANTS)
#: Export arrays a benchmark reads: the code maps and every directly usable variant.
FEATURE_ARRAYS = ("codes", *DIRECT_VARIANTS)


#: Prefixes of the parsed grid variants and the kind each parses to.
GRID_PREFIXES = {"codes_grid_hist_": "hist", "codes_grid_mean_": "mean", "encoder_stats_": "stats"}


def parse_grid_variant(name: str) -> tuple[str, int] | None:
    """``codes_grid_hist_4x4`` -> ``("hist", 4)``, ``codes_grid_mean_2x2`` -> ``("mean", 2)``,
    ``encoder_stats_2x2`` -> ``("stats", 2)``, else ``None``."""
    for prefix, kind in GRID_PREFIXES.items():
        if name.startswith(prefix):
            size = name[len(prefix):].split("x")
            if len(size) == 2 and size[0] == size[1] and size[0].isdigit() and int(size[0]) >= 1:
                return kind, int(size[0])
    return None


def coarser_encoder_stats(
    mean: np.ndarray, std: np.ndarray, export_grid: int, spatial_dims: int, cells: int
) -> np.ndarray:
    """``encoder_stats`` on a coarser grid, merged exactly from the export's per-cell mean and spread.

    The export pools every stage on an ``export_grid`` grid; a cell of the ``cells`` grid is the union of
    ``(export_grid / cells) ** spatial_dims`` equal export cells, so its mean is theirs averaged and its
    variance the average second moment (spread squared plus mean squared) less its mean squared.

    Args:
        mean: ``encoder_grid`` ``(N, S)``, each stage's channels times the export grid's cells, cells last.
        std: ``encoder_grid_std`` ``(N, S)``, the same layout.
        export_grid: cells per axis of the export's grid.
        spatial_dims: 2 or 3.
        cells: cells per axis wanted; must divide ``export_grid``.

    Returns:
        ``(N, 2 * S / (export_grid / cells) ** spatial_dims)`` float32: the coarser means, then the spreads.
    """
    if cells < 1 or export_grid % cells:
        raise KeyError(f"encoder_stats_{cells}x{cells}: {cells} cells per axis do not divide the export's {export_grid}")
    n, factor = len(mean), export_grid // cells
    shape = (n, -1) + (cells, factor) * spatial_dims
    merge = tuple(range(3, 3 + 2 * spatial_dims, 2))  # the factor axes
    m = np.asarray(mean, dtype=np.float64).reshape(shape)
    second = np.asarray(std, dtype=np.float64).reshape(shape) ** 2 + m**2
    m_coarse = m.mean(axis=merge)
    s_coarse = np.sqrt(np.clip(second.mean(axis=merge) - m_coarse**2, 0.0, None))
    return np.concatenate([m_coarse.reshape(n, -1), s_coarse.reshape(n, -1)], axis=1).astype(np.float32)


def grid_code_histograms(codes: np.ndarray, n_codes: int, grid: int, chunk: int = 256) -> np.ndarray:
    """Normalised code histogram of every cell of a ``grid`` x ... x ``grid`` partition of the code maps.

    Works for 2D ``(N, h, w)`` and 3D ``(N, d, h, w)`` maps; cells split each axis as evenly as
    possible (``floor(position * grid / size)``), so sizes need not be divisible by ``grid``.

    Args:
        codes: integer code maps, ``(N, *spatial)``.
        n_codes: codebook size ``K``.
        grid: cells per axis.
        chunk: maps processed at once (bounds memory at ``chunk * cells * K`` counts).

    Returns:
        ``(N, cells, K)`` float32 histograms, each cell summing to 1.
    """
    codes = np.asarray(codes)
    spatial = codes.shape[1:]
    if grid > min(spatial):
        raise ValueError(f"grid {grid} is finer than the code maps {spatial}")
    if codes.size and int(codes.max()) >= n_codes:
        raise ValueError(f"code {int(codes.max())} is outside a codebook of {n_codes} entries")
    axes = [np.arange(s) * grid // s for s in spatial]
    cell = np.zeros(spatial, dtype=np.int64)
    for axis, idx in enumerate(axes):
        shape = [1] * len(spatial)
        shape[axis] = len(idx)
        cell = cell * grid + idx.reshape(shape)
    cell = cell.ravel()
    n_cells = grid ** len(spatial)
    per_cell = np.bincount(cell, minlength=n_cells).astype(np.float32)
    out = np.empty((len(codes), n_cells, n_codes), dtype=np.float32)
    for start in range(0, len(codes), chunk):
        block = codes[start:start + chunk].reshape(-1, cell.size).astype(np.int64)
        rows = np.arange(len(block))[:, None]
        flat = (rows * n_cells + cell[None, :]) * n_codes + block
        counts = np.bincount(flat.ravel(), minlength=len(block) * n_cells * n_codes)
        out[start:start + len(block)] = counts.reshape(len(block), n_cells, n_codes) / per_cell[None, :, None]
    return out


def feature_variant(name: str, arrays: Mapping[str, np.ndarray], codebook: np.ndarray | None) -> np.ndarray:
    """One named feature matrix ``(N, F)`` built from the arrays of an export.

    Args:
        name: ``quantized_mean``, ``code_histogram``, ``continuous_mean``, ``continuous_grid``, ``encoder_grid``,
            ``encoder_grid_std`` (taken as exported), ``encoder_stats`` (``encoder_grid`` and
            ``encoder_grid_std`` side by side), or
            ``codes_grid_hist_GxG`` / ``codes_grid_mean_GxG`` (from ``codes`` and ``codebook``: per
            cell the code histogram, or the mean codebook vector of the cell's codes), or
            ``encoder_stats_GxG`` (``encoder_stats`` merged onto a coarser G x G grid, G dividing the export's).
        arrays: the export's arrays by name, aligned with its index.
        codebook: ``(K, D)`` codebook (needed by the grid variants).

    Raises:
        KeyError: when the export lacks what the variant needs.
    """
    if name in DIRECT_VARIANTS or name in COMBINED_VARIANTS:
        parts = COMBINED_VARIANTS.get(name, (name,))
        _require(name, arrays, parts)
        blocks = [np.asarray(arrays[p], dtype=np.float32) for p in parts]
        return np.concatenate([b.reshape(len(b), -1) for b in blocks], axis=1)
    parsed = parse_grid_variant(name)
    if parsed is None:
        raise KeyError(f"unknown feature variant {name!r}")
    if parsed[0] == "stats":
        _require(name, arrays, ("encoder_grid", "encoder_grid_std", "continuous_grid"))
        spatial = np.shape(arrays["continuous_grid"])[2:]  # (N, D, *grid): the export's grid and dimensionality
        mean, std = arrays["encoder_grid"], arrays["encoder_grid_std"]
        return coarser_encoder_stats(mean, std, spatial[0], len(spatial), parsed[1])
    if "codes" not in arrays or codebook is None:
        raise KeyError(f"variant {name!r} needs the export's 'codes' and its codebook")
    kind, grid = parsed
    hist = grid_code_histograms(arrays["codes"], len(codebook), grid)
    if kind == "hist":
        return hist.reshape(len(hist), -1)
    # mean codebook vector per cell = cell histogram @ codebook (no (N, h, w, D) tensor needed)
    pooled = hist @ np.asarray(codebook, dtype=np.float32)
    return pooled.reshape(len(pooled), -1)


def _require(name: str, arrays: Mapping[str, np.ndarray], parts: tuple[str, ...]) -> None:
    """Raise ``KeyError`` naming the export arrays variant ``name`` needs and ``arrays`` lacks."""
    missing = [p for p in parts if p not in arrays]
    if missing:
        raise KeyError(f"variant {name!r} needs the export array(s) {missing}")
