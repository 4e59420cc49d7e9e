"""Export speed: studies/s of vqmed's export vs MONAI's ``VQVAE.index_quantize`` at 128x128, same run.

Both run on the same real Kermany chest X-rays, fp32, batch 32, 2 torch threads, weights as
initialised (speed does not depend on training):

* ``monai_index_quantize`` (baseline): ``monai.networks.nets.VQVAE`` with channels (64, 128), 2
  residual layers, residual channels (64, 128), factor-4 down/upsampling, a 512 x 64 codebook;
  ``index_quantize`` on images already in memory.
* ``vqmed_features``: :func:`vqmed.export.compute_features` (code map + quantized/continuous means +
  bag of codes) of vqmed's model on the same in-memory batches.
* ``vqmed_export``: :func:`vqmed.export.export_manifest` end to end: read and decode the JPEGs,
  encode, write the sharded store (fresh store each pass).

vqmed's model: ``model`` of ``configs/pretrain/cxr_128.yaml`` if it exists, else the networks'
default ``vqvae`` (what ``configs/pretrain/cxr_64.yaml`` uses). Passes alternate between the
contenders and the median pass is reported, to even out the load of a shared machine.

    .venv/bin/python benchmarks/export_speed.py [--n 512] [--passes 3] [--out benchmarks/results/export_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.networks.nets import VQVAE as MonaiVQVAE

from vqmed.data import ImageDataset, ImageSpec, read_manifest, resolve_data_root
from vqmed.export import compute_features, export_manifest
from vqmed.networks import build_model
from vqmed.models_io.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SIZE = 128


def vqmed_model_settings() -> tuple[str, dict, str]:
    """(model name, params, where they came from)."""
    config = REPO / "configs" / "pretrain" / "cxr_128.yaml"
    if config.is_file():
        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        return model.get("name", "vqvae"), dict(model.get("params") or {}), str(config.relative_to(REPO))
    return "vqvae", {}, "vqmed.networks defaults (no configs/pretrain/cxr_128.yaml)"


def baseline_model() -> torch.nn.Module:
    """MONAI's VQVAE in the baseline configuration (factor 4: two stride-2 levels)."""
    return MonaiVQVAE(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(64, 128), num_res_layers=2,
        num_res_channels=(64, 128), downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=512, embedding_dim=64,
    ).eval()


def timed_pass(fn, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            fn(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="number of Kermany images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3, help="timed passes per contender (median reported)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VQMED_ID_SALT", "export-speed-benchmark")  # no per-user salt file needed

    data_root = resolve_data_root(args.data_root)
    manifest = read_manifest(REPO / "data_manifests" / "chest_xray.csv")
    # A fixed spread over both splits and labels (same images every run).
    manifest = manifest.iloc[np.linspace(0, len(manifest) - 1, args.n).astype(int)].reset_index(drop=True)
    ds = ImageDataset(manifest, data_root, ImageSpec(SIZE), progress=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    batches = list(images.split(args.batch_size))

    name, params, source = vqmed_model_settings()
    params.update(spatial_dims=2, in_channels=1, out_channels=1)
    torch.manual_seed(0)
    ours = build_model(name, **params).eval()
    theirs = baseline_model()
    codes_ours = compute_features(ours, batches[0])["codes"]
    with torch.no_grad():
        codes_theirs = theirs.index_quantize(batches[0])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    times: dict[str, list[float]] = {"monai_index_quantize": [], "vqmed_features": [], "vqmed_export": []}
    with tempfile.TemporaryDirectory(prefix="vqmed-export-bench-") as tmp:
        tmp = Path(tmp)
        ckpt = save_checkpoint({"model_name": name, "model_config": ours.config, "model_state": ours.state_dict(),
                                "step": 0, "config": {"data": {"image_size": SIZE, "spatial_dims": 2, "channels": 1}}},
                               tmp / "ckpt")
        rows = tmp / "manifest.csv"
        manifest.to_csv(rows, index=False)
        # Warm-up (allocator, oneDNN kernel selection) outside the timings.
        timed_pass(theirs.index_quantize, batches[:2])
        timed_pass(lambda b: compute_features(ours, b), batches[:2])
        for k in range(args.passes):
            times["monai_index_quantize"].append(timed_pass(theirs.index_quantize, batches))
            times["vqmed_features"].append(timed_pass(lambda b: compute_features(ours, b), batches))
            summary = export_manifest(ckpt, rows, tmp / f"store{k}", data_root, batch_size=args.batch_size,
                                      progress=False, shard_size=1024)
            assert summary["exported"] == args.n, summary
            times["vqmed_export"].append(summary["seconds"])

    n = len(images)
    rate = {key: n / statistics.median(values) for key, values in times.items()}
    base = rate["monai_index_quantize"]
    result = {
        "benchmark": "export_speed",
        "images": n, "image_size": SIZE, "batch_size": args.batch_size, "threads": args.threads, "dtype": "float32",
        "passes": args.passes, "device": "cpu",
        "baseline": "monai VQVAE channels=(64,128) num_res_layers=2 num_res_channels=(64,128) factor 4, 512x64 codebook, index_quantize",
        "vqmed_model": {"name": name, "params_from": source, "config": ours.config, "parameters": count(ours),
                        "code_map": list(codes_ours.shape[1:])},
        "monai_model": {"parameters": count(theirs), "code_map": list(codes_theirs.shape[1:])},
        "studies_per_s": {key: round(value, 1) for key, value in rate.items()},
        "ratio_vs_monai": {key: round(value / base, 2) for key, value in rate.items()},
        "pass_seconds": {key: [round(v, 3) for v in values] for key, values in times.items()},
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    print(f"export speed at {SIZE}x{SIZE}, {n} Kermany images, batch {args.batch_size}, fp32, {args.threads} threads "
          f"(median of {args.passes} passes)")
    print(f"{'contender':<24}{'studies/s':>12}{'vs MONAI':>10}   what")
    what = {
        "monai_index_quantize": "MONAI VQVAE.index_quantize, images in memory (baseline)",
        "vqmed_features": "vqmed compute_features (codes + 3 pooled features), images in memory",
        "vqmed_export": "vqmed export_manifest end to end (JPEG decode + encode + sharded store)",
    }
    for key, value in rate.items():
        print(f"{key:<24}{value:>12.1f}{value / base:>9.2f}x   {what[key]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
