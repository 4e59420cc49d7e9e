"""Objective screening probe: a few hundred pretraining steps of a candidate objective, then the frozen
``encoder_stats`` features probed on the committed validation patients (never the test split).

    .venv/bin/python benchmarks/objective_probe.py --objective vicreg --steps 616 --batch 32 --stages last

This is the fast screen behind docs/objective_selection.md. It uses the library's own parts (the vqmed model,
the objective room's objectives, the export's ``compute_features``, the benchmark's patient-grouped
``draw_labeled_subset``) with logistic regression (C by patient-grouped cross-validation inside the labeled
subset), but a compact loop over images held in memory with batched torch augmentation instead of the engine's
per-image MONAI chain, so that a candidate costs ~5 minutes on 2 cores. Finalists are re-run with the real
commands (``vqmed pretrain`` / ``vqmed export`` / ``vqmed benchmark --set evaluate_on=validation``). Every run
appends one JSON line to ``benchmarks/results/objective_probe.jsonl``: validation AUC at 10/25 per class and
1/2/10% of the labels, averaged over 5 draws.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from vqmed.data import ImageDataset, ImageSpec, patient_groups, read_manifest, resolve_data_root
from vqmed.downstream.sampling import Budget, draw_labeled_subset
from vqmed.export.features import compute_features
from vqmed.networks import build_model
from vqmed.training.objectives import build_objective

from acceptance_margins import FOUR_BUDGETS  # the four-budget average (this folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "objective_probe.jsonl"
BUDGETS = [Budget("per_class", 10), Budget("per_class", 25), Budget("fraction", 0.01), Budget("fraction", 0.02),
           Budget("fraction", 0.10)]


def random_views(x: torch.Tensor, min_area: float) -> torch.Tensor:
    """A batched random resized crop (area in [min_area, 1], aspect 0.85-1.18, +-10 degrees), gamma, contrast,
    brightness and noise; no flips (left and right matter on a chest film)."""
    b = x.shape[0]
    side = torch.empty(b).uniform_(min_area, 1.0).sqrt()
    aspect = torch.exp(torch.empty(b).uniform_(math.log(0.85), math.log(1.18)))
    sx, sy = side * aspect.sqrt(), side / aspect.sqrt()
    angle = torch.empty(b).uniform_(-10, 10) * math.pi / 180
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = sx * torch.cos(angle), -sy * torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = sx * torch.sin(angle), sy * torch.cos(angle)
    theta[:, 0, 2] = (1 - sx) * torch.empty(b).uniform_(-1, 1)
    theta[:, 1, 2] = (1 - sy) * torch.empty(b).uniform_(-1, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = y.clamp(1e-4, 1) ** torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.7), math.log(1.4)))
    mean = y.mean(dim=(2, 3), keepdim=True)
    y = (y - mean) * torch.empty(b, 1, 1, 1).uniform_(0.8, 1.2) + mean + torch.empty(b, 1, 1, 1).uniform_(-0.1, 0.1)
    return (y + 0.02 * torch.rand(b, 1, 1, 1) * torch.randn_like(y)).clamp(0, 1)


def probe(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, is_val: np.ndarray) -> dict[str, float]:
    """Mean validation AUC per budget: labeled subsets drawn by patient from the non-validation rows."""
    pool, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    mean, std = features[pool].mean(0), features[pool].std(0) + 1e-6  # scales from the unlabeled pool
    features = (features - mean) / std
    out = {}
    for budget in BUDGETS:
        aucs = []
        for draw in range(5):
            sub = pool[draw_labeled_subset(labels[pool], groups[pool], budget, 0, draw)]
            y, best = labels[sub], (-1.0, None)
            folds = StratifiedGroupKFold(min(3, int(np.bincount(y).min())), shuffle=True, random_state=draw)
            for c in (1e-3, 1e-2, 1e-1):
                oof = np.zeros(len(sub))
                for tr, te in folds.split(features[sub], y, groups[sub]):
                    clf = LogisticRegression(C=c, max_iter=300).fit(features[sub][tr], y[tr])
                    oof[te] = clf.decision_function(features[sub][te])
                best = max(best, (roc_auc_score(y, oof), c), key=lambda t: t[0])
            clf = LogisticRegression(C=best[1], max_iter=300).fit(features[sub], y)
            aucs.append(roc_auc_score(labels[val], clf.decision_function(features[val])))
        out[budget.name] = float(np.mean(aucs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="reconstruction", help="a registered objective name")
    parser.add_argument("--steps", type=int, default=616, help="pretraining steps (0 = the random initialisation)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (each gives the objective's views)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    parser.add_argument("--min-area", type=float, default=0.6, help="smallest crop area of the views")
    parser.add_argument("--params", default="{}", help="objective.params as JSON, e.g. '{\"weight\": 2.0}'")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    manifest = read_manifest(REPO / "data_manifests" / "chest_xray.csv")
    manifest = manifest[manifest["split"] == "train"].reset_index(drop=True)
    ds = ImageDataset(manifest, resolve_data_root(None), ImageSpec(64), cache_dir=REPO / ".vqmed_cache", progress=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    kept = manifest.iloc[ds.rows]
    labels = (kept["label"].to_numpy() == "PNEUMONIA").astype(int)
    groups = patient_groups(kept).to_numpy()
    listed = pd.read_csv(REPO / "data_manifests" / "chest_xray_validation_patients.csv", comment="#")
    is_val = np.isin(groups, listed["patient_id"].astype(str).to_numpy())

    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1)
    objective = build_objective(args.objective, json.loads(args.params), model, (1, 64, 64))
    params = [*model.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    # Like `vqmed pretrain` on the train split: every train image, labels unused (the validation patients'
    # images too; their labels are used only to score).
    train_rows = np.arange(len(images))
    start = time.time()
    model.train()
    for step in range(args.steps):
        # 50 linear warm-up steps times a cosine decay to 5% over the whole run (close to, not the same as,
        # the engine's lr_at, which starts the cosine after the warm-up; kept so the recorded rows reproduce)
        scale = min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        pick = np.random.default_rng([args.seed, step]).choice(train_rows, args.batch, replace=False)
        x = images[torch.from_numpy(pick)]
        min_area = args.min_area if objective.views > 1 else 0.9  # one view: the mild augmentation
        views = torch.stack([random_views(x, min_area) for _ in range(objective.views)], dim=1)
        loss, _ = objective(model, views)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start

    model.eval()
    with torch.no_grad():
        chunks = [compute_features(model, images[i:i + 256]) for i in range(0, len(images), 256)]
    features = np.concatenate([np.concatenate([c["encoder_grid"], c["encoder_grid_std"]], 1) for c in chunks]).astype(np.float32)
    aucs = probe(features, labels, groups, is_val)
    line = {"tag": args.tag or args.objective, "objective": args.objective, "params": json.loads(args.params),
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "min_area": args.min_area,
            "train_seconds": round(train_seconds), **{k: round(v, 4) for k, v in aucs.items()},
            "avg4": round(float(np.mean([aucs[b] for b in FOUR_BUDGETS])), 4)}
    print(json.dumps(line), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
