"""The pretraining-compute curve: its figure (probe AUC against pretraining steps, one line per objective)
and its MLflow run."""

from __future__ import annotations

from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["compute_curve_plot", "log_compute_curve"]

# Okabe-Ito colours (colour-blind safe) and distinct markers: objectives stay apart in grey print too.
_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
_MARKERS = ["o", "s", "D", "^", "v", "P"]


def compute_curve_plot(df: Any, title: str = "Pretraining compute vs frozen-feature AUC") -> Figure:
    """One panel per label budget: mean AUC (with its CI as a band) against pretraining steps.

    Args:
        df: a pandas DataFrame with columns ``objective``, ``steps``, ``budget``, ``auc_mean``, ``auc_low``,
            ``auc_high`` (one row per objective, pretraining length and budget). Step 0 is the random
            initialisation, shared by every objective.
        title: figure title.

    Raises:
        KeyError: when a column is missing.
    """
    need = ["objective", "steps", "budget", "auc_mean", "auc_low", "auc_high"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise KeyError(f"compute_curve_plot: columns {missing} missing (has {list(df.columns)})")
    budgets = list(dict.fromkeys(df["budget"].astype(str)))
    fig = Figure(figsize=(3.2 * len(budgets), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    objectives = list(dict.fromkeys(df["objective"].astype(str)))
    steps = sorted(set(df["steps"].astype(int)))
    for ax, budget in zip(axes, budgets):
        for i, objective in enumerate(objectives):
            sub = df[(df["budget"].astype(str) == budget) & (df["objective"].astype(str) == objective)].sort_values("steps")
            # steps on a symlog axis: 0 (random init) and 16x the demo both readable
            x = sub["steps"].to_numpy(float)
            colour = _COLOURS[i % len(_COLOURS)]
            ax.fill_between(x, sub["auc_low"].to_numpy(float), sub["auc_high"].to_numpy(float), color=colour,
                            alpha=0.15, linewidth=0)
            ax.plot(x, sub["auc_mean"].to_numpy(float), color=colour, marker=_MARKERS[i % len(_MARKERS)],
                    markersize=5, label=objective)
        ax.set_xscale("symlog", linthresh=max(1, min([s for s in steps if s > 0], default=1)))
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps], rotation=45, fontsize=7)
        ax.set_title(f"{budget} labels", fontsize=10)
        ax.set_xlabel("pretraining steps (0 = random init)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean test ROC AUC (band: CI)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def log_compute_curve(table: Any, figure: Figure, params: dict[str, Any], tracking_uri: str | None,
                      experiment: str, run_name: str) -> str:
    """One MLflow run holding a compute curve: its params, ``auc/BUDGET/OBJECTIVE`` metrics at each step
    (MLflow's step axis is the pretraining length), the table as CSV and the figure. Returns the run id."""
    import mlflow

    from vqmed.tracking.mlflow_utils import log_figure, log_metrics, log_params, metric_key, setup_mlflow

    setup_mlflow(tracking_uri, experiment)
    with mlflow.start_run(run_name=run_name) as run:
        log_params(params)
        for row in table.itertuples():
            log_metrics({metric_key(f"auc/{row.budget.replace('%', 'pct')}/{row.objective}"): row.auc_mean},
                        step=int(row.steps))
        mlflow.log_text(table.to_csv(index=False), "compute_curve.csv")
        log_figure(figure, "compute_curve.png")
        return run.info.run_id
