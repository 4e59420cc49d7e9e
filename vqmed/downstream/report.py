"""Benchmark report: ``benchmark.csv``, ``summary.json``, ``summary.md``, the label-efficiency figures,
and the MLflow parent run with one nested run per method and budget (through :mod:`vqmed.tracking`).

Nothing here makes a choice or touches a model: it turns the engine's per-draw records into tables,
figures and tracked runs, and states which split made which choice.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vqmed.config import BenchmarkConfig, to_dict
from vqmed.downstream.metrics import METRICS, StratifiedBootstrap
from vqmed.downstream.sampling import Budget

__all__ = ["CI_METHOD", "PRIMARY_ORDER", "Tracker", "build_summary", "long_table", "mlflow_parent", "summarise", "write_outputs"]

#: How summary.json's ``auc_ci_low``/``auc_ci_high`` are computed (also written into the file).
CI_METHOD = (
    "auc_ci_low/auc_ci_high: two-level percentile bootstrap of the mean AUC over draws: each replicate "
    "resamples the draws with replacement and the test images (stratified by class, the same test "
    "resample for every draw and method) and averages the draws' AUCs. It covers both the variation "
    "between label draws and the finite test set. auc_draw_ci_low/high: mean over draws of each "
    "draw's own test-bootstrap CI (test-set uncertainty of a single draw). auc_std: standard deviation "
    "across draws (ddof=1; null for a single draw)."
)

#: The reference methods, in table and legend order; feature variants (``vqvae:*``) and candidates follow.
PRIMARY_ORDER = ("vqvae", "random_encoder", "raw_pixels_logreg", "pca_logreg", "cnn_scratch")

#: Which split makes which choice (``summary.json`` ``choices``; see ``docs/objective_selection.md``).
CHOICES = {
    "classifier": "cross-validation inside the labeled subset (patient-grouped folds)",
    "hyper_parameters": "cross-validation inside the labeled subset (patient-grouped folds)",
    "threshold": "Youden's J on out-of-fold scores of the labeled subset",
    "objective, weights, augmentation, pretraining length, feature variant": (
        "the validation split (train-split patients of `validation_patients`, scored by runs with "
        "`evaluate_on: validation`); see docs/objective_selection.md"
    ),
}


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------
def long_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """``benchmark.csv``: one row per method, budget, draw and metric."""
    rows = []
    for r in records:
        for metric in METRICS:
            value, lo, hi = r["metrics"][metric]
            rows.append(
                {
                    "method": r["method"],
                    "budget": r["budget"],
                    "n_labels": r["n_labels"],
                    "n_pos": r["n_pos"],
                    "n_neg": r["n_neg"],
                    "n_patients": r["n_patients"],
                    "draw": r["draw"],
                    "metric": metric,
                    "value": value,
                    "ci_low": lo,
                    "ci_high": hi,
                    "selected": r["selected"],
                    "cv_auc": r["cv_auc"],
                    "threshold": r["threshold"],
                    "params": json.dumps(r["params"], default=_json_default, sort_keys=True),
                }
            )
    return pd.DataFrame(rows)


def summarise(records: list[dict[str, Any]], boot: StratifiedBootstrap, seed: int) -> list[dict[str, Any]]:
    """One row per method and budget: means, spreads and CIs over draws (see :data:`CI_METHOD`)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    alpha = (1.0 - boot.ci) / 2.0
    out = []
    for (method, budget), rs in groups.items():
        aucs = np.array([r["metrics"]["auc"][0] for r in rs])
        mat = np.stack([r["auc_boot"] for r in rs])  # (draws, resamples), same test resamples in every row
        rng = np.random.default_rng([int(seed), zlib.crc32(f"{method}|{budget}".encode())])
        pick = rng.integers(0, len(rs), size=(mat.shape[1], len(rs)))
        means = mat[pick, np.arange(mat.shape[1])[:, None]].mean(axis=1)
        lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
        n_labels = np.array([r["n_labels"] for r in rs])
        row: dict[str, Any] = {
            "method": method,
            "candidate": bool(rs[0]["candidate"]),
            "budget": budget,
            "budget_kind": rs[0]["budget_kind"],
            "n_labels": float(n_labels.mean()),
            "n_labels_min": int(n_labels.min()),
            "n_labels_max": int(n_labels.max()),
            "n_draws": len(rs),
            "auc_mean": float(aucs.mean()),
            "auc_ci_low": float(lo),
            "auc_ci_high": float(hi),
            "auc_std": float(aucs.std(ddof=1)) if len(rs) > 1 else None,  # undefined for one draw
            "auc_draw_ci_low": float(np.mean([r["metrics"]["auc"][1] for r in rs])),
            "auc_draw_ci_high": float(np.mean([r["metrics"]["auc"][2] for r in rs])),
            "auc_per_draw": aucs.tolist(),
            "cv_auc_mean": float(np.mean([r["cv_auc"] for r in rs])),
        }
        for metric in METRICS[1:]:
            vals = np.array([r["metrics"][metric][0] for r in rs])
            row[f"{metric}_mean"] = float(vals.mean())
            row[f"{metric}_std"] = float(vals.std(ddof=1)) if len(rs) > 1 else None
        if not row["candidate"]:
            row["selected"] = dict(Counter(r["selected"] for r in rs).most_common())
        out.append(row)

    def order(row: dict[str, Any]) -> tuple:
        base = row["method"].split("[")[0].split(":")[0]
        rank = PRIMARY_ORDER.index(base) if base in PRIMARY_ORDER else len(PRIMARY_ORDER)
        return (row["candidate"], rank, row["method"], row["n_labels"])

    return sorted(out, key=order)


