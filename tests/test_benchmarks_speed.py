"""``benchmarks/speed.py --quick`` end to end on real Kermany images: every section measured, every number positive.

A smoke test of the benchmark's code paths (worker processes, the real trainer, the data loader, the
JSON), not of vqmed's speed: ``--quick`` budgets are far too small for the ratios to mean anything.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", ROOT.parent / "shared" / "data"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA_ROOT / "chest_xray").is_dir(), reason="real Kermany data not found"),
]


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--data-root", str(DATA_ROOT)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio vqmed / baseline" in result.stdout and "validation PSNR" in result.stdout
    r = json.loads(out.read_text())
    assert r["quick"] is True and r["device"] == "cpu" and r["machine"]["device_name"]
    sizes = list(r["train"])
    assert sizes and sizes == list(r["encode"])
    for size in sizes:
        train, encode, memory = r["train"][size], r["encode"][size], r["memory"][size]
        assert positive(train["ratio"]) and positive(encode["ratio"])
        for contender in ("vqmed", "baseline"):
            assert positive(train[contender]["images_per_s"]) and train[contender]["steps"] >= 1
            assert positive(encode[contender]["index_quantize"]["images_per_s"])
            assert positive(encode[contender]["export_features"]["images_per_s"])
            assert positive(memory[contender]["train_peak_mb"]) and positive(memory[contender]["encode_peak_mb"])
        assert r["contenders"]["vqmed"][size]["model"] == "vqvae"
        assert r["contenders"]["baseline"][size]["model"] == "monai_vqvae"
        assert r["contenders"]["baseline"][size]["model_config"]["channels"] == [64, 128]
    psnr = r["psnr"]
    for contender in ("vqmed", "baseline"):
        assert positive(psnr[contender]["val_psnr"]) and psnr[contender]["steps"] >= 1
        assert positive(psnr[contender]["peak_memory_mb"])
    assert psnr["vqmed"]["val_paths_sha256"] == psnr["baseline"]["val_paths_sha256"]
    assert psnr["val_images"] >= 1 and math.isfinite(psnr["psnr_difference_db"])
    data = r["data"]
    assert data["cold_cache"]["decoded"] == data["images"] and data["warm_cache"]["decoded"] == 0
    assert positive(data["cold_cache"]["total_s"]) and positive(data["warm_cache"]["total_s"])
    assert data["cold_cache"]["checksum"] == data["warm_cache"]["checksum"], "cached images differ from decoded ones"
    wait = data["wait"]["epochs"]
    assert len(wait) >= 2 and all(0 <= e["data_wait_fraction"] < 1 for e in wait)
    assert all(positive(e["train_images_per_second"]) for e in wait)
    assert positive(data["peak_memory_mb"])
    assert set(r["acceptance"]) >= {"train_ratio_128", "encode_ratio_128", "psnr_difference_db_128", "data_wait_ok"}


def test_objective_step_times_every_contender_against_the_base(tmp_path):
    """``benchmarks/objective_step.py`` on real films with tiny budgets: each contender is timed with its own
    objective parameters (the variant's on top of the base's), and the base's ratio to itself is 1."""
    out = tmp_path / "objective_step.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "objective_step.py"), "--base", '{"reconstruct": "first"}',
         "--variant", 'grid2={"embedding_grid": 2}', "--steps", "2", "--rounds", "2", "--warmup", "1",
         "--images", "32", "--threads", "1", "--data-root", str(DATA_ROOT), "--cache-dir", str(tmp_path / "cache"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())["contenders"]
    assert set(r) == {"base", "grid2"} and "ratio to base" in result.stdout
    assert r["base"]["params"]["reconstruct"] == "first" and "embedding_grid" not in r["base"]["params"]
    assert r["grid2"]["params"]["embedding_grid"] == 2 and r["grid2"]["params"]["reconstruct"] == "first"
    assert r["base"]["ratio_to_base"] == 1.0
    assert all(positive(c["seconds_per_step"]) and positive(c["images_per_second"]) for c in r.values())
