"""Tests of the downstream room on real Kermany chest X-rays.

The frozen features come from a real vector quantiser fitted here (k-means on 4x4 patches of the
training images: code maps, codebook, bag of codes, pooled vectors), so the engine is exercised on
genuine discrete code maps of real images without waiting for a pretrained VQ-VAE.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from vqmed.config import (
    BenchmarkConfig,
    CNNConfig,
    ConfigError,
    ProbeConfig,
    apply_overrides,
    from_dict,
    load_config,
)
from vqmed.downstream import (
    Budget,
    CodeMapCNN,
    FeatureSource,
    ImageCNN,
    draw_labeled_subset,
    run_benchmark_on_features,
)
from vqmed.downstream.features import feature_variant, grid_code_histograms
from vqmed.downstream.metrics import (
    StratifiedBootstrap,
    binary_metrics,
    choose_threshold,
)
from vqmed.downstream.probes import fit_probe, make_folds, make_probe, scores_of
from vqmed.downstream.sampling import make_budgets, patient_strata

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", REPO.parent / "shared" / "data"))
KERMANY = DATA_ROOT / "chest_xray"
SIZE = 64

pytestmark = pytest.mark.skipif(not KERMANY.is_dir(), reason=f"Kermany data not found at {KERMANY}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """One torch/BLAS thread, as the benchmark runs: on a busy 2-core machine two threads are ~10x slower."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


def _patient(name: str) -> str:
    """Patient id from a Kermany file name (person1946_bacteria_4875 -> person1946, IM-0115-0001 -> IM-0115)."""
    m = re.match(r"(person\d+)_", name) or re.search(r"(IM-\d+)", name)
    assert m is not None, name
    return m.group(1)


