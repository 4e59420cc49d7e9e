"""The QA benchmark: can a study's likelihood under the prior tell real chest films from corrupted ones?

The real films of the store's test split are scored as they are and as corrupted copies (inverted, rotated by
90 and 180 degrees, flipped left-right, cropped to their upper-left quarter and resized back); non-chest
images (MNIST digits, CIFAR-10 / STL-10 photographs, non-chest DICOMs) are scored as they are. Each group
against the real films gives one AUROC (corrupted = positive) per score:

- ``likelihood``: the prior's bits per code of the study's code map (higher = less like the training films);
- ``reconstruction_error``: the VQ-VAE's mean squared reconstruction error (higher = less like them);
- ``mean_intensity``: the distance of the image's mean intensity from the mean of ``reference_images`` films
  of the training split (never the test split).

Nothing is tuned here: the prior, the VQ-VAE and the reference come from the training split only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from vqmed.atomic import atomic_write_json, atomic_write_text
from vqmed.config import QAConfig, QASourceConfig, to_dict
from vqmed.data import ImageDataset, ImageSpec, read_manifest, resolve_data_root
from vqmed.export import ExportStore, load
from vqmed.prior.model import PriorModel
from vqmed.prior.score import score_codes

__all__ = ["CORRUPT", "METHODS", "run_qa"]

METHODS = ("likelihood", "reconstruction_error", "mean_intensity")


def _crop_quarter(x: torch.Tensor) -> torch.Tensor:
    """The upper-left quarter of the film (half of each side), resized back to the full size."""
    h, w = x.shape[-2:]
    part = x[..., : h // 2, : w // 2]
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return nn.functional.interpolate(part, size=x.shape[2:], mode=mode, align_corners=False).clamp(0, 1)


#: The corruption registry (``QAConfig.corruptions`` is validated against it): name -> what it does to ``[N, C, *spatial]`` images in [0, 1]
CORRUPT = {
    "inverted": lambda x: 1.0 - x,  # a MONOCHROME1 film read as MONOCHROME2 (or inverted twice)
    "rotated_90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rotated_180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "flipped": lambda x: torch.flip(x, dims=(-1,)),
    "cropped": _crop_quarter,
}


def _images(rows: pd.DataFrame, root: Path, spec: ImageSpec) -> torch.Tensor:
    ds = ImageDataset(rows.reset_index(drop=True), root, spec, cache_dir=None, progress=False)
    if len(ds) == 0:
        return torch.empty((0, spec.channels) + (spec.image_size,) * spec.spatial_dims)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def _source_images(source: QASourceConfig, default_root: str | None, spec: ImageSpec) -> torch.Tensor:
    if source.pydicom_files:
        from pydicom.data import get_testdata_file

        paths = [Path(get_testdata_file(name)) for name in source.pydicom_files]
        missing = [n for n, p in zip(source.pydicom_files, paths) if p is None or not p.is_file()]
        if missing:
            raise FileNotFoundError(f"pydicom-data has no file(s) {missing}")
        rows = pd.DataFrame({"path": [p.name for p in paths]})
        root = paths[0].parent
    else:
        rows = read_manifest(Path(str(source.manifest)))
        root = Path(resolve_data_root(source.data_root or default_root))
    if source.max_images is not None:
        rows = rows.head(source.max_images)
    return _images(rows, root, spec)


class Scorer:
    """The three scores of a batch of images: prior bits per code, reconstruction error, mean-intensity distance."""

    def __init__(self, prior: PriorModel, vqvae: nn.Module, reference_mean: float, batch_size: int) -> None:
        self.prior, self.vqvae, self.reference_mean, self.batch_size = prior, vqvae.eval(), reference_mean, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        codes: dict[str, list[np.ndarray]] = {}
        errors = []
        for start in range(0, len(images), self.batch_size):
            x = images[start:start + self.batch_size]
            indices = self.vqvae.index_quantize(x)
            errors.append(((self.vqvae.decode_indices(indices) - x) ** 2).flatten(1).mean(1).numpy())
            pair = indices if isinstance(indices, (tuple, list)) else (indices,)
            for name, value in zip(("codes", "codes_top"), pair):
                codes.setdefault(name, []).append(value.numpy())
        merged = {k: np.concatenate(v) for k, v in codes.items() if k in {lv.array for lv in self.prior.levels}}
        bits, _ = score_codes(self.prior, merged, self.batch_size)
        mean = images.flatten(1).mean(1).numpy()
        return {"likelihood": bits, "reconstruction_error": np.concatenate(errors),
                "mean_intensity": np.abs(mean - self.reference_mean)}


def _auroc(real: np.ndarray, other: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(real)), np.ones(len(other))]
    return float(roc_auc_score(labels, np.r_[real, other]))


def _split_rows(store: ExportStore, split: str) -> pd.DataFrame:
    rows = store.index[store.index["split"].astype(str) == split] if "split" in store.index.columns else store.index.iloc[:0]
    if rows.empty:
        raise ValueError(f"{store.directory}: no study of split {split!r}")
    return rows


def run_qa(cfg: QAConfig, out: str | Path | None = None) -> dict[str, Any]:
    """``vqmed prior qa``: AUROC of each score at telling the real test films from each corruption.

    Writes ``OUT/qa.csv``, ``OUT/qa.md``, ``OUT/qa.json`` and ``OUT/qa_auroc.png``, and logs them with one
    ``auroc/GROUP/METHOD`` metric per cell to an MLflow run. Returns the summary (``qa.json``).
    """
    from vqmed.tracking import end_run, log_artifact, log_figure, log_metrics, log_params, metric_key, qa_auroc_plot, setup_mlflow, start_run

    from vqmed.prior.train import load_prior

    out = Path(out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store = load(str(cfg.export))
    prior, state = load_prior(cfg.prior)
    if store.meta.get("model_id") != state["export"]["model_id"]:
        raise ValueError(f"{cfg.export}: holds codes of model {store.meta.get('model_id')}; the prior {cfg.prior} was "
                         f"trained on codes of {state['export']['model_id']}")
    spec = ImageSpec(**store.meta["image_spec"])
    root = Path(resolve_data_root(cfg.data_root))
    reference_rows = _split_rows(store, cfg.reference_split)
    pick = np.random.default_rng(cfg.seed).choice(len(reference_rows), size=min(cfg.reference_images, len(reference_rows)),
                                                  replace=False)
    reference_mean = float(_images(reference_rows.iloc[np.sort(pick)], root, spec).mean())
    scorer = Scorer(prior, store.model(), reference_mean, cfg.batch_size)

    real = _images(_split_rows(store, cfg.test_split), root, spec)
    groups: dict[str, dict[str, np.ndarray]] = {"real": scorer(real)}
    for name in CORRUPT if cfg.corruptions is None else cfg.corruptions:
        groups[name] = scorer(CORRUPT[name](real))
    non_chest = []
    for name, source in cfg.non_chest.items():
        images = _source_images(source, cfg.data_root, spec)
        if len(images):
            groups[f"non_chest:{name}"] = scorer(images)
            non_chest.append(f"non_chest:{name}")
    if non_chest:
        groups["non_chest"] = {m: np.concatenate([groups[g][m] for g in non_chest]) for m in METHODS}

    rows = []
    for group, scores in groups.items():
        if group == "real":
            continue
        row: dict[str, Any] = {"corruption": group, "n": len(scores["likelihood"])}
        row.update({m: _auroc(groups["real"][m], scores[m]) for m in METHODS})
        rows.append(row)
    table = pd.DataFrame(rows)
    table["likelihood_beats_reconstruction"] = table["likelihood"] > table["reconstruction_error"]
    means = {g: {m: float(np.mean(s[m])) for m in METHODS} for g, s in groups.items()}
    core = ["inverted", "rotated_90", "rotated_180", "non_chest"]
    summary = {
        "real_films": len(real),
        "test_split": cfg.test_split,
        "reference_split": cfg.reference_split,
        "reference_mean_intensity": reference_mean,
        "table": table.to_dict(orient="records"),
        "mean_scores": means,
        "min_auroc_core": float(table[table["corruption"].isin(core)]["likelihood"].min()) if table["corruption"].isin(core).any() else None,
        "likelihood_beats_reconstruction": int(table[~table["corruption"].str.startswith("non_chest:")]["likelihood_beats_reconstruction"].sum()),
        "prior": str(Path(cfg.prior).resolve()),
        "export": str(Path(str(cfg.export)).resolve()),
    }
    table.to_csv(out / "qa.csv", index=False)
    markdown = _markdown(table)
    atomic_write_text(out / "qa.md", markdown)
    atomic_write_json(out / "qa.json", summary)
    figure = qa_auroc_plot(table, list(METHODS), title=f"Real {cfg.test_split} films vs corrupted: AUROC of each score")
    figure.savefig(out / "qa_auroc.png", dpi=120)

    setup_mlflow(cfg.tracking.tracking_uri, cfg.tracking.experiment)
    run = start_run(run_name=cfg.name)
    try:
        log_params(to_dict(cfg))
        for row in table.itertuples():
            log_metrics({metric_key(f"auroc/{row.corruption}/{m}"): getattr(row, m) for m in METHODS}, step=0)
        for name in ("qa.csv", "qa.md", "qa.json"):
            log_artifact(out / name)
        log_figure(figure, "qa_auroc.png")
    finally:
        end_run()
    summary["mlflow_run_id"] = run.info.run_id
    atomic_write_json(out / "qa.json", summary)
    print(markdown)
    return json.loads(json.dumps(summary, default=str))


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| corruption | n | likelihood (prior) | reconstruction error | mean intensity |", "|---|---|---|---|---|"]
    for row in table.itertuples():
        best = max(METHODS, key=lambda m: getattr(row, m))
        cells = [f"**{getattr(row, m):.3f}**" if m == best else f"{getattr(row, m):.3f}" for m in METHODS]
        lines.append(f"| {row.corruption} | {row.n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
