"""Speed: vqmed's default chest X-ray model vs MONAI's VQ-VAE, training, quality, encoding, data, memory.

Everything is measured in one run, on real Kermany chest X-rays, against the baseline of issue #7:
``monai.networks.nets.VQVAE`` with channels (64, 128), 2 residual layers (residual channels (64, 128)),
factor-4 down/upsampling and a 512 x 64 codebook (``model.name: monai_vqvae`` in a vqmed config, i.e.
:class:`vqmed.networks.MonaiVQVAE`, which builds exactly that network). vqmed's contender is the
``model`` section of ``configs/pretrain/cxr_64.yaml`` at 64 px and of ``configs/pretrain/cxr_128.yaml``
at 128 and 256 px (``params: {}`` = the networks' defaults).

Sections of the table and of the JSON:

* ``train``: training images/s at each size, batch 32, images in memory, the Trainer's step
  (AdamW with the config's lr, MSE + quantizer losses, gradient clipping, ``channels_last`` as the
  config says, for both contenders). Warm-up steps are not timed. Each contender runs in its own
  process; rounds alternate the order (vqmed first, then the baseline first, ...) so both see the
  same load on a shared machine. Ratio = vqmed / baseline.
* ``psnr``: the real trainer (``vqmed.training.engine.Trainer(cfg).run()``, what ``pretrain(cfg)`` does)
  on ``cxr_128.yaml`` with ``train.max_minutes=--minutes`` for each contender (the baseline via
  ``model.name=monai_vqvae`` and the parameters above), same seed, same data, same validation images
  (their paths are hashed in the JSON); validation PSNR (MONAI's ``PSNRMetric``) after the same budget.
* ``encode``: no-grad encoding images/s at each size: ``index_quantize`` (MONAI's own for the baseline,
  the issue's measure) and :func:`vqmed.export.compute_features` (what ``vqmed export`` runs per batch)
  for both, each contender in its training precision and memory format, without ``torch.compile``.
  ``ratio`` = vqmed's export features / the baseline's ``index_quantize`` (vqmed does more work).
* ``data``: one epoch of N images through vqmed's ``ImageDataset`` + ``DataLoader`` (worker count of the
  config) and the objective's batched augmentation, with a cold cache (fresh folder: decode + write) and a
  warm one; and the share of each training step spent waiting for data (``epoch/data_wait_fraction`` of a real short
  pretrain run, read from its checkpoint history), epoch 1 apart from the later epochs.
* ``memory``: peak memory of every contender's process (CPU: ``ru_maxrss``; CUDA:
  ``torch.cuda.max_memory_allocated``), for training, encoding and the real training run.

On ``--device cuda`` vqmed runs the Trainer's CUDA path (``train.amp=bf16``, ``train.compile=true``,
``channels_last``); the baseline stays fp32 as in the issue, and a third contender ``baseline_amp``
(MONAI with bf16 autocast, no compile) shows how much of the gain AMP alone explains. vqmed's
wall-clock budget in ``psnr`` includes ``torch.compile``'s compilation, as a real run's would; the
augmentation runs batched on the GPU there, and the DataLoader workers only read the cache.

    .venv/bin/python benchmarks/speed.py [--minutes 5] [--sizes 64 128 256] [--device cpu|cuda]
        [--out benchmarks/results/speed.json] [--quick]

``--quick`` shrinks every budget (a smoke test, < 1 minute on 2 cores); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "chest_xray.csv"
CONFIG_64 = REPO / "configs" / "pretrain" / "cxr_64.yaml"
CONFIG_128 = REPO / "configs" / "pretrain" / "cxr_128.yaml"
# Issue #7's baseline: MONAI's VQVAE, channels (64, 128), 2 residual layers, residual channels (64, 128)
# (MONAI's default: = channels), factor 4, a 512 x 64 codebook; MONAI's own defaults for the rest.
BASELINE_PARAMS = {"channels": [64, 128], "num_res_layers": 2, "num_res_channels": [64, 128], "downsample": 4,
                   "num_embeddings": 512, "embedding_dim": 64}
WAIT_TARGET = 0.10  # acceptance: after the first epoch, waiting for data < 10% of the step time
RATIO_TARGET = 3.0  # acceptance: >= 3x the baseline's images/s at 128


# ============================================================================================ configs
def config_path(size: int) -> Path:
    """vqmed's default config for a size: cxr_64 at 64 px and below, cxr_128 above."""
    return CONFIG_64 if size <= 64 else CONFIG_128


