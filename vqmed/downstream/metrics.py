"""Test-set metrics with bootstrap confidence intervals, and threshold choice on out-of-fold scores.

The decision threshold is a property of the *labeled subset*: :func:`choose_threshold` sees only
out-of-fold scores of the labeled images. :class:`StratifiedBootstrap` holds the test labels and one fixed
set of stratified resamples, shared by every method and draw (common random numbers), so that
differences between methods are not blurred by different resamples.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")


def choose_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Decision threshold maximising Youden's J (sensitivity + specificity - 1).

    Call it with out-of-fold scores of the labeled subset only. The threshold is placed halfway
    between the chosen score and the next lower one, so it transfers to a refitted model with a
    margin; ties in J go to the higher threshold (the first maximum of the ROC curve).

    Args:
        y_true: 0/1 labels of the labeled images.
        scores: their out-of-fold scores (higher = more positive).
    """
    y_true = np.asarray(y_true).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if len(np.unique(y_true)) < 2:
        raise ValueError("choose_threshold needs both classes among the labeled images")
    fpr, tpr, thr = roc_curve(y_true, scores, drop_intermediate=False)
    youden = tpr - fpr
    # first maximum up to rounding (1 - 1/3 and 2/3 differ in the last bit but are the same J)
    best = int(np.flatnonzero(youden >= youden.max() - 1e-9)[0])
    if not np.isfinite(thr[best]):
        # the "predict nothing positive" corner: put the threshold just above the top score
        return float(np.nextafter(scores.max(), np.inf))
    lower = thr[best + 1] if best + 1 < len(thr) else -np.inf
    return float((thr[best] + lower) / 2) if np.isfinite(lower) else float(thr[best])


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC AUC and the thresholded metrics (positive when ``score >= threshold``) of one set."""
    y_true = np.asarray(y_true).astype(int)
    weights = np.ones((1, len(y_true)))
    values = _weighted_metrics(weights, y_true, np.asarray(scores, dtype=np.float64), threshold)
    return {k: float(v[0]) for k, v in values.items()}


class StratifiedBootstrap:
    """Stratified bootstrap of a fixed test set, reused for every method and draw.

    Positives and negatives are resampled separately (so every resample has both classes and the
    test prevalence); the intervals are percentile intervals.

    Args:
        y_true: 0/1 labels of the test images.
        n_resamples: bootstrap resamples.
        ci: confidence level, e.g. 0.95.
        seed: seeds the resamples.
    """

    def __init__(self, y_true: np.ndarray, n_resamples: int = 1000, ci: float = 0.95, seed: int = 0) -> None:
        self.y_true = np.asarray(y_true).astype(int)
        if len(np.unique(self.y_true)) < 2:
            raise ValueError("the test set needs both classes for ROC AUC")
        self.n_resamples = int(n_resamples)
        self.ci = float(ci)
        rng = np.random.default_rng([int(seed), 7919])
        n = len(self.y_true)
        weights = np.zeros((self.n_resamples, n), dtype=np.float64)
        rows = np.arange(self.n_resamples)[:, None]
        for cls in (0, 1):
            members = np.flatnonzero(self.y_true == cls)
            picks = members[rng.integers(0, len(members), size=(self.n_resamples, len(members)))]
            np.add.at(weights, (np.broadcast_to(rows, picks.shape), picks), 1.0)
        # multiplicity of every test image in every resample: metrics become weighted sums
        self.weights = weights

    def evaluate(self, scores: np.ndarray, threshold: float) -> tuple[dict[str, tuple[float, float, float]], np.ndarray]:
        """Point estimates and CIs of every metric for one method's test scores.

        Returns:
            ``({metric: (value, ci_low, ci_high)}, auc_resamples)``; the AUC of every resample is
            returned so that callers can bootstrap means over draws with the same resamples.
        """
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.y_true.shape:
            raise ValueError(f"expected {self.y_true.shape[0]} test scores, got shape {scores.shape}")
        point = binary_metrics(self.y_true, scores, threshold)
        boot = _weighted_metrics(self.weights, self.y_true, scores, threshold)
        alpha = (1.0 - self.ci) / 2.0
        out = {}
        for name in METRICS:
            lo, hi = np.quantile(boot[name], [alpha, 1.0 - alpha])
            out[name] = (point[name], float(lo), float(hi))
        return out, boot["auc"]


def _weighted_metrics(weights: np.ndarray, y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every metric for each row of ``weights`` (image multiplicities), vectorised.

    AUC is the Mann-Whitney statistic with ties counted one half: per distinct score value, the
    positive weight times (negative weight strictly below + half the negative weight at the value).
    """
    pos = y_true == 1
    uniq, inv = np.unique(scores, return_inverse=True)
    w_pos = np.zeros((weights.shape[0], len(uniq)))
    w_neg = np.zeros_like(w_pos)
    # sum the weights per distinct score (columns grouped by `inv`)
    np.add.at(w_pos.T, inv[pos], weights[:, pos].T)
    np.add.at(w_neg.T, inv[~pos], weights[:, ~pos].T)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    n_pos = w_pos.sum(axis=1)
    n_neg = w_neg.sum(axis=1)
    auc = (w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1) / (n_pos * n_neg)
    pred = scores >= threshold
    tp = weights[:, pos & pred].sum(axis=1)
    tn = weights[:, ~pos & ~pred].sum(axis=1)
    sens = tp / n_pos
    spec = tn / n_neg
    return {
        "auc": auc,
        "accuracy": (tp + tn) / (n_pos + n_neg),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2.0,
    }
