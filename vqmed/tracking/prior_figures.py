"""Figures of the prior over code maps: image rows (samples beside real studies), the likelihood heat map of a
study and the QA benchmark's AUROC bars."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from vqmed.tracking.figures import OKABE_ITO, _batch_images, _new_figure
from vqmed.tracking.mlflow_utils import to_display_image

__all__ = ["image_rows", "likelihood_heatmap", "qa_auroc_plot"]


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def image_rows(rows: Mapping[str, Any], title: str, max_cols: int = 8) -> Figure:
    """Labelled rows of images, e.g. ``{"real (decoded)": real, "samples": samples}``.

    Args:
        rows: label -> ``[N, C, H, W]`` (or 3D ``[N, C, H, W, D]``, the middle slice) batch in [0, 1]; a batch
            longer than ``max_cols`` wraps onto further rows under the same label.
        title: figure title.
        max_cols: images per row.
    """
    lines: list[tuple[str, list[np.ndarray]]] = []
    for label, batch in rows.items():
        arr = _batch_images(batch, label)
        shown = [to_display_image(arr[i]) for i in range(arr.shape[0])]
        for start in range(0, max(1, len(shown)), max_cols):
            lines.append((label if start == 0 else "", shown[start:start + max_cols]))
    cols = max(1, max(len(imgs) for _, imgs in lines))
    cell = 1.4
    fig = _new_figure(cols * cell + 0.6, len(lines) * cell + 0.5)
    axes = fig.subplots(len(lines), cols, squeeze=False)
    for r, (label, imgs) in enumerate(lines):
        for c in range(cols):
            ax = axes[r, c]
            _bare(ax)
            if c < len(imgs):
                img = imgs[c]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def likelihood_heatmap(image: Any, bits: Any, title: str) -> Figure:
    """A study beside its per-code code length (bits) laid over it; the worst codes are the hottest.

    Args:
        image: ``[C, H, W]`` image in [0, 1] (3D: the middle slice).
        bits: ``[h, w]`` bits per code of the code map (3D: ``[d, h, w]``, the middle slice).
        title: figure title.
    """
    shown = to_display_image(np.asarray(image))
    heat = np.asarray(bits, dtype=float)
    if heat.ndim == 3:
        heat = heat[heat.shape[0] // 2]
    h, w = shown.shape[:2]
    fig = _new_figure(5.2, 2.8)
    axes = fig.subplots(1, 2)
    for ax in axes:
        _bare(ax)
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0.0, vmax=1.0)
    overlay = axes[1].imshow(heat, cmap="inferno", alpha=0.55, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                             interpolation="nearest")
    fig.colorbar(overlay, ax=axes[1], fraction=0.046, label="bits per code")
    axes[0].set_title("study", fontsize=8)
    axes[1].set_title("code length under the prior", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def qa_auroc_plot(table: Any, methods: Sequence[str], title: str = "Real films vs corrupted: AUROC") -> Figure:
    """Grouped bars: one group per corruption, one bar per method, the 0.5 chance line and the 0.95 bar.

    Args:
        table: a pandas DataFrame with a ``corruption`` column and one AUROC column per method.
        methods: the method columns, in bar order.
        title: figure title.
    """
    missing = [c for c in ["corruption", *methods] if c not in table.columns]
    if missing:
        raise KeyError(f"qa_auroc_plot: columns {missing} missing (has {list(table.columns)})")
    names = table["corruption"].astype(str).tolist()
    x = np.arange(len(names))
    width = 0.8 / max(1, len(methods))
    fig = _new_figure(max(5.0, 0.9 * len(names) + 1.5), 3.6)
    ax = fig.subplots()
    for i, method in enumerate(methods):
        values = table[method].to_numpy(float)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=method,
               color=OKABE_ITO[i % (len(OKABE_ITO) - 1)])
    ax.axhline(0.5, color=OKABE_ITO[-1], linewidth=0.8, linestyle=":", label="chance")
    ax.axhline(0.95, color=OKABE_ITO[-1], linewidth=0.8, linestyle="--", label="0.95")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    low = min(0.0, math.floor(float(np.nanmin(table[list(methods)].to_numpy(float))) * 10) / 10)
    ax.set_ylim(low, 1.0)
    ax.set_ylabel("AUROC (corrupted = positive)")
    ax.legend(fontsize=7, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig
