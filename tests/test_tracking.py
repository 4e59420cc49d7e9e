"""Tests of vqmed.tracking against a real MLflow sqlite store and real Kermany chest X-rays."""

from __future__ import annotations

import json
import math
import os
import ast
import re
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vqmed.tracking import (
    default_tracking_uri,
    flatten_params,
    label_efficiency_plot,
    local_artifact_root,
    log_dataset_input,
    log_figure,
    log_image_array,
    log_metrics,
    log_params,
    loss_curves,
    manifest_digest,
    psnr,
    reconstruction_gif,
    reconstruction_grid,
    serve_ui,
    setup_mlflow,
    stop_ui,
    usage_histogram,
)

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The shared real data: env VQMED_DATA_ROOT, else ``<repo>/../shared/data``."""
    return Path(os.environ.get("VQMED_DATA_ROOT") or REPO.parent / "shared" / "data")


def kermany_files(split: str = "train", per_label: int = 8) -> list[Path]:
    root = data_root() / "chest_xray" / split
    if not root.is_dir():
        pytest.skip(f"Kermany chest X-rays not found at {root} (set VQMED_DATA_ROOT)")
    files: list[Path] = []
    for label in ("NORMAL", "PNEUMONIA"):
        files += sorted((root / label).glob("*.jpeg"))[:per_label]
    return files


def load_batch(files: list[Path], size: int = 64, mode: str = "L") -> np.ndarray:
    """Real X-rays as [N, C, H, W] float in [0, 1]."""
    imgs = []
    for f in files:
        im = np.asarray(Image.open(f).convert(mode).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        imgs.append(im[None] if im.ndim == 2 else np.moveaxis(im, -1, 0))
    return np.stack(imgs) / 255.0


def pca_reconstruct(train: np.ndarray, val: np.ndarray, k: int) -> np.ndarray:
    """A real (linear) autoencoder: project validation images on the top-k principal components of train."""
    x = train.reshape(len(train), -1)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    v = vt[:k]
    rec = ((val.reshape(len(val), -1) - mean) @ v.T) @ v + mean
    return np.clip(rec.reshape(val.shape), 0.0, 1.0)


def reset_mlflow_globals() -> None:
    """Forget the store/experiment/run that setup_mlflow made current (MLflow keeps them in globals and env)."""
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # also clears MLFLOW_TRACKING_URI, which MLflow sets for subprocesses
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set by mlflow.set_experiment, likewise
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite store in tmp_path (also the cwd); MLflow's global state reset afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    reset_mlflow_globals()


def artifact_file(uri: str, run_id: str, path: str) -> Path:
    local = mlflow.MlflowClient(uri).download_artifacts(run_id, path)
    return Path(local)


# --------------------------------------------------------------------------------------------------
def test_default_tracking_uri_is_absolute_sqlite_in_working_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri()
    assert uri == "sqlite:///" + str(tmp_path.resolve() / "mlflow.db") and uri.startswith("sqlite:////")
    assert local_artifact_root(uri) == tmp_path.resolve() / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri() == "http://tracking.example:5000"
    assert local_artifact_root() is None  # a server decides where its artifacts go


def test_setup_mlflow_keeps_artifacts_beside_the_database(store, tmp_path):
    exp_id = setup_mlflow(store, "vqmed-pretrain")
    exp = mlflow.get_experiment(exp_id)
    assert exp.name == "vqmed-pretrain"
    assert exp.artifact_location == (tmp_path / "mlartifacts" / "vqmed-pretrain").as_uri()
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert mlflow.get_tracking_uri() == store
    # idempotent, and a relative sqlite URI resolves to the same absolute store (cwd is tmp_path)
    assert setup_mlflow("sqlite:///mlflow.db", "vqmed-pretrain") == exp_id
    assert mlflow.get_tracking_uri() == store
    with mlflow.start_run() as run:
        log_metrics({"x": 1.0}, step=0)
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "mlartifacts")
    # a deleted experiment of the same name is restored, not an error
    mlflow.MlflowClient(store).delete_experiment(exp_id)
    assert setup_mlflow(store, "vqmed-pretrain") == exp_id
    assert mlflow.get_experiment(exp_id).lifecycle_stage == "active"
    with pytest.raises(ValueError, match="empty"):
        setup_mlflow(store, " ")
    # an experiment made by plain MLflow (no kind tag: the UI would open it on GenAI traces) gets the tag
    plain = mlflow.MlflowClient(store).create_experiment("made-elsewhere")
    assert "mlflow.experimentKind" not in mlflow.get_experiment(plain).tags
    assert setup_mlflow(store, "made-elsewhere") == plain
    assert mlflow.get_experiment(plain).tags["mlflow.experimentKind"] == "custom_model_development"


def test_flatten_params_nested_lists_and_limits():
    long_text = "x" * 900
    cfg = {
        "model": {"channels": [32, 64, 128], "num_embeddings": 512, "beta": 0.25, "decay": 1.0, "norm": None},
        "data": {"root": Path("/data/chest_xray"), "augment": {"flip": True}, "extra": {}},
        "stages": [{"name": "a", "depth": 2}, {"name": "b", "depth": 3}],
        "notes": long_text,
        "k" * 300: 1,
        "np": np.float32(0.5),
    }
    flat = flatten_params(cfg)
    assert flat["model.channels"] == "[32, 64, 128]"
    assert flat["model.num_embeddings"] == "512"
    assert flat["model.decay"] == "1.0"
    assert flat["model.norm"] == "None"
    assert flat["data.root"] == "/data/chest_xray"
    assert flat["data.augment.flip"] == "True"
    assert flat["data.extra"] == "{}"
    assert flat["stages.0.name"] == "a" and flat["stages.1.depth"] == "3"
    assert flat["np"] == "0.5"
    assert len(flat["notes"]) == 500 and flat["notes"].endswith("...[truncated]")
    long_keys = [k for k in flat if k.startswith("kkk")]
    assert len(long_keys) == 1 and len(long_keys[0]) <= 250
    assert all(isinstance(v, str) for v in flat.values())


def test_params_and_metrics_are_logged_by_step(store):
    setup_mlflow(store, "unit")
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_metrics({"loss": 1.0}, step=0)
    cfg = {"model": {f"p{i}": i for i in range(130)}, "train": {"lr": 3e-4, "epochs": 5}}  # > 100: batched
    losses = [1.0, 0.5, float("nan"), 0.2, float("inf")]
    with mlflow.start_run() as run:
        flat = log_params(cfg)
        for step, loss in enumerate(losses):
            logged = log_metrics({"train/loss": loss, "val_psnr": np.float64(20 + step), "skipped": None}, step=step)
            assert ("train/loss" in logged) == math.isfinite(loss)
        with pytest.raises(TypeError, match="'label'"):
            log_metrics({"label": "pneumonia"}, step=0)
    client = mlflow.MlflowClient(store)
    params = client.get_run(run.info.run_id).data.params
    assert params == flat and len(params) == 132
    assert params["train.lr"] == "0.0003" and params["model.p129"] == "129"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 1.0), (1, 0.5), (3, 0.2)]
    psnrs = client.get_metric_history(run.info.run_id, "val_psnr")
    assert sorted((m.step, m.value) for m in psnrs) == [(s, 20.0 + s) for s in range(5)]


def test_psnr():
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(1e-4) == pytest.approx(40.0)
    assert psnr(65.025, data_range=255.0) == pytest.approx(30.0)
    assert psnr(0.0) == math.inf
    with pytest.raises(ValueError):
        psnr(-1.0)


def test_figures_are_logged_as_readable_pngs(store):
    setup_mlflow(store, "unit")
    files = kermany_files(per_label=12)
    grey = load_batch(files, size=64)
    train, val = grey[::2], grey[1::2]
    rec = pca_reconstruct(train, val, k=6)
    rgb = load_batch(files[:4], size=48, mode="RGB")

    fig = reconstruction_grid(val, rec, n=10, max_cols=5)
    img_axes = [ax for ax in fig.axes if ax.images]
    assert len(img_axes) == 20  # 10 originals + 10 reconstructions in two row pairs
    # top-left shows the first original, the row below its reconstruction (what a reader relies on)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), val[0, 0], atol=1e-6)
    np.testing.assert_allclose(fig.axes[5].images[0].get_array(), rec[0, 0], atol=1e-6)
    expected = psnr(float(np.mean((val[0, 0] - rec[0, 0]) ** 2)))
    assert fig.axes[5].get_title() == f"{expected:.1f} dB"
    rgb_fig = reconstruction_grid(rgb, rgb[:, ::-1], n=16)
    assert rgb_fig.axes[0].images[0].get_array().shape == (48, 48, 3)

    history = {
        "train/loss": [(s, 2.0 * 0.5**s) for s in range(8)],
        "train/commitment": [(s, 0.1 / (s + 1)) for s in range(8)],
        "val_mse": [(s, 0.05 / (s + 1)) for s in range(0, 8, 2)],
        "val_psnr": [(s, 13.0 + s) for s in range(0, 8, 2)],
    }
    curves = loss_curves(history)
    panels = {ax.get_title(): ax for ax in curves.axes if ax.get_title()}
    assert set(panels) == {"loss", "PSNR (dB)"}
    assert panels["loss"].get_yscale() == "log" and panels["PSNR (dB)"].get_yscale() == "linear"
    assert {line.get_label() for line in panels["loss"].lines} == {"train/loss", "train/commitment", "val_mse"}

    counts = np.bincount(np.random.default_rng(0).integers(0, 40, 5000), minlength=64)
    hist = usage_histogram(counts)
    assert "40/64 codes used (62.5%)" in hist.get_suptitle()

    df = pd.DataFrame(
        [(m, n, a, a - 0.05, a + 0.05) for m, base in (("vq codes", 0.8), ("raw pixels", 0.7)) for n, a in ((10, base), (100, base + 0.1), (1000, base + 0.15))],
        columns=["method", "n_labels", "auc_mean", "auc_low", "auc_high"],
    )
    eff = label_efficiency_plot(df)
    assert eff.axes[0].get_xscale() == "log"
    assert [t.get_text() for t in eff.axes[0].get_legend().get_texts()][:2] == ["vq codes", "raw pixels"]
    with pytest.raises(KeyError, match="auc_low"):
        label_efficiency_plot(df.drop(columns="auc_low"))

    import matplotlib.pyplot as plt  # a caller's own pyplot figure must be closed by log_figure too

    pyplot_fig, pyplot_ax = plt.subplots()
    pyplot_ax.imshow(val[0, 0], cmap="gray")
    with mlflow.start_run() as run:
        for fig_, name in ((fig, "recon/grid"), (rgb_fig, "recon/rgb.png"), (curves, "curves.png"), (hist, "codebook/usage.png"), (eff, "efficiency.png"), (pyplot_fig, "pyplot.png")):
            log_figure(fig_, name)
    assert not plt.fignum_exists(pyplot_fig.number)
    for name in ("recon/grid.png", "recon/rgb.png", "curves.png", "codebook/usage.png", "efficiency.png", "pyplot.png"):
        with Image.open(artifact_file(store, run.info.run_id, name)) as im:
            im.verify()  # a complete, decodable PNG
        with Image.open(artifact_file(store, run.info.run_id, name)) as im:
            assert im.format == "PNG" and min(im.size) > 200
            # not a blank canvas
            assert np.asarray(im.convert("L")).std() > 10


def test_reconstruction_gif_has_one_labelled_frame_per_epoch(store, tmp_path):
    setup_mlflow(store, "unit")
    files = kermany_files(per_label=10)
    grey = load_batch(files, size=64)
    train, val = grey[::2], grey[1::2]
    ks = [1, 2, 4, 8, 10]
    frames = [np.concatenate([val[0], pca_reconstruct(train, val[:1], k)[0]], axis=-1) for k in ks]
    path = reconstruction_gif(frames, tmp_path / "gif" / "val0.gif", fps=4)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(ks)
        assert gif.info["duration"] == 250 and gif.info.get("loop") == 0
        decoded = []
        for i in range(gif.n_frames):
            gif.seek(i)
            decoded.append(np.asarray(gif.convert("L"), dtype=np.float32))
    # 64 px is enlarged 3x to >= 192 px under a 24 px caption bar
    assert decoded[0].shape == (24 + 64 * 3, 128 * 3)
    original = np.kron(val[0, 0] * 255.0, np.ones((3, 3)))
    shown = decoded[-1][24:, : 64 * 3]
    assert np.corrcoef(original.ravel(), shown.ravel())[0, 1] > 0.99  # the image itself, not covered
    # captions differ ("epoch 1" ... "epoch 5") and the reconstruction half changes across epochs
    assert len({frame[:24].tobytes() for frame in decoded}) == len(ks)
    assert np.abs(decoded[0][24:, 192:] - decoded[-1][24:, 192:]).mean() > 1.0
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(path), "reconstructions")
    with Image.open(artifact_file(store, run.info.run_id, "reconstructions/val0.gif")) as gif:
        assert gif.n_frames == len(ks)
    with pytest.raises(ValueError, match="labels"):
        reconstruction_gif(frames, tmp_path / "x.gif", labels=["epoch 1"])


def test_log_image_array_channel_layouts_and_3d_middle_slice(store):
    import nibabel as nib

    setup_mlflow(store, "unit")
    xray = load_batch(kermany_files(per_label=1)[:1], size=96)[0]  # [1, H, W]
    rgb = load_batch(kermany_files(per_label=1)[:1], size=40, mode="RGB")[0]  # [3, H, W]
    nifti = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    vol = np.asarray(nib.load(nifti).get_fdata(), dtype=np.float32)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    with mlflow.start_run() as run:
        log_image_array(xray, "images/xray")
        log_image_array((rgb * 255).astype(np.uint8), "images/rgb.png")
        log_image_array(vol[None], "images/volume.png")
    rid = run.info.run_id
    with Image.open(artifact_file(store, rid, "images/xray.png")) as im:
        assert im.mode == "L" and im.size == (96, 96)
        np.testing.assert_allclose(np.asarray(im) / 255.0, xray[0], atol=1 / 255)
    with Image.open(artifact_file(store, rid, "images/rgb.png")) as im:
        assert im.mode == "RGB" and im.size == (40, 40)
    with Image.open(artifact_file(store, rid, "images/volume.png")) as im:
        mid = vol[..., vol.shape[-1] // 2]
        assert im.size == (mid.shape[1], mid.shape[0])
        np.testing.assert_allclose(np.asarray(im) / 255.0, mid, atol=1 / 255)
    with mlflow.start_run(), pytest.raises(ValueError, match="not an image"):
        log_image_array(np.zeros(5), "bad.png")
    # the reconstruction grid shows 3D volumes ([N, C, H, W, D]) as the same middle slice
    grid = reconstruction_grid(vol[None, None], vol[None, None] * 0.9)
    np.testing.assert_allclose(grid.axes[0].images[0].get_array(), mid, atol=1e-6)


def kermany_manifest(n_per_label: int = 40) -> pd.DataFrame:
    """A manifest like the data room's: one row per image, with a patient id parsed from the file name."""
    rows = []
    for split in ("train", "test"):
        for f in kermany_files(split, per_label=n_per_label):
            m = re.search(r"(person\d+)", f.name)
            rows.append({"path": str(f), "split": split, "label": f.parent.name, "patient_id": m.group(1) if m else f.stem})
    return pd.DataFrame(rows)


