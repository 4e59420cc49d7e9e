"""The objectives issue's acceptance check, read from benchmark outputs (no training, no scoring).

    .venv/bin/python benchmarks/acceptance_margins.py runs/pneumonia_cpu/benchmark runs/pneumonia_cpu/benchmark_seed1 \\
        runs/pneumonia_cpu/benchmark_seed2 --margin 0.01

For every benchmark directory (its ``summary.json``): the mean test AUC of ``vqvae`` minus ``random_encoder``
averaged over 10/class, 25/class, 1% and 2% (the issue's four-budget average), and for each other baseline the
budgets up to 10% at which ``vqvae`` is not ahead. Prints one Markdown line per directory and exits 1 when a
directory misses the bar (``--margin``), so the check can run in a script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FOUR_BUDGETS = ("10/class", "25/class", "1%", "2%")
OTHER_BASELINES = ("raw_pixels_logreg", "pca_logreg", "cnn_scratch")


def margins(summary: dict) -> tuple[float, dict[str, float], dict[str, list[str]]]:
    """``(four-budget mean margin, per-budget margins, budgets up to 10% where vqvae is not ahead, per baseline)``."""
    auc = {(r["method"], r["budget"]): r["auc_mean"] for r in summary["results"] if not r.get("candidate")}
    per_budget = {b: auc[("vqvae", b)] - auc[("random_encoder", b)] for b in FOUR_BUDGETS}
    # "up to 10%": the fractions up to 10% and the per-class budgets (a few dozen labels at most)
    up_to_10 = [r["budget"] for r in summary["results"] if r["method"] == "vqvae" and not r.get("candidate")
                and (r["budget_kind"] == "per_class" or float(r["budget"].rstrip("%")) <= 10)]
    behind = {m: [b for b in up_to_10 if (m, b) in auc and auc[("vqvae", b)] <= auc[(m, b)]]
              for m in OTHER_BASELINES if any(k[0] == m for k in auc)}
    return sum(per_budget.values()) / len(per_budget), per_budget, behind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="+", type=Path, help="benchmark output directories (with summary.json)")
    parser.add_argument("--margin", type=float, default=0.01, help="the bar for vqvae - random_encoder")
    args = parser.parse_args()
    ok = True
    for folder in args.benchmarks:
        summary = json.loads((folder / "summary.json").read_text())
        mean, per_budget, behind = margins(summary)
        passed = mean >= args.margin and not any(behind.values())
        ok &= passed
        budgets = ", ".join(f"{b} {m:+.3f}" for b, m in per_budget.items())
        others = "; ".join(f"vs {m}: " + (f"not ahead at {', '.join(b)}" if b else "ahead at every budget up to 10%")
                           for m, b in behind.items())
        print(f"- `{folder}` (seed {summary['seed']}, scored on {summary['evaluated_on']}): `vqvae` - `random_encoder` "
              f"on the four-budget mean **{mean:+.4f}** ({budgets}); {others}: "
              f"{'meets' if passed else 'misses'} the bar of {args.margin:+.2f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
