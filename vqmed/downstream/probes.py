"""Few-label probes as scikit-learn pipelines, and their model selection inside the labeled subset.

Everything here sees only the labeled subset: hyper-parameters, the choice between classifiers and
the decision threshold all come from out-of-fold (OOF) scores of patient-grouped, class-stratified
folds of that subset. The test split never enters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from vqmed.config import CNNConfig, ProbeConfig
from vqmed.downstream.cnn import CodeMapCNN, ImageCNN
from vqmed.downstream.metrics import choose_threshold

Folds = list[tuple[np.ndarray, np.ndarray]]

#: The classifier registry, simplest first (the order ``selection: one_se`` prefers). The one home of these
#: names: the config validates ``probes.classifiers`` against :data:`CLASSIFIERS`.
#: Classifiers on feature vectors (scikit-learn pipelines, one per feature variant).
SKLEARN_PROBES = ("logreg", "linsvm", "knn", "mlp")
#: Every classifier a config may list: the feature-vector ones and the CNN on the code maps.
CLASSIFIERS = (*SKLEARN_PROBES, "code_cnn")
#: Probes the benchmark's baselines use internally (not configurable by name).
BASELINE_PROBES = ("pca_logreg", "image_cnn")


class CappedPCA(TransformerMixin, BaseEstimator):
    """PCA whose component count is capped by the data it is fitted on.

    With ten labeled images a 50-component PCA is impossible; capping at ``min(n_samples - 1,
    n_features)`` keeps one pipeline for every budget.

    Args:
        n_components: wanted number of components.
        random_state: seeds the randomized solver.
    """

    def __init__(self, n_components: int = 50, random_state: int = 0) -> None:
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> CappedPCA:
        k = max(1, min(int(self.n_components), X.shape[0] - 1, X.shape[1]))
        self.pca_ = PCA(n_components=k, random_state=self.random_state).fit(X)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return self.pca_.transform(X)


def make_probe(
    name: str,
    probes: ProbeConfig,
    cnn: CNNConfig,
    random_state: int,
    codebook: np.ndarray | None = None,
    pca_components: int = 50,
    scale: bool = True,
) -> tuple[BaseEstimator, list[dict[str, Any]]]:
    """A classifier and its hyper-parameter grid (strongest regularisation first).

    Args:
        name: ``logreg``, ``linsvm``, ``knn``, ``mlp``, ``pca_logreg`` (on any feature matrix),
            ``code_cnn`` (on code maps; needs ``codebook``) or ``image_cnn`` (on images).
        probes: grids and sizes of the scikit-learn probes.
        cnn: sizes and training schedule of the CNNs.
        random_state: seeds every random part of the classifier.
        codebook: ``(K, D)`` codebook for ``code_cnn``.
        pca_components: components of ``pca_logreg``.
        scale: start the scikit-learn pipelines with a ``StandardScaler`` fitted on the rows they are
            given; ``False`` when the features arrive standardised already (on the unlabeled pool).
    """
    rs = int(random_state)
    scaler = [("scale", StandardScaler())] if scale else []
    if name == "logreg":
        est = Pipeline([*scaler, ("clf", LogisticRegression(max_iter=2000))])
        return est, [{"clf__C": c} for c in sorted(probes.logreg_c)]
    if name == "pca_logreg":
        est = Pipeline(
            [
                *scaler,
                ("pca", CappedPCA(pca_components, random_state=rs)),
                ("clf", LogisticRegression(max_iter=2000)),
            ]
        )
        return est, [{"clf__C": c} for c in sorted(probes.logreg_c)]
    if name == "linsvm":
        # liblinear penalises the intercept like a weight; under the strong regularisation few labels
        # need, that pins it near 0 and tilts the weights (measured: test AUC 0.856 vs 0.934 at 10% of
        # Kermany labels). A large intercept_scaling leaves the intercept practically unpenalised.
        # The solver follows the shape (``dual="auto"``): the primal with more rows than features (~7x
        # faster at thousands of rows and C=0.01), the dual with more features than rows (on 12k encoder
        # features: 3x faster at 1,300 rows, and at 5,200 rows 3x faster for C=1e-4 but 3x slower for
        # C=0.01); both solve the same problem.
        svc = LinearSVC(dual="auto", max_iter=5000, intercept_scaling=100.0, random_state=rs)
        est = Pipeline([*scaler, ("clf", svc)])
        return est, [{"clf__C": c} for c in sorted(probes.svm_c)]
    if name == "knn":
        est = Pipeline([*scaler, ("clf", KNeighborsClassifier(weights="distance"))])
        return est, [{"clf__n_neighbors": k} for k in sorted(probes.knn_k, reverse=True)]
    if name == "mlp":
        # full-batch L-BFGS: deterministic, and much faster than Adam on a few thousand rows. On 12k
        # features scipy's L-BFGS-B bookkeeping over ~400k weights dominates (~2 s per fit even on 20
        # rows); the leading principal components (``mlp_components``) cut that to a few milliseconds.
        mlp = MLPClassifier(hidden_layer_sizes=(probes.mlp_hidden,), solver="lbfgs", max_iter=probes.mlp_max_iter, random_state=rs)
        pca = [("pca", CappedPCA(probes.mlp_components, random_state=rs))] if probes.mlp_components else []
        est = Pipeline([*scaler, *pca, ("clf", mlp)])
        return est, [{"clf__alpha": a} for a in sorted(probes.mlp_alpha, reverse=True)]
    schedule = {
        "channels": tuple(cnn.channels),
        "epochs": cnn.epochs,
        "max_steps": cnn.max_steps,
        "batch_size": cnn.batch_size,
        "lr": cnn.lr,
        "weight_decay": cnn.weight_decay,
        "random_state": rs,
    }
    if name == "code_cnn":
        if codebook is None:
            raise ValueError("code_cnn needs the export's codebook")
        return CodeMapCNN(codebook=codebook, freeze_embedding=cnn.freeze_embedding, **schedule), [{}]
    if name == "image_cnn":
        return ImageCNN(**schedule), [{}]
    raise ValueError(f"unknown probe {name!r}")


def make_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> Folds:
    """Patient-grouped, class-stratified folds of the labeled subset.

    The fold count drops to the number of patients of the rarest class when that is smaller;
    when even two grouped folds are impossible (a class with a single patient) the folds fall back
    to stratified folds of images.

    Raises:
        ValueError: when a class has fewer than two labeled images.
    """
    y = np.asarray(y).astype(int)
    groups = np.asarray(groups).astype(str)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        raise ValueError(f"cross-validation needs >= 2 labeled images of each class; got {dict(zip(classes.tolist(), counts.tolist()))}")
    patients_per_class = min(len(np.unique(groups[y == c])) for c in classes)
    k = min(n_folds, patients_per_class)
    if k >= 2:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = list(splitter.split(np.zeros(len(y)), y, groups))
        if all(len(np.unique(y[tr])) == 2 and len(te) > 0 for tr, te in folds):
            return folds
    k = min(n_folds, int(counts.min()))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of a ROC AUC estimated on ``n_pos`` positives and ``n_neg`` negatives
    (Hanley & McNeil 1982): wide with a few dozen labels, narrow with hundreds."""
    a = min(max(float(auc), 1e-6), 1 - 1e-6)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / max(n_pos * n_neg, 1)
    return float(np.sqrt(max(var, 0.0)))


