"""Convolutional vs ViT VQ-VAE on Kermany chest X-rays at 64 px, at equal wall-clock on this machine.

    .venv/bin/python benchmarks/vit_vqvae_compare.py                 # 10 minutes per model, 2 threads

Each model is the ``model:`` section of its pretraining config (``configs/pretrain/cxr_64.yaml``: the conv
``vqvae``; ``configs/pretrain/cxr_64_vit.yaml``: ``vit_vqvae``), trained with the ``reconstruction`` objective
and its config's batch size and peak learning rate for the same wall-clock budget on the Kermany train split
less the committed validation patients (``data_manifests/chest_xray_validation_patients.csv``). Everything is
scored on the validation patients' images; the test split is never read. Reported per model: training
images/s, encoding images/s (``compute_features``, the export's pass), validation PSNR / SSIM (MONAI's metrics,
reconstructions decoded from the code maps), codebook usage (share of codes used over the last complete epoch of
training, and on the validation images), and the validation AUC of logistic regression on the frozen
``encoder_stats`` features with 1% and 10% of the labels (``benchmarks/objective_probe.py``'s probe: labeled
subsets drawn by patient from the non-validation rows, C by patient-grouped cross-validation, 5 draws).
Like ``objective_probe.py`` it holds the images in memory and uses its batched mild augmentation instead of the
engine's per-image MONAI chain. Writes ``benchmarks/results/vit_vqvae_compare.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from vqmed.config import PretrainConfig, load_config
from vqmed.data import ImageDataset, ImageSpec, patient_groups, read_manifest, resolve_data_root
from vqmed.export.features import compute_features
from vqmed.networks import build_model
from vqmed.training.control import model_arguments
from vqmed.training.objectives import build_objective

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objective_probe import probe, random_views  # noqa: E402  (the screening probe's machinery, reused)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "pretrain" / "cxr_64.yaml", REPO / "configs" / "pretrain" / "cxr_64_vit.yaml"]


def load_split(size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """The Kermany train split at ``size`` px: images, labels (1 = pneumonia), patient groups, validation mask."""
    manifest = read_manifest(REPO / "data_manifests" / "chest_xray.csv")
    manifest = manifest[manifest["split"] == "train"].reset_index(drop=True)
    ds = ImageDataset(manifest, resolve_data_root(None), ImageSpec(size), cache_dir=REPO / ".vqmed_cache", progress=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    kept = manifest.iloc[ds.rows]
    labels = (kept["label"].to_numpy() == "PNEUMONIA").astype(int)
    groups = patient_groups(kept).to_numpy()
    listed = pd.read_csv(REPO / "data_manifests" / "chest_xray_validation_patients.csv", comment="#")
    return images, labels, groups, np.isin(groups, listed["patient_id"].astype(str).to_numpy())


@torch.no_grad()
def reconstruction_metrics(model: torch.nn.Module, images: torch.Tensor, batch: int = 128) -> dict[str, float]:
    """PSNR / SSIM (MONAI, data range 1) of the reconstructions decoded from the code maps, and code usage."""
    model.eval()
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0)
    used = set()
    for x in images.split(batch):
        codes = model.index_quantize(x)
        recon = model.decode_indices(codes).float().clamp(0, 1)
        psnr(recon, x)
        ssim(recon, x)
        used.update(codes.unique().tolist())
    k = model.quantizers[0].num_embeddings
    return {"val_psnr": float(psnr.aggregate()), "val_ssim": float(ssim.aggregate()), "val_code_usage": len(used) / k}


def train(cfg: PretrainConfig, images: torch.Tensor, val_images: torch.Tensor, seconds: float | None,
          steps: int | None, eval_every: int | None, seed: int) -> tuple[torch.nn.Module, dict]:
    """Train ``cfg``'s model with the reconstruction objective for ``seconds`` (or ``steps``)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model.name, **model_arguments(cfg))
    objective = build_objective("reconstruction", {}, model, tuple(images.shape[1:]))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batch, warmup = cfg.train.batch_size, cfg.train.warmup_steps
    steps_per_epoch = len(images) // batch
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    step, stats, curve = 0, None, []
    train_time, start = 0.0, time.monotonic()
    model.train()
    while True:
        progress = step / steps if steps else train_time / seconds
        if progress >= 1.0:
            break
        # linear warm-up, then a cosine decay to 5% over the budget (time or steps): the engine's lr_at
        scale = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * scale
        if step % steps_per_epoch == 0:
            if step:
                stats = model.quantizers[0].stats()  # usage over the epoch just completed
            model.quantizers[0].reset_stats()
            order = rng.permutation(len(images))
        pick = order[(step % steps_per_epoch) * batch:(step % steps_per_epoch + 1) * batch]
        tic = time.monotonic()
        loss, _ = objective(model, random_views(images[torch.from_numpy(pick)], 0.9).unsqueeze(1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
        optimizer.step()
        train_time += time.monotonic() - tic
        step += 1
        if eval_every and step % eval_every == 0:
            point = {"step": step, "train_seconds": round(train_time, 1), "loss": round(loss.item(), 5),
                     **reconstruction_metrics(model, val_images)}
            model.train()
            curve.append(point)
            print(json.dumps(point), flush=True)
    stats = stats or model.quantizers[0].stats()
    return model, {"steps": step, "epochs": step / steps_per_epoch, "train_seconds": train_time,
                   "wall_seconds": time.monotonic() - start, "train_images_per_s": step * batch / train_time,
                   "train_code_usage": stats["usage_fraction"], "perplexity": stats["perplexity"], "curve": curve}


def encode_speed(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, float]:
    """The frozen ``encoder_stats`` features of every image and the export pass's images/s."""
    model.eval()
    start = time.monotonic()
    chunks = [compute_features(model, images[i:i + batch]) for i in range(0, len(images), batch)]
    rate = len(images) / (time.monotonic() - start)
    return np.concatenate([np.concatenate([c["encoder_grid"], c["encoder_grid_std"]], 1) for c in chunks]).astype(np.float32), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, default=CONFIGS, help="pretraining configs (their model: sections)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-clock per model")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead (tuning, smoke runs)")
    parser.add_argument("--eval-every", type=int, default=None, help="also print validation PSNR every N steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-probe", action="store_true", help="skip the features and the probe")
    parser.add_argument("--set", action="append", default=[], help="override for every config, e.g. train.lr=1e-3")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vit_vqvae_compare.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, labels, groups, is_val = load_split(64)
    pool, val = images[torch.from_numpy(~is_val)], images[torch.from_numpy(is_val)]
    print(f"{len(pool)} training images (validation patients held out), {len(val)} validation images", flush=True)
    rows = []
    for path in args.configs:
        cfg = load_config(PretrainConfig, path, ["objective.name=reconstruction", "objective.params={}", *args.set])
        model, row = train(cfg, pool, val, None if args.steps else args.minutes * 60, args.steps, args.eval_every,
                           args.seed)
        row = {"config": str(path.relative_to(REPO) if path.is_absolute() else path), "model": cfg.model.name,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "batch_size": cfg.train.batch_size,
               "lr": cfg.train.lr, **row, **reconstruction_metrics(model, val)}
        if not args.no_probe:
            features, row["encode_images_per_s"] = encode_speed(model, images)
            aucs = probe(features, labels, groups, is_val)
            row["auc_1pct"], row["auc_10pct"] = aucs["1%"], aucs["10%"]
            row["auc_all_budgets"] = aucs
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)

    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, {os.cpu_count()} cores visible"
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    print(f"\nKermany train split at 64 px, {budget} per model, {machine}; scored on the validation patients\n")
    print("| model | params | steps | train img/s | encode img/s | val PSNR | val SSIM | codes used (train / val) "
          "| AUC 1% | AUC 10% |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['model']}` | {r['params_M']:.2f} M | {r['steps']} | {r['train_images_per_s']:.1f} "
              f"| {r.get('encode_images_per_s', float('nan')):.0f} | {r['val_psnr']:.2f} dB | {r['val_ssim']:.3f} "
              f"| {r['train_code_usage']:.0%} / {r['val_code_usage']:.0%} "
              f"| {r.get('auc_1pct', float('nan')):.3f} | {r.get('auc_10pct', float('nan')):.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "vit_vqvae_compare", "machine": machine, "budget": budget,
                                    "settings": {k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
