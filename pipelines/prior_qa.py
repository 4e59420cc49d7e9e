"""Prior QA pipeline: prior train -> prior score -> prior sample -> prior qa, as ``vqmed`` CLI steps.

    python pipelines/prior_qa.py --config configs/benchmark/qa.yaml --set export=runs/pneumonia_cpu/export

Needs an export (the README main command writes ``runs/pneumonia_cpu/export``). Each step is the ``vqmed``
command a user would type; a prior already trained in ``prior`` is reused, one interrupted is resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

from vqmed.config import QAConfig

from pneumonia_low_label import pipeline_config, step


def main(argv: list[str] | None = None) -> None:
    cfg, config_path, out = pipeline_config(QAConfig, __doc__.splitlines()[0], "configs/benchmark/qa.yaml", argv)
    prior = Path(cfg.prior)
    if not (prior / "summary.json").is_file():
        resume = ["--resume"] if (prior / "run.json").is_file() else []
        step("prior train", ["prior", "train", "--config", cfg.prior_config, "--export", str(cfg.export), "--out", str(prior),
                             *resume])
    step("prior score", ["prior", "score", "--prior", str(prior), "--export", str(cfg.export), "--flag-quantile", "0.01",
                         "--heatmaps", "8", "--heatmap-dir", str(out / "heatmaps")])
    step("prior sample", ["prior", "sample", "--prior", str(prior), "--out", str(out / "samples"), "--n", "16"])
    sets = [a for key in ("export", "prior", "out") for a in ("--set", f"{key}={getattr(cfg, key)}")]
    step("prior qa", ["prior", "qa", "--config", config_path, *sets])
    summary = json.loads((prior / "summary.json").read_text())
    print(f"\nprior: validation {summary['val_bits_per_code']:.3f} bits per code vs unigram "
          f"{summary['unigram_bits_per_code']:.3f} ({100 * summary['improvement_over_unigram']:.1f}% fewer)")
    print(f"QA table: {out / 'qa.md'}  plot: {out / 'qa_auroc.png'}")


if __name__ == "__main__":
    main()
