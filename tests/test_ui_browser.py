"""Acceptance: ``vqmed ui`` serves a page where the pretraining run, its ``val_psnr`` and its reconstruction
image are visible, checked with headless Chromium (Debian's ``chromium``) driven by Playwright.

The run comes from one fixture, :func:`pretrain_run`, so it can be swapped for a real tiny ``vqmed pretrain``
run without touching the browser checks, which find the experiment, the metric value and the reconstruction
image artifact from the store itself. Screenshots of every page go to the test's tmp dir (or to
``$VQMED_SCREENSHOT_DIR`` when set, e.g. for CI artifacts).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vqmed.tracking import (
    log_dataset_input,
    log_figure,
    log_metrics,
    log_params,
    psnr,
    reconstruction_gif,
    reconstruction_grid,
    serve_ui,
    setup_mlflow,
    stop_ui,
    wait_for_ui,
)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 25_000  # one page of MLflow's React UI renders in 3-10 s on a busy 2-core machine
UI_START_TIMEOUT_S = 45.0  # the server answers after 6-18 s there


# a drawn chart (plotly trace) inside the chart card titled by the metric (the card names no other val_ metric)
PLOTTED = """key => Array.from(document.querySelectorAll('.js-plotly-plot')).some(plot => {
  for (let el = plot, i = 0; el && i < 10; el = el.parentElement, i++) {
    const t = el.textContent;
    if (t.includes(key)) return !t.replace(new RegExp(key, 'g'), '').includes('val_')
                                && plot.querySelectorAll('.scatterlayer .trace').length > 0;
  }
  return false;
})"""


def data_root() -> Path:
    return Path(os.environ.get("VQMED_DATA_ROOT") or REPO.parent / "shared" / "data")


def chromium_or_skip() -> str:
    """Debian's chromium; missing is a skip on a workstation but a failure in CI."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    reason = f"headless browser test needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI must install it")
    pytest.skip(reason)


