"""VQ-VAE vs VQ-VAE-2 at equal wall-clock and equal bottom latent grid on Kermany chest X-rays.

Trains ``vqvae`` (one code map at 1/4 resolution) and ``vqvae2`` (the same bottom map plus a top map
at 1/8) for the same wall-clock budget each, then reports validation PSNR on held-out test-split images.

    .venv/bin/python benchmarks/hierarchical_psnr.py --minutes 3
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vqmed.networks import build_model, vqvae_loss

REPO = Path(__file__).resolve().parents[1]


def load_images(root: Path, split: str, n: int, size: int) -> torch.Tensor:
    """``n`` grey images of one Kermany split, evenly spread over the sorted file list, in [0, 1]."""
    paths = sorted(glob.glob(str(root / "chest_xray" / split / "*" / "*.jpeg")))
    if len(paths) < n:
        raise SystemExit(f"need {n} images under {root / 'chest_xray' / split}, found {len(paths)}")
    images = []
    for i in np.linspace(0, len(paths) - 1, n).astype(int):
        with Image.open(paths[i]) as im:
            im.draft("L", (size, size))
            images.append(np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32))
    return torch.from_numpy(np.stack(images) / 255.0).unsqueeze(1)


@torch.no_grad()
def psnr(model: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> float:
    """Mean per-image PSNR (data range 1) of the reconstructions from the code maps."""
    model.eval()
    values = []
    for x in images.split(batch):
        recon = model.decode_indices(model.index_quantize(x)).clamp(0, 1)
        values.append(10 * torch.log10(1.0 / F.mse_loss(recon, x, reduction="none").flatten(1).mean(1)))
    model.train()
    return float(torch.cat(values).mean())


def train(
    name: str, params: dict, train_x: torch.Tensor, val_x: torch.Tensor, seconds: float, batch: int, lr: float
) -> dict:
    torch.manual_seed(0)
    model = build_model(name, **params)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    steps, epochs, losses, stats = 0, 0, [], None
    start, cpu_start = time.monotonic(), time.process_time()
    while time.monotonic() - start < seconds:
        for q in model.quantizers:
            q.reset_stats()
        complete = True
        for idx in torch.randperm(len(train_x), generator=g).split(batch):
            if time.monotonic() - start >= seconds:
                complete = False
                break
            x = train_x[idx]
            loss, terms, _ = vqvae_loss(model, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            losses.append(terms["recon_mse"].item())
        if complete:
            epochs += 1
            stats = [q.stats() for q in model.quantizers]  # usage over the last complete epoch
    wall, cpu = time.monotonic() - start, time.process_time() - cpu_start
    stats = stats or [q.stats() for q in model.quantizers]
    return {
        "model": name,
        "levels": model.levels,
        "latent_shape": model.latent_shape(train_x.shape[-1]),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "steps": steps,
        "epochs": epochs,
        "train_seconds": wall,
        "cpu_seconds": cpu,
        "images_per_s": steps * batch / wall,
        "train_mse_last": float(np.mean(losses[-10:])) if losses else float("nan"),
        "val_psnr": psnr(model, val_x),
        "usage_fraction": [s["usage_fraction"] for s in stats],  # last complete epoch, per level
        "perplexity": [s["perplexity"] for s in stats],
        "config": model.config,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget per model")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-embeddings", type=int, default=512)
    parser.add_argument(
        "--data-root", type=Path, default=Path(os.environ.get("VQMED_DATA_ROOT", REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hierarchical_psnr.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_x = load_images(args.data_root, "train", args.train_images, args.image_size)
    val_x = load_images(args.data_root, "test", args.val_images, args.image_size)
    common = dict(downsample=4, num_embeddings=args.num_embeddings)  # same bottom grid: 1/4 resolution
    runs = [
        train("vqvae", common, train_x, val_x, args.minutes * 60, args.batch_size, args.lr),
        train("vqvae2", dict(common, top_downsample=2), train_x, val_x, args.minutes * 60, args.batch_size, args.lr),
    ]
    base = runs[0]["val_psnr"]
    print(
        f"\nKermany {args.image_size}x{args.image_size}, {args.train_images} train / {args.val_images} val images, "
        f"{args.minutes:g} min each, batch {args.batch_size}, {args.threads} threads"
    )
    print(f"{'model':8s} {'codes':>16s} {'steps':>6s} {'img/s':>7s} {'val PSNR':>9s} {'vs vqvae':>9s} {'usage':>12s}")
    for r in runs:
        shape = " + ".join(
            "x".join(map(str, s)) for s in (r["latent_shape"] if r["levels"] == 2 else [r["latent_shape"]])
        )
        usage = "/".join(f"{u:.2f}" for u in r["usage_fraction"])
        print(
            f"{r['model']:8s} {shape:>16s} {r['steps']:6d} {r['images_per_s']:7.1f} {r['val_psnr']:9.2f} "
            f"{r['val_psnr'] - base:+9.2f} {usage:>12s}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "hierarchical_psnr",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs,
        "psnr_gain_vqvae2_over_vqvae_db": runs[1]["val_psnr"] - base,
        "note": "wall-clock budgets on a shared machine: compare steps and cpu_seconds too",
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
