"""Acceptance: ``vqmed ui`` serves a page where the pretraining run, its ``val_psnr`` and its reconstruction
image are visible, checked with headless Chromium (Debian's ``chromium``) driven by Playwright.

The run comes from one fixture, :func:`pretrain_run`, so it can be swapped for a real tiny ``vqmed pretrain``
run without touching the browser checks, which find the experiment, the metric value and the reconstruction
image artifact from the store itself. Screenshots of every page go to the test's tmp dir (or to
``$VQMED_SCREENSHOT_DIR`` when set, e.g. for CI artifacts).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from PIL import Image

from vqmed.tracking import (
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
UI_START_TIMEOUT_S = 150.0  # the server answers after 6-18 s there, over 60 s when other jobs load the machine


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
    """A real tiny ``vqmed pretrain`` on Kermany X-rays in a fresh store; returns ``(tracking_uri, run_id, run_name)``."""
    root = data_root()
    if not (root / "chest_xray").is_dir():
        pytest.skip(f"Kermany chest X-rays not found at {root} (set VQMED_DATA_ROOT)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_name = "pretrain-kermany-32px"
    config = {
        "name": run_name,
        "out": str(tmp_path / "run"),
        "data": {"manifests": [str(REPO / "data_manifests" / "chest_xray.csv")], "splits": ["train"],
                 "image_size": 32, "max_images": 256, "val_fraction": 0.1, "data_root": str(root),
                 "cache_dir": str(tmp_path / "cache")},
        "model": {"name": "vqvae", "params": {"channels": [16, 32], "num_res_channels": [16, 32],
                                             "num_embeddings": 64, "embedding_dim": 16}},
        "train": {"epochs": 2, "batch_size": 16, "threads": 1, "warmup_steps": 5},
        "tracking": {"experiment": "vqmed-pretrain", "tracking_uri": uri, "log_model": False},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "vqmed", "pretrain", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "CI": "1"}, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return uri, summary["mlflow_run_id"], run_name


@pytest.fixture
def benchmark_run(pretrain_run, tmp_path) -> str:
    """A real small ``vqmed export`` + ``vqmed benchmark`` of the fixture's encoder into the same store; returns
    the benchmark's parent run id (its label-efficiency plot is the figure under test)."""
    import pandas as pd

    uri, run_id, _ = pretrain_run
    manifest = pd.read_csv(REPO / "data_manifests" / "chest_xray.csv", dtype=str, keep_default_na=False)
    parts = [g.sort_values("path").head(40 if split == "train" else 20) for (split, _), g in manifest.groupby(["split", "label"])]
    small = tmp_path / "kermany_small.csv"
    pd.concat(parts).to_csv(small, index=False)
    env = {**os.environ, "CI": "1", "VQMED_ID_SALT": "vqmed-browser-test", "MLFLOW_TRACKING_URI": uri}
    steps = [
        ["export", "--model", str(tmp_path / "run"), "--manifest", str(small), "--out", str(tmp_path / "store"),
         "--data-root", str(data_root())],
        ["benchmark", "--config", str(REPO / "configs" / "benchmark" / "pneumonia.yaml"), "--out", str(tmp_path / "bench"),
         "--set", f"export={tmp_path / 'store'}", "--set", f"data_root={data_root()}", "--set", "cache_dir=null",
         "--set", "budgets.fractions=[0.5, 1.0]", "--set", "budgets.per_class=[]", "--set", "budgets.draws=1",
         "--set", "probes.variants=[code_histogram]", "--set", "probes.classifiers=[logreg]",
         "--set", "baselines.pca=false", "--set", "baselines.random_encoder=false", "--set", "baselines.cnn_scratch=false",
         "--set", "metrics.bootstrap=20", "--set", "jobs=1",
         "--set", f"tracking.tracking_uri={uri}"],
    ]
    for args in steps:
        result = subprocess.run([sys.executable, "-m", "vqmed", *args], cwd=REPO, capture_output=True, text=True,
                                env=env, timeout=240)
        assert result.returncode == 0, (args[0], result.stderr[-3000:])
    return json.loads((tmp_path / "bench" / "summary.json").read_text())["mlflow_parent_run_id"]


def start_ui(tracking_uri: str, tmp_path: Path) -> subprocess.Popen:
    """``vqmed ui`` on a free port in its own process group (so ``stop_ui`` reaches its workers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "ui.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vqmed", "ui", "--port", str(port), "--tracking-uri", tracking_uri],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.url = f"http://127.0.0.1:{port}"
    proc.log_path = tmp_path / "ui.log"
    return proc


def printed_url(proc: subprocess.Popen, experiment: str) -> str:
    """The address of ``experiment`` that ``vqmed ui`` printed once ready (``  NAME: URL`` lines)."""
    deadline = time.monotonic() + UI_START_TIMEOUT_S  # printed just after the server first answers
    while True:
        text = Path(proc.log_path).read_text(errors="replace")
        found = re.findall(rf"^\s+{re.escape(experiment)}: (\S+)$", text, re.M)
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found, f"vqmed ui printed no address for {experiment}:\n{text[-2000:]}"
    return found[-1]


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


@pytest.mark.timeout(900)
def test_ui_shows_pretrain_run_val_psnr_and_reconstruction(pretrain_run, benchmark_run, tmp_path):
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

    bench = client.get_run(benchmark_run)
    figure = "label_efficiency.png"
    assert figure in {f.path for f in client.list_artifacts(benchmark_run)}
    with Image.open(client.download_artifacts(benchmark_run, figure, dst_path=str(tmp_path))) as im:
        figure_width = im.width

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

                # 0. the experiment's address printed by `vqmed ui` opens on its training runs (not MLflow 3's
                # GenAI "Traces" overview), and the run's name there leads to its page
                assert client.get_experiment(exp_id).tags.get("mlflow.experimentKind") == "custom_model_development"
                page.goto(printed_url(proc, "vqmed-pretrain"), wait_until="domcontentloaded")
                link = page.get_by_role("link", name=run_name).first
                link.wait_for(state="visible")
                page.screenshot(path=str(shots / "0_experiment_runs.png"))
                link.click()
                page.wait_for_url(re.compile(f"runs/{run_id}"))

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
                # a real run logs ~15 metrics in sections that render lazily: filter the charts to val_psnr
                page.get_by_placeholder(re.compile("search", re.I)).first.fill("val_psnr")
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

                # 4. the benchmark's parent run shows the label-efficiency plot (its experiment also opens on runs)
                bench_url = f"{proc.url}/#/experiments/{bench.info.experiment_id}/runs/{benchmark_run}"
                page.goto(printed_url(proc, "vqmed-benchmark"), wait_until="domcontentloaded")
                page.get_by_role("link", name=bench.info.run_name).first.wait_for(state="visible")
                page.goto(f"{bench_url}/artifacts/{figure}{query}", wait_until="domcontentloaded")
                page.wait_for_function(loaded, arg=figure_width)
                page.screenshot(path=str(shots / "4_label_efficiency.png"))
                shown = page.locator("img").evaluate_all(
                    "(imgs, w) => imgs.filter(i => i.naturalWidth === w).map(i => i.getBoundingClientRect().width)",
                    figure_width,
                )
                assert shown and max(shown) > 300, f"label-efficiency plot not displayed: widths {shown}"
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