def test_dataset_input_is_logged_by_digest_without_patient_data(store):
    setup_mlflow(store, "unit")
    manifest = kermany_manifest()
    assert manifest["patient_id"].str.startswith("person").any()
    digest = manifest_digest(manifest)
    # stable under row order and mount point, sensitive to content
    moved = manifest.sample(frac=1.0, random_state=0).assign(path=lambda d: "/mnt/other/" + d["path"].map(lambda p: Path(p).name))
    assert manifest_digest(moved) == digest
    relabelled = manifest.copy()
    relabelled.loc[0, "label"] = "PNEUMONIA" if relabelled.loc[0, "label"] == "NORMAL" else "NORMAL"
    assert manifest_digest(relabelled) != digest

    with mlflow.start_run() as run:
        assert log_dataset_input(manifest, name="kermany", context="training") == digest
        with pytest.raises(ValueError, match="patient_id"):
            log_dataset_input(manifest, name="kermany", count_columns=("split", "patient_id"))
    inputs = mlflow.MlflowClient(store).get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "kermany" and ds.digest == digest
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    profile = json.loads(ds.profile)
    assert profile["num_rows"] == manifest.groupby(["split", "label"]).ngroups == 4
    schema_cols = [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]]
    assert schema_cols == ["manifest_digest", "split", "label", "n"]
    # nothing identifying leaves: no patient ids, file names or data paths anywhere in the logged entry
    logged = json.dumps([ds.name, ds.digest, ds.source_type, ds.source, ds.schema, ds.profile])
    assert "person" not in logged.lower()
    assert not any(Path(p).name in logged for p in manifest["path"])
    assert str(data_root()) not in logged