def build_summary(
    cfg: BenchmarkConfig,
    data: dict[str, np.ndarray],
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    skipped: dict[str, list[str]],
    cpu_per_method: dict[str, float],
) -> dict[str, Any]:
    """``summary.json`` less the run's timings and MLflow id (added by the caller at the end)."""
    validation = cfg.evaluate_on == "validation"
    scored = (
        f"the {cfg.train_split!r} split's images of the patients in {cfg.validation_patients} (the test split is never read)"
        if validation
        else f"the {cfg.test_split!r} split"
    )
    pool = f"the {cfg.train_split!r} split" + (" less the validation patients" if validation else "")
    summary = {
        "name": cfg.name,
        "seed": cfg.seed,
        "meta": meta,
        "evaluated_on": cfg.evaluate_on,
        "scored_set": scored,
        "label_pool": pool,
        "choices": {**CHOICES, "scored set (metrics only, never a choice)": scored},
        "n_train": len(data["y_train"]),
        "n_test": len(data["y_test"]),
        "test_positives": int(data["y_test"].sum()),
        "positive_label": cfg.positive_label,
        "ci_method": CI_METHOD,
        "threshold_method": "Youden's J on out-of-fold scores of the labeled subset (never the scored set)",
        "selection_method": (
            "per method, budget and draw, on patient-grouped folds of the labeled subset: "
            + (
                "the simplest candidate (classifier order of the config) whose pooled out-of-fold AUC is within one "
                "standard error (Hanley-McNeil) of the best; hyper-parameters likewise (strongest regularisation first)"
                if cfg.probes.selection == "one_se"
                else "the candidate (feature variant x classifier) with the best pooled out-of-fold AUC; hyper-parameters likewise"
            )
        ),
        "standardization": (
            f"feature mean/std of {pool}, labels unused (every method alike)"
            if cfg.probes.standardize == "pool"
            else "feature mean/std of the labeled subset"
        ),
        "skipped_variants": skipped,
        "cpu_seconds_per_method": {k: round(v, 1) for k, v in sorted(cpu_per_method.items())},
        "results": rows,
        "config": to_dict(cfg),
    }
    summary["table_markdown"] = "\n".join(_auc_table(rows))
    return summary


