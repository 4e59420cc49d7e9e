"""Downstream room: few-label probes on frozen features and the label-budget benchmark.

Owns the patient-grouped, class-stratified label draws (:mod:`.sampling`), the scikit-learn probes
and their model selection inside the labeled subset (:mod:`.probes`), the torch CNN estimators on
code maps and pixels (:mod:`.cnn`), feature variants of an export (:mod:`.features`), test metrics
with bootstrap CIs and out-of-fold thresholds (:mod:`.metrics`), and the benchmark in three rooms:
its inputs (export store, images, random encoder, validation patients: :mod:`.inputs`), the draw engine
(rows, draws, worker processes: :mod:`.engine`) and the report (CSV, Markdown, figures, MLflow:
:mod:`.report`), wired by :mod:`.benchmark`: ``vqmed benchmark`` calls :func:`run_benchmark`.
The classifier names (:data:`.probes.CLASSIFIERS`) and feature variants (:data:`.features.VARIANTS`) live
here; the config validates against them.
"""

from vqmed.downstream.benchmark import run_benchmark, run_benchmark_on_features
from vqmed.downstream.inputs import FeatureSource
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