def contender_overrides(contender: str, device: str) -> list[str]:
    """``--set`` overrides that turn a cxr config into one contender (model + precision settings)."""
    # Model against model at the same objective: reconstruction (MONAI's VQVAE has no encoder stages for
    # vicreg, the cxr configs' objective); the objective's own cost is the pipeline's business.
    out = [f"train.device={device}", "objective.name=reconstruction", "objective.params={}"]
    if contender.startswith("baseline"):
        out += ["model.name=monai_vqvae", "model.params=" + json.dumps(BASELINE_PARAMS), "train.compile=false"]
        # The issue's baseline is fp32; ``baseline_amp`` (CUDA only) gives MONAI's net bf16 autocast too.
        out.append("train.amp=bf16" if contender == "baseline_amp" else "train.amp='off'")
    elif device == "cuda":
        out += ["train.amp=bf16", "train.compile=true", "train.channels_last=true"]
    return out


def load_cfg(path: Path, overrides: list[str]):
    from vqmed.config import PretrainConfig, load_config

    return load_config(PretrainConfig, path, overrides)


# ============================================================================================ workers
# Every measurement runs in a fresh process: peak memory is then the contender's own, and one
# contender's allocator / oneDNN caches cannot help or hurt the next.


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def prepared_model(spec: dict[str, Any]):
    """(cfg, model, net, autocast factory, channels_last) as the Trainer would set them up."""
    import torch

    from vqmed.networks import build_model
    from vqmed.training.control import model_arguments

    cfg = load_cfg(Path(spec["config"]), spec["overrides"])
    device = spec["device"]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, **model_arguments(cfg)).to(device)
    channels_last = cfg.train.channels_last and cfg.data.spatial_dims == 2
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if (cfg.train.compile and device == "cuda" and spec.get("compile", True)) else model
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if device == "cuda" else None

    def autocast():
        return torch.autocast(device_type="cuda", dtype=amp) if amp else contextlib.nullcontext()

    settings = {"model": cfg.model.name, "config": str(Path(spec["config"]).relative_to(REPO)),
                "channels_last": channels_last, "amp": str(amp).replace("torch.", "") if amp else "off",
                "compile": net is not model, "parameters": sum(p.numel() for p in model.parameters()),
                "model_config": model.config}
    return cfg, model, net, autocast, channels_last, settings


def load_images(spec: dict[str, Any]):
    import torch

    images = torch.load(spec["images"], weights_only=True).float().mul_(1.0 / 255.0)
    return images.pin_memory() if spec["device"] == "cuda" else images  # as the Trainer's loader pins batches


def to_device(batch, device: str, channels_last: bool):
    import torch

    x = batch.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def timed_loop(fn, items: list, device: str, seconds: float, min_iters: int, warmup: int) -> dict[str, Any]:
    """Run ``fn`` over ``items`` (cycled): ``warmup`` untimed calls (fewer when they take over 15 s), then
    timed calls until ``seconds`` have passed and at least ``min_iters`` were made (one when a call takes
    over 5 s, e.g. the baseline at 256 px on CPU)."""
    start, done = time.perf_counter(), 0
    while done < warmup:
        fn(items[done % len(items)])
        sync(device)
        done += 1
        if device == "cpu" and time.perf_counter() - start > 15.0:
            break  # one-off costs (oneDNN kernel choice, optimiser state) are small next to such a step
    warm_s = time.perf_counter() - start
    min_iters = 1 if warm_s / max(done, 1) > 5.0 else min_iters
    t0, n, images = time.perf_counter(), 0, 0
    while True:
        batch = items[(done + n) % len(items)]
        fn(batch)
        n += 1
        images += batch.shape[0]
        sync(device)
        if n >= min_iters and time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return {"images": images, "steps": n, "seconds": elapsed, "images_per_s": images / elapsed,
            "warmup_steps": done, "warmup_seconds": warm_s}


