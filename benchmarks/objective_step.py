"""Step time of pretraining-objective settings against the config's own, measured in one process.

What a candidate objective costs decides how many steps it gets in a fixed time, so a screen that compares
candidates at equal steps needs the step-time ratio beside it. Engine runs on different days or machines
are not comparable (this 2-core machine's throughput drifts by a third between sessions); this script
times every contender in the same process on the same real Kermany images, in alternating rounds (the order
rotates every round) so that all of them see the same load.

One step is what the Trainer does: the objective's batched augmentation of a batch of films, the objective's
forward pass (model and heads), backward, AdamW. The model is the config's, in its ``channels_last`` format;
the objective is the config's, with the ``--base`` overrides for every contender and each ``--variant``'s
overrides on top. Ratio = contender's time a step / the base's (below 1: cheaper).

    .venv/bin/python benchmarks/objective_step.py [--config configs/pretrain/cxr_64.yaml]
        [--base '{"reconstruct": "first"}'] [--variant 'grid2={"embedding_grid": 2}' ...]
        [--steps 30] [--rounds 4] [--out benchmarks/results/objective_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from vqmed.config import PretrainConfig, load_config
from vqmed.data import ImageDataset, ImageSpec, read_manifest, resolve_data_root
from vqmed.data.augment import BatchAugmentation
from vqmed.networks import build_model
from vqmed.training.control import model_arguments
from vqmed.training.objectives import build_objective

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "pretrain" / "cxr_64.yaml"))
    p.add_argument("--base", default="{}", help="JSON objective.params overrides of every contender")
    p.add_argument("--variant", action="append", default=[], metavar='NAME={"key": value}',
                   help="a contender: a name and its JSON objective.params overrides on top of --base (repeatable)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per contender before the first round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--images", type=int, default=256, help="Kermany train images the batches are drawn from")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", default=None)
    p.add_argument("--cache-dir", default=".vqmed_cache")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "objective_step.json"))
    return p.parse_args()


def contenders(args: argparse.Namespace, cfg: PretrainConfig) -> dict[str, dict[str, Any]]:
    """``{name: objective params}``: the config's objective with ``--base``, then each ``--variant`` on top."""
    base = {**(cfg.objective.params or {}), **json.loads(args.base)}
    out = {"base": base}
    for item in args.variant:
        name, sep, overrides = item.partition("=")
        if not sep or not name or name in out:
            raise SystemExit(f"--variant {item!r}: expected a new NAME={{json}}")
        out[name] = {**base, **json.loads(overrides)}
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(PretrainConfig, args.config)
    manifest = read_manifest(REPO / cfg.data.manifests[0])
    rows = manifest[manifest["split"] == "train"].head(args.images)
    spec = ImageSpec.from_config(cfg.data)
    ds = ImageDataset(rows, resolve_data_root(args.data_root), spec, cache_dir=args.cache_dir, progress=False)
    films = torch.stack([ds[i]["image"] for i in range(len(ds))])
    setups = {}
    for name, params in contenders(args, cfg).items():
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model.name, **model_arguments(cfg))
        if cfg.train.channels_last and films.dim() == 4:
            model = model.to(memory_format=torch.channels_last)
        objective = build_objective(cfg.objective.name, params, model, tuple(films.shape[1:]))
        optimizer = torch.optim.AdamW([*model.parameters(), *objective.parameters()], lr=cfg.train.lr,
                                      weight_decay=cfg.train.weight_decay)
        augment = BatchAugmentation(films.dim() - 2, objective.augmentation_of(objective.params))
        setups[name] = (model, objective, optimizer, augment, params)

    generator = torch.Generator().manual_seed(cfg.seed)

    def step(name: str) -> float:
        model, objective, optimizer, augment, _ = setups[name]
        idx = torch.randint(0, len(films), (cfg.train.batch_size,), generator=generator)
        start = time.perf_counter()
        views = augment(films[idx], objective.views, generator)
        loss, _ = objective(model, views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    names = list(setups)
    for name in names:
        for _ in range(args.warmup):
            step(name)
    seconds = {name: 0.0 for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            seconds[name] += sum(step(name) for _ in range(args.steps))
    timed = args.rounds * args.steps
    base = seconds["base"] / timed
    results = {
        name: {"objective": cfg.objective.name, "params": setups[name][4], "seconds_per_step": seconds[name] / timed,
               "images_per_second": cfg.train.batch_size * timed / seconds[name],
               "ratio_to_base": seconds[name] / timed / base}
        for name in names
    }
    print(f"{cfg.objective.name} at {cfg.data.image_size} px, batch {cfg.train.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps:")
    for name, r in results.items():
        print(f"  {name:>12}: {1000 * r['seconds_per_step']:6.0f} ms/step  {r['images_per_second']:6.1f} images/s  "
              f"ratio to base {r['ratio_to_base']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": str(Path(args.config).name), "batch_size": cfg.train.batch_size,
                               "image_size": cfg.data.image_size, "threads": args.threads, "rounds": args.rounds,
                               "steps_per_round": args.steps, "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "contenders": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
