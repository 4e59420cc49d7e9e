"""Per-study likelihood under a prior, written as new columns of the export index (idempotent, atomic).

Columns (any earlier ``prior_*`` columns are replaced, so the same command twice gives the same index):

- ``prior_bits_per_code``: the study's negative log-likelihood in bits per code (every level's codes);
- ``prior_worst_cell``: ``"row,col"`` of the cell of a 4 x 4 (x 4) grid over the code map whose codes are the
  least likely (where the study is least like the training films);
- ``prior_id``: the prior's fingerprint (weights and architecture);
- ``prior_flag`` (with ``flag_quantile``): the study is less likely than ``1 - q`` of the prior's training-split
  studies in this store (the threshold is taken from that split only, never from the scored studies).

The index is rewritten with :func:`vqmed.atomic.atomic_write` under the export's store lock, so a killed run
leaves the old index and an export never runs at the same time. A later export that adds studies rewrites
the index from its shard parts (without these columns): score again after it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from vqmed.atomic import atomic_write, atomic_write_json
from vqmed.export import load
from vqmed.export.store import INDEX_FILE
from vqmed.export.writer import _store_lock
from vqmed.prior.model import LN2, PriorModel

__all__ = ["COLUMNS", "score_codes", "score_store"]

COLUMNS = ("prior_bits_per_code", "prior_worst_cell", "prior_id", "prior_flag")
SCORES_FILE = "prior_scores.json"
GRID = 4  # cells per axis of the worst-region grid (as the export's pooled grids)


def score_codes(model: PriorModel, codes: dict[str, np.ndarray], batch_size: int = 128,
                device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Bits per code ``[N]`` and the bits map of the finest level ``[N, *shape]`` of code maps ``{array: [N, *shape]}``."""
    model = model.to(device).eval()
    n = len(next(iter(codes.values())))
    bits = np.empty(n, dtype=np.float64)
    maps = np.empty((n, *model.levels[0].shape), dtype=np.float32)
    for start in range(0, n, batch_size):
        batch = {k: torch.from_numpy(v[start:start + batch_size].astype(np.int64)).to(device) for k, v in codes.items()}
        ll = model.log_likelihood(batch)
        nats = sum(-m.flatten(1).double().sum(1) for m in ll.values())
        bits[start:start + batch_size] = (nats / (model.total_codes * LN2)).cpu().numpy()  # type: ignore[union-attr]
        maps[start:start + batch_size] = (-ll[model.levels[0].array] / LN2).cpu().numpy()
    return bits, maps


def worst_cells(maps: np.ndarray) -> list[str]:
    """``"row,col[,slice]"`` of the highest mean bits per code on a ``GRID``-cell partition of each map."""
    t = torch.from_numpy(maps).unsqueeze(1)
    pool = nn.functional.adaptive_avg_pool3d if t.dim() == 5 else nn.functional.adaptive_avg_pool2d
    cells = pool(t, GRID).flatten(1)
    shape = (GRID,) * (t.dim() - 2)
    return [",".join(str(int(i)) for i in np.unravel_index(int(c), shape)) for c in cells.argmax(1)]


def score_store(prior_dir: str | Path, export_dir: str | Path, flag_quantile: float | None = None, heatmaps: int = 0,
                heatmap_dir: str | Path | None = None, batch_size: int = 128) -> dict[str, Any]:
    """``vqmed prior score``: every study's likelihood as columns of the export index.

    Args:
        prior_dir: the prior (``vqmed prior train --out``).
        export_dir: the store to score (the prior's own or another export of the same model).
        flag_quantile: also flag the studies less likely than ``1 - flag_quantile`` of the training split's.
        heatmaps: write the heat map of the ``heatmaps`` least likely studies (``KEY.png``, the salted row key).
        heatmap_dir: where the heat maps go (default ``EXPORT/prior_heatmaps``).
        batch_size: code maps per prior call.

    Returns:
        ``studies``, ``seconds``, ``studies_per_s``, ``prior_id``, ``flag_threshold``, ``flagged``, ``heatmaps``.
    """
    from vqmed.prior.train import load_prior

    start = time.perf_counter()
    if flag_quantile is not None and not 0.0 < flag_quantile < 1.0:
        raise ValueError(f"flag_quantile must be in (0, 1), got {flag_quantile}")
    model, state = load_prior(prior_dir)
    store = load(export_dir)
    if store.meta.get("model_id") != state["export"]["model_id"]:
        raise ValueError(f"{export_dir}: holds codes of model {store.meta.get('model_id')}; the prior was trained on "
                         f"codes of {state['export']['model_id']}")
    codes = {lv.array: store.array(lv.array) for lv in model.levels}
    bits, maps = score_codes(model, codes, batch_size)
    prior_id = model.fingerprint()
    index = store.index.drop(columns=[c for c in store.index.columns if c.startswith("prior_")])
    index["prior_bits_per_code"] = bits
    index["prior_worst_cell"] = worst_cells(maps)
    index["prior_id"] = prior_id
    threshold = None
    if flag_quantile is not None:
        split = state["config"].get("split", "train")
        reference = bits[(index["split"].astype(str) == split).to_numpy()] if "split" in index.columns else bits
        if len(reference) == 0:
            raise ValueError(f"{export_dir}: no study of the prior's training split {split!r} to set the flag threshold")
        threshold = float(np.quantile(reference, 1.0 - flag_quantile))
        index["prior_flag"] = bits > threshold
    out = Path(export_dir)
    with _store_lock(out, True):
        atomic_write(out / INDEX_FILE, lambda h: index.to_parquet(h, index=False))
        atomic_write_json(out / SCORES_FILE, {"prior": str(Path(prior_dir).resolve()), "prior_id": prior_id,
                                              "flag_quantile": flag_quantile, "flag_threshold_bits": threshold,
                                              "columns": [c for c in COLUMNS if c in index.columns]})
    written = _heatmaps(store, codes, maps, bits, index["key"].tolist(), heatmaps,
                        Path(heatmap_dir) if heatmap_dir else out / "prior_heatmaps") if heatmaps else []
    seconds = time.perf_counter() - start
    return {"studies": len(index), "seconds": round(seconds, 2), "studies_per_s": round(len(index) / seconds, 1),
            "prior_id": prior_id, "mean_bits_per_code": float(bits.mean()) if len(bits) else None,
            "flag_threshold": threshold, "flagged": int(index["prior_flag"].sum()) if threshold is not None else None,
            "heatmaps": [str(p) for p in written]}


def _heatmaps(store: Any, codes: dict[str, np.ndarray], maps: np.ndarray, bits: np.ndarray, keys: list[str], n: int,
              out: Path) -> list[Path]:
    """The ``n`` least likely studies: the decoded study beside its bits map, as ``OUT/KEY.png``."""
    from vqmed.tracking import likelihood_heatmap

    out.mkdir(parents=True, exist_ok=True)
    worst = np.argsort(-bits, kind="stable")[:n]
    images = store.decode(codes["codes"][worst], codes["codes_top"][worst] if "codes_top" in codes else None)
    written = []
    for image, i in zip(images.clamp(0, 1), worst):
        fig = likelihood_heatmap(image.numpy(), maps[i], f"{bits[i]:.2f} bits per code")
        path = out / f"{keys[i]}.png"
        atomic_write(path, lambda h, f=fig: f.savefig(h, format="png", dpi=110))
        written.append(path)
    return written