def write_outputs(out_dir: Path, table: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``benchmark.csv``, ``summary.json``, ``summary.md`` and the figures; returns the figures."""
    table.to_csv(out_dir / "benchmark.csv", index=False)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out_dir / "summary.md").write_text(markdown(summary["results"], summary))
    figures = plots(summary["results"], "Validation" if summary["evaluated_on"] == "validation" else "Test")
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight", facecolor="white")
    return figures


def _budget_columns(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Budgets as table columns: the balanced k-per-class ones first, then the fractions, each ascending."""
    seen: dict[str, tuple[int, float]] = {}
    for r in rows:
        seen.setdefault(r["budget"], (0 if r["budget_kind"] == "per_class" else 1, r["n_labels"]))
    return [(b, n) for b, (_, n) in sorted(seen.items(), key=lambda kv: kv[1])]


def _auc_table(rows: list[dict[str, Any]]) -> list[str]:
    """The wide AUC table (methods x budgets) as Markdown lines: ``summary.md``'s first table."""
    primary = [r for r in rows if not r["candidate"]]
    budgets = _budget_columns(primary)
    lines = ["| method | " + " | ".join(f"{b} (n={n:g})" for b, n in budgets) + " |", "|---|" + "---|" * len(budgets)]
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for r in primary:
        by_method.setdefault(r["method"], {})[r["budget"]] = r
    for method, cells in by_method.items():
        vals = []
        for b, _ in budgets:
            r = cells.get(b)
            vals.append("" if r is None else f"{r['auc_mean']:.3f} [{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}]{_pm(r['auc_std'])}")
        lines.append(f"| {method} | " + " | ".join(vals) + " |")
    return lines


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """``summary.md``: a wide AUC table (methods x budgets), the details, the candidates, who chose what."""
    primary = [r for r in rows if not r["candidate"]]
    cands = [r for r in rows if r["candidate"]]
    scored = "Validation" if summary["evaluated_on"] == "validation" else "Test"
    lines = [
        f"# Low-label benchmark: {summary['name']}",
        "",
        (
            f"Evaluated on: **{summary['evaluated_on']}**, {summary['scored_set']}: {summary['n_test']} images "
            f"({summary['test_positives']} {summary['positive_label']}), never used for any choice. Labels drawn from "
            f"{summary['label_pool']}: {summary['n_train']} images. Seed {summary['seed']}."
        ),
    ]
    if summary["meta"].get("pretrain_run_id"):
        lines.append(f"Pretraining MLflow run: `{summary['meta']['pretrain_run_id']}`.")
    lines += ["", f"## {scored} ROC AUC (mean over draws [95% CI], ± std across draws)", "", *_auc_table(rows)]
    lines += [
        "",
        "## All metrics (mean ± std across draws; threshold from out-of-fold scores of the labeled subset)",
        "",
        "| method | budget | labels | draws | AUC | AUC 95% CI | CV AUC | balanced acc. | sensitivity | specificity | accuracy | most selected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in primary:
        sel = r.get("selected") or {}
        top = next(iter(sel.items()), ("", 0))
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['n_labels']:g} | {r['n_draws']} | {r['auc_mean']:.3f}{_pm(r['auc_std'])} | "
            f"[{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}] | {r['cv_auc_mean']:.3f} | "
            f"{r['balanced_accuracy_mean']:.3f}{_pm(r['balanced_accuracy_std'])} | {r['sensitivity_mean']:.3f} | "
            f"{r['specificity_mean']:.3f} | {r['accuracy_mean']:.3f} | {top[0]} ({top[1]}/{r['n_draws']}) |"
        )
    if cands:
        cb = _budget_columns(cands)
        lines += [
            "",
            f"## Every candidate ({scored.lower()} AUC, mean over draws; for analysis only: the method rows above never look at these)",
            "",
            "| candidate | " + " | ".join(b for b, _ in cb) + " |",
            "|---|" + "---|" * len(cb),
        ]
        by_cand: dict[str, dict[str, float]] = {}
        for r in cands:
            by_cand.setdefault(r["method"], {})[r["budget"]] = r["auc_mean"]
        for name, cells in by_cand.items():
            lines.append(f"| {name} | " + " | ".join(f"{cells[b]:.3f}" if b in cells else "" for b, _ in cb) + " |")
    lines += ["", "## Which split made which choice", "", "| choice | made on |", "|---|---|"]
    lines += [f"| {what} | {where} |" for what, where in summary["choices"].items()]
    lines += ["", "## How to read this", "", summary["ci_method"], "", summary["selection_method"] + ".", ""]
    return "\n".join(lines)


def _pm(std: float | None) -> str:
    return "" if std is None else f" ±{std:.3f}"