@pytest.fixture
def pretrain_run(tmp_path, monkeypatch) -> tuple[str, str, str]:
    """Produce a pretraining run in a fresh store under ``tmp_path``; return ``(tracking_uri, run_id, run_name)``.

    Interim stand-in until the lead swaps in a real tiny ``vqmed pretrain``: the "model" is a linear
    autoencoder (PCA fitted on real Kermany training X-rays, growing by a few components per "epoch"),
    whose real reconstructions of held-out X-rays give the logged ``val_mse``/``val_psnr`` and the
    reconstruction grid, all logged through vqmed.tracking's helpers the way the trainer logs them.
    """
    root = data_root() / "chest_xray"
    if not root.is_dir():
        pytest.skip(f"Kermany chest X-rays not found at {root} (set VQMED_DATA_ROOT)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    files = {s: sorted((root / s / "NORMAL").glob("*.jpeg"))[:24] + sorted((root / s / "PNEUMONIA").glob("*.jpeg"))[:24] for s in ("train", "test")}

    def load(paths: list[Path]) -> np.ndarray:
        arr = [np.asarray(Image.open(p).convert("L").resize((64, 64), Image.Resampling.BILINEAR), np.float32) for p in paths]
        return np.stack(arr)[:, None] / 255.0

    train, val = load(files["train"]), load(files["test"][::3])
    x = train.reshape(len(train), -1)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    manifest = pd.DataFrame(
        [{"path": str(p), "split": s, "label": p.parent.name} for s, ps in files.items() for p in ps]
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_name = "pretrain-kermany-64px"
    setup_mlflow(uri, "vqmed-pretrain")
    try:
        with mlflow.start_run(run_name=run_name) as run:
            mlflow.set_tag("vqmed.stage", "pretrain")
            log_params({"model": {"kind": "pca-baseline", "size": 64}, "train": {"epochs": 4}})
            log_dataset_input(manifest, name="kermany-64px", context="training")
            frames = []
            for epoch, k in enumerate((2, 4, 8, 16), start=1):
                v = vt[:k]
                def rec_of(a: np.ndarray) -> np.ndarray:
                    r = ((a.reshape(len(a), -1) - mean) @ v.T) @ v + mean
                    return np.clip(r.reshape(a.shape), 0.0, 1.0)
                rec = rec_of(val)
                val_mse = float(np.mean((rec - val) ** 2))
                train_mse = float(np.mean((rec_of(train) - train) ** 2))
                log_metrics({"train/loss": train_mse, "val_mse": val_mse, "val_psnr": psnr(val_mse)}, step=epoch)
                frames.append(np.concatenate([val[0], rec[0]], axis=-1))
            log_figure(reconstruction_grid(val, rec, n=16), "reconstructions/val_grid.png")
            mlflow.log_artifact(str(reconstruction_gif(frames, tmp_path / "val_0.gif")), "reconstructions")
    finally:
        # forget the store/experiment MLflow made current (globals and env), so later tests start clean
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        import mlflow.tracking.fluent as fluent

        fluent._active_experiment_id = None
    return uri, run.info.run_id, run_name


def start_ui(tracking_uri: str, tmp_path: Path):
    """``vqmed ui`` on a free port, not blocking and not yet waited for; returns the process (with ``.url``)."""
    return serve_ui(port=0, tracking_uri=tracking_uri, block=False, wait_timeout=None, log_path=tmp_path / "ui.log")


def reconstruction_artifact(client: mlflow.MlflowClient, run_id: str) -> str:
    """Path of the run's reconstruction image (first PNG whose path mentions "recon")."""
    todo, found = [None], []
    while todo:
        for f in client.list_artifacts(run_id, todo.pop()):
            if f.is_dir:
                todo.append(f.path)
            elif f.path.lower().endswith(".png") and "recon" in f.path.lower():
                found.append(f.path)
    assert found, f"run {run_id} has no reconstruction PNG artifact"
    return sorted(found)[0]


def metric_values_on_page(text: str, key: str) -> list[float]:
    """Numbers shown right after ``key`` in the page text (the UI's metrics table: name, then value)."""
    return [float(m) for m in re.findall(rf"{re.escape(key)}\s+(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", text)]


@pytest.mark.timeout(90)
def test_ui_shows_pretrain_run_val_psnr_and_reconstruction(pretrain_run, tmp_path):
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    uri, run_id, run_name = pretrain_run
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    exp_id = run.info.experiment_id
    val_psnr = run.data.metrics["val_psnr"]
    image_path = reconstruction_artifact(client, run_id)
    with Image.open(client.download_artifacts(run_id, image_path, dst_path=str(tmp_path))) as im:
        image_width = im.width
    shots = Path(os.environ.get("VQMED_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    proc = start_ui(uri, tmp_path)
    try:
        # the run page of MLflow 3's React UI; workflowType picks the model-training (not GenAI) layout
        run_url = f"{proc.url}/#/experiments/{exp_id}/runs/{run_id}"
        query = "?workflowType=machine_learning"
        with sync_playwright() as pw:
            # the browser starts while the server boots; then wait for the server to answer
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True, timeout=30_000)
            try:
                wait_for_ui(proc.url, timeout=UI_START_TIMEOUT_S, proc=proc)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(PAGE_TIMEOUT_MS)

                # 1. overview: run name and the val_psnr metric with its value
                page.goto(run_url + query, wait_until="domcontentloaded")
                metric = page.get_by_text("val_psnr", exact=True).first
                metric.wait_for(state="visible")
                page.get_by_text(run_name, exact=True).first.wait_for(state="visible")
                metric.scroll_into_view_if_needed()
                page.screenshot(path=str(shots / "1_run_overview.png"))
                shown = metric_values_on_page(page.inner_text("body"), "val_psnr")
                assert any(math.isclose(v, val_psnr, abs_tol=0.01) for v in shown), (val_psnr, shown)

                # 2. model metrics tab: the val_psnr chart
                page.goto(f"{run_url}/model-metrics{query}", wait_until="domcontentloaded")
                page.get_by_text("val_psnr", exact=True).first.wait_for(state="visible")
                page.get_by_text("val_psnr", exact=True).first.scroll_into_view_if_needed()
                page.wait_for_function(PLOTTED, arg="val_psnr")
                page.screenshot(path=str(shots / "2_model_metrics.png"))

                # 3. artifacts tab with the reconstruction image selected: the preview <img> has loaded it
                page.goto(f"{run_url}/artifacts/{image_path}{query}", wait_until="domcontentloaded")
                loaded = (
                    "w => Array.from(document.images).some(i => i.complete && i.naturalWidth === w && "
                    "(i.src.startsWith('blob:') || i.src.includes('artifact')))"
                )
                try:
                    page.wait_for_function(loaded, arg=image_width, timeout=15_000)
                except Exception:  # older/newer UI without deep links: open the file in the tree
                    for part in image_path.split("/"):
                        page.get_by_text(part, exact=True).first.click()
                    page.wait_for_function(loaded, arg=image_width)
                page.get_by_text(image_path.rsplit("/", 1)[-1], exact=True).first.wait_for(state="visible")
                page.screenshot(path=str(shots / "3_reconstruction_artifact.png"))
                preview = page.locator("img").evaluate_all(
                    "(imgs, w) => imgs.filter(i => i.naturalWidth === w).map(i => i.getBoundingClientRect().width)",
                    image_width,
                )
                assert preview and max(preview) > 300, f"reconstruction preview not displayed: widths {preview}"
            finally:
                browser.close()
    except BaseException:
        log = Path(proc.log_path).read_text(errors="replace")[-3000:] if proc.log_path else ""
        print(f"--- MLflow UI log tail ---\n{log}")
        raise
    finally:
        stop_ui(proc)
    assert proc.poll() is not None, "UI server still running"
    if shots != tmp_path / "screenshots":
        shutil.copy(tmp_path / "ui.log", shots / "ui.log")