def select(cv_aucs: list[float], y: np.ndarray, rule: str = "one_se") -> int:
    """Index of the chosen option among ``cv_aucs``, listed simplest (most regularised) first.

    ``best``: the highest cross-validated AUC (first on ties). ``one_se``: the first option whose AUC is
    within one standard error of the best (Breiman's one-standard-error rule): with a few dozen labels
    the differences between options are mostly noise, and the simpler model generalises better,
    above all to a test set that differs from the training images (as Kermany's does).
    """
    best = int(np.argmax(cv_aucs))
    if rule == "best":
        return best
    y = np.asarray(y).astype(int)
    se = auc_standard_error(cv_aucs[best], int(y.sum()), int(len(y) - y.sum()))
    return next(i for i, auc in enumerate(cv_aucs) if auc >= cv_aucs[best] - se)


def scores_of(model: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """Positive-class scores for ROC AUC: probabilities where the model has them, else margins."""
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(X))[:, 1].astype(np.float64)
    return np.asarray(model.decision_function(X)).astype(np.float64)


@dataclass
class ProbeFit:
    """A probe fitted on the whole labeled subset, with what cross-validation said about it.

    Args:
        name: the candidate's name (e.g. ``code_histogram+logreg``).
        model: the estimator refitted on every labeled image with the chosen hyper-parameters
            (``None`` until :meth:`refit` when :func:`fit_probe` was called with ``refit=False``).
        params: the chosen hyper-parameters.
        cv_auc: pooled out-of-fold ROC AUC of the chosen hyper-parameters.
        oof: out-of-fold scores of the labeled images (chosen hyper-parameters).
        threshold: decision threshold chosen on ``oof`` (Youden's J).
        grid_auc: pooled OOF AUC of every grid point, in grid order.
    """

    name: str
    model: BaseEstimator | None
    params: dict[str, Any]
    cv_auc: float
    oof: np.ndarray
    threshold: float
    grid_auc: list[float] = field(default_factory=list)
    estimator: BaseEstimator | None = None

    def refit(self, X: np.ndarray, y: np.ndarray) -> BaseEstimator:
        """Fit (once) the chosen configuration on every labeled image and return it."""
        if self.model is None:
            if self.estimator is None:
                raise ValueError(f"{self.name}: no estimator to refit")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                self.model = clone(self.estimator).fit(X, np.asarray(y).astype(int))
        return self.model