def test_serve_ui_serves_store_and_artifacts(store, tmp_path, capsys):
    exp_id = setup_mlflow(store, "vqmed-pretrain")
    xray = load_batch(kermany_files(per_label=1)[:1], size=32)[0]
    with mlflow.start_run(run_name="pretrain-ui-check") as run:
        log_metrics({"val_psnr": 21.5}, step=1)
        log_image_array(xray, "reconstructions/x.png")
    proc = serve_ui(port=0, tracking_uri=store, block=False, log_path=tmp_path / "ui.log", wait_timeout=150)
    try:
        assert proc.url.startswith("http://127.0.0.1:")
        # each experiment's address opens MLflow 3.17's UI on its Training runs (workflowType), not GenAI traces
        assert f"vqmed-pretrain: {proc.url}/#/experiments/{exp_id}?workflowType=machine_learning" in capsys.readouterr().out
        with urllib.request.urlopen(f"{proc.url}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}", timeout=10) as r:
            got = json.load(r)["run"]
        assert got["info"]["run_name"] == "pretrain-ui-check" and got["info"]["experiment_id"] == exp_id
        assert {m["key"]: m["value"] for m in got["data"]["metrics"]}["val_psnr"] == 21.5
        url = f"{proc.url}/get-artifact?path=reconstructions/x.png&run_uuid={run.info.run_id}"
        with urllib.request.urlopen(url, timeout=10) as r:
            png = r.read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        stop_ui(proc)
    assert proc.poll() is not None


