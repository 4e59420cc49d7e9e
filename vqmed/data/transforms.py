"""MONAI dictionary-transform chains that turn a file into the model's input.

Deterministic chain (cached by :class:`vqmed.data.ImageDataset`)::

    LoadMedicalImaged  file -> float32 [C,H,W(,D)] via PIL / pydicom / nibabel / IDX (display orientation)
    CheckDegenerated   quarantine what cannot be a model input (see DEGENERATE_RULE)
    ToChannelsd        RGB -> grey (luminance; identical channels stay exact) or grey -> RGB
    ToGridd            to spec.image_size, area interpolation (anti-aliased downsampling); spec.resize:
                       squeeze = every side to image_size (aspect ratio lost; the default, as trained so far),
                       pad = longest side to image_size (aspect kept), crop = shortest side to image_size;
                       3D with spec.spacing: resampled to that voxel size, centre-cropped/padded to the cube
    ScaleIntensityd    spec.intensity: minmax = per-image min-max to [0, 1] (the default), or
                       ScaleIntensityRangePercentilesd: 0.5-99.5th percentile window to [0, 1], clipped
    ResizeWithPadOrCropd  pad (black) / centre-crop to the square or cube (pad and crop modes)
    EnsureTyped        plain float32 numpy, no MONAI metadata

Pretraining's random augmentation is not here: it acts on whole batches on their device
(:mod:`vqmed.data.augment`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Resize,
    ResizeWithPadOrCrop,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRangePercentilesd,
    Spacing,
)
from monai.data import MetaTensor

from vqmed.config import INTENSITY_MODES, RESIZE_MODES, DataConfig
from vqmed.data.errors import UnreadableImageError
from vqmed.data.orientation import resized_affine
from vqmed.data.readers import DEFAULT_MAX_PIXELS, read_pixels

# Bump whenever the deterministic chain changes what it produces: it is part of every cache key.
# 2: degenerate images are quarantined (a cached constant image must not survive the rule).
TRANSFORM_VERSION = 2

# The documented rule for degenerate inputs (README "Images"): quarantined with this reason, never
# silently turned into an all-black input.
MIN_SIDE = 8  # below the smallest downsampling factor of the project's encoders (4-16)
MAX_ASPECT = 20.0  # longer side over shorter side; real films and slices stay far below (1024x256 NM: 4)
PERCENTILES = (0.5, 99.5)
DEGENERATE_RULE = (f"an image is quarantined when a side is under {MIN_SIDE} pixels, its sides differ more than "
                   f"{MAX_ASPECT:g}-fold, or every pixel has the same value")

# ITU-R BT.601 luma, as PIL's convert("L"); weights sum to 1, so identical channels give that channel.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class ImageSpec:
    """What the model sees; part of the cache key.

    Args:
        image_size: side length after resizing (2D: ``image_size x image_size``; 3D: a cube).
        spatial_dims: 2 for images, 3 for volumes.
        channels: 1 (grey; RGB is converted by luminance) or 3 (true colour kept; grey repeated).
        spacing: 3D only: voxel size in mm along the display axes (rows, columns, slices). Volumes are resampled
            to it (MONAI ``Spacing``) and centre-cropped or padded to the cube, so every scanner's volume reaches
            the model on one grid (a field of view of ``image_size x spacing`` mm); ``None`` resizes each volume
            to the cube.
        resize: ``squeeze``, ``pad`` or ``crop`` (see the module docstring).
        intensity: ``minmax`` or ``percentile`` (see the module docstring).
    """

    image_size: int
    spatial_dims: int = 2
    channels: int = 1
    spacing: tuple[float, float, float] | None = None
    resize: str = "squeeze"
    intensity: str = "minmax"

    def __post_init__(self) -> None:
        if self.spacing is not None:
            if self.spatial_dims != 3 or len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ValueError(f"ImageSpec.spacing must be 3 positive mm values of a 3D spec, got {self.spacing}")
            object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"ImageSpec.resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"ImageSpec.intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if int(self.image_size) < 1:
            raise ValueError(f"ImageSpec.image_size must be >= 1, got {self.image_size}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"ImageSpec.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.channels not in (1, 3):
            raise ValueError(f"ImageSpec.channels must be 1 or 3, got {self.channels}")

    @classmethod
    def from_config(cls, data: DataConfig) -> ImageSpec:
        """The spec a pretraining config's ``data:`` section asks for (the engine and the benchmarks read it here)."""
        return cls(data.image_size, data.spatial_dims, data.channels,
                   spacing=tuple(data.spacing) if data.spacing else None, resize=data.resize, intensity=data.intensity)

    @property
    def shape(self) -> tuple[int, ...]:
        """Output shape ``(C, S, S)`` or ``(C, S, S, S)``."""
        return (self.channels,) + (self.image_size,) * self.spatial_dims

    def key(self) -> str:
        """Stable short id of (spec, transform version), used to name the cache folder."""
        fields = {k: v for k, v in asdict(self).items() if not (k == "spacing" and v is None)}  # keys as before spacing
        payload = json.dumps({**fields, "transform_version": TRANSFORM_VERSION}, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
        return f"{self.spatial_dims}d-s{self.image_size}-c{self.channels}-v{TRANSFORM_VERSION}-{digest}"


class LoadMedicalImaged(MapTransform):
    """Read ``data[key]`` (a path) with the format's own library into float32 ``[C,H,W(,D)]``.

    DICOM goes through the full display pipeline (modality LUT, VOI LUT/window, MONOCHROME1 inverted);
    PNG/JPEG keep rows = image height (MONAI's PIL reader would transpose them).

    Args:
        keys: key(s) holding file paths.
        spatial_dims: 2 or 3 (see :func:`vqmed.data.readers.read_pixels`).
        frame_key: key holding the frame index (``None``/missing = the middle frame).
        facts_key: key that receives the non-identifying header facts.
        max_pixels: refuse files whose header declares more pixels than this.
    """

    def __init__(
        self,
        keys: str | list[str],
        spatial_dims: int = 2,
        frame_key: str = "frame",
        facts_key: str = "facts",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(keys)
        self.spatial_dims = spatial_dims
        self.frame_key = frame_key
        self.facts_key = facts_key
        self.max_pixels = max_pixels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        frame = d.get(self.frame_key)
        frame = None if frame is None or (isinstance(frame, float) and math.isnan(frame)) else int(frame)
        for key in self.key_iterator(d):
            d[key], d[self.facts_key] = read_pixels(Path(d[key]), frame, self.spatial_dims, self.max_pixels)
        return d


class ToChannelsd(MapTransform):
    """Convert channel-first arrays to ``channels`` channels.

    Args:
        keys: keys to convert.
        channels: 1 (RGB -> luminance; identical RGB channels give exactly that channel) or 3
            (grey repeated, colour kept).
        facts_key: key of the facts dict that records the source colour (``grey``, ``rgb-grey``, ``rgb``).
    """

    def __init__(self, keys: str | list[str], channels: int = 1, facts_key: str = "facts") -> None:
        super().__init__(keys)
        self.channels = channels
        self.facts_key = facts_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = np.asarray(d[key], dtype=np.float32)
            if img.shape[0] == 3:
                grey_rgb = bool(np.array_equal(img[0], img[1]) and np.array_equal(img[0], img[2]))
                colour = "rgb-grey" if grey_rgb else "rgb"
                if self.channels == 1:
                    img = img[:1] if grey_rgb else np.tensordot(_LUMA, img, axes=1)[None].astype(np.float32)
            else:
                colour = "grey"
                if self.channels == 3:
                    img = np.repeat(img, 3, axis=0)
            d[key] = img
            if isinstance(d.get(self.facts_key), dict):
                d[self.facts_key]["colour"] = colour
        return d


class CheckDegenerated(MapTransform):
    """Refuse degenerate inputs (:data:`DEGENERATE_RULE`) with an :class:`UnreadableImageError` naming why.

    Args:
        keys: keys holding channel-first arrays ``[C,H,W(,D)]``; the in-plane sides are ``H`` and ``W``.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = np.asarray(d[key])
            h, w = img.shape[1:3]
            if min(h, w) < MIN_SIDE:
                raise UnreadableImageError(d.get("_path", ""), f"degenerate image: {h}x{w} pixels, a side is under {MIN_SIDE}")
            if max(h, w) > MAX_ASPECT * min(h, w):
                raise UnreadableImageError(d.get("_path", ""), f"degenerate image: {h}x{w} pixels, sides differ more than {MAX_ASPECT:g}-fold")
            if img.size and float(img.max()) == float(img.min()):
                raise UnreadableImageError(d.get("_path", ""), f"degenerate image: every pixel is {float(img.min()):g} (constant, no content)")
        return d


class ToGridd(MapTransform):
    """Bring an image onto the model's grid and record that grid's world affine in ``facts["grid_affine"]``.

    3D with ``spec.spacing``: MONAI ``Spacing`` to that voxel size (bilinear), then ``ResizeWithPadOrCrop`` to the
    cube (centred); MONAI tracks the affine through both. Otherwise an area resize by ``spec.resize``: ``squeeze``
    (every side to ``image_size``), ``pad`` (longest side) or ``crop`` (shortest side); the pad/crop to the square or
    cube comes after intensity scaling (:func:`deterministic_transform`). Volumes whose reader gave no affine (e.g. a
    multi-frame DICOM), and pad/crop volumes (their final grid is shifted later), get no grid affine.

    Args:
        keys: image key(s).
        spec: the image spec.
        facts_key: key of the reader's facts (holding ``affine``, the display grid's voxel -> RAS mm affine).
    """

    def __init__(self, keys: str | list[str], spec: ImageSpec, facts_key: str = "facts") -> None:
        super().__init__(keys)
        self.spec = spec
        self.facts_key = facts_key
        self.spacing = Spacing(pixdim=spec.spacing, mode="bilinear") if spec.spacing else None
        self.crop = ResizeWithPadOrCrop(spatial_size=(spec.image_size,) * spec.spatial_dims)

    def _target(self, sides: tuple[int, ...]) -> tuple[int, ...]:
        if self.spec.resize == "squeeze":
            return (self.spec.image_size,) * len(sides)
        ref = max(sides) if self.spec.resize == "pad" else min(sides)
        return tuple(max(1, round(s * self.spec.image_size / ref)) for s in sides)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        facts = d.get(self.facts_key) if isinstance(d.get(self.facts_key), dict) else {}
        affine = facts.get("affine") if self.spec.spatial_dims == 3 else None
        for key in self.key_iterator(d):
            img = np.asarray(d[key], dtype=np.float32)
            if affine is not None and self.spacing is not None:
                out = self.crop(self.spacing(MetaTensor(torch.from_numpy(img), affine=torch.tensor(affine))))
                facts["grid_affine"] = np.asarray(out.affine, dtype=np.float64).tolist()
                d[key] = out.as_tensor().numpy()
                continue
            if self.spacing is not None:
                raise UnreadableImageError("?", "no world geometry to resample to data.spacing (not a NIfTI, "
                                                "MetaImage, NRRD or DICOM series volume)")
            target = self._target(img.shape[1:])
            if affine is not None and self.spec.resize == "squeeze":
                facts["grid_affine"] = resized_affine(np.asarray(affine), img.shape[1:], target).tolist()
            # "area" = adaptive average pooling: anti-aliased downsizing of 2000-px radiographs, cheap, exact for
            # integer factors.
            d[key] = np.asarray(Resize(spatial_size=target, mode="area")(img), dtype=np.float32)
        return d


def deterministic_transform(spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> Compose:
    """The cached part: load, refuse degenerate images, fix channels, resize (3D: or resample), scale to [0, 1]
    (see the module docstring)."""
    lo, hi = PERCENTILES
    scale = (ScaleIntensityd("image", minv=0.0, maxv=1.0) if spec.intensity == "minmax" else
             ScaleIntensityRangePercentilesd("image", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True))
    chain = [
        LoadMedicalImaged("image", spatial_dims=spec.spatial_dims, max_pixels=max_pixels),
        CheckDegenerated("image"),
        ToChannelsd("image", channels=spec.channels),
        ToGridd("image", spec),
        scale,
    ]
    if spec.resize != "squeeze" and not spec.spacing:  # after scaling: the bars are black, no percentile counts them
        chain.append(ResizeWithPadOrCropd("image", spatial_size=(spec.image_size,) * spec.spatial_dims))
    chain.append(EnsureTyped("image", data_type="numpy", dtype=np.float32, track_meta=False))
    return Compose(chain)


def run_transform(transform: Compose, path: Path, frame: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply a deterministic chain to one file; unwrap MONAI's ``RuntimeError`` into the reader's reason."""
    try:
        out = transform({"image": str(path), "frame": frame})
    except Exception as exc:  # MONAI wraps every failure as RuntimeError("applying transform ...")
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, UnreadableImageError):
            cause = cause.__cause__
        if isinstance(cause, UnreadableImageError):
            raise UnreadableImageError(path, cause.reason) from exc
        inner = exc
        while inner.__cause__ is not None:
            inner = inner.__cause__
        raise UnreadableImageError(path, f"{type(inner).__name__}: {inner}") from exc
    img = np.asarray(out["image"], dtype=np.float32)
    return img, dict(out.get("facts") or {})


def load_image(
    path: Path, spec: ImageSpec, frame: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, dict[str, Any]]:
    """Load one file exactly as the model sees it (without augmentation).

    Args:
        path: PNG/JPEG/TIFF/BMP, DICOM, NIfTI or IDX file.
        spec: output size, dimensionality and channels.
        frame: frame of a multi-frame file / slice of a volume (2D) / image index in an IDX file;
            ``None`` = the middle one.
        max_pixels: refuse files whose header declares more pixels than this, before decoding.

    Returns:
        ``float32 [C,H,W]`` or ``[C,H,W,D]`` in [0, 1], and non-identifying header facts (format,
        modality, photometric, size, frames, channels, encoding, colour, ...).

    Raises:
        UnreadableImageError: the path and a one-line reason.
    """
    return run_transform(deterministic_transform(spec, max_pixels), Path(path), frame)
