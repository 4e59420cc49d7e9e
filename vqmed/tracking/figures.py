"""Figures for runs: reconstruction grid and GIF, loss curves, codebook usage, label efficiency.

Figures are plain ``matplotlib.figure.Figure`` objects on the Agg canvas: no display, no pyplot state to
leak in long training loops. Colours follow the Okabe-Ito palette (safe for colour-blind readers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter
from PIL import Image, ImageDraw, ImageFont

from vqmed.tracking.mlflow_utils import _as_numpy, _to_uint8, psnr, to_display_image

__all__ = [
    "OKABE_ITO",
    "reconstruction_grid",
    "reconstruction_gif",
    "loss_curves",
    "usage_histogram",
    "label_efficiency_plot",
]

#: Okabe & Ito (2008) colour-blind-safe palette (black last: used for reference lines).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: savefig/draw work headless
    return fig


def _batch_images(x: Any, what: str) -> np.ndarray:
    arr = _as_numpy(x)
    if arr.ndim not in (4, 5):
        raise ValueError(f"reconstruction_grid: {what} must be [N,C,H,W] or [N,C,H,W,D], got shape {tuple(arr.shape)}")
    return arr


def reconstruction_grid(
    originals: Any,
    reconstructions: Any,
    n: int = 16,
    max_cols: int = 8,
    title: str | None = None,
) -> Figure:
    """Originals above their reconstructions, with each reconstruction's PSNR.

    Args:
        originals: ``[N, C, H, W]`` (or 3D ``[N, C, H, W, D]``, shown as the middle slice) in [0, 1];
            one channel is shown grey, three as RGB. Arrays or tensors.
        reconstructions: same shape as ``originals``.
        n: number of images shown (the first ``n``).
        max_cols: images per row; more images wrap into further original/reconstruction row pairs.
        title: figure title (default ``"Reconstructions (mean PSNR ... dB)"``).

    Returns:
        the figure (log it with :func:`log_figure`, which also closes it).

    Raises:
        ValueError: when shapes differ or are not image batches.
    """
    orig = _batch_images(originals, "originals")
    rec = _batch_images(reconstructions, "reconstructions")
    if orig.shape != rec.shape:
        raise ValueError(f"reconstruction_grid: originals {tuple(orig.shape)} and reconstructions {tuple(rec.shape)} differ")
    count = max(1, min(int(n), orig.shape[0]))
    cols = min(count, max(1, int(max_cols)))
    pairs = math.ceil(count / cols)
    shown_o = [to_display_image(orig[i]) for i in range(count)]
    shown_r = [to_display_image(rec[i]) for i in range(count)]
    # PSNR on the displayed (clipped) images, as the reader sees them
    scores = [psnr(float(np.mean((o - r) ** 2))) for o, r in zip(shown_o, shown_r)]
    finite = [s for s in scores if math.isfinite(s)]

    h, w = shown_o[0].shape[:2]
    cell = 1.6
    fig = _new_figure(cols * cell, pairs * 2 * cell * h / w + 0.5)
    axes = fig.subplots(2 * pairs, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for i in range(count):
        r, c = divmod(i, cols)
        for row, img in ((2 * r, shown_o[i]), (2 * r + 1, shown_r[i])):
            ax = axes[row, c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="antialiased")
        axes[2 * r + 1, c].set_title(f"{scores[i]:.1f} dB", fontsize=7, pad=2)
    for r in range(pairs):
        axes[2 * r, 0].set_ylabel("original", fontsize=8)
        axes[2 * r + 1, 0].set_ylabel("reconstruction", fontsize=8)
    if title is None:
        mean = f"{np.mean(finite):.2f} dB" if finite else "inf dB"
        title = f"Reconstructions (top: original, below: reconstruction; mean PSNR {mean})"
    fig.suptitle(title, fontsize=9)
    return fig


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font
    except TypeError:  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def reconstruction_gif(
    frames: Sequence[Any],
    path: str | Path,
    fps: float = 2,
    labels: Sequence[str] | None = None,
    min_size: int = 192,
) -> Path:
    """Write the per-epoch reconstruction animation of one validation image as a looping GIF.

    Each frame gets a caption bar above the image (``"epoch k"`` by default, k counting from 1), so the image
    itself is not covered. Small images are enlarged (nearest neighbour) to at least ``min_size`` pixels so
    the caption fits and pixels stay visible.

    Args:
        frames: one image per epoch, each ``[C, H, W]`` (or ``[C, H, W, D]``: middle slice) in [0, 1]; all the
            same shape. Tip: concatenate original and reconstruction along W to show both.
        path: output file (``.gif``); parent folders are created.
        fps: frames per second.
        labels: one caption per frame (default ``"epoch 1"``, ``"epoch 2"``, ...).
        min_size: smallest displayed side in pixels.

    Returns:
        the path written.

    Raises:
        ValueError: for no frames, mismatched labels or frame shapes.
    """
    if len(frames) == 0:
        raise ValueError(f"reconstruction_gif: no frames to write to {path}")
    if labels is None:
        labels = [f"epoch {k}" for k in range(1, len(frames) + 1)]
    if len(labels) != len(frames):
        raise ValueError(f"reconstruction_gif: {len(labels)} labels for {len(frames)} frames")
    if fps <= 0:
        raise ValueError(f"reconstruction_gif: fps must be > 0, got {fps}")
    imgs = [_to_uint8(f) for f in frames]
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise ValueError(f"reconstruction_gif: frames have different shapes {sorted(shapes)}")
    h, w = imgs[0].shape[:2]
    scale = max(1, math.ceil(min_size / max(1, min(h, w))))
    bar = 24
    font = _font(16)
    rendered = []
    for im, label in zip(imgs, labels):
        pil = Image.fromarray(im).convert("RGB")
        if scale > 1:
            pil = pil.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (pil.width, pil.height + bar), "white")
        canvas.paste(pil, (0, bar))
        ImageDraw.Draw(canvas).text((6, 3), str(label), fill="black", font=font)
        rendered.append(canvas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = max(20, int(round(1000.0 / fps)))
    # a shared adaptive palette from all frames; frames always differ (captions), so none are merged
    rendered[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=rendered[1:],
        duration=duration,
        loop=0,
        optimize=False,
        disposal=1,
    )
    return path


def _panel_of(name: str) -> str:
    n = name.lower()
    if "psnr" in n:
        return "PSNR (dB)"
    if "perplexity" in n:
        return "codebook perplexity"
    if any(s in n for s in ("usage", "used", "dead", "fraction")):
        return "codebook usage"
    if any(s in n for s in ("auc", "acc", "ssim", "f1", "precision", "recall")):
        return "score"
    if n in ("lr", "learning_rate") or n.endswith("/lr") or n.endswith(".lr") or "learning_rate" in n:
        return "learning rate"
    return "loss"


def loss_curves(history: Mapping[str, Sequence[tuple[int, float]]], title: str = "Training curves") -> Figure:
    """Plot metric series against step, one panel per kind of quantity.

    Series are grouped by name: losses and MSEs together, PSNR, codebook perplexity/usage, scores (AUC,
    accuracy) and learning rate each in their own panel, so different units never share an axis. A panel
    uses a log y-axis when all its values are positive and span more than a factor of 10 (typical of
    losses); PSNR and scores stay linear. Non-finite points are dropped.

    Args:
        history: ``{name: [(step, value), ...]}``, e.g. ``{"train/loss": [...], "val_psnr": [...]}``.
        title: figure title.

    Returns:
        the figure.
    """
    panels: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for name, series in history.items():
        pts = [(float(s), float(v)) for s, v in series if v is not None and math.isfinite(float(v))]
        if not pts:
            continue
        pts.sort()
        steps, values = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        panels.setdefault(_panel_of(str(name)), []).append((str(name), steps, values))
    order = ["loss", "PSNR (dB)", "codebook perplexity", "codebook usage", "score", "learning rate"]
    keys = [k for k in order if k in panels]
    if not keys:
        fig = _new_figure(5, 3)
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no finite values to plot", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        fig.suptitle(title)
        return fig
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _new_figure(4.6 * ncols, 3.4 * nrows)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    colour = 0
    for ax, key in zip(axes, keys):
        allv = np.concatenate([v for _, _, v in panels[key]])
        for name, steps, values in panels[key]:
            ax.plot(
                steps,
                values,
                label=name,
                color=OKABE_ITO[colour % (len(OKABE_ITO) - 1)],
                marker="o" if len(steps) <= 30 else None,
                markersize=3,
                linewidth=1.5,
            )
            colour += 1
        if key != "PSNR (dB)" and key != "score" and np.all(allv > 0) and allv.max() / allv.min() > 10:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(keys) :]:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def usage_histogram(counts: Any, title: str = "Codebook usage") -> Figure:
    """Codebook usage: codes sorted by how often they are chosen, and the cumulative share of assignments.

    The title states the codes used (count > 0) as a number and a fraction of the codebook, and the
    perplexity ``exp(entropy)`` of the usage distribution (= codebook size for perfectly uniform use).

    Args:
        counts: ``[K]`` number of assignments per code (any non-negative numbers).
        title: first part of the figure title.

    Returns:
        the figure.

    Raises:
        ValueError: for an empty or negative ``counts``.
    """
    c = _as_numpy(counts).astype(np.float64).ravel()
    if c.size == 0 or np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError(f"usage_histogram: counts must be a non-empty, finite, non-negative vector (got size {c.size})")
    k = c.size
    used = int(np.count_nonzero(c))
    total = c.sum()
    if total > 0:
        p = c[c > 0] / total
        perplexity = float(np.exp(-(p * np.log(p)).sum()))
    else:
        perplexity = 0.0
    ranked = np.sort(c)[::-1]
    rank = np.arange(1, k + 1)

    fig = _new_figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    if k <= 256:
        ax1.bar(rank, ranked, width=1.0, color=OKABE_ITO[0], edgecolor="none")
    else:  # thousands of bars are slow to draw and unreadable; a filled step curve shows the same
        ax1.fill_between(rank, ranked, step="mid", color=OKABE_ITO[0], linewidth=0)
    if ranked[0] > 0 and used > 1 and ranked[used - 1] > 0 and ranked[0] / ranked[used - 1] > 100:
        ax1.set_yscale("log")
    if used < k:
        ax1.axvline(used + 0.5, color=OKABE_ITO[3], linestyle="--", linewidth=1, label=f"{k - used} unused codes")
        ax1.legend(fontsize=8)
    ax1.set_xlim(0.5, k + 0.5)
    ax1.set_xlabel("code rank (sorted by count)")
    ax1.set_ylabel("assignments")
    ax1.set_title("assignments per code")
    ax1.grid(True, axis="y", alpha=0.3)

    share = np.cumsum(ranked) / total if total > 0 else np.zeros(k)
    ax2.plot(rank / k, share, color=OKABE_ITO[2], linewidth=2, label="observed")
    ax2.plot([0, 1], [0, 1], color=OKABE_ITO[-1], linestyle=":", linewidth=1, label="uniform use")
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("fraction of codes (most used first)")
    ax2.set_ylabel("fraction of assignments")
    ax2.set_title("cumulative share")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}: {used}/{k} codes used ({used / k:.1%}), perplexity {perplexity:.1f}")
    return fig


#: Line styles of the label-efficiency curves: with the colours and markers, every method differs in three ways.
_LINESTYLES = ("-", "--", "-.", ":", (0, (3, 1, 1, 1, 1, 1)), (0, (5, 1)), (0, (1, 1)))
_MARKERS = "osD^vP*X"


def label_efficiency_plot(
    df: Any,
    title: str = "Label efficiency",
    metric_label: str = "ROC AUC",
    reference: Sequence[str] | None = None,
) -> Figure:
    """AUC against number of labels, one line per method with its confidence band, log-x.

    Every method of a panel gets its own colour, marker and line style, and the methods are dodged
    sideways by a few percent of a budget, so lines that nearly coincide (raw pixels and PCA) stay
    visible side by side instead of one hiding the other.

    Args:
        df: a pandas DataFrame with columns ``method``, ``n_labels``, ``auc_mean``, ``auc_low``, ``auc_high``
            (one row per method and label budget).
        title: figure title.
        metric_label: y-axis label.
        reference: the reference methods, drawn in this order in the first panel; every other method
            (feature variants, candidates) goes to a second panel beside it. ``None``: one panel, every method.

    Returns:
        the figure.

    Raises:
        KeyError: when a column is missing.
    """
    need = ["method", "n_labels", "auc_mean", "auc_low", "auc_high"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise KeyError(f"label_efficiency_plot: columns {missing} missing (has {list(df.columns)})")
    methods = list(dict.fromkeys(df["method"].astype(str).tolist()))  # first-appearance order
    if reference is None:
        panels = [("", methods)]
    else:
        first = [m for m in reference if m in methods]
        rest = [m for m in methods if m not in first]
        panels = [("reference methods", first)] + ([("feature variants and candidates", rest)] if rest else [])
    fig = _new_figure(6.4 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (label, names) in zip(axes, panels):
        _efficiency_panel(ax, df, names, metric_label)
        ax.set_title(f"{title} (bands: confidence interval)" if len(panels) == 1 else label)
    if len(panels) > 1:
        fig.suptitle(f"{title} (bands: confidence interval)")
    return fig


def _efficiency_panel(ax: Any, df: Any, methods: Sequence[str], metric_label: str) -> None:
    budgets: set[float] = set()
    for i, method in enumerate(methods):
        sub = df[df["method"].astype(str) == method].sort_values("n_labels")
        n = sub["n_labels"].to_numpy(dtype=float)
        # dodge: method i sits 3% of a budget right of method i-1 on the log axis (ticks stay on the true budgets)
        x = n * 1.03 ** (i - (len(methods) - 1) / 2)
        colour = OKABE_ITO[i % (len(OKABE_ITO) - 1)]
        style = _LINESTYLES[(i // (len(OKABE_ITO) - 1) + i) % len(_LINESTYLES)]
        ax.fill_between(x, sub["auc_low"].to_numpy(float), sub["auc_high"].to_numpy(float), color=colour, alpha=0.08, linewidth=0)
        ax.plot(x, sub["auc_mean"].to_numpy(float), color=colour, marker=_MARKERS[i % len(_MARKERS)], markersize=5,
                linestyle=style, linewidth=1.6, label=method)
        budgets.update(n.tolist())
    ax.axhline(0.5, color=OKABE_ITO[-1], linestyle=":", linewidth=1, label="chance")
    positive = sorted(b for b in budgets if b > 0)
    if positive:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(positive))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("number of labelled training images (log scale)")
    ax.set_ylabel(metric_label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
