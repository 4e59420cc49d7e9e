"""Samples of a prior, decoded through the exporting VQ-VAE: a PNG grid and a real-vs-sample grid, in MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqmed.config import PriorSampleConfig
from vqmed.export import ExportStore, load
from vqmed.prior.model import PriorModel

__all__ = ["draw", "log_samples", "sample_prior"]


def draw(model: PriorModel, store: ExportStore, n: int, temperature: float = 1.0, top_k: int | None = None,
         seed: int = 0, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``n`` code maps per level from the prior and their images (``[n, C, *spatial]``, decoded by the store's model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        codes = model.to(device).eval().sample(n, temperature=temperature, top_k=top_k, device=device)
    images = store.decode(codes["codes"].cpu(), codes["codes_top"].cpu() if "codes_top" in codes else None)
    return codes, images.clamp(0.0, 1.0)


def real_images(store: ExportStore, split: str, n: int, seed: int) -> torch.Tensor:
    """``n`` studies of ``split`` drawn at random (seeded), their code maps decoded: what the samples imitate."""
    rows = np.flatnonzero((store.index["split"].astype(str) == split).to_numpy()) if "split" in store.index.columns else np.array([])
    if n == 0 or len(rows) == 0:
        return torch.empty(0)
    rows = np.sort(np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False))
    top = store.array("codes_top")[rows] if "codes_top" in store.meta.get("arrays", {}) else None
    return store.decode(store.array("codes")[rows], top).clamp(0.0, 1.0)


def log_samples(model: PriorModel, store: ExportStore, cfg: PriorSampleConfig, out: Path, seed: int,
                device: str | torch.device = "cpu", prefix: str = "") -> list[Path]:
    """Draw ``cfg.n`` samples, write ``OUT/PREFIXsamples.png`` and ``OUT/PREFIXreal_vs_sample.png`` and log both
    to the active MLflow run; returns the two files."""
    from vqmed.tracking import image_rows, log_artifact

    _, images = draw(model, store, cfg.n, cfg.temperature, cfg.top_k, seed, device)
    setting = f"temperature {cfg.temperature:g}" + (f", top-k {cfg.top_k}" if cfg.top_k else "")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    grid = image_rows({"samples": images}, f"{cfg.n} samples of the prior, decoded by the VQ-VAE ({setting})")
    files.append(out / f"{prefix}samples.png")
    grid.savefig(files[-1], dpi=120)
    real = real_images(store, cfg.real_split, cfg.real, seed)
    rows: dict[str, Any] = {f"real ({cfg.real_split}, decoded)": real} if len(real) else {}
    rows["samples"] = images[: max(len(real), 1) if len(real) else cfg.n]
    pair = image_rows(rows, f"Real {cfg.real_split} studies (their code maps decoded) vs samples of the prior ({setting})")
    files.append(out / f"{prefix}real_vs_sample.png")
    pair.savefig(files[-1], dpi=120)
    for path in files:
        log_artifact(path, artifact_path="samples")
    return files


def sample_prior(prior_dir: str | Path, out: str | Path, n: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, export: str | Path | None = None, seed: int | None = None) -> dict[str, Any]:
    """``vqmed prior sample``: samples of a trained prior as PNG grids in ``out`` and in the prior's MLflow run.

    Args:
        prior_dir: the prior's directory (``vqmed prior train --out``).
        out: where the PNGs go.
        n, temperature, top_k: override the prior config's ``sample`` section.
        export: the store whose model decodes the samples (default: the one the prior was trained on).
        seed: sampling seed (default: the prior config's).
    """
    from vqmed.config import PriorConfig, from_dict
    from vqmed.tracking import end_run, setup_mlflow, start_run

    from vqmed.prior.train import load_prior

    model, state = load_prior(prior_dir)
    cfg = from_dict(PriorConfig, state["config"])
    sample_cfg = cfg.sample
    for key, value in (("n", n), ("temperature", temperature), ("top_k", top_k)):
        if value is not None:
            setattr(sample_cfg, key, value)
    sample_cfg.validate()
    store = load(export or state["export"]["directory"])
    if store.meta.get("model_id") != state["export"]["model_id"]:
        raise ValueError(f"{store.directory}: holds codes of model {store.meta.get('model_id')}, the prior was trained "
                         f"on {state['export']['model_id']}")
    setup_mlflow(cfg.tracking.tracking_uri, cfg.tracking.experiment)
    start_run(run_id=state["mlflow_run_id"]) if state.get("mlflow_run_id") else start_run(run_name=f"{cfg.name}-samples")
    try:
        tag = f"t{sample_cfg.temperature:g}_k{sample_cfg.top_k or 'all'}_"
        files = log_samples(model, store, sample_cfg, Path(out), cfg.seed if seed is None else seed, prefix=tag)
    finally:
        end_run()
    return {"n": sample_cfg.n, "temperature": sample_cfg.temperature, "top_k": sample_cfg.top_k,
            "files": [str(f) for f in files]}
