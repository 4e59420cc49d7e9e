"""Downstream room: few-label probes on frozen features and the label-budget benchmark.

Owns the patient-grouped, class-stratified label draws (:mod:`.sampling`), the scikit-learn probes
and their model selection inside the labeled subset (:mod:`.probes`), the torch CNN estimators on
code maps and pixels (:mod:`.cnn`), feature variants of an export (:mod:`.features`), test metrics
with bootstrap CIs and out-of-fold thresholds (:mod:`.metrics`), and the orchestration with its
outputs and MLflow runs (:mod:`.benchmark`): ``vqmed benchmark`` calls :func:`run_benchmark`.
"""

from vqmed.downstream.benchmark import (
    FeatureSource,
    run_benchmark,
    run_benchmark_on_features,
)
from vqmed.downstream.cnn import CodeMapCNN, ImageCNN
from vqmed.downstream.sampling import Budget, draw_labeled_subset

__all__ = [
    "Budget",
    "CodeMapCNN",
    "FeatureSource",
    "ImageCNN",
    "draw_labeled_subset",
    "run_benchmark",
    "run_benchmark_on_features",
]