def train_speed(spec: dict[str, Any], images) -> dict[str, Any]:
    import torch
    from torch import nn

    from vqmed.networks import vqvae_loss
    from vqmed.training.control import lr_at

    device = spec["device"]
    cfg, model, net, autocast, channels_last, settings = prepared_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # The Trainer's warm-up + cosine schedule over a nominal 10 epochs of the Kermany train split.
    total = 10 * 5000 // spec["batch_size"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total, cfg) / cfg.train.lr)
    batches = [b for b in images.split(spec["batch_size"]) if b.shape[0] == spec["batch_size"]]  # drop_last
    losses: list[float] = []

    def step(batch) -> None:
        # The Trainer's _train_step (vqmed/training/engine.py) on batches already in memory.
        x = to_device(batch, device, channels_last)
        with autocast():
            loss, parts, _ = vqvae_loss(net, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())  # the Trainer reads the loss every step too (a CUDA sync)

    net.train()
    out = timed_loop(step, batches, device, spec["train_seconds"], spec["min_steps"], spec["warmup"])
    return {**out, "settings": settings, "first_loss": losses[0], "last_loss": losses[-1]}


def encode_speed(spec: dict[str, Any], images) -> dict[str, Any]:
    import torch

    from vqmed.export import compute_features
    from vqmed.networks import MonaiVQVAE

    device = spec["device"]
    # No torch.compile: ``vqmed export`` runs the model as loaded from the checkpoint.
    _, model, _, autocast, channels_last, settings = prepared_model({**spec, "compile": False})
    settings["compile"] = False
    model.eval()
    batches = list(images.split(spec["batch_size"]))
    # The baseline's own MONAI ``VQVAE.index_quantize`` (what the issue timed), not the adapter's.
    encode = model.net.index_quantize if isinstance(model, MonaiVQVAE) else model.index_quantize

    def index_quantize(batch) -> None:
        with torch.no_grad(), autocast():
            encode(to_device(batch, device, channels_last)).cpu()

    def features(batch) -> None:
        with autocast():
            compute_features(model, to_device(batch, device, channels_last))

    args = (batches, device, spec["encode_seconds"], spec["min_steps"], spec["warmup"])
    return {"index_quantize": timed_loop(index_quantize, *args), "export_features": timed_loop(features, *args),
            "settings": settings}


