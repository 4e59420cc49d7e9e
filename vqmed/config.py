"""Typed, validated run configs loaded from ``configs/*.yaml``.

Every tunable value has one home: the YAML file. The CLI may override any field with
``--set section.key=value`` (parsed as YAML, so ``--set train.epochs=3`` gives an int), and a few
common flags (``--out``) are shorthands for such overrides. Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the offending key and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


# Model input side lengths: below 8 no encoder downsamples meaningfully; above these an image (float32,
# several copies while resizing) costs gigabytes per item and no model of this project needs it.
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = {2: 4096, 3: 512}
RESIZE_MODES = ("squeeze", "pad", "crop")
INTENSITY_MODES = ("minmax", "percentile")


def image_size_problem(size: Any, spatial_dims: int = 2) -> str | None:
    """What is wrong with a model input size (``None`` when it is fine), as one line."""
    top = MAX_IMAGE_SIZE.get(int(spatial_dims), MAX_IMAGE_SIZE[2])
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_IMAGE_SIZE <= size <= top:
        return f"must be an integer from {MIN_IMAGE_SIZE} to {top} ({spatial_dims}D), got {size!r}"
    return None


@dataclass
class DataConfig:
    """Which images to read and how they reach the model.

    Args:
        manifests: manifest CSV files (relative to the working directory or absolute).
        splits: manifest splits to use; empty means all rows. Labels are ignored for pretraining.
        data_root: root that manifest paths are relative to; ``None`` = ``--data-root``,
            ``VQMED_DATA_ROOT`` or ``../shared/data``.
        image_size: side length the images are resized to (pixels / voxels).
        spatial_dims: 2 for images, 3 for volumes.
        channels: 1 (grey; RGB with identical channels is converted) or 3 (true colour).
        spacing: 3D only: ``[rows, columns, slices]`` voxel size in mm that every volume is resampled to before it
            is centre-cropped or padded to the ``image_size`` cube (one grid for every scanner); ``None`` resizes
            each volume to the cube.
        val_fraction: share of the unlabeled images held out for validation, split by patient.
        augment: augment the pretraining batches with the objective's chain (``vqmed.data.augment``: ``mild`` for
            reconstruction, ``views`` for an invariance objective's two views); off, every view is the image.
        cache_dir: where decoded, resized images are cached (``None`` disables the cache).
        fail_fast: stop at the first unreadable file instead of quarantining it.
        max_images: use at most this many images (after the split filter); ``None`` = all.
        resize: ``squeeze`` (stretch to a square, the aspect ratio is lost), ``pad`` (longest side to
            ``image_size``, black bars) or ``crop`` (shortest side to ``image_size``, centre crop).
        intensity: ``minmax`` (per-image min-max after resizing) or ``percentile`` (0.5-99.5th
            percentile window, clipped: small burned-in markers do not set the brightness).
        keep_paths: write file paths into ``quarantine.csv`` (off: salted study ids only).
    """

    manifests: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    data_root: str | None = None
    image_size: int = 64
    spatial_dims: int = 2
    channels: int = 1
    spacing: list[float] | None = None
    val_fraction: float = 0.05
    augment: bool = True
    cache_dir: str | None = ".vqmed_cache"
    fail_fast: bool = False
    max_images: int | None = None
    resize: str = "squeeze"
    intensity: str = "minmax"
    keep_paths: bool = False

    def validate(self) -> None:
        _check(len(self.manifests) > 0, "data.manifests", "must list at least one manifest CSV")
        _check(self.spatial_dims in (2, 3), "data.spatial_dims", f"must be 2 or 3, got {self.spatial_dims}")
        problem = image_size_problem(self.image_size, self.spatial_dims)
        _check(problem is None, "data.image_size", str(problem))
        _check(self.resize in RESIZE_MODES, "data.resize", f"must be one of {list(RESIZE_MODES)}, got {self.resize!r}")
        _check(self.intensity in INTENSITY_MODES, "data.intensity",
               f"must be one of {list(INTENSITY_MODES)}, got {self.intensity!r}")
        _check(self.channels in (1, 3), "data.channels", f"must be 1 or 3, got {self.channels}")
        if self.spacing is not None:
            _check(self.spatial_dims == 3, "data.spacing", "needs spatial_dims 3 (it resamples volumes)")
            _check(len(self.spacing) == 3 and all(float(v) > 0 for v in self.spacing), "data.spacing",
                   f"must be 3 positive voxel sizes in mm, got {self.spacing}")
        _check(0.0 < self.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        _check(self.max_images is None or self.max_images > 0, "data.max_images", "must be positive or null")


@dataclass
class ModelConfig:
    """The network, chosen by name, with its constructor arguments.

    Args:
        name: ``vqvae`` (single level), ``vqvae2`` (hierarchical), ``vit_vqvae`` (transformer encoder and
            decoder) or ``monai_vqvae`` (MONAI's reference ``VQVAE``, used as the speed/quality baseline).
        params: keyword arguments of the chosen class (see :mod:`vqmed.networks`); ``spatial_dims``,
            the channel counts and (for ``vit_vqvae``) ``img_size`` are filled in from the data section.
    """

    name: str = "vqvae"
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        # The networks' registry is the one home of the model names (imported here, not copied).
        from vqmed.networks.factory import MODELS

        _check(self.name in MODELS, "model.name", f"must be one of {sorted(MODELS)}, got {self.name!r}")


@dataclass
class ObjectiveConfig:
    """What pretraining minimises, chosen by name, with its parameters.

    Args:
        name: a registered objective (``vqmed.training.objectives.OBJECTIVES``): ``reconstruction`` (the
            VQ-VAE loss), ``vicreg`` (VQ-VAE loss + VICReg between two augmented views) or ``masked``
            (reconstruct the whole image from a patch-masked copy).
        params: the objective's parameters (see its ``Params`` dataclass); unknown keys are errors.
    """

    name: str = "reconstruction"
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        # The registry is the one home of the names and parameters (imported here, not copied).
        from vqmed.training.objectives import objective_params

        objective_params(self.name, self.params)


@dataclass
class LoopConfig:
    """What every optimisation loop has (pretraining's ``TrainConfig``, the prior's ``PriorTrainConfig``).

    Args:
        epochs: passes over the training data.
        max_steps: stop after this many optimiser steps (``None`` = epochs decide).
        max_minutes: wall-clock budget; training stops cleanly at the end of the step that passes it.
        batch_size: examples per optimiser step per process.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up before cosine decay.
        grad_clip: clip the gradient norm to this value (``None`` = off).
    """

    epochs: int = 10
    max_steps: int | None = None
    max_minutes: float | None = None
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float | None = 1.0

    def validate_loop(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
        _check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes", "must be > 0 or null")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")


@dataclass
class TrainConfig(LoopConfig):
    """The pretraining loop: :class:`LoopConfig`'s fields (``batch_size`` counts images) and

    Args:
        num_workers: DataLoader workers (more than 1 slows a 2-core machine).
        threads: torch intra-op threads; ``None`` = the number of usable cores.
        amp: mixed precision on CUDA (``bf16``/``fp16``/``off``); always off on CPU, where bf16 is ~25x slower.
        compile: ``torch.compile`` the model on CUDA. Ignored on CPU, where it did not pay: the CPU demo's step
            (2 cores, session 20) ran at ~80 images/s compiled against 79-89 eager, after a ~70 s compile.
        channels_last: memory format for 2D convolutions.
        log_every: log step metrics every this many steps.
        checkpoint_every: also checkpoint every this many steps within an epoch (``None`` = per epoch only).
        val_images: validation images shown in the reconstruction grid.
        device: ``auto``, ``cpu`` or ``cuda``.
        keep_checkpoints_at: also keep a model-only checkpoint ``checkpoints/step_NNNNNN.pt`` after each of
            these steps (0 = the random initialisation), e.g. for a pretraining-compute curve.
    """

    num_workers: int = 0
    threads: int | None = None
    amp: str = "bf16"
    compile: bool = False
    channels_last: bool = True
    log_every: int = 10
    checkpoint_every: int | None = 100
    val_images: int = 16
    device: str = "auto"
    keep_checkpoints_at: list[int] = field(default_factory=list)

    def validate(self) -> None:
        self.validate_loop()
        _check(self.amp in ("bf16", "fp16", "off"), "train.amp", f"must be bf16, fp16 or off, got {self.amp!r}")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {self.device!r}")
        _check(self.num_workers >= 0, "train.num_workers", "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.checkpoint_every is None or self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1 or null")
        _check(all(s >= 0 for s in self.keep_checkpoints_at), "train.keep_checkpoints_at", "steps must be >= 0")


@dataclass
class TrackingConfig:
    """MLflow tracking.

    Args:
        experiment: MLflow experiment name.
        tracking_uri: ``None`` = ``MLFLOW_TRACKING_URI`` if set, else the project's local store.
        log_model: log the final model as an MLflow model.
        gif_every: add a frame to the reconstruction animation every this many epochs.
    """

    experiment: str = "vqmed-pretrain"
    tracking_uri: str | None = None
    log_model: bool = True
    gif_every: int = 1

    def validate(self) -> None:
        _check(bool(self.experiment and self.experiment.strip()), "tracking.experiment", "must be a non-empty name")
        _check(self.tracking_uri is None or bool(self.tracking_uri.strip()), "tracking.tracking_uri", "must be null or a URI")
        _check(self.gif_every >= 1, "tracking.gif_every", f"must be >= 1 (epochs between animation frames), got {self.gif_every}")


@dataclass
class PretrainConfig:
    """A whole pretraining run: ``vqmed pretrain --config configs/pretrain/NAME.yaml``."""

    name: str = "pretrain"
    seed: int = 0
    out: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.objective.validate()
        self.train.validate()
        self.tracking.validate()


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value`` into the dotted key and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with dotted ``--set`` overrides applied."""
    out = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls: type, raw: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint in (str, float) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def load_config(cls: type, path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """Load, override and validate a config of dataclass type ``cls`` (e.g. :class:`PretrainConfig`).

    ``path=None`` starts from the dataclass's defaults (for commands whose config file is optional).
    """
    raw = apply_overrides(load_yaml(path) if path is not None else {}, overrides or [])
    try:
        cfg = from_dict(cls, raw)
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path if path is not None else 'command line'}: {exc}") from None
    return cfg


def check_export_overrides(overrides: list[str]) -> None:
    """A pipeline's ``--set`` overrides of its export step: every one an :class:`ExportConfig` key=value with a
    valid value, and none of the paths the pipeline sets itself (the model, the manifest, the store, the data
    root); checked when the pipeline's config loads, not minutes later when the export starts."""
    key, placeholders = "export_overrides", {"model": "-", "manifest": "-", "out": "-"}
    for i, text in enumerate(overrides):
        _check(isinstance(text, str), f"{key}[{i}]", f"must be a key=value string, got {text!r}")
        try:
            name, _ = parse_override(text)
        except ConfigError as exc:
            raise ConfigError(f"{key}[{i}]: {exc}") from None
        _check(name not in (*placeholders, "data_root"), f"{key}[{i}]",
               f"{name!r} is set by the pipeline (its model, manifest, store and data root), not here")
    try:
        from_dict(ExportConfig, apply_overrides(placeholders, overrides), where="the export step").validate()
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML dumps and MLflow params)."""
    return dataclasses.asdict(cfg)


@dataclass
class ExportConfig:
    """Export of a frozen model's code maps and features: ``vqmed export --config configs/export/default.yaml``.

    Every field's default is here, once; ``vqmed export`` flags (``--model``, ``--batch-size``, ...) and
    ``--set key=value`` override the YAML file.

    Args:
        model: checkpoint file, pretraining output directory or MLflow run id (``--model``).
        manifest: manifest CSV of the images to export (``--manifest``).
        out: the store directory (``--out``).
        data_root: root of the manifest paths (``None``: ``VQMED_DATA_ROOT`` or ``../shared/data``).
        batch_size: images per encoder call.
        arrays: feature arrays to write (``vqmed.export.features.ARRAYS``; the code maps are always
            written); ``None``: every array the model gives.
        keep_ids: keep the manifest's study/series ids instead of salted hashes.
        nifti: also write 3D code maps as NIfTI on the scan's grid.
        cache_dir: image cache of the data loader (e.g. the pretraining's ``.vqmed_cache``); ``None``:
            decode in memory.
        device: ``auto``, ``cpu`` or ``cuda``.
        keep_paths: also write each image's path into the index and ``quarantine.csv`` (off: salted ids only).
        grid: cells per axis of the pooled grids (``encoder_grid``, its spread, ``continuous_grid``): 4 keeps
            where a finding lies at 16 cells per stage; 8 scored higher on the validation patients (probes'
            avg4 0.9753 against 0.9722 and 0.9725 at two model seeds) but makes the store 3.7x larger and the
            probes 2.3x slower, more than the CPU demo's 20 minutes hold (docs/objective_selection.md). The
            benchmark's ``encoder_stats_GxG`` reads coarser grids from it.
    """

    model: str | None = None
    manifest: str | None = None
    out: str | None = None
    data_root: str | None = None
    batch_size: int = 64
    arrays: list[str] | None = None
    keep_ids: bool = False
    nifti: bool = False
    cache_dir: str | None = None
    device: str = "auto"
    keep_paths: bool = False
    grid: int = 4

    def validate(self) -> None:
        for key in ("model", "manifest", "out"):
            _check(getattr(self, key) is not None, key, f"is required (in the YAML file or as --{key})")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grid >= 1, "grid", f"must be >= 1, got {self.grid}")
        _check(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.arrays is not None:
            # The export room's registry is the one home of the array names (imported here, not copied).
            from vqmed.export.features import ARRAYS

            for i, name in enumerate(self.arrays):
                _check(name in ARRAYS, f"arrays[{i}]", f"must be one of {list(ARRAYS)}, got {name!r}")


@dataclass
class PipelineConfig:
    """An end-to-end run (manifest -> pretrain -> export -> benchmark), composed of CLI steps.

    Args:
        name: name of the pipeline run (output folder name).
        out: output directory; each step writes a sub-folder.
        data_root: data root for every step (``None`` = ``VQMED_DATA_ROOT`` or ``../shared/data``).
        dataset: folder (relative to the data root) the manifest is built from.
        manifest: manifest CSV written by the first step and read by the others.
        pretrain_config: pretraining config; its ``data.manifests`` is replaced by ``manifest``.
        pretrain_overrides: ``--set`` overrides for the pretraining step.
        export_overrides: ``--set`` overrides for the export step (:class:`ExportConfig` keys, e.g.
            ``batch_size=128``, ``cache_dir=.vqmed_cache`` to read the pretraining's decoded images, ``grid=8``).
        benchmark_config: benchmark config; its export directory is set by the pipeline.
        benchmark_overrides: ``--set`` overrides for the benchmark step.
    """

    name: str = "pneumonia"
    out: str = "runs/pipeline"
    data_root: str | None = None
    dataset: str = "chest_xray"
    manifest: str = "data_manifests/chest_xray.csv"
    pretrain_config: str = "configs/pretrain/cxr_64.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)
    export_overrides: list[str] = field(default_factory=list)
    benchmark_config: str = "configs/benchmark/pneumonia.yaml"
    benchmark_overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for key in ("pretrain_config", "benchmark_config"):
            _check(Path(getattr(self, key)).is_file(), key, f"file not found: {getattr(self, key)}")
        check_export_overrides(self.export_overrides)


@dataclass
class ComputeCurveConfig:
    """A pretraining-compute curve: each objective pretrained once for ``max(steps)`` steps, a model-only
    checkpoint kept at every entry of ``steps``, each exported and probed with the same benchmark config.

    Args:
        name: name of the curve (MLflow run name).
        out: output directory.
        data_root: data root for every step (``None`` = ``VQMED_DATA_ROOT`` or ``../shared/data``).
        manifest: manifest CSV every step reads.
        pretrain_config: the pretraining config (an arm with no overrides trains its objective).
        pretrain_overrides: ``--set`` overrides for every arm (e.g. the batch size).
        objectives: arm name -> extra ``--set`` overrides of that arm (``{}`` = the config as it is).
        steps: pretraining steps at which the model is probed; 0 is the random initialisation (shared by the arms).
        export_overrides: ``--set`` overrides for every export (:class:`ExportConfig` keys, as a
            :class:`PipelineConfig`'s).
        benchmark_config: the probe benchmark config (logistic regression, budgets of the curve).
        benchmark_overrides: ``--set`` overrides for every benchmark.
        experiment: MLflow experiment of the curve's run.
    """

    name: str = "compute-curve"
    out: str = "runs/compute_curve"
    data_root: str | None = None
    manifest: str = "data_manifests/chest_xray.csv"
    pretrain_config: str = "configs/pretrain/cxr_64.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)
    objectives: dict[str, Any] = field(default_factory=lambda: {
        "chosen": [],
        "reconstruction": ["objective.name=reconstruction", "objective.params={}", "train.batch_size=64"],
    })
    steps: list[int] = field(default_factory=lambda: [0, 616, 2464, 9856])
    export_overrides: list[str] = field(default_factory=list)
    benchmark_config: str = "configs/benchmark/pneumonia_curve.yaml"
    benchmark_overrides: list[str] = field(default_factory=list)
    experiment: str = "vqmed-compute-curve"

    def validate(self) -> None:
        for key in ("pretrain_config", "benchmark_config"):
            _check(Path(getattr(self, key)).is_file(), key, f"file not found: {getattr(self, key)}")
        _check(len(self.objectives) > 0, "objectives", "must name at least one arm")
        for arm, overrides in self.objectives.items():
            _check(isinstance(overrides, list) and all(isinstance(o, str) for o in overrides), f"objectives.{arm}",
                   f"must be a list of section.key=value overrides, got {overrides!r}")
        _check(len(self.steps) > 0 and all(isinstance(s, int) and s >= 0 for s in self.steps), "steps",
               f"must be a non-empty list of steps >= 0, got {self.steps}")
        _check(max(self.steps) > 0, "steps", "needs at least one step > 0")
        check_export_overrides(self.export_overrides)


@dataclass
class BudgetConfig:
    """Label budgets of the low-label benchmark and how often each is drawn.

    Args:
        fractions: shares of the training split's images (``1.0`` = every label).
        per_class: labels per class (e.g. 5 -> 5 NORMAL + 5 PNEUMONIA).
        draws: random draws per budget, each stratified by class and drawn by patient.
        full_draws: draws for a fraction of 1.0; that subset is the whole split every time, so
            extra draws only vary the classifiers' seeds.
    """

    fractions: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.10, 0.25, 1.0])
    per_class: list[int] = field(default_factory=lambda: [5, 10, 25, 50])
    draws: int = 5
    full_draws: int = 1

    def validate(self) -> None:
        _check(len(self.fractions) + len(self.per_class) > 0, "budgets", "needs at least one budget")
        for i, f in enumerate(self.fractions):
            _check(0.0 < f <= 1.0, f"budgets.fractions[{i}]", f"must be in (0, 1], got {f}")
        for i, n in enumerate(self.per_class):
            _check(n >= 2, f"budgets.per_class[{i}]", f"must be >= 2 (cross-validation needs it), got {n}")
        _check(self.draws >= 1, "budgets.draws", f"must be >= 1, got {self.draws}")
        _check(self.full_draws >= 1, "budgets.full_draws", f"must be >= 1, got {self.full_draws}")


@dataclass
class ProbeConfig:
    """Classifiers on frozen features and their model selection inside the labeled subset.

    Args:
        variants: feature variants: ``quantized_mean``, ``code_histogram``, ``continuous_mean``, ``continuous_grid``,
            ``encoder_grid`` (the encoder's stage activations mean-pooled on a 4x4 grid), ``encoder_grid_std`` (their
            standard deviation in the same cells), ``encoder_stats`` (both side by side), ``codes_grid_hist_GxG`` (a G x G grid of code histograms) and ``codes_grid_mean_GxG``
            (codebook vectors mean-pooled per cell). Variants whose arrays the export lacks are skipped.
        classifiers: ``logreg``, ``linsvm``, ``knn``, ``mlp`` (on every variant) and ``code_cnn``
            (a small CNN on the code maps, embedding initialised from the codebook), simplest first:
            the order in which ``selection: one_se`` prefers them.
        cv_folds: patient-grouped stratified folds inside the labeled subset (fewer when a class has
            fewer patients); they pick hyper-parameters, the classifier and the decision threshold.
        logreg_c: inverse regularisation strengths tried for logistic regression.
        svm_c: ``C`` values tried for the linear SVM.
        knn_k: neighbour counts tried for k-nearest neighbours (larger than the fold are dropped).
        mlp_hidden: hidden units of the one-hidden-layer MLP.
        mlp_alpha: L2 penalties tried for the MLP.
        mlp_max_iter: MLP optimiser iterations.
        mlp_components: principal components of the (standardised) features the MLP sees, capped by
            the labeled rows; ``None`` feeds it every feature. With thousands of features and a few
            dozen labels the components carry what an MLP can use, at a fraction of L-BFGS's cost.
        report_candidates: also report every variant x classifier candidate, not only the one selected.
        standardize: where the scikit-learn probes' feature means and standard deviations come from,
            for every method alike (raw pixels and PCA too): ``pool``, the whole training split with
            its labels unused (the unlabeled archive a user has), or ``subset``, the labeled subset only
            (a few dozen rows give noisy scales for thousands of features).
        selection: how cross-validation chooses hyper-parameters and the classifier: ``one_se`` (the
            simplest option, first in the grid / in ``classifiers`` order, whose out-of-fold AUC is within
            one standard error of the best) or ``best`` (the highest out-of-fold AUC).
    """

    variants: list[str] = field(
        default_factory=lambda: ["quantized_mean", "code_histogram", "codes_grid_mean_4x4", "continuous_mean"]
    )
    classifiers: list[str] = field(default_factory=lambda: ["logreg", "linsvm", "knn", "mlp", "code_cnn"])
    cv_folds: int = 5
    logreg_c: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    svm_c: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    knn_k: list[int] = field(default_factory=lambda: [5, 15, 45])
    mlp_hidden: int = 64
    mlp_alpha: list[float] = field(default_factory=lambda: [1e-2, 1.0])
    mlp_max_iter: int = 200
    mlp_components: int | None = None
    report_candidates: bool = True
    standardize: str = "pool"
    selection: str = "one_se"

    def validate(self) -> None:
        _check(self.selection in ("one_se", "best"), "probes.selection", f"must be 'one_se' or 'best', got {self.selection!r}")
        _check(self.standardize in ("pool", "subset"), "probes.standardize", f"must be 'pool' or 'subset', got {self.standardize!r}")
        _check(len(self.variants) > 0, "probes.variants", "must list at least one feature variant")
        # The downstream room's registry is the one home of the variant names and the grid parser.
        from vqmed.downstream.features import VARIANTS, parse_grid_variant

        for i, v in enumerate(self.variants):
            ok = v in VARIANTS or parse_grid_variant(v) is not None
            _check(ok, f"probes.variants[{i}]", f"unknown variant {v!r}; use {sorted(VARIANTS)} or "
                   "codes_grid_hist_GxG / codes_grid_mean_GxG / encoder_stats_GxG")
        _check_classifiers(self.classifiers, "probes.classifiers")
        _check(self.cv_folds >= 2, "probes.cv_folds", f"must be >= 2, got {self.cv_folds}")
        for key in ("logreg_c", "svm_c", "mlp_alpha"):
            values = getattr(self, key)
            _check(len(values) > 0 and all(v > 0 for v in values), f"probes.{key}", f"must be a non-empty list of positive numbers, got {values}")
        _check(len(self.knn_k) > 0 and all(k >= 1 for k in self.knn_k), "probes.knn_k", f"must be a non-empty list of ints >= 1, got {self.knn_k}")
        _check(self.mlp_hidden >= 1, "probes.mlp_hidden", "must be >= 1")
        _check(self.mlp_max_iter >= 1, "probes.mlp_max_iter", "must be >= 1")
        _check(self.mlp_components is None or self.mlp_components >= 1, "probes.mlp_components", f"must be null or >= 1, got {self.mlp_components}")


def _check_classifiers(names: list[str], key: str) -> None:
    # The probes' registry is the one home of the classifier names (imported here, not copied).
    from vqmed.downstream.probes import CLASSIFIERS

    _check(len(names) > 0, key, "must list at least one classifier")
    for i, c in enumerate(names):
        _check(c in CLASSIFIERS, f"{key}[{i}]", f"must be one of {list(CLASSIFIERS)}, got {c!r}")


@dataclass
class CNNConfig:
    """The two tiny CNNs: on code maps (frozen encoder) and from scratch on pixels (baseline).

    Args:
        channels: output channels of the convolution layers (each halves the resolution).
        epochs: passes over the labeled subset, capped by ``max_steps``.
        max_steps: at most this many optimiser steps per fit (keeps large budgets cheap).
        batch_size: images per step (the whole subset when it is smaller).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        freeze_embedding: keep the codebook embedding of the code-map CNN fixed.
    """

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    epochs: int = 30
    max_steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    freeze_embedding: bool = False

    def validate(self) -> None:
        _check(len(self.channels) > 0 and all(c >= 1 for c in self.channels), "cnn.channels", f"must be positive ints, got {self.channels}")
        _check(self.epochs >= 1, "cnn.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.max_steps >= 1, "cnn.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1, "cnn.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, "cnn.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "cnn.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass
class BaselineConfig:
    """Baselines run on the same draws as the frozen features.

    Args:
        raw_pixels: logistic regression on standardised raw pixels (``image_size`` squared).
        pca: PCA + logistic regression on the raw pixels.
        pca_components: PCA components (capped by the labeled subset's size).
        random_encoder: the same probes on features of a randomly initialised encoder of the
            pretrained architecture (the first feature variant).
        random_encoder_classifiers: the classifiers the random encoder's features get, chosen between
            by the same cross-validation; ``None``: every one of ``probes.classifiers``.
        cnn_scratch: a tiny CNN trained from scratch on the labeled images.
    """

    raw_pixels: bool = True
    pca: bool = True
    pca_components: int = 50
    random_encoder: bool = True
    random_encoder_classifiers: list[str] | None = None
    cnn_scratch: bool = True

    def validate(self) -> None:
        _check(self.pca_components >= 1, "baselines.pca_components", "must be >= 1")
        if self.random_encoder_classifiers is not None:
            _check_classifiers(self.random_encoder_classifiers, "baselines.random_encoder_classifiers")


@dataclass
class MetricConfig:
    """Test-set metrics and their uncertainty.

    Args:
        bootstrap: bootstrap resamples of the test images (stratified by class) for the CIs.
        ci: confidence level of the intervals.
    """

    bootstrap: int = 1000
    ci: float = 0.95

    def validate(self) -> None:
        _check(self.bootstrap >= 10, "metrics.bootstrap", f"must be >= 10, got {self.bootstrap}")
        _check(0.5 < self.ci < 1.0, "metrics.ci", f"must be in (0.5, 1), got {self.ci}")


@dataclass
class BenchmarkConfig:
    """The low-label benchmark: ``vqmed benchmark --config configs/benchmark/NAME.yaml``.

    Args:
        name: name of the MLflow parent run.
        seed: seeds the label draws, the folds, the classifiers and the bootstrap.
        out: output directory (``--out`` overrides it).
        export: the export store directory (``vqmed export --out``).
        data_root: root of the manifest paths for the pixel baselines (``None`` = ``VQMED_DATA_ROOT``
            or ``../shared/data``).
        image_size: side of the raw-pixel images of the pixel baselines and the scratch CNN.
        train_split: split the labeled subsets are drawn from.
        test_split: split every method is evaluated on with ``evaluate_on: test`` (never used for tuning).
        evaluate_on: ``test`` (labels from the whole training split, the test split scored) or
            ``validation`` (labels, folds and feature scales from the training split less the patients of
            ``validation_patients``, whose training images are scored; the test split is never read).
            Choose objectives, weights, pretraining lengths and feature variants with ``validation``;
            score the final choice once with ``test``.
        validation_patients: patient list CSV (``#`` comment lines, a ``patient_id`` column), e.g.
            ``data_manifests/chest_xray_validation_patients.csv``; needed by ``evaluate_on: validation``.
        positive_label: the positive class; every other label is negative.
        threads: torch and BLAS threads of each worker (1 keeps results bit-reproducible).
        jobs: worker processes running label draws side by side; every draw has its own seeds, so
            the results are the same for any number of jobs.
        cache_dir: image cache of the dataset loader (``None`` disables it).
    """

    name: str = "pneumonia-benchmark"
    seed: int = 0
    out: str = "runs/benchmark"
    export: str = "runs/export"
    data_root: str | None = None
    image_size: int = 64
    train_split: str = "train"
    test_split: str = "test"
    evaluate_on: str = "test"
    validation_patients: str | None = None
    positive_label: str = "PNEUMONIA"
    threads: int = 1
    jobs: int = 1
    cache_dir: str | None = ".vqmed_cache"
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    metrics: MetricConfig = field(default_factory=MetricConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="vqmed-benchmark", log_model=False))

    def validate(self) -> None:
        _check(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        _check(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        _check(self.jobs >= 1, "jobs", f"must be >= 1, got {self.jobs}")
        _check(self.train_split != self.test_split, "test_split", "must differ from train_split")
        _check(self.evaluate_on in ("test", "validation"), "evaluate_on", f"must be 'test' or 'validation', got {self.evaluate_on!r}")
        _check(
            self.evaluate_on != "validation" or self.validation_patients is not None,
            "validation_patients",
            "evaluate_on: validation needs a patient list (e.g. data_manifests/chest_xray_validation_patients.csv)",
        )
        if self.validation_patients is not None:
            _check(Path(self.validation_patients).is_file(), "validation_patients", f"file not found: {self.validation_patients}")
        self.budgets.validate()
        self.probes.validate()
        self.cnn.validate()
        self.baselines.validate()
        self.metrics.validate()
        self.tracking.validate()


@dataclass
class PriorNetConfig:
    """The prior's transformer (MONAI ``DecoderOnlyTransformer``, one per code level).

    Args:
        attn_layers_dim: width of the attention layers.
        attn_layers_depth: transformer blocks.
        attn_layers_heads: attention heads (must divide ``attn_layers_dim``).
        embedding_dropout_rate: dropout on the token + position embeddings while training.
        ordering: how a code map becomes a sequence (MONAI ``Ordering``): ``raster_scan``, ``s_curve`` or ``random``.
    """

    attn_layers_dim: int = 64
    attn_layers_depth: int = 2
    attn_layers_heads: int = 4
    embedding_dropout_rate: float = 0.1
    ordering: str = "raster_scan"

    def validate(self) -> None:
        _check(self.attn_layers_dim >= 8, "net.attn_layers_dim", f"must be >= 8, got {self.attn_layers_dim}")
        _check(self.attn_layers_depth >= 1, "net.attn_layers_depth", f"must be >= 1, got {self.attn_layers_depth}")
        _check(self.attn_layers_heads >= 1 and self.attn_layers_dim % self.attn_layers_heads == 0, "net.attn_layers_heads",
               f"must divide attn_layers_dim ({self.attn_layers_dim}), got {self.attn_layers_heads}")
        _check(0.0 <= self.embedding_dropout_rate < 1.0, "net.embedding_dropout_rate", "must be in [0, 1)")
        _check(self.ordering in ("raster_scan", "s_curve", "random"), "net.ordering",
               f"must be raster_scan, s_curve or random, got {self.ordering!r}")


@dataclass
class PriorTrainConfig(LoopConfig):
    """The prior's optimisation loop: :class:`LoopConfig`'s fields (``batch_size`` counts code maps; the learning
    rate decays to 5% of ``lr``) and

    Args:
        val_fraction: share of the training split's patients held out for validation bits per code.
        val_every: validate every this many steps (and at the end).
        log_every: log the training loss every this many steps.
        checkpoint_every: checkpoint every this many steps (and at the end).
        threads: torch threads (``None``: every usable core).
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    val_fraction: float = 0.05
    val_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 50
    threads: int | None = None
    device: str = "auto"

    def validate(self) -> None:
        self.validate_loop()
        _check(0.0 < self.val_fraction < 0.5, "train.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        for key in ("val_every", "log_every", "checkpoint_every"):
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class PriorSampleConfig:
    """Samples of the prior, decoded through the VQ-VAE.

    Args:
        n: samples drawn (``vqmed prior sample --n`` overrides it).
        temperature: softmax temperature (< 1 sharper, > 1 more varied).
        top_k: draw only among the k likeliest codes (``None``: all).
        real: real studies of ``real_split`` shown beside the samples (their code maps decoded).
        real_split: the split the real studies come from.
    """

    n: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    real: int = 8
    real_split: str = "test"

    def validate(self) -> None:
        _check(self.n >= 1, "sample.n", f"must be >= 1, got {self.n}")
        _check(self.temperature > 0, "sample.temperature", f"must be > 0, got {self.temperature}")
        _check(self.top_k is None or self.top_k >= 1, "sample.top_k", "must be >= 1 or null")
        _check(self.real >= 0, "sample.real", "must be >= 0")


@dataclass
class PriorConfig:
    """A prior over an export's code maps: ``vqmed prior train --config configs/prior/NAME.yaml``.

    Args:
        name: MLflow run name.
        seed: seeds the validation patients, the batch order, dropout and the samples.
        export: the export store (``--export`` overrides it).
        out: output directory (``--out``): checkpoints, ``final.pt``, ``summary.json``, figures.
        split: the store split the prior learns from (its patients also give the validation part).
        net: the transformer.
        train: the optimisation loop.
        sample: the samples logged at the end of training and by ``vqmed prior sample``.
        tracking: MLflow experiment and store.
    """

    name: str = "prior"
    seed: int = 0
    export: str | None = None
    out: str = "runs/prior"
    split: str = "train"
    net: PriorNetConfig = field(default_factory=PriorNetConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    sample: PriorSampleConfig = field(default_factory=PriorSampleConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="vqmed-prior", log_model=False))

    def validate(self) -> None:
        _check(self.export is not None, "export", "is required (in the YAML file or as --export)")
        _check(self.split != "test", "split", "the prior never learns from the test split")
        self.net.validate()
        self.train.validate()
        self.sample.validate()
        self.tracking.validate()


@dataclass
class QASourceConfig:
    """Non-chest images of the QA benchmark, one source.

    Args:
        manifest: a manifest CSV (paths relative to ``data_root``).
        pydicom_files: names of files of the ``pydicom-data`` package (``pydicom.data.get_testdata_file``),
            instead of a manifest.
        data_root: root of the manifest paths (``None``: the benchmark's ``data_root``).
        max_images: use the first this many readable rows (``None``: all).
    """

    manifest: str | None = None
    pydicom_files: list[str] = field(default_factory=list)
    data_root: str | None = None
    max_images: int | None = None

    def validate(self, key: str) -> None:
        _check((self.manifest is None) != (not self.pydicom_files), key, "needs exactly one of manifest or pydicom_files")
        if self.manifest is not None:
            _check(Path(self.manifest).is_file(), f"{key}.manifest", f"file not found: {self.manifest}")
        _check(self.max_images is None or self.max_images >= 1, f"{key}.max_images", "must be >= 1 or null")


@dataclass
class QAConfig:
    """The prior's quality-control benchmark: real test films vs corrupted copies and non-chest images.

    ``python pipelines/prior_qa.py --config configs/benchmark/qa.yaml`` trains the prior (``prior_config``)
    when ``prior`` holds none yet, then runs ``vqmed prior qa``.

    Args:
        name: MLflow run name.
        export: the export store whose test split is scored (``--set export=...``).
        prior: the prior's directory (``vqmed prior train --out``).
        prior_config: the prior config the pipeline trains with when ``prior`` holds no prior yet.
        seed: seeds the reference images drawn from the training split.
        out: output directory: ``qa.csv``, ``qa.md``, ``qa.json``, ``qa_auroc.png``.
        data_root: root of the store's image paths (``None``: ``VQMED_DATA_ROOT`` or ``../shared/data``).
        test_split: the store split whose real films are corrupted and scored.
        reference_split: split the mean-intensity baseline's reference comes from (never the test split).
        reference_images: images of ``reference_split`` giving that reference.
        corruptions: corruptions of the real films, names of ``vqmed.prior.qa.CORRUPT`` (``inverted``, ``rotated_90``,
            ``rotated_180``, ``flipped``, ``cropped``: the film's upper-left quarter, resized back to full size);
            ``None``: every one.
        non_chest: name -> :class:`QASourceConfig`: non-chest images scored as they are.
        batch_size: images per encoder / prior call.
        tracking: MLflow experiment and store.
    """

    name: str = "prior-qa"
    export: str | None = None
    prior: str = "runs/prior"
    prior_config: str = "configs/prior/cxr_64.yaml"
    seed: int = 0
    out: str = "runs/prior_qa"
    data_root: str | None = None
    test_split: str = "test"
    reference_split: str = "train"
    reference_images: int = 256
    corruptions: list[str] | None = None
    non_chest: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="vqmed-prior-qa", log_model=False))

    def validate(self) -> None:
        _check(self.export is not None, "export", "is required (in the YAML file or as --set export=DIR)")
        _check(self.reference_split != self.test_split, "reference_split", "must differ from test_split")
        _check(self.reference_images >= 1, "reference_images", "must be >= 1")
        # The QA room's registry is the one home of the corruption names (imported here, not copied).
        from vqmed.prior.qa import CORRUPT

        for i, name in enumerate(self.corruptions or []):
            _check(name in CORRUPT, f"corruptions[{i}]", f"must be one of {list(CORRUPT)}, got {name!r}")
        _check(self.corruptions != [] or len(self.non_chest) > 0, "corruptions", "needs a corruption or a non_chest source")
        for name, raw in self.non_chest.items():
            self.non_chest[name] = source = raw if isinstance(raw, QASourceConfig) else from_dict(QASourceConfig, raw, f"non_chest.{name}")
            source.validate(f"non_chest.{name}")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.tracking.validate()