@pytest.fixture(scope="module")
def kermany() -> dict:
    """Every Kermany image at 64x64 grey in [0, 1], with split, label and patient."""
    rows = []
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            for p in sorted((KERMANY / split / label).glob("*.jpeg")):
                rows.append({"split": split, "label": label, "patient_id": f"{split}/{_patient(p.name)}", "path": p})
    index = pd.DataFrame(rows)
    pixels = np.stack(
        [np.asarray(Image.open(p).convert("L").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255.0 for p in index["path"]]
    )
    train = index["split"].to_numpy() == "train"
    return {
        "index": index.drop(columns="path"),
        "pixels": pixels,
        "train": train,
        "y": (index["label"].to_numpy() == "PNEUMONIA").astype(int),
        "groups": index["patient_id"].to_numpy(),
    }


def _patch_vq(pixels: np.ndarray, fit_rows: np.ndarray, k: int, seed: int) -> FeatureSource:
    """A real vector quantiser: k-means codebook of 4x4 patches, 16x16 code maps per image."""
    n = len(pixels)
    patches = pixels.reshape(n, SIZE // 4, 4, SIZE // 4, 4).transpose(0, 1, 3, 2, 4).reshape(n, SIZE // 4, SIZE // 4, 16)
    rng = np.random.default_rng(seed)
    sample = patches[fit_rows].reshape(-1, 16)
    km = MiniBatchKMeans(k, random_state=seed, n_init=1, batch_size=2048).fit(sample[rng.choice(len(sample), 20000, replace=False)])
    codes = km.predict(patches.reshape(-1, 16)).reshape(n, SIZE // 4, SIZE // 4).astype(np.uint16)
    codebook = km.cluster_centers_.astype(np.float32)
    hist = grid_code_histograms(codes, k, 1)[:, 0]
    arrays = {
        "codes": codes,
        "code_histogram": hist,
        "quantized_mean": hist @ codebook,
        "continuous_mean": patches.mean(axis=(1, 2)),
    }
    return FeatureSource(arrays, codebook)


@pytest.fixture(scope="module")
def vq(kermany: dict) -> FeatureSource:
    return _patch_vq(kermany["pixels"], kermany["train"], k=64, seed=0)


def _tiny_cfg(**overrides: object) -> BenchmarkConfig:
    raw = {
        "name": "test-benchmark",
        "budgets": {"fractions": [0.02], "per_class": [10], "draws": 2},
        "probes": {
            "variants": ["code_histogram", "codes_grid_mean_2x2"],
            "classifiers": ["logreg", "knn", "code_cnn"],
            "cv_folds": 3,
            "logreg_c": [0.01, 1.0],
            "knn_k": [5],
        },
        "cnn": {"channels": [8, 16], "epochs": 10, "max_steps": 25},
        "baselines": {"pca_components": 10},
        "metrics": {"bootstrap": 200},
    }
    cfg = from_dict(BenchmarkConfig, apply_overrides(raw, [f"{k}={v}" for k, v in overrides.items()]))
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------------
# label draws
# --------------------------------------------------------------------------------------------------
def test_draws_keep_patients_together_are_stratified_and_deterministic(kermany: dict) -> None:
    y, g = kermany["y"][kermany["train"]], kermany["groups"][kermany["train"]]
    _, _, image_patient = patient_strata(y, g)
    sizes = np.bincount(image_patient)
    assert sizes.max() > 1, "Kermany has patients with several images: the grouping must matter"
    n_per_class = {c: int((y == c).sum()) for c in (0, 1)}
    for budget in make_budgets([0.01, 0.05, 0.25], [5, 50]):
        targets = budget.targets(n_per_class)
        for draw in range(3):
            sub = draw_labeled_subset(y, g, budget, seed=0, draw=draw)
            chosen = np.unique(image_patient[sub])
            # whole patients: every image of every chosen patient is in, nothing else
            assert np.array_equal(np.sort(sub), np.flatnonzero(np.isin(image_patient, chosen)))
            # stratified: the class counts hit the targets exactly (enough single-image patients exist)
            for c in (0, 1):
                assert int((y[sub] == c).sum()) == targets[c], (budget.name, draw, c)
            assert np.array_equal(sub, draw_labeled_subset(y, g, budget, seed=0, draw=draw))
        assert not np.array_equal(draw_labeled_subset(y, g, budget, 0, 0), draw_labeled_subset(y, g, budget, 0, 1))
        assert not np.array_equal(draw_labeled_subset(y, g, budget, 0, 0), draw_labeled_subset(y, g, budget, 1, 0))
    assert budget.name == "25%" and Budget("per_class", 5).name == "5/class"
    assert len(draw_labeled_subset(y, g, Budget("fraction", 1.0), 0, 3)) == len(y)
    # row order does not matter: the same patients are drawn from a shuffled copy
    perm = np.random.default_rng(0).permutation(len(y))
    a = draw_labeled_subset(y, g, Budget("per_class", 25), 0, 0)
    b = draw_labeled_subset(y[perm], g[perm], Budget("per_class", 25), 0, 0)
    assert set(g[a]) == set(g[perm][b])


def test_folds_are_grouped_by_patient(kermany: dict) -> None:
    y, g = kermany["y"][kermany["train"]], kermany["groups"][kermany["train"]]
    sub = draw_labeled_subset(y, g, Budget("fraction", 0.05), 0, 0)
    folds = make_folds(y[sub], g[sub], 5, seed=0)
    assert len(folds) == 5
    for tr, va in folds:
        assert not set(g[sub][tr]) & set(g[sub][va])
        assert set(y[sub][va]) == {0, 1}
    assert np.array_equal(np.sort(np.concatenate([va for _, va in folds])), np.arange(len(sub)))


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def test_raw_pixel_logreg_beats_chance_and_bootstrap_ci_contains_estimate(kermany: dict) -> None:
    cfg = BenchmarkConfig()
    tr_rows, te_rows = np.flatnonzero(kermany["train"]), np.flatnonzero(~kermany["train"])
    y, g = kermany["y"][tr_rows], kermany["groups"][tr_rows]
    sub = draw_labeled_subset(y, g, Budget("per_class", 25), seed=0, draw=0)
    X = kermany["pixels"].reshape(len(kermany["pixels"]), -1)
    est, grid = make_probe("logreg", cfg.probes, cfg.cnn, random_state=0)
    fit = fit_probe("pixels+logreg", est, grid, X[tr_rows[sub]], y[sub], make_folds(y[sub], g[sub], 5, 0))
    scores = scores_of(fit.model, X[te_rows])
    y_test = kermany["y"][te_rows]
    boot = StratifiedBootstrap(y_test, n_resamples=500, seed=0)
    metrics, auc_boot = boot.evaluate(scores, fit.threshold)
    assert metrics["auc"][0] == pytest.approx(roc_auc_score(y_test, scores))
    assert metrics["balanced_accuracy"][0] == pytest.approx(balanced_accuracy_score(y_test, scores >= fit.threshold))
    assert metrics["auc"][0] > 0.8 and metrics["auc"][1] > 0.7, metrics["auc"]  # 50 labels: clearly above chance
    for name, (value, lo, hi) in metrics.items():
        assert lo <= value <= hi, name
        assert hi - lo < 0.2, name
    assert auc_boot.shape == (500,) and metrics["auc"][1] < np.median(auc_boot) < metrics["auc"][2]
    # the CI narrows with a bigger test set: a shuffled copy of it twice over
    doubled = StratifiedBootstrap(np.concatenate([y_test, y_test]), n_resamples=500, seed=0)
    d_metrics, _ = doubled.evaluate(np.concatenate([scores, scores]), fit.threshold)
    assert d_metrics["auc"][2] - d_metrics["auc"][1] < metrics["auc"][2] - metrics["auc"][1]


def test_threshold_comes_from_out_of_fold_scores() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    t = choose_threshold(y, s)
    # Youden's J is best (2/3) at 0.7 or 0.4; the first maximum on the ROC curve (higher) is used,
    # halfway to the next lower score
    assert t == pytest.approx((0.7 + 0.6) / 2)
    m = binary_metrics(y, s, t)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1.0)


def test_test_split_makes_no_selection(kermany: dict, vq: FeatureSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scrambling the test labels changes the metrics but no choice: per method, budget and draw the chosen
    classifier, its hyper-parameters, its threshold and CV AUC (and every candidate's) stay the same."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = _tiny_cfg(**{
        # 25 labels a class: with 10, a draw can be too weak a subset for the 0.75 sanity bound at the end
        "budgets.fractions": "[0.02]", "budgets.per_class": "[25]", "budgets.draws": 2, "probes.classifiers": "[logreg, knn]",
        "probes.knn_k": "[3, 5]", "baselines.cnn_scratch": False, "baselines.random_encoder": False,
    })
    index = kermany["index"]
    scrambled = index.copy()
    test = scrambled["split"] == "test"
    scrambled.loc[test, "label"] = np.random.default_rng(0).permutation(scrambled.loc[test, "label"].to_numpy())
    runs = []
    for name, idx in (("true", index), ("scrambled", scrambled)):
        run_benchmark_on_features(idx, {"vqvae": vq}, kermany["pixels"], cfg, tmp_path / name, verbose=False)
        runs.append(pd.read_csv(tmp_path / name / "benchmark.csv").query("metric == 'auc'"))
    a, b = runs
    # a real choice is made: two classifiers (x hyper-parameters) per feature variant, per draw
    assert {"vqvae[code_histogram+logreg]", "vqvae[code_histogram+knn]"} <= set(a.method)
    assert a.loc[a.method == "vqvae", "params"].nunique() >= 1 and len(a) == len(b)
    for col in ("method", "budget", "draw", "selected", "params", "threshold", "cv_auc", "n_labels"):
        assert a[col].tolist() == b[col].tolist(), col
    pixels_a = a.loc[a.method == "raw_pixels_logreg", "value"].to_numpy()
    pixels_b = b.loc[b.method == "raw_pixels_logreg", "value"].to_numpy()
    assert pixels_a.min() > 0.75 and np.abs(pixels_b - 0.5).max() < 0.1  # the scores did see the scrambled labels


def _validation_list(kermany: dict, path: Path, share: float = 0.2) -> set[str]:
    """A committed-style patient list (comment lines, ``patient_id``) of ``share`` of the train patients."""
    patients = np.unique(kermany["groups"][kermany["train"]])
    chosen = set(np.random.default_rng(1).choice(patients, size=int(share * len(patients)), replace=False).tolist())
    path.write_text("# validation patients for a test\n# drawn by patient\npatient_id\n" + "\n".join(sorted(chosen)) + "\n")
    return chosen


def test_validation_mode_scores_the_listed_patients_and_never_reads_the_test_split(
    kermany: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``evaluate_on: validation``: the scored rows are exactly the listed patients' training images, none
    of them is ever drawn into a labeled subset, and the test split is not read (NaN test pixels do no harm)."""
    from vqmed.downstream.engine import prepare_rows

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    listed = _validation_list(kermany, tmp_path / "validation.csv")
    cfg = _tiny_cfg(**{
        "evaluate_on": "validation", "validation_patients": str(tmp_path / "validation.csv"), "budgets.draws": 2,
        "probes.classifiers": "[logreg]", "baselines.cnn_scratch": False, "baselines.random_encoder": False,
    })
    groups, train = kermany["groups"], kermany["train"]
    expected = np.flatnonzero(train & np.isin(groups, list(listed)))
    data = prepare_rows(kermany["index"], cfg, listed)
    assert np.array_equal(data["test_rows"], expected)
    assert np.array_equal(data["train_rows"], np.flatnonzero(train & ~np.isin(groups, list(listed))))
    for budget in make_budgets(cfg.budgets.fractions, cfg.budgets.per_class):
        for draw in range(cfg.budgets.draws):
            drawn = data["train_rows"][draw_labeled_subset(data["y_train"], data["groups_train"], budget, cfg.seed, draw)]
            assert not set(groups[drawn]) & listed and train[drawn].all()

    pixels = kermany["pixels"].copy()
    pixels[~train] = np.nan  # were the test split read (scored or pooled), its NaNs would break the run
    summary = run_benchmark_on_features(kermany["index"], {}, pixels, cfg, tmp_path / "val", verbose=False)
    assert summary["evaluated_on"] == "validation" and summary["n_test"] == len(expected)
    assert summary["n_train"] == len(data["train_rows"]) and "classifier" in summary["choices"]
    assert all(np.isfinite(r["auc_mean"]) and r["auc_mean"] > 0.7 for r in summary["results"])
    md = (tmp_path / "val" / "summary.md").read_text()
    assert "Evaluated on: **validation**" in md and "Which split made which choice" in md and "table_markdown" in summary

    # the test protocol on the same rows is unchanged and says so
    test_summary = run_benchmark_on_features(kermany["index"], {}, kermany["pixels"], _tiny_cfg(**{
        "budgets.draws": 1, "probes.classifiers": "[logreg]", "baselines.cnn_scratch": False, "baselines.random_encoder": False,
    }), tmp_path / "test", verbose=False)
    assert test_summary["evaluated_on"] == "test" and test_summary["n_test"] == int((~train).sum())


def test_draws_and_folds_do_not_depend_on_the_id_salt(kermany: dict) -> None:
    """The store's patient keys are hashes salted per installation; the same seed must still draw the same
    labeled images and folds on every machine, or no benchmark would repeat elsewhere."""
    from vqmed.data.privacy import salted_id
    from vqmed.downstream.engine import prepare_rows

    cfg = _tiny_cfg()
    picked = []
    for salt in ("salt-of-one-machine", "salt-of-another"):
        index = kermany["index"].assign(patient_id=[salted_id("patient", p, salt) for p in kermany["groups"]])
        data = prepare_rows(index, cfg)
        runs = []
        for budget in make_budgets([0.01, 0.1], [10]):
            for draw in range(3):
                sub = draw_labeled_subset(data["y_train"], data["groups_train"], budget, seed=0, draw=draw)
                folds = make_folds(data["y_train"][sub], data["groups_train"][sub], 3, seed=draw)
                runs.append((data["train_rows"][sub].tolist(), [te.tolist() for _, te in folds]))
        picked.append(runs)
        # still grouped by patient: the numbers split exactly where the patients do
        train = data["train_rows"]
        assert len(np.unique(data["groups_train"])) == len(np.unique(kermany["groups"][train]))
    assert picked[0] == picked[1]
    # the old order (sorted salted keys) did depend on the salt: the check above is not vacuous
    sorted_draws = [
        draw_labeled_subset(kermany["y"][kermany["train"]], np.asarray([salted_id("patient", p, salt) for p in kermany["groups"][kermany["train"]]]),
                            Budget("fraction", 0.01), seed=0, draw=0).tolist()
        for salt in ("salt-of-one-machine", "salt-of-another")
    ]
    assert sorted_draws[0] != sorted_draws[1]


def test_validation_config_errors_are_clear(kermany: dict, tmp_path: Path) -> None:
    from vqmed.downstream.engine import prepare_rows

    path = REPO / "configs" / "benchmark" / "pneumonia.yaml"
    with pytest.raises(ConfigError, match="validation_patients: evaluate_on: validation needs a patient list"):
        load_config(BenchmarkConfig, path, ["evaluate_on=validation"])
    with pytest.raises(ConfigError, match="validation_patients: file not found"):
        load_config(BenchmarkConfig, path, ["evaluate_on=validation", f"validation_patients={tmp_path / 'missing.csv'}"])
    with pytest.raises(ConfigError, match="evaluate_on: must be"):
        load_config(BenchmarkConfig, path, ["evaluate_on=train"])
    committed = REPO / "data_manifests" / "chest_xray_validation_patients.csv"
    cfg = load_config(BenchmarkConfig, path, ["evaluate_on=validation", f"validation_patients={committed}"])
    # the fixture's patient ids carry a split prefix ("train/person1"): the committed list matches none of them
    from vqmed.data import read_patient_list

    with pytest.raises(ConfigError, match="shares no patient"):
        prepare_rows(kermany["index"], cfg, set(read_patient_list(committed)))
    assert len(read_patient_list(committed)) > 100


def test_pool_standardisation_uses_the_training_split_only(kermany: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``probes.standardize: pool`` scales features with the unlabeled training split: rescaling the test
    images changes no choice made on the labeled subset, while switching to ``subset`` does change them."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # 25 labels a class: with 10, one draw can be too weak a subset for the 0.7 sanity bound below
    off = {"budgets.fractions": "[]", "budgets.per_class": "[25]", "budgets.draws": 1, "baselines.cnn_scratch": False,
           "baselines.random_encoder": False}
    pixels = kermany["pixels"]
    shifted = pixels.copy()
    test = ~kermany["train"]
    shifted[test] = np.sqrt(shifted[test])  # a different scanner's contrast curve on the test split
    tables = {}
    for name, px, mode in (("pool", pixels, "pool"), ("pool_shifted", shifted, "pool"), ("subset", pixels, "subset")):
        cfg = _tiny_cfg(**off, **{"probes.standardize": mode})
        run_benchmark_on_features(kermany["index"], {}, px, cfg, tmp_path / name, verbose=False)
        tables[name] = pd.read_csv(tmp_path / name / "benchmark.csv").query("metric == 'auc'")
    pool, shifted_run, subset = tables["pool"], tables["pool_shifted"], tables["subset"]
    for col in ("threshold", "cv_auc", "selected", "params"):
        assert pool[col].tolist() == shifted_run[col].tolist(), col
    assert not np.allclose(pool["value"], shifted_run["value"])  # the test scores did move
    assert not np.allclose(pool["cv_auc"], subset["cv_auc"])  # the option is live: other scales, other fits
    assert pool["value"].min() > 0.7 and subset["value"].min() > 0.7


# --------------------------------------------------------------------------------------------------
# features and CNN estimators
# --------------------------------------------------------------------------------------------------
def test_grid_variants_pool_the_code_maps(vq: FeatureSource) -> None:
    codes, codebook = vq.arrays["codes"][:50], vq.codebook
    hist = feature_variant("codes_grid_hist_2x2", {"codes": codes}, codebook).reshape(50, 4, -1)
    np.testing.assert_allclose(hist.sum(axis=2), 1.0, rtol=1e-6)
    top_left = codes[:, :8, :8].reshape(50, -1)
    np.testing.assert_allclose(hist[:, 0], np.stack([np.bincount(c, minlength=len(codebook)) / 64 for c in top_left]), rtol=1e-6)
    mean = feature_variant("codes_grid_mean_2x2", {"codes": codes}, codebook).reshape(50, 4, -1)
    np.testing.assert_allclose(mean[:, 0], codebook[top_left].mean(axis=1), rtol=1e-5, atol=1e-6)
    # the whole-map grid is the exported bag of codes
    np.testing.assert_allclose(feature_variant("codes_grid_hist_1x1", vq.arrays, codebook)[:50], vq.arrays["code_histogram"][:50])
    with pytest.raises(KeyError, match="continuous_mean"):
        feature_variant("continuous_mean", {"codes": codes}, codebook)


def test_encoder_stats_variant_puts_mean_and_spread_side_by_side() -> None:
    from vqmed.downstream.features import COMBINED_VARIANTS, DIRECT_VARIANTS, VARIANTS

    rng = np.random.default_rng(0)
    arrays = {"encoder_grid": rng.normal(size=(6, 32)).astype(np.float16), "encoder_grid_std": rng.random((6, 32)).astype(np.float16)}
    stats = feature_variant("encoder_stats", arrays, None)
    assert stats.dtype == np.float32 and stats.shape == (6, 64)
    np.testing.assert_array_equal(stats[:, :32], arrays["encoder_grid"].astype(np.float32))
    np.testing.assert_array_equal(stats[:, 32:], arrays["encoder_grid_std"].astype(np.float32))
    with pytest.raises(KeyError, match="encoder_grid_std"):
        feature_variant("encoder_stats", {"encoder_grid": arrays["encoder_grid"]}, None)
    # the registry the config validates against is the set of names the features module builds
    assert set(VARIANTS) == set(DIRECT_VARIANTS) | set(COMBINED_VARIANTS)


def test_coarser_encoder_stats_merge_the_export_cells_exactly(kermany: dict) -> None:
    """``encoder_stats_GxG`` from the exported 4x4 cells equals the stages' statistics pooled on G x G directly."""
    import torch

    from vqmed.export import compute_features
    from vqmed.networks import build_model
    from vqmed.networks.stages import grid_mean_std, stage_outputs

    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1).eval()
    images = torch.as_tensor(kermany["pixels"][:24, None])
    arrays = compute_features(model, images)
    for cells in (1, 2):
        with torch.no_grad(), stage_outputs(model.feature_stages(), lambda out: grid_mean_std(out, cells)) as stages:
            model.encode(images)
        direct = torch.cat([torch.cat([m for m, _ in stages], 1), torch.cat([s for _, s in stages], 1)], 1).numpy()
        merged = feature_variant(f"encoder_stats_{cells}x{cells}", arrays, None)
        assert merged.shape == direct.shape == (24, 2 * arrays["encoder_grid"].shape[1] // (4 // cells) ** 2)
        # the export stores float16: agreement to its precision, on real activations (spread > 0 everywhere)
        np.testing.assert_allclose(merged, direct, rtol=2e-3, atol=2e-3)
    whole_grid = feature_variant("encoder_stats_4x4", arrays, None)
    np.testing.assert_array_equal(whole_grid, feature_variant("encoder_stats", arrays, None))
    with pytest.raises(KeyError, match="do not divide"):
        feature_variant("encoder_stats_3x3", arrays, None)
    with pytest.raises(KeyError, match="continuous_grid"):
        feature_variant("encoder_stats_2x2", {k: arrays[k] for k in ("encoder_grid", "encoder_grid_std")}, None)


def test_code_map_cnn_learns_and_is_a_deterministic_sklearn_estimator(kermany: dict, vq: FeatureSource) -> None:
    tr_rows, te_rows = np.flatnonzero(kermany["train"]), np.flatnonzero(~kermany["train"])
    y, g = kermany["y"][tr_rows], kermany["groups"][tr_rows]
    sub = tr_rows[draw_labeled_subset(y, g, Budget("per_class", 100), seed=0, draw=0)]
    codes = vq.arrays["codes"]
    est = CodeMapCNN(codebook=vq.codebook, channels=(16, 32), epochs=30, max_steps=120, random_state=3)
    model = clone(est).fit(codes[sub], kermany["y"][sub])
    curve = np.asarray(model.loss_curve_)
    assert len(curve) == 120 and curve[-10:].mean() < 0.8 * curve[:5].mean(), curve
    proba = model.predict_proba(codes[te_rows])
    assert proba.shape == (len(te_rows), 2) and np.allclose(proba.sum(axis=1), 1.0)
    train_auc = roc_auc_score(kermany["y"][sub], model.predict_proba(codes[sub])[:, 1])
    test_auc = roc_auc_score(kermany["y"][te_rows], proba[:, 1])
    assert train_auc > 0.9 and test_auc > 0.7, (train_auc, test_auc)
    assert set(model.predict(codes[te_rows][:20])) <= {0, 1}
    again = clone(est).fit(codes[sub], kermany["y"][sub])
    np.testing.assert_array_equal(again.predict_proba(codes[te_rows]), proba)
    # the embedding starts from the codebook (rescaled), so code similarity is there from step 0
    assert est.get_params()["codebook"] is vq.codebook
    with pytest.raises(ValueError, match="integer code maps"):
        model.predict_proba(kermany["pixels"][:2])


def test_mlp_on_principal_components_learns_from_few_labels(kermany: dict) -> None:
    """``mlp_components`` puts a PCA, capped by the labeled rows, in front of the MLP."""
    tr_rows, te_rows = np.flatnonzero(kermany["train"]), np.flatnonzero(~kermany["train"])
    y, g = kermany["y"][tr_rows], kermany["groups"][tr_rows]
    X = kermany["pixels"].reshape(len(kermany["pixels"]), -1)
    probes = ProbeConfig(mlp_hidden=16, mlp_alpha=[1.0], mlp_max_iter=100, mlp_components=32)
    for per_class, components in ((10, 19), (50, 32)):  # 20 labeled rows leave 19 components
        sub = tr_rows[draw_labeled_subset(y, g, Budget("per_class", per_class), seed=0, draw=0)]
        est, grid = make_probe("mlp", probes, CNNConfig(), random_state=0)
        model = clone(est).set_params(**grid[0]).fit(X[sub], kermany["y"][sub])
        assert model.named_steps["pca"].pca_.n_components_ == components
        assert model.named_steps["clf"].coefs_[0].shape == (components, 16)
        test_auc = roc_auc_score(kermany["y"][te_rows], model.predict_proba(X[te_rows])[:, 1])
        assert test_auc > 0.7, (per_class, test_auc)
    est, _ = make_probe("mlp", ProbeConfig(mlp_components=None), CNNConfig(), random_state=0)
    assert "pca" not in est.named_steps


def test_image_cnn_from_scratch_learns(kermany: dict) -> None:
    tr_rows, te_rows = np.flatnonzero(kermany["train"]), np.flatnonzero(~kermany["train"])
    y, g = kermany["y"][tr_rows], kermany["groups"][tr_rows]
    sub = tr_rows[draw_labeled_subset(y, g, Budget("per_class", 100), seed=0, draw=0)]
    model = ImageCNN(channels=(8, 16, 32), epochs=30, max_steps=100, random_state=0).fit(kermany["pixels"][sub], kermany["y"][sub])
    train_auc = roc_auc_score(kermany["y"][sub], model.predict_proba(kermany["pixels"][sub])[:, 1])
    test_auc = roc_auc_score(kermany["y"][te_rows], model.predict_proba(kermany["pixels"][te_rows])[:, 1])
    assert train_auc > 0.85 and test_auc > 0.65, (train_auc, test_auc)


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------
def test_benchmark_end_to_end_writes_outputs_and_mlflow_runs(kermany: dict, vq: FeatureSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cfg = _tiny_cfg()
    random_vq = _patch_vq(np.random.default_rng(0).random(kermany["pixels"].shape, dtype=np.float32), kermany["train"], k=64, seed=1)
    sources = {"vqvae": vq, "random_encoder": random_vq}
    meta = {"pretrain_run_id": "0123456789abcdef0123456789abcdef", "model_ref": "patch-kmeans"}
    out = tmp_path / "bench"
    summary = run_benchmark_on_features(kermany["index"], sources, kermany["pixels"], cfg, out, meta=meta, verbose=False)

    for name in ("benchmark.csv", "summary.json", "summary.md", "label_efficiency.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert Image.open(out / "label_efficiency.png").size[0] > 300
    assert not (out / "tracking_backlog").exists()  # the tracking store took everything: no empty backlog folder
    table = pd.read_csv(out / "benchmark.csv")
    primary = ["vqvae", "random_encoder", "raw_pixels_logreg", "pca_logreg", "cnn_scratch"]
    main = table[~table.method.str.contains(r"\[")]
    # the first variant is the method; the second is reported as a method of its own
    assert sorted(main.method.unique()) == sorted([*primary, "vqvae:codes_grid_mean_2x2"])
    assert len(main) == (len(primary) + 1) * 2 * 2 * 5  # methods x budgets x draws x metrics
    assert set(table.metric) == {"auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy"}
    assert (table.ci_low <= table.value + 1e-12).all() and (table.value <= table.ci_high + 1e-12).all()
    # the first variant x 2 sklearn classifiers + the code CNN; the second variant x 2 classifiers
    assert set(table[table.method.str.startswith("vqvae[")].method) == {
        "vqvae[code_histogram+logreg]", "vqvae[code_histogram+knn]", "vqvae[codes+code_cnn]"
    }
    assert table[table.method.str.startswith("vqvae:codes_grid_mean_2x2[")].method.nunique() == 2
    assert set(main[main.method == "vqvae"].selected) <= set(table[table.method.str.startswith("vqvae[")].method.str[6:-1])
    n10 = main[(main.budget == "10/class") & (main.metric == "auc")]
    assert (n10.n_labels == 20).all() and (n10.n_pos == 10).all()

    saved = json.loads((out / "summary.json").read_text())
    assert saved["meta"]["pretrain_run_id"] == meta["pretrain_run_id"]
    rows = {(r["method"], r["budget"]): r for r in saved["results"]}
    assert set(primary) <= {m for m, _ in rows}
    for m in primary:
        r = rows[(m, "2%")]
        assert r["n_draws"] == 2 and r["auc_ci_low"] <= r["auc_mean"] <= r["auc_ci_high"]
        assert r["auc_mean"] == pytest.approx(np.mean(r["auc_per_draw"]))
    # frozen features of real images beat the same probes on features of noise
    assert rows[("vqvae", "2%")]["auc_mean"] > rows[("random_encoder", "2%")]["auc_mean"] + 0.1
    assert rows[("raw_pixels_logreg", "2%")]["auc_mean"] > 0.8
    md = (out / "summary.md").read_text()
    assert "| vqvae |" in md and "10/class (n=20)" in md

    with sqlite3.connect(db) as con:
        runs = dict(con.execute("select run_uuid, name from runs").fetchall())
        tags = con.execute("select run_uuid, key, value from tags").fetchall()
    parent = summary["mlflow_parent_run_id"]
    assert runs[parent] == "test-benchmark"
    parent_tags = {k: v for r, k, v in tags if r == parent}
    assert parent_tags["vqmed.pretrain_run_id"] == meta["pretrain_run_id"]
    children = {r for r, k, v in tags if k == "mlflow.parentRunId" and v == parent}
    assert {runs[c] for c in children} == {f"{m} @ {b}" for m in [*primary, "vqvae:codes_grid_mean_2x2"] for b in ("10/class", "2%")}

    # same config and seed: the same AUCs, draw by draw, also when two worker processes share the draws
    # (every draw is seeded on its own and each worker runs single-threaded)
    parallel = _tiny_cfg(jobs=2)
    again = run_benchmark_on_features(kermany["index"], sources, kermany["pixels"], parallel, tmp_path / "again", verbose=False)
    first = {(r["method"], r["budget"]): r["auc_per_draw"] for r in summary["results"]}
    second = {(r["method"], r["budget"]): r["auc_per_draw"] for r in again["results"]}
    assert first == second
    assert again["cpu_seconds"] >= sum(again["cpu_seconds_per_method"].values())  # the workers' CPU is counted


def test_vqmed_benchmark_cli_on_an_export_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``vqmed benchmark`` on a real export store: arrays, codebook, pixels through ImageDataset, and a
    randomly initialised encoder of the same architecture, all wired from the store's metadata."""
    import torch

    from vqmed.cli import main
    from vqmed.data import read_manifest
    from vqmed.export import export_manifest
    from vqmed.networks import build_model
    from vqmed.models_io.checkpoint import save_checkpoint

    monkeypatch.setenv("VQMED_ID_SALT", "vqmed-test-salt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CI", "1")  # no progress bars
    manifest = read_manifest(REPO / "data_manifests" / "chest_xray.csv")
    parts = [g.sort_values("path").head(60 if split == "train" else 40) for (split, _), g in manifest.groupby(["split", "label"])]
    small = tmp_path / "kermany_small.csv"
    pd.concat(parts).to_csv(small, index=False)
    # a small untrained model: the wiring is under test here, not the pretraining
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(
            "vqvae", spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32), num_res_layers=(1, 1),
            num_res_channels=(16, 16), downsample=4, num_embeddings=64, embedding_dim=16,
        )
    run_id = "fedcba9876543210fedcba9876543210"
    state = {
        "model_name": "vqvae",
        "model_config": model.config,
        "model_state": model.state_dict(),
        "step": 0,
        "mlflow_run_id": run_id,
        "config": {"data": {"image_size": SIZE, "spatial_dims": 2, "channels": 1}},
    }
    ckpt = save_checkpoint(state, tmp_path / "ckpt")
    export_manifest(ckpt, small, tmp_path / "store", DATA_ROOT, batch_size=64, progress=False)

    out = tmp_path / "bench"
    overrides = {
        "export": str(tmp_path / "store"),
        "data_root": str(DATA_ROOT),
        "cache_dir": "null",
        "budgets.fractions": "[0.2]",
        "budgets.per_class": "[10]",
        "budgets.draws": 2,
        "probes.variants": "[code_histogram, codes_grid_mean_2x2, continuous_mean]",
        "probes.classifiers": "[logreg, code_cnn]",
        "cnn.max_steps": 20,
        "metrics.bootstrap": 100,
        "name": "cli-benchmark",
    }
    args = ["benchmark", "--config", str(REPO / "configs" / "benchmark" / "pneumonia.yaml"), "--out", str(out)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["pretrain_run_id"] == run_id and summary["n_train"] == 120 and summary["n_test"] == 80
    methods = {r["method"] for r in summary["results"]}
    assert methods == {
        "vqvae", "vqvae:codes_grid_mean_2x2", "vqvae:continuous_mean", "random_encoder", "raw_pixels_logreg", "pca_logreg", "cnn_scratch"
    }
    assert {r["budget"] for r in summary["results"]} == {"10/class", "20%"}
    for name in ("benchmark.csv", "summary.md", "label_efficiency.png", "label_efficiency_per_class.png"):
        assert (out / name).is_file(), name
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        tagged = con.execute("select run_uuid from tags where key = 'vqmed.pretrain_run_id' and value = ?", (run_id,)).fetchall()
    assert [r[0] for r in tagged] == [summary["mlflow_parent_run_id"]]

    # the validation protocol on the store: the committed patient list, matched through the store's salted
    # patient keys; only the training split's images are read
    committed = REPO / "data_manifests" / "chest_xray_validation_patients.csv"
    listed = set(pd.read_csv(committed, comment="#", dtype=str)["patient_id"])
    train_small = pd.read_csv(small).query("split == 'train'")
    args = [str(tmp_path / "bench_val") if a == str(out) else a for a in args]
    args += ["--set", "evaluate_on=validation", "--set", f"validation_patients={committed}", "--set", "budgets.fractions=[]"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    val = json.loads((tmp_path / "bench_val" / "summary.json").read_text())
    assert val["evaluated_on"] == "validation"
    assert val["n_test"] == int(train_small["patient_id"].isin(listed).sum()) > 0
    assert val["n_train"] == int((~train_small["patient_id"].isin(listed)).sum())


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pneumonia.yaml", "pneumonia_full.yaml"])
def test_benchmark_configs_load(name: str) -> None:
    cfg = load_config(BenchmarkConfig, REPO / "configs" / "benchmark" / name)
    budgets = make_budgets(cfg.budgets.fractions, cfg.budgets.per_class)
    assert [b.name for b in budgets] == ["5/class", "10/class", "25/class", "50/class", "1%", "2%", "5%", "10%", "25%", "100%"]
    assert cfg.budgets.draws >= 5


def test_feature_probe_config_loads() -> None:
    cfg = load_config(BenchmarkConfig, REPO / "configs" / "benchmark" / "pneumonia_probe.yaml")
    assert cfg.probes.variants[0] == "encoder_stats" and cfg.probes.classifiers == ["logreg"]
    assert max(cfg.budgets.fractions) <= 0.10 and cfg.budgets.draws >= 5


def test_benchmark_config_rejects_bad_values(tmp_path: Path) -> None:
    path = REPO / "configs" / "benchmark" / "pneumonia.yaml"
    with pytest.raises(ConfigError, match="probes.classifiers"):
        load_config(BenchmarkConfig, path, ["probes.classifiers=[logreg, forest]"])
    with pytest.raises(ConfigError, match="budgets.fractions"):
        load_config(BenchmarkConfig, path, ["budgets.fractions=[0.0]"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(BenchmarkConfig, path, ["probes.folds=3"])
    with pytest.raises(ConfigError, match="variant"):
        load_config(BenchmarkConfig, path, ["probes.variants=[codes_grid_hist_2x3]"])
    with pytest.raises(ConfigError, match="jobs"):
        load_config(BenchmarkConfig, path, ["jobs=0"])
    with pytest.raises(ConfigError, match="probes.mlp_components"):
        load_config(BenchmarkConfig, path, ["probes.mlp_components=0"])
