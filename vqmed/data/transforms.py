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

Augmentation chains (pretraining only, applied on top of the cached image, then clamped to [0, 1]):
``mild`` (small RandAffined, RandAdjustContrastd, RandGaussianNoised) for reconstruction, ``views`` (zoom,
shift, rotation, intensity, blur, noise) for the two views of an invariance objective. No flips:
left/right matters in chest radiographs (heart side). :class:`SeededAugmentation` runs a chain with the draw
that ``Compose.set_random_state(seed=s)`` would choose, a few times faster (one draw per image and view).
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
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Randomizable,
    Resize,
    ResizeWithPadOrCrop,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRangePercentilesd,
    Spacing,
)
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.utils import MAX_SEED

from vqmed.config import INTENSITY_MODES, RESIZE_MODES
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


AUGMENTATIONS = ("mild", "views")


def augment_transform(spec: ImageSpec, name: str = "mild") -> Compose:
    """Random augmentation for pretraining, on a float tensor already in [0, 1].

    Args:
        spec: what the model sees.
        name: ``mild`` (small affine, gamma, noise: reconstruction keeps the image as it is) or ``views``
            (the two views of an invariance objective: up to +-25% zoom and 8% shift, which crops or pads
            like a random resized crop, +-10 degrees, stronger gamma / contrast / brightness, blur and
            noise). Never a flip: left and right matter on a chest film.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {name!r}")
    if name == "views":
        chain = [
            _random_affine(spec, prob=1.0, degrees=10.0, zoom=0.25, shift=0.08),
            RandAdjustContrastd("image", prob=0.8, gamma=(0.7, 1.4)),
            RandScaleIntensityd("image", prob=0.5, factors=0.2),
            RandShiftIntensityd("image", prob=0.5, offsets=0.1),
            RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
            RandGaussianNoised("image", prob=0.3, mean=0.0, std=0.02),
        ]
    else:
        chain = [
            _random_affine(spec, prob=0.8, degrees=5.0, zoom=0.05, shift=0.03),
            RandAdjustContrastd("image", prob=0.3, gamma=(0.85, 1.15)),
            RandGaussianNoised("image", prob=0.2, mean=0.0, std=0.01),
        ]
    return Compose([*chain, EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False)])


class SeededAugmentation:
    """A random MONAI chain whose draw is chosen by one integer, as ``chain.set_random_state(seed=s)`` chooses it,
    at a fraction of the cost.

    ``Compose.set_random_state`` builds a new NumPy ``RandomState`` for every random transform and every random
    transform inside it (14 for the ``views`` chain, ~135 us each); per augmented view that was a third of the
    augmentation's time. This finds, once, the generators that call reaches and reseeds the same objects in place
    (``RandomState.seed`` gives the state a new ``RandomState`` would have, in ~2 us), so each seed draws
    bit-for-bit what ``set_random_state(seed=s)`` draws. The chain runs without MetaTensor bookkeeping: it
    receives a plain tensor and its last step drops the metadata anyway (identical pixels, ~25% faster).

    Args:
        chain: the MONAI chain (e.g. from :func:`augment_transform`); its random transforms must take their
            randomness from their ``R`` generators, as MONAI's do.
    """

    def __init__(self, chain: Compose) -> None:
        self.chain = chain
        subtrees = [(t, _randomizables(t)) for t in chain.transforms]
        # The generators set_random_state replaces are the ones it seeds: compare two calls.
        chain.set_random_state(seed=0)
        before = {id(o): o.R for _, members in subtrees for o in members}
        chain.set_random_state(seed=1)
        self._seeded = [[o for o in members if o.R is not before[id(o)]]
                        for t, members in subtrees if isinstance(t, Randomizable)]
        # A transform that seeds its inner generators some other way (not with its own seed) would draw
        # differently: such a chain keeps MONAI's own, slower call.
        self.in_place = self._reseeds_like_monai([chain, *(o for _, members in subtrees for o in members)], seed=20261203)

    def __call__(self, data: dict[str, Any], seed: int) -> dict[str, Any]:
        """Apply the chain with the draw of ``chain.set_random_state(seed=seed)``."""
        if self.in_place:
            self._reseed(seed)
        else:
            self.chain.set_random_state(seed=seed)
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return self.chain(data)
        finally:
            set_track_meta(tracking)

    def _reseed(self, seed: int) -> None:
        outer = self.chain.R
        outer.seed(int(np.int64(seed) % MAX_SEED))
        for group in self._seeded:  # Compose.set_random_state's order: one draw per random transform
            inner = int(outer.randint(MAX_SEED, dtype="uint32"))
            for o in group:
                o.R.seed(inner)

    def _reseeds_like_monai(self, randomizables: list[Randomizable], seed: int) -> bool:
        """Whether in-place reseeding leaves every generator in the state ``set_random_state(seed=seed)`` does."""
        self.chain.set_random_state(seed=seed)
        expected = [o.R.get_state()[1:3] for o in randomizables]  # (key array, position)
        self.chain.set_random_state(seed=seed + 1)
        self._reseed(seed)
        return all(np.array_equal(o.R.get_state()[1], key) and o.R.get_state()[2] == pos
                   for o, (key, pos) in zip(randomizables, expected))


def _randomizables(obj: Any) -> list[Randomizable]:
    """``obj`` and every :class:`Randomizable` among its attributes, depth first (a transform's inner transforms)."""
    found: list[Randomizable] = []
    stack, seen = [obj], set()
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, Randomizable):
            found.append(o)
        if isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif hasattr(o, "__dict__") and not isinstance(o, (np.random.RandomState, torch.Tensor, np.ndarray)):
            stack.extend(v for v in vars(o).values() if hasattr(v, "__dict__") or isinstance(v, (list, tuple, dict)))
    return found


def _random_affine(spec: ImageSpec, prob: float, degrees: float, zoom: float, shift: float) -> RandAffined:
    """Rotation up to ``degrees`` (about every axis in 3D), zoom by up to ``zoom``, shift by up to ``shift`` of
    the side; bilinear, border padding (a zoomed-out film keeps its edge intensity instead of black bars)."""
    nd, rot = spec.spatial_dims, math.radians(degrees)
    return RandAffined(
        "image",
        prob=prob,
        rotate_range=(rot,) if nd == 2 else (rot, rot, rot),
        scale_range=(zoom,) * nd,
        translate_range=(shift * spec.image_size,) * nd,
        mode="bilinear",
        padding_mode="border",
    )


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
