"""Label budgets and their random draws: stratified by class, drawn by patient, deterministic."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Budget:
    """One label budget of the benchmark.

    Args:
        kind: ``"fraction"`` (a share of the training images) or ``"per_class"`` (labels per class).
        value: the share in (0, 1] or the number of labels per class.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("fraction", "per_class"):
            raise ValueError(f"budget kind must be 'fraction' or 'per_class', got {self.kind!r}")
        if self.kind == "fraction" and not 0.0 < self.value <= 1.0:
            raise ValueError(f"fraction budget must be in (0, 1], got {self.value}")
        if self.kind == "per_class" and (self.value < 1 or int(self.value) != self.value):
            raise ValueError(f"per-class budget must be a positive integer, got {self.value}")

    @property
    def name(self) -> str:
        """``"1%"``, ``"100%"``, ``"5/class"``: the label used in every output."""
        if self.kind == "fraction":
            return f"{self.value * 100:g}%"
        return f"{int(self.value)}/class"

    @property
    def is_full(self) -> bool:
        """True for the 100% budget, whose subset is the whole training split."""
        return self.kind == "fraction" and self.value >= 1.0

    def targets(self, class_counts: dict[int, int]) -> dict[int, int]:
        """Labels wanted per class, given the images available per class."""
        if self.kind == "fraction":
            # at least one image per class so that every subset is a two-class problem
            return {c: min(n, max(1, round(self.value * n))) for c, n in class_counts.items()}
        return {c: min(n, int(self.value)) for c, n in class_counts.items()}


def make_budgets(fractions: list[float], per_class: list[int]) -> list[Budget]:
    """The budgets of a config: per-class budgets first, then fractions, each ascending."""
    out = [Budget("per_class", float(n)) for n in sorted(set(per_class))]
    out += [Budget("fraction", float(f)) for f in sorted(set(fractions))]
    return out


def patient_strata(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each patient's class (the majority label of its images) for stratified drawing.

    Returns:
        ``(patients, patient_label, image_patient)``: the sorted unique patients, their class, and
        for every image the position of its patient in ``patients``.
    """
    patients, image_patient = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    labels = np.asarray(labels).astype(int)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    counts = np.zeros((len(patients), max(n_classes, 1)), dtype=np.int64)
    np.add.at(counts, (image_patient, labels), 1)
    # ties go to the lower class index (argmax takes the first maximum): deterministic
    return patients, counts.argmax(axis=1), image_patient


def draw_labeled_subset(labels: np.ndarray, groups: np.ndarray, budget: Budget, seed: int, draw: int) -> np.ndarray:
    """Draw the labeled training subset of one budget: whole patients, stratified by class.

    Each class's patients are visited in a random order that depends only on ``(seed, draw)``
    (not on the budget), and a patient is taken when all of its images still fit the class's target.
    Targets are therefore met exactly whenever the remaining patients allow it, patients are never
    split, and a draw's smaller budgets are (nearly always) subsets of its larger ones, which makes
    label-efficiency curves smoother without sharing anything across draws.

    Args:
        labels: integer class of every training image.
        groups: patient key of every training image (all images of a patient go together).
        budget: the label budget.
        seed: the benchmark seed.
        draw: the draw number (0, 1, ...).

    Returns:
        sorted positions (into ``labels``) of the labeled images.
    """
    labels = np.asarray(labels).astype(int)
    if len(labels) != len(groups):
        raise ValueError(f"labels ({len(labels)}) and groups ({len(groups)}) differ in length")
    if budget.is_full:
        return np.arange(len(labels))
    patients, patient_label, image_patient = patient_strata(labels, groups)
    sizes = np.bincount(image_patient, minlength=len(patients))
    class_counts = {int(c): int(sizes[patient_label == c].sum()) for c in np.unique(patient_label)}
    targets = budget.targets(class_counts)
    rng = np.random.default_rng([int(seed), int(draw), zlib.crc32(b"labeled-subset")])
    order = rng.permutation(len(patients))
    chosen: list[int] = []
    for cls, target in sorted(targets.items()):
        taken = 0
        first = None
        for p in order[patient_label[order] == cls]:
            first = p if first is None else first
            if taken + sizes[p] <= target:
                chosen.append(int(p))
                taken += int(sizes[p])
                if taken == target:
                    break
        if taken == 0 and first is not None:
            # every patient of this class is larger than the target: take the first one whole
            chosen.append(int(first))
    return np.flatnonzero(np.isin(image_patient, np.asarray(chosen, dtype=np.int64)))
