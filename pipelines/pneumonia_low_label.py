"""Pneumonia low-label pipeline: manifest -> pretrain -> export -> benchmark, as ``vqmed`` CLI steps.

    python pipelines/pneumonia_low_label.py --config configs/pipeline/pneumonia_cpu.yaml

Each step is the ``vqmed`` command a user would type; this file only composes them and holds no logic
of its own. A step whose output is already complete is skipped, so an interrupted pipeline is re-run
with the same command (pretraining resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vqmed.config import ConfigError, PipelineConfig, load_config


def step(title: str, args: list[str]) -> None:
    command = [sys.executable, "-m", "vqmed", *args]
    print(f"\n=== {title}\n+ vqmed {shlex.join(args)}", flush=True)
    start = time.monotonic()
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"step '{title}' failed with exit status {result.returncode}")
    print(f"=== {title}: done in {time.monotonic() - start:.0f} s", flush=True)


def set_flags(overrides: list[str]) -> list[str]:
    """``--set`` flags of a step, one per ``key=value`` override."""
    return [arg for override in overrides for arg in ("--set", override)]


def pipeline_config(cls: type, description: str, default: str, argv: list[str] | None) -> tuple[Any, str, Path]:
    """Parse ``--config`` / ``--set`` of a pipeline: its validated config, the config path and its out folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.set)
    except ConfigError as exc:  # one line naming the key, as the vqmed commands report it
        parser.error(str(exc))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, args.config, out


def main(argv: list[str] | None = None) -> None:
    cfg, _, out = pipeline_config(PipelineConfig, __doc__.splitlines()[0], "configs/pipeline/pneumonia_cpu.yaml", argv)
    root = ["--data-root", cfg.data_root] if cfg.data_root else []
    start = time.monotonic()

    manifest = Path(cfg.manifest)
    if not manifest.is_file():
        step("manifest", ["manifest", "build", cfg.dataset, "--out", str(manifest), *root])
    step("manifest check", ["manifest", "check", str(manifest), *root])

    pretrain_dir = out / "pretrain"
    if not (pretrain_dir / "summary.json").is_file():
        resume = ["--resume"] if (pretrain_dir / "run.json").is_file() else []
        overrides = [f"data.manifests=[{manifest}]", *cfg.pretrain_overrides]
        step("pretrain", ["pretrain", "--config", cfg.pretrain_config, "--out", str(pretrain_dir), *root, *resume,
                          *set_flags(overrides)])

    export_dir = out / "export"
    step("export", ["export", "--model", str(pretrain_dir), "--manifest", str(manifest), "--out", str(export_dir),
                    *root, *set_flags(cfg.export_overrides)])

    bench_dir = out / "benchmark"
    overrides = [f"export={export_dir}", *cfg.benchmark_overrides]
    step("benchmark", ["benchmark", "--config", cfg.benchmark_config, "--out", str(bench_dir),
                       *set_flags(overrides)])

    summary = json.loads((bench_dir / "summary.json").read_text())
    print(f"\npipeline finished in {(time.monotonic() - start) / 60:.1f} min")
    print(f"results: {bench_dir / 'summary.md'}  plot: {bench_dir / 'label_efficiency.png'}")
    print("MLflow UI: vqmed ui  (then open http://127.0.0.1:5000)")
    if isinstance(summary, dict) and "table_markdown" in summary:
        print(summary["table_markdown"])


if __name__ == "__main__":
    main()