def test_tracking_room_imports_no_other_vqmed_room():
    room = REPO / "vqmed" / "tracking"
    for py in room.glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text(), filename=str(py))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("vqmed") or name.startswith("vqmed.tracking"), f"{py.name} imports {name}"


def test_serve_ui_refuses_a_taken_port_and_skips_remote_servers(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}.*in use"):
            serve_ui(port=port, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", block=False)
    assert serve_ui(tracking_uri="http://tracking.example:5000", block=False) is None
    assert "http://tracking.example:5000" in capsys.readouterr().out


def test_label_efficiency_plot_tells_every_reference_method_apart() -> None:
    """The five reference methods each get their own colour, marker and line style, lines that coincide
    (raw pixels and PCA, identical AUCs here) are dodged apart, and variants go to a second panel."""
    # the benchmark's reference methods (vqmed.downstream.report.PRIMARY_ORDER); the tracking room knows no benchmark
    PRIMARY_ORDER = ("vqvae", "random_encoder", "raw_pixels_logreg", "pca_logreg", "cnn_scratch")
    methods = [*PRIMARY_ORDER, "vqvae:code_histogram", "vqvae[encoder_stats+logreg]"]
    rows = []
    for i, method in enumerate(methods):
        base = 0.8 if method in ("raw_pixels_logreg", "pca_logreg") else 0.7 + 0.02 * i
        rows += [(method, n, base + 0.05 * k, base + 0.05 * k - 0.03, base + 0.05 * k + 0.03) for k, n in enumerate((20, 52, 522))]
    df = pd.DataFrame(rows, columns=["method", "n_labels", "auc_mean", "auc_low", "auc_high"])
    fig = label_efficiency_plot(df, title="Test ROC AUC", reference=PRIMARY_ORDER)
    left, right = fig.axes
    lines = {line.get_label(): line for line in left.get_lines() if line.get_label() != "chance"}
    assert list(lines) == list(PRIMARY_ORDER)
    # a custom dash pattern reads back as "--": compare the dash patterns themselves
    styles = {
        "colour": [line.get_color() for line in lines.values()],
        "marker": [line.get_marker() for line in lines.values()],
        "dashes": [str(line._unscaled_dash_pattern) for line in lines.values()],
    }
    for what, values in styles.items():
        assert len(set(values)) == len(values), (what, values)
    raw, pca = lines["raw_pixels_logreg"], lines["pca_logreg"]
    assert np.array_equal(raw.get_ydata(), pca.get_ydata()) and not np.allclose(raw.get_xdata(), pca.get_xdata())
    assert [line.get_label() for line in right.get_lines() if line.get_label() != "chance"] == methods[5:]
    assert [t.get_text() for t in left.get_xticklabels()] == ["20", "52", "522"]  # ticks stay on the true budgets
    # without a reference list: one panel, every method
    assert len(label_efficiency_plot(df).axes) == 1