def fit_probe(
    name: str,
    estimator: BaseEstimator,
    grid: list[dict[str, Any]],
    X: np.ndarray,
    y: np.ndarray,
    folds: Folds,
    refit: bool = True,
    selection: str = "one_se",
) -> ProbeFit:
    """Choose hyper-parameters by pooled OOF AUC on ``folds``, then refit on all of ``X``.

    The grids list the strongest regularisation first; ``selection`` (see :func:`select`) decides
    between them.
    ``k`` of k-NN is capped by the smallest training fold.

    Args:
        name: the candidate's name, kept in the result.
        estimator: an unfitted scikit-learn estimator (cloned, never modified).
        grid: parameter settings to try (``[{}]`` for none).
        X: features (or code maps / images) of the labeled subset.
        y: their 0/1 labels.
        folds: ``(train, validation)`` positions into ``X`` (see :func:`make_folds`).
        refit: refit now; with ``False`` only cross-validate (call ``.refit(X, y)`` when needed,
            e.g. only for the candidate a method selects).
        selection: ``one_se`` or ``best`` (see :func:`select`).
    """
    y = np.asarray(y).astype(int)
    smallest_train = min(len(tr) for tr, _ in folds)
    grid = _cap_neighbours(grid, smallest_train)
    oof = np.zeros((len(grid), len(y)))
    prefix, last = _shared_prefix(estimator, grid)
    with warnings.catch_warnings():
        # small labeled sets: lbfgs stopping at max_iter is expected, not news
        warnings.simplefilter("ignore", ConvergenceWarning)
        for tr, va in folds:
            if prefix is not None and last is not None:
                # the grid only touches the final step: fit scaler/PCA once per fold (same result, less work)
                step_name, step = last
                pre = clone(prefix).fit(X[tr], y[tr])
                x_tr, x_va = pre.transform(X[tr]), pre.transform(X[va])
                for g, params in enumerate(grid):
                    inner = {k[len(step_name) + 2:]: v for k, v in params.items()}
                    oof[g, va] = scores_of(clone(step).set_params(**inner).fit(x_tr, y[tr]), x_va)
                continue
            for g, params in enumerate(grid):
                model = clone(estimator).set_params(**params).fit(X[tr], y[tr])
                oof[g, va] = scores_of(model, X[va])
    grid_auc = [float(roc_auc_score(y, row)) for row in oof]
    best = select(grid_auc, y, selection)
    fit = ProbeFit(
        name=name,
        model=None,
        params=grid[best],
        cv_auc=grid_auc[best],
        oof=oof[best],
        threshold=choose_threshold(y, oof[best]),
        grid_auc=grid_auc,
        estimator=clone(estimator).set_params(**grid[best]),
    )
    if refit:
        fit.refit(X, y)
    return fit


def _shared_prefix(estimator: BaseEstimator, grid: list[dict[str, Any]]) -> tuple[Pipeline | None, tuple[str, BaseEstimator] | None]:
    """``(pipeline[:-1], last step)`` when every grid key addresses the pipeline's last step."""
    if not isinstance(estimator, Pipeline) or len(estimator.steps) < 2:
        return None, None
    name, step = estimator.steps[-1]
    if all(key.startswith(f"{name}__") for params in grid for key in params):
        return estimator[:-1], (name, step)
    return None, None


def _cap_neighbours(grid: list[dict[str, Any]], n_train: int) -> list[dict[str, Any]]:
    if not grid or "clf__n_neighbors" not in grid[0]:
        return grid
    kept = [p for p in grid if p["clf__n_neighbors"] <= n_train]
    return kept or [{"clf__n_neighbors": n_train}]
