"""vqmed.data.augment on real chest films (and a real brain MRI for 3D): the batched chains draw views like MONAI's
per-image chains with the same ranges, reproducibly from a generator, and keep the film recognisable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasField,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from vqmed.data import ImageDataset, ImageSpec, load_image, read_manifest, resolve_data_root
from vqmed.data.augment import AUGMENTATIONS, BatchAugmentation

ROOT = Path(__file__).resolve().parents[1]
MNI = Path(__import__("nilearn").__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> torch.Tensor:
    """128 Kermany train films at 64x64, ``[128, 1, 64, 64]``."""
    root = resolve_data_root(None)
    if not (root / "chest_xray").is_dir():
        pytest.skip("real Kermany data not found")
    manifest = read_manifest(ROOT / "data_manifests" / "chest_xray.csv")
    rows = manifest[manifest["split"] == "train"].iloc[::40].head(128)
    ds = ImageDataset(rows, root, ImageSpec(64), cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def _monai_chain(name: str) -> Compose:
    """MONAI's own per-image chain with the ranges of ``AUGMENTATIONS[name]`` (2D, 64 pixels)."""
    r = AUGMENTATIONS[name]
    chain = [
        RandAffined("image", prob=r.affine_prob, rotate_range=(math.radians(r.degrees),), scale_range=(r.zoom, r.zoom),
                    translate_range=(r.shift * 64, r.shift * 64), mode="bilinear", padding_mode="border"),
        RandAdjustContrastd("image", prob=r.gamma_prob, gamma=r.gamma),
    ]
    if r.scale_prob:
        chain.append(RandScaleIntensityd("image", prob=r.scale_prob, factors=r.scale))
    if r.offset_prob:
        chain.append(RandShiftIntensityd("image", prob=r.offset_prob, offsets=r.offset))
    if r.bias_prob:
        chain.append(RandBiasFieldd("image", prob=r.bias_prob, degree=r.bias_degree, coeff_range=r.bias_coeff))
    if r.blur_prob:
        chain.append(RandGaussianSmoothd("image", prob=r.blur_prob, sigma_x=r.blur_sigma, sigma_y=r.blur_sigma))
    if r.noise_prob:
        chain.append(RandGaussianNoised("image", prob=r.noise_prob, mean=0.0, std=r.noise_std))
    return Compose(chain).set_random_state(seed=0)


def _statistics(views: torch.Tensor, films: torch.Tensor) -> dict[str, float]:
    """How far views move from their film and from each other, and their brightness and contrast."""
    return {"from_film": float((views - films[:, None]).abs().mean()),
            "between_views": float((views[:, 0] - views[:, 1]).abs().mean()),
            "mean": float(views.mean()), "std": float(views.std())}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_batched_chain_draws_views_like_monais_per_image_chain(films, name):
    """Same ranges, same distribution: the batched port must move the films as far as MONAI's chain does."""
    chain = _monai_chain(name)
    monai_views = torch.stack([torch.stack([torch.as_tensor(chain({"image": f.clone()})["image"]).clamp(0, 1)
                                            for _ in range(2)]) for f in films])
    batched = BatchAugmentation(2, name)(films, 2, torch.Generator().manual_seed(0))
    assert batched.shape == (128, 2, 1, 64, 64) and batched.min() >= 0 and batched.max() <= 1
    expected, got = _statistics(monai_views, films), _statistics(batched, films)
    for key in ("from_film", "between_views"):  # 128 films x 2 views: sampling error is a few percent
        assert got[key] == pytest.approx(expected[key], rel=0.12), (key, got, expected)
    for key in ("mean", "std"):
        assert got[key] == pytest.approx(expected[key], abs=0.02), (key, got, expected)


def test_mild_views_stay_the_same_radiograph_and_views_move_more(films):
    mild = BatchAugmentation(2, "mild")(films, 1, torch.Generator().manual_seed(1))[:, 0]
    strong = BatchAugmentation(2, "views")(films, 1, torch.Generator().manual_seed(1))[:, 0]

    def corr(views: torch.Tensor) -> np.ndarray:
        return np.array([np.corrcoef(v.ravel().numpy(), f.ravel().numpy())[0, 1] for v, f in zip(views, films)])

    mild_corr, strong_corr = corr(mild), corr(strong)
    assert (mild_corr < 0.999).mean() > 0.5  # random: most films are changed
    assert np.median(mild_corr) > 0.9 and mild_corr.min() > 0.6  # mild: still the same radiograph
    assert np.median(strong_corr) < np.median(mild_corr) - 0.1  # the invariance views are far stronger


def test_views_are_reproducible_from_the_generator_and_independent(films):
    aug = BatchAugmentation(2, "views")
    first = aug(films[:16], 2, torch.Generator().manual_seed(7))
    assert torch.equal(first, aug(films[:16], 2, torch.Generator().manual_seed(7)))  # a resumed run repeats it
    assert not torch.equal(first, aug(films[:16], 2, torch.Generator().manual_seed(8)))
    # the two views of one film differ, and the input is left untouched
    assert (first[:, 0] - first[:, 1]).abs().mean() > 0.05
    assert torch.equal(films[:16], films[:16].clone())


def test_a_3d_volume_is_augmented_and_keeps_its_anatomy():
    if not MNI.is_file():
        pytest.skip("nilearn's MNI template not installed")
    volume, _ = load_image(MNI, ImageSpec(32, spatial_dims=3))
    volume = torch.from_numpy(volume)[None]  # [1, 1, 32, 32, 32]
    views = BatchAugmentation(3, "views")(volume.repeat(4, 1, 1, 1, 1), 2, torch.Generator().manual_seed(0))
    assert views.shape == (4, 2, 1, 32, 32, 32) and views.min() >= 0 and views.max() <= 1
    corr = [np.corrcoef(v.ravel().numpy(), volume.ravel().numpy())[0, 1] for v in views.flatten(0, 1)]
    assert min(corr) > 0.5 and max(corr) < 0.999  # changed, still the same brain


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bias_field_is_monais_for_the_same_coefficients(spatial_dims):
    """The batched field is MONAI's ``RandBiasField`` field, term for term: the same Legendre products (its 2D
    lower triangle, its 3D degrees i+j+k <= d) weighted by the coefficients drawn for each image."""
    aug, side = BatchAugmentation(spatial_dims, "views_bias"), 12
    d = aug.ranges.bias_degree
    x = torch.ones(5, 1, *(side,) * spatial_dims, dtype=torch.float64)
    fields = aug._bias_field(x, torch.Generator().manual_seed(3))
    drawn = aug._uniform(5, *aug.ranges.bias_coeff, x, torch.Generator().manual_seed(3), *(d + 1,) * spatial_dims)
    if spatial_dims == 2:
        terms = list(zip(*np.tril_indices(d + 1)))
    else:
        terms = [(i, j, k) for i in range(d + 1) for j in range(d + 1 - i) for k in range(d + 1 - i - j)]
    assert fields.shape == (5, 1, *(side,) * spatial_dims) and fields.std() > 0.01
    for field, coefficients in zip(fields, drawn):
        reference = RandBiasField(degree=d)._generate_random_field((side,) * spatial_dims, d,
                                                                   [float(coefficients[t]) for t in terms])
        np.testing.assert_allclose(field[0].numpy(), reference, atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="augmentation must be one of"):
        BatchAugmentation(2, "strong")
    with pytest.raises(ValueError, match="spatial_dims"):
        BatchAugmentation(4)
    with pytest.raises(ValueError, match="expected"):
        BatchAugmentation(3)(torch.rand(2, 1, 8, 8))