def worker_speed(spec: dict[str, Any]) -> dict[str, Any]:
    """Encoding first, then training, in one process: the process peak after encoding is the encoder's,
    the peak after training (which holds activations, gradients and optimiser state) the trainer's."""
    import torch

    device = spec["device"]
    images = load_images(spec)
    out: dict[str, Any] = {"rss_before_model_mb": rss_mb()}
    if "encode" in spec["parts"]:
        out["encode"] = encode_speed(spec, images)
        out["encode"]["peak_memory_mb"] = peak_memory_mb(device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if "train" in spec["parts"]:
        out["train"] = train_speed(spec, images)
        out["train"]["peak_memory_mb"] = peak_memory_mb(device)
    out["load_average_after"] = list(os.getloadavg())
    return out


def _val_fingerprint(cfg, manifest) -> tuple[int, str]:
    """Number and SHA-256 of the validation image paths the Trainer holds out (same rule, same seed)."""
    from vqmed.data import split_by_patient

    _, val_rows = split_by_patient(manifest, cfg.data.val_fraction, cfg.seed)
    paths = sorted(val_rows["path"].astype(str))
    return len(paths), hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


def worker_psnr(spec: dict[str, Any]) -> dict[str, Any]:
    from vqmed.training.engine import Trainer

    cfg = load_cfg(Path(spec["config"]), spec["overrides"])
    trainer = Trainer(cfg, resume=False)  # exactly what vqmed.training.pretrain(cfg) does
    n_val, val_hash = _val_fingerprint(cfg, trainer.manifest)
    assert n_val == len(trainer.val_set), "validation split differs from the Trainer's"
    start = time.perf_counter()
    summary = trainer.run()
    keys = ("val_psnr", "val_ssim", "val_mse", "codebook_usage", "perplexity", "steps", "epochs",
            "train_images_per_second")
    return {**{k: summary[k] for k in keys}, "images_seen": summary["steps"] * cfg.train.batch_size,
            "budget_minutes": cfg.train.max_minutes, "run_seconds": time.perf_counter() - start,
            "val_images": n_val, "val_paths_sha256": val_hash, "train_images": len(trainer.train_set),
            "model": cfg.model.name, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
            "amp": cfg.train.amp if spec["device"] == "cuda" else "off",
            "compile": bool(cfg.train.compile and spec["device"] == "cuda"),
            "peak_memory_mb": peak_memory_mb(spec["device"]), "load_average_after": list(os.getloadavg())}


def worker_data(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from vqmed.data import ImageDataset, ImageSpec, read_manifest, resolve_data_root
    from vqmed.data.augment import BatchAugmentation
    from vqmed.training.objectives import OBJECTIVES, objective_params

    cfg = load_cfg(Path(spec["config"]), spec["overrides"])
    torch.set_num_threads(spec["threads"])
    root = resolve_data_root(spec["data_root"])
    manifest = read_manifest(MANIFEST)
    manifest = manifest[manifest["split"] == "train"]
    manifest = manifest.iloc[np.linspace(0, len(manifest) - 1, spec["images"]).astype(int)].reset_index(drop=True)
    image_spec = ImageSpec.from_config(cfg.data)

    objective = OBJECTIVES[cfg.objective.name]
    chain = objective.augmentation_of(objective_params(cfg.objective.name, cfg.objective.params))
    augment = BatchAugmentation(image_spec.spatial_dims, chain) if cfg.data.augment else None

    def one_run(cache: Path) -> dict[str, Any]:
        """A fresh process's view: build the dataset (hash; decode what the cache lacks), then one epoch."""
        # seeded in each run, so the cold and the warm epoch draw the same views and their checksums compare
        generator = torch.Generator().manual_seed(cfg.seed)
        t0 = time.perf_counter()
        ds = ImageDataset(manifest, root, image_spec, cache_dir=cache, progress=False)
        built = time.perf_counter() - t0
        loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.train.num_workers, pin_memory=spec["device"] == "cuda",
                            generator=torch.Generator().manual_seed(0))
        t1, total = time.perf_counter(), 0.0
        for batch in loader:
            images = batch["image"]
            if augment is not None:  # as the Trainer does: the objective's views, batched, in this process
                images = augment(images, objective.views, generator)
            total += float(images.sum())  # touch every pixel, as a training step would
        epoch = time.perf_counter() - t1
        return {"build_s": built, "epoch_s": epoch, "total_s": built + epoch, "decoded": ds.stats["decoded"],
                "cached": ds.stats["cached"], "checksum": round(total, 1)}

    with tempfile.TemporaryDirectory(prefix="vqmed-speed-cache-") as tmp:
        cold = one_run(Path(tmp))  # a fresh cache folder: every image is decoded (= no cache)
        warm = one_run(Path(tmp))  # the same folder again: every image comes from the cache
    out = {"images": spec["images"], "image_size": cfg.data.image_size, "batch_size": cfg.train.batch_size,
           "num_workers": cfg.train.num_workers, "augment": chain if augment is not None else None, "cold_cache": cold,
           "warm_cache": warm, "cold_ms_per_image": 1000 * cold["total_s"] / spec["images"],
           "warm_ms_per_image": 1000 * warm["total_s"] / spec["images"],
           "speedup": cold["total_s"] / warm["total_s"], "peak_memory_mb": peak_memory_mb("cpu")}
    out["wait"] = data_wait(spec)  # after the peak above, which is the data epoch's alone
    return out


def data_wait(spec: dict[str, Any]) -> dict[str, Any]:
    """A real short pretraining run; the Trainer's per-epoch share of step time spent waiting for data."""
    from vqmed.models_io.checkpoint import load_checkpoint
    from vqmed.training.engine import Trainer

    cfg = load_cfg(Path(spec["config"]), spec["wait_overrides"])
    summary = Trainer(cfg, resume=False).run()
    # The Trainer keeps its metric history in the checkpoint (step, value); epoch metrics are logged
    # once per epoch at the epoch's last step, so the series line up epoch by epoch.
    history = load_checkpoint(Path(summary["checkpoint"]))["history"]
    wait = [v for _, v in history["epoch/data_wait_fraction"]]
    rate = [v for _, v in history["epoch/train_images_per_second"]]
    epochs = [{"epoch": i + 1, "data_wait_fraction": w, "train_images_per_second": r} for i, (w, r) in
              enumerate(zip(wait, rate))]
    return {"config": str(Path(spec["config"]).relative_to(REPO)), "image_size": cfg.data.image_size,
            "batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers,
            "images_per_epoch": summary["steps"] // max(summary["epochs"], 1) * cfg.train.batch_size,
            "epochs": epochs, "first_epoch": wait[0] if wait else None,
            "later_epochs_mean": sum(wait[1:]) / len(wait[1:]) if len(wait) > 1 else None,
            "later_epochs_max": max(wait[1:]) if len(wait) > 1 else None,
            "load_average_after": list(os.getloadavg())}


WORKERS = {"speed": worker_speed, "psnr": worker_psnr, "data": worker_data}


def run_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import importlib

    # vqmed before torch, as in ``vqmed pretrain``: a process-level setting vqmed makes at import
    # (e.g. an OpenMP environment variable, read once when torch loads) then applies here too.
    importlib.import_module("vqmed")
    import torch

    torch.set_num_threads(spec["threads"])
    result = WORKERS[spec["kind"]](spec)
    Path(spec["result"]).write_text(json.dumps(result, default=str))


# ============================================================================================= parent
class Runner:
    """Starts one worker process per measurement and collects its JSON."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp, self.args, self.count = tmp, args, 0
        self.env = {**os.environ, "CI": "1", "PYTHONUNBUFFERED": "1"}
        self.env.setdefault("VQMED_ID_SALT", "speed-benchmark")  # no per-user salt file needed
        if args.omp_wait_policy:
            # Read once when torch loads: spinning OpenMP threads stall when a 2-core machine is busy.
            self.env["OMP_WAIT_POLICY"] = args.omp_wait_policy

    def __call__(self, kind: str, label: str, **spec: Any) -> dict[str, Any]:
        self.count += 1
        spec = {"kind": kind, "threads": self.args.threads, "device": self.args.device, **spec,
                "result": str(self.tmp / f"result{self.count}.json")}
        path = self.tmp / f"spec{self.count}.json"
        path.write_text(json.dumps(spec))
        print(f"  [{time.strftime('%H:%M:%S')}] {kind:<6} {label} ...", end="", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], cwd=REPO, env=self.env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(" FAILED")
            raise RuntimeError(f"{kind} worker for {label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        print(f" {time.perf_counter() - start:.0f} s", flush=True)
        return json.loads(Path(spec["result"]).read_text())


def speed_images(size: int, n: int, root: Path, cache: Path | None, tmp: Path) -> Path:
    """``n`` Kermany train images at ``size`` px as a uint8 tensor file (a fixed spread, same every run)."""
    import numpy as np
    import torch

    from vqmed.data import ImageDataset, ImageSpec, read_manifest

    manifest = read_manifest(MANIFEST)
    manifest = manifest[manifest["split"] == "train"]
    manifest = manifest.iloc[np.linspace(0, len(manifest) - 1, n).astype(int)].reset_index(drop=True)
    ds = ImageDataset(manifest, root, ImageSpec(size), cache_dir=cache, progress=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    path = tmp / f"images{size}.pt"
    torch.save(images.mul(255).round_().to(torch.uint8), path)
    return path


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the timed rounds of one contender: images over seconds."""
    images = sum(r["images"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds,
            "steps": sum(r["steps"] for r in rounds), "rounds_images_per_s": [r["images_per_s"] for r in rounds],
            "warmup_steps": [r["warmup_steps"] for r in rounds]}


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info = {"cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "load_average": list(os.getloadavg()), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            # OpenMP's wait policy decides how 2 threads fare on a busy 2-core machine (spinning threads stall).
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget per contender (psnr)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="image sizes of train/encode")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed.json"))
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test, numbers mean nothing")
    p.add_argument("--sections", nargs="+", default=["train", "encode", "psnr", "data"],
                   choices=("train", "encode", "psnr", "data"), help="what to measure (memory comes with each)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every contender")
    p.add_argument("--train-seconds", type=float, default=30.0, help="timed seconds per contender per size")
    p.add_argument("--encode-seconds", type=float, default=10.0, help="timed seconds per encoder per contender per size")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds the timed seconds are split over")
    p.add_argument("--speed-images", type=int, default=256, help="Kermany images cycled by the train/encode timings")
    p.add_argument("--psnr-size", type=int, default=128)
    p.add_argument("--data-images", type=int, default=1000, help="images of the cold/warm cache epoch")
    p.add_argument("--wait-images", type=int, default=1200, help="data.max_images of the data-wait training run")
    p.add_argument("--wait-epochs", type=int, default=3)
    p.add_argument("--wait-size", type=int, default=128, help="image size (config) of the data measurements")
    p.add_argument("--cache-dir", default=str(REPO / ".vqmed_cache"),
                   help="image cache of the train/encode/psnr runs (the data section uses fresh ones)")
    p.add_argument("--data-root", default=None, help="default: VQMED_DATA_ROOT or ../shared/data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override of the real training runs (psnr, data) and the data epoch, both contenders, "
                        "e.g. --set train.num_workers=8 on a GPU machine")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None,
                   help="OMP_WAIT_POLICY of every worker process (both contenders); default: inherited")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        # Just enough of everything to exercise every code path (CI smoke test).
        if "--sizes" not in sys.argv:
            args.sizes = [32]
        args.train_seconds, args.encode_seconds, args.rounds = 0.5, 0.2, 1
        args.speed_images, args.data_images, args.wait_images, args.wait_epochs = 64, 64, 160, 2
        args.minutes, args.psnr_size, args.wait_size, args.batch_size = 0.05, 32, 32, 16
    return args


def fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    import torch

    from vqmed.data import resolve_data_root

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    root = resolve_data_root(args.data_root)
    cache = Path(args.cache_dir) if args.cache_dir else None
    contenders = ["vqmed", "baseline"] + (["baseline_amp"] if args.device == "cuda" else [])
    bs = args.batch_size
    result: dict[str, Any] = {
        "benchmark": "speed", "device": args.device, "threads": args.threads, "batch_size": bs,
        "omp_wait_policy": args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY"), "overrides": args.overrides,
        "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(args.device),
        "note": "measured on a shared machine unless stated otherwise",
        "baseline": "monai.networks.nets.VQVAE channels=(64,128) num_res_layers=2 num_res_channels=(64,128) "
                    "factor 4 (stride-2 kernel-4 convolutions), 512x64 codebook, fp32",
        "contenders": {}, "train": {}, "encode": {}, "psnr": {}, "data": {}, "memory": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    started = time.perf_counter()
    print(f"speed benchmark on {args.device} ({result['machine']['device_name']}), {args.threads} threads, batch {bs}")
    with tempfile.TemporaryDirectory(prefix="vqmed-speed-") as tmp_name:
        tmp = Path(tmp_name)
        run = Runner(tmp, args)
        tracking = f"sqlite:///{tmp / 'mlflow.db'}"
        common = [f"data.data_root={root}", f"data.manifests=[{MANIFEST}]", f"train.threads={args.threads}",
                  f"tracking.tracking_uri={tracking}", "tracking.experiment=vqmed-speed-benchmark",
                  "tracking.log_model=false", f"data.cache_dir={cache}" if cache else "data.cache_dir=null",
                  *args.overrides]

        # ---------------------------------------------------------------- a, c, e: train / encode per size
        parts = [x for x in ("encode", "train") if x in args.sections]
        for size in args.sizes if parts else []:
            images = speed_images(size, max(args.speed_images, 2 * bs), root, cache, tmp)
            rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
            for r in range(args.rounds):
                order = contenders if r % 2 == 0 else contenders[::-1]  # alternate who goes first
                for c in order:
                    rounds[c].append(run("speed", f"{c} {size}px round {r + 1}/{args.rounds}",
                                         config=str(config_path(size)), images=str(images), batch_size=bs,
                                         overrides=contender_overrides(c, args.device) + [f"data.image_size={size}"],
                                         parts=parts, train_seconds=args.train_seconds / args.rounds,
                                         encode_seconds=args.encode_seconds / args.rounds,
                                         min_steps=1 if args.quick else 3, warmup=5 if args.device == "cuda" else 2))
            for section in parts:
                entry: dict[str, Any] = {}
                for c in contenders:
                    done = [x[section] for x in rounds[c]]
                    result["contenders"].setdefault(c, {})[str(size)] = done[0]["settings"]
                    mem = result["memory"].setdefault(str(size), {}).setdefault(c, {})
                    mem[f"{section}_peak_mb"] = max(x["peak_memory_mb"] for x in done)
                    mem["before_model_mb"] = min(x["rss_before_model_mb"] for x in rounds[c])
                    if section == "train":
                        entry[c] = {**aggregate(done), "first_loss": done[0]["first_loss"], "last_loss": done[-1]["last_loss"]}
                    else:
                        entry[c] = {k: aggregate([x[k] for x in done]) for k in ("index_quantize", "export_features")}
                    entry[c]["load_average_after"] = [x["load_average_after"] for x in rounds[c]]
                if section == "train":
                    entry["ratio"] = entry["vqmed"]["images_per_s"] / entry["baseline"]["images_per_s"]
                else:
                    for k in ("index_quantize", "export_features"):
                        entry[f"ratio_{k}"] = entry["vqmed"][k]["images_per_s"] / entry["baseline"][k]["images_per_s"]
                    # vqmed's export path vs MONAI's index_quantize (the issue's baseline figure): vqmed does more work.
                    entry["ratio"] = (entry["vqmed"]["export_features"]["images_per_s"]
                                      / entry["baseline"]["index_quantize"]["images_per_s"])
                result[section][str(size)] = entry
            save()

        # ---------------------------------------------------------------- b: PSNR after the same budget
        if "psnr" in args.sections:
            extra = [f"data.image_size={args.psnr_size}", f"train.max_minutes={args.minutes}"]
            if args.quick:
                extra += ["data.max_images=160", f"train.batch_size={bs}", "train.epochs=1", "train.warmup_steps=2"]
            psnr: dict[str, Any] = {"image_size": args.psnr_size, "minutes": args.minutes,
                                    "config": str(CONFIG_128.relative_to(REPO))}
            for c in contenders:
                overrides = contender_overrides(c, args.device) + common + extra + [f"out={tmp / ('psnr-' + c)}"]
                psnr[c] = run("psnr", f"{c} {args.psnr_size}px {args.minutes} min", config=str(CONFIG_128),
                              overrides=overrides)
                result["memory"].setdefault(str(args.psnr_size), {}).setdefault(c, {})["pretrain_run_peak_mb"] = (
                    psnr[c]["peak_memory_mb"])
            if len({psnr[c]["val_paths_sha256"] for c in contenders}) != 1:
                raise RuntimeError("the contenders validated on different images")
            psnr["val_images"] = psnr["vqmed"]["val_images"]
            psnr["psnr_difference_db"] = psnr["vqmed"]["val_psnr"] - psnr["baseline"]["val_psnr"]
            psnr["images_seen_ratio"] = psnr["vqmed"]["images_seen"] / max(psnr["baseline"]["images_seen"], 1)
            result["psnr"] = psnr
            save()

        # ---------------------------------------------------------------- d: data loading and data wait
        if "data" in args.sections:
            size_override = [f"data.image_size={args.wait_size}"] + ([f"train.batch_size={bs}"] if args.quick else [])
            data = run("data", f"{args.data_images} images cold/warm cache, then {args.wait_images} images x "
                       f"{args.wait_epochs} epochs of training", config=str(config_path(args.wait_size)),
                       overrides=common + size_override, images=args.data_images, data_root=str(root),
                       wait_overrides=contender_overrides("vqmed", args.device) + common + size_override + [
                           f"data.max_images={args.wait_images}", f"train.epochs={args.wait_epochs}",
                           "train.max_minutes=null", f"out={tmp / 'wait'}"])
            wait = data["wait"]
            wait["target"] = WAIT_TARGET
            wait["passed"] = wait["later_epochs_max"] is not None and wait["later_epochs_max"] < WAIT_TARGET
            result["data"] = data
            result["memory"].setdefault(str(args.wait_size), {}).setdefault("vqmed", {})["data_epoch_peak_mb"] = (
                data["peak_memory_mb"])
            save()

    result["seconds_total"] = time.perf_counter() - started
    result["acceptance"] = acceptance(result)
    save()
    print_table(result)
    print(f"wrote {out}")


def acceptance(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance lines at 128 px, where measured (``None`` = not measured in this run)."""
    train, encode, psnr, data = (result.get(k) or {} for k in ("train", "encode", "psnr", "data"))
    t, e = train.get("128", {}).get("ratio"), encode.get("128", {}).get("ratio")
    d = psnr.get("psnr_difference_db") if psnr.get("image_size") == 128 else None
    w = (data.get("wait") or {}).get("later_epochs_max")
    return {"train_ratio_128": t, "train_ratio_128_ok": None if t is None else t >= RATIO_TARGET,
            "encode_ratio_128": e, "encode_ratio_128_ok": None if e is None else e >= RATIO_TARGET,
            "psnr_difference_db_128": d, "psnr_128_ok": None if d is None else d >= 0.0,
            "data_wait_after_epoch_1": w, "data_wait_ok": None if w is None else w < WAIT_TARGET}


def print_table(r: dict[str, Any]) -> None:
    contenders = [c for c in ("vqmed", "baseline", "baseline_amp") if any(c in v for v in r["train"].values())
                  or any(c in v for v in r["encode"].values()) or c in r["psnr"]]
    sizes = sorted({int(s) for s in list(r["train"]) + list(r["encode"])})
    head = f"{'':<34}" + "".join(f"{s:>10}" for s in sizes)
    print(f"\n{r['device']} ({r['machine']['device_name']}), {r['threads']} threads, batch {r['batch_size']}"
          + (" -- QUICK: numbers mean nothing" if r["quick"] else ""))
    rows: list[tuple[str, str, Any]] = []
    if r["train"]:
        rows += [("training images/s", "", None)]
        rows += [(f"  {c}", "train", lambda e, c=c: e[c]["images_per_s"]) for c in contenders]
        rows += [("  ratio vqmed / baseline", "train", lambda e: e["ratio"])]
    if r["encode"]:
        rows += [("encoding images/s (index_quantize)", "", None)]
        rows += [(f"  {c}", "encode", lambda e, c=c: e[c]["index_quantize"]["images_per_s"]) for c in contenders]
        rows += [("  ratio", "encode", lambda e: e["ratio_index_quantize"])]
        rows += [("export features images/s", "", None)]
        rows += [(f"  {c}", "encode", lambda e, c=c: e[c]["export_features"]["images_per_s"]) for c in contenders]
        rows += [("  vqmed export / baseline index_q.", "encode", lambda e: e["ratio"])]
    if r["memory"] and sizes:
        rows += [("peak memory MB (train / encode)", "", None)]
        for c in contenders:
            rows.append((f"  {c}", "memory", lambda e, c=c: f"{fmt(e.get(c, {}).get('train_peak_mb'), '.0f')}/"
                                                            f"{fmt(e.get(c, {}).get('encode_peak_mb'), '.0f')}"))
    print(head)
    for label, section, get in rows:
        if get is None:
            print(label)
            continue
        cells = []
        for s in sizes:
            entry = r[section].get(str(s))
            try:
                value = get(entry) if entry else None
            except KeyError:
                value = None
            cells.append(f"{value:>10}" if isinstance(value, str) else f"{fmt(value, '.2f' if 'ratio' in label else '.1f'):>10}")
        print(f"{label:<34}" + "".join(cells))
    p = r["psnr"]
    if p:
        print(f"\nvalidation PSNR after {p['minutes']} min at {p['image_size']} px ({p['val_images']} held-out images):")
        for c in contenders:
            if c in p:
                x = p[c]
                print(f"  {c:<14}{x['val_psnr']:7.2f} dB  SSIM {x['val_ssim']:.3f}  {x['steps']} steps "
                      f"({x['images_seen']} images, {x['train_images_per_second']:.1f} img/s), peak {x['peak_memory_mb']:.0f} MB")
        print(f"  difference vqmed - baseline: {p['psnr_difference_db']:+.2f} dB")
    d = r["data"]
    if d:
        print(f"\ndata, {d['images']} images at {d['image_size']} px, batch {d['batch_size']}, "
              f"{d['num_workers']} worker(s), augment={d['augment']}:")
        for k in ("cold_cache", "warm_cache"):
            x = d[k]
            print(f"  {k:<11} build {x['build_s']:6.2f} s + epoch {x['epoch_s']:6.2f} s = {x['total_s']:6.2f} s "
                  f"(decoded {x['decoded']})")
        print(f"  warm cache is {d['speedup']:.1f}x faster than cold")
        w = d["wait"]
        per_epoch = ", ".join(f"{e['data_wait_fraction']:.1%}" for e in w["epochs"])
        print(f"  waiting for data, share of the step time ({w['config']}, {w['images_per_epoch']} images/epoch): "
              f"{per_epoch}; after epoch 1 max {fmt(w['later_epochs_max'], '.1%')} (target < {w['target']:.0%})")
    a = r["acceptance"]
    print("\nacceptance at 128 px: "
          + ", ".join(f"{k}={fmt(a[k], '.2f')} ({'ok' if a[k + '_ok'] else 'NOT MET' if a[k + '_ok'] is False else 'n/a'})"
                      for k in ("train_ratio_128", "encode_ratio_128"))
          + f", psnr diff={fmt(a['psnr_difference_db_128'], '+.2f')} dB"
          + f", data wait={fmt(a['data_wait_after_epoch_1'], '.1%')}")


if __name__ == "__main__":
    main()