def plots(rows: list[dict[str, Any]], scored: str = "Test") -> dict[str, Any]:
    """``label_efficiency.png`` over the fraction budgets (the split's own class balance) and, when
    both kinds are run, ``label_efficiency_per_class.png`` over the balanced k-per-class budgets:
    the two protocols differ in class balance, so one line through both would zigzag. The reference
    methods (:data:`PRIMARY_ORDER`) share the first panel; feature variants and candidates the second."""
    from vqmed.tracking import label_efficiency_plot

    primary = [r for r in rows if not r["candidate"]]
    kinds = [k for k in ("fraction", "per_class") if any(r["budget_kind"] == k for r in primary)]
    figures = {}
    for i, kind in enumerate(kinds):
        df = pd.DataFrame(
            [
                {"method": r["method"], "n_labels": r["n_labels"], "auc_mean": r["auc_mean"], "auc_low": r["auc_ci_low"], "auc_high": r["auc_ci_high"]}
                for r in rows
                if r["budget_kind"] == kind
            ]
        )
        what = "share of the training split" if kind == "fraction" else "k labels per class (balanced)"
        name = "label_efficiency.png" if i == 0 else "label_efficiency_per_class.png"
        figures[name] = label_efficiency_plot(df, title=f"{scored} ROC AUC vs labels, {what}", reference=PRIMARY_ORDER)
    return figures


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------
class Tracker:
    """The parent MLflow run and its nested runs (one per method and budget)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_budget(self, budget: Budget, records: list[dict[str, Any]], boot: StratifiedBootstrap, cfg: BenchmarkConfig) -> None:
        """One nested run per method of a finished budget: per-draw and mean metrics, the candidates."""
        from vqmed.tracking import log_dict, log_metrics, log_params, metric_key, set_tags, start_run

        rows = summarise(records, boot, cfg.seed)
        candidates = [r for r in rows if r["candidate"]]
        for row in (r for r in rows if not r["candidate"]):
            method = row["method"]
            with start_run(run_name=f"{method} @ {budget.name}", nested=True):
                set_tags({"vqmed.stage": "benchmark", "vqmed.method": method, "vqmed.budget": budget.name})
                log_params(
                    {
                        "method": method,
                        "budget": budget.name,
                        "budget_kind": budget.kind,
                        "budget_value": budget.value,
                        "n_draws": row["n_draws"],
                        "n_labels_mean": row["n_labels"],
                    }
                )
                for r in (r for r in records if r["method"] == method):
                    log_metrics({f"draw/{m}": r["metrics"][m][0] for m in METRICS} | {"draw/cv_auc": r["cv_auc"], "draw/n_labels": r["n_labels"]}, step=r["draw"])
                log_metrics({k: row[k] for k in row if isinstance(row[k], float) and not k.startswith("n_labels")} | {"n_labels": row["n_labels"]}, step=0)
                prefix = f"{method}["
                log_metrics({metric_key(f"candidate/{c['method'][len(prefix):-1]}/auc_mean"): c["auc_mean"] for c in candidates if c["method"].startswith(prefix)}, step=0)
                if row.get("selected"):
                    log_dict(row["selected"], "selected_candidates.json")

    def finish(self, out_dir: Path, rows: list[dict[str, Any]], figures: dict[str, Any]) -> None:
        """The parent run's mean AUC per method over labels, the output files and the figures."""
        from vqmed.tracking import log_artifact, log_figure, log_metrics, metric_key

        for row in (r for r in rows if not r["candidate"]):
            step = round(row["n_labels"])
            log_metrics({metric_key(f"auc_mean/{row['method']}"): row["auc_mean"]}, step=step)
        for name in ("benchmark.csv", "summary.json", "summary.md"):
            log_artifact(out_dir / name)
        for name, fig in figures.items():
            log_figure(fig, name)


@contextmanager
def mlflow_parent(cfg: BenchmarkConfig, meta: dict[str, Any], out_dir: Path) -> Iterator[Tracker]:
    """The benchmark's parent MLflow run, tagged with its provenance (pretraining run, export, ...)."""
    from vqmed.tracking import backlog_size, flush_backlog, log_params, set_backlog_dir, set_tags, setup_mlflow, start_run

    set_backlog_dir(out_dir / "tracking_backlog")  # what a server that dies mid-run cannot take (sent when it is back)
    setup_mlflow(cfg.tracking.tracking_uri, cfg.tracking.experiment)
    with start_run(run_name=cfg.name) as run:
        tags = {"vqmed.stage": "benchmark", "vqmed.out_dir": str(out_dir.resolve()), "vqmed.evaluated_on": cfg.evaluate_on}
        for key in ("pretrain_run_id", "model_ref", "model_id", "export"):
            if meta.get(key):
                tags[f"vqmed.{key}"] = str(meta[key])
        if meta.get("pretrain_run_id"):
            tags["mlflow.note.content"] = (
                f"Low-label benchmark of the encoder pretrained in MLflow run `{meta['pretrain_run_id']}` "
                f"(export `{meta.get('export', '?')}`). Nested runs: one per method and label budget."
            )
        set_tags(tags)
        log_params(to_dict(cfg))
        yield Tracker(run.info.run_id)
    flush_backlog()
    if backlog_size():
        import sys

        print(f"vqmed: warning: {backlog_size()} tracking entries could not be sent to the MLflow server; they are "
              f"kept in {out_dir / 'tracking_backlog'}", file=sys.stderr, flush=True)
