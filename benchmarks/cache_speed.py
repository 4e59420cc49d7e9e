"""Cache speed: first vs second pass over N Kermany chest X-rays with a fresh cache folder.

A pass = build an ``ImageDataset`` (hash files, decode what the cache lacks) + read every item once,
i.e. what a training epoch costs. The first pass decodes (PIL + MONAI chain) and writes the cache;
the second finds every image in the memory-mapped cache. Baseline = the first pass, same run.

    .venv/bin/python benchmarks/cache_speed.py [--n 1000] [--image-size 64] [--out benchmarks/results/cache_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vqmed.data import ImageDataset, ImageSpec, read_manifest, resolve_data_root

REPO = Path(__file__).resolve().parents[1]


def one_pass(df, data_root: Path, spec: ImageSpec, cache: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    ds = ImageDataset(df, data_root, spec, cache_dir=cache, progress=False)
    total = 0.0
    for i in range(len(ds)):
        total += float(ds[i]["image"].sum())  # touch every pixel, as a training epoch would
    return time.perf_counter() - start, {**ds.stats, "checksum": round(total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of Kermany images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cache_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data_root = resolve_data_root(args.data_root)
    df = read_manifest(REPO / "data_manifests" / "chest_xray.csv")
    # A fixed spread over both splits and labels (no randomness: same images every run).
    df = df.iloc[np.linspace(0, len(df) - 1, args.n).astype(int)].reset_index(drop=True)
    spec = ImageSpec(args.image_size)
    with tempfile.TemporaryDirectory(prefix="vqmed-cache-bench-") as tmp:
        first, stats1 = one_pass(df, data_root, spec, Path(tmp))
        second, stats2 = one_pass(df, data_root, spec, Path(tmp))
    assert stats1["checksum"] == stats2["checksum"], "cached images differ from decoded ones"
    ratio = first / second
    result = {
        "benchmark": "cache_speed", "images": args.n, "image_size": args.image_size, "threads": args.threads,
        "first_pass_s": round(first, 3), "second_pass_s": round(second, 3), "speedup": round(ratio, 1),
        "first_pass_ms_per_image": round(1000 * first / args.n, 3), "second_pass_ms_per_image": round(1000 * second / args.n, 3),
        "decoded_first": stats1["decoded"], "decoded_second": stats2["decoded"], "cached_second": stats2["cached"],
        "target_speedup": 5.0, "passed": ratio >= 5.0, "python": platform.python_version(), "machine": platform.machine(),
    }
    print(f"{'pass':<8}{'seconds':>10}{'ms/image':>10}{'decoded':>9}")
    print(f"{'first':<8}{first:>10.3f}{1000 * first / args.n:>10.3f}{stats1['decoded']:>9}")
    print(f"{'second':<8}{second:>10.3f}{1000 * second / args.n:>10.3f}{stats2['decoded']:>9}")
    print(f"speedup {ratio:.1f}x (target >= 5x): {'PASS' if ratio >= 5 else 'FAIL'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
