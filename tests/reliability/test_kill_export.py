"""Killed export: SIGKILL a running ``vqmed export`` twice at seeded random moments, then re-run it: every
study is in the index exactly once, with the same codes as an uninterrupted export, and no temporary file,
orphan shard or partial array is left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vqmed.export import export_manifest, load

REPO = Path(__file__).resolve().parents[2]
SEED = 7
ROWS = 800  # 50 shards of 16: enough for the kills to land at different points of the run
# `vqmed export` itself, with shards of 16 images instead of 1,024 (the CLI has no --shard-size):
# many commit points in a short run.
CLI_WITH_SMALL_SHARDS = (
    "import sys\n"
    "from vqmed.export import writer\n"
    "writer.export_manifest.__kwdefaults__['shard_size'] = 16\n"
    "from vqmed.cli import main\n"
    "main(sys.argv[1:])\n"
)


def _parts(out: Path) -> int:
    shards = out / "shards"
    return len(list(shards.glob("part-*.parquet"))) if shards.is_dir() else 0


def _check_store_consistent(out: Path) -> pd.DataFrame:
    """What any reader may rely on at any time: the store loads, keys are unique, every committed
    part has its whole arrays, and every array of the index can be gathered."""
    store = load(out)
    index = store.index
    assert index["key"].is_unique
    shards = out / "shards"
    for part in shards.glob("part-*.parquet"):
        rows = len(pd.read_parquet(part, columns=["key"]))
        with np.load(part.with_suffix(".npz")) as arrays:  # a committed part always has its arrays
            assert {name: arrays[name].shape[0] for name in arrays.files} == {name: rows for name in arrays.files}
    assert store.array("codes").shape[0] == len(index)
    return index


def test_export_killed_twice_then_rerun(small_checkpoint, kermany, data_root, tmp_path, env_for_child, find_temp_files):
    rows = kermany.iloc[np.linspace(0, len(kermany) - 1, ROWS).astype(int)].reset_index(drop=True)
    manifest = tmp_path / "rows.csv"
    rows.to_csv(manifest, index=False)
    out = tmp_path / "store"
    rng = random.Random(SEED)
    kills = []
    for attempt in range(2):
        before = _parts(out)
        target = before + rng.randint(2, 12)  # shards committed by this attempt before its kill
        delay = rng.uniform(0.0, 0.15)  # then a random moment: mid-batch, mid-write, between renames
        log = tmp_path / f"export{attempt}.log"
        args = ["export", "--model", str(small_checkpoint), "--manifest", str(manifest), "--out", str(out),
                "--data-root", str(data_root), "--batch-size", "8", "--quiet"]
        with open(log, "w") as fh:
            process = subprocess.Popen([sys.executable, "-c", CLI_WITH_SMALL_SHARDS, *args], cwd=REPO,
                                       env=env_for_child(), stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while _parts(out) < target:
                assert process.poll() is None, f"export ended (rc {process.returncode}) before the kill:\n{log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "export too slow to reach the kill point"
                time.sleep(0.01)
            time.sleep(delay)
            assert process.poll() is None, "export finished before the kill"
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == -signal.SIGKILL
        index = _check_store_consistent(out)
        kills.append({"after_parts": target, "delay_s": round(delay, 3), "committed_rows": len(index),
                      "leftovers": [p.name for p in find_temp_files(out)]})
    committed = kills[-1]["committed_rows"]
    assert 0 < committed < ROWS

    # What a kill between the two renames of a shard leaves (arrays whose index part never came), in
    # case no kill above happened to land there.
    (out / "shards" / "part-orphan-00000.npz").write_bytes(b"arrays without an index part")
    summary = export_manifest(small_checkpoint, manifest, out, data_root, batch_size=8, progress=False, shard_size=16)
    print("export kills:", json.dumps(kills), "rerun:", summary)
    assert summary["exported"] == ROWS - committed and summary["skipped"] == committed
    assert summary["quarantined"] == 0 and summary["index_rows"] == ROWS

    store = load(out)
    index = _check_store_consistent(out)
    # Every study exactly once.
    assert len(index) == ROWS and index["study_id"].is_unique and index["key"].is_unique
    assert sorted(rows["path"].iloc[index["row"].to_numpy()]) == sorted(rows["path"])
    raw = pd.concat([pd.read_parquet(p, columns=["key"]) for p in (out / "shards").glob("*.parquet")])
    assert len(raw) == ROWS, "a study is listed in two committed parts"
    # No temporary file, no orphan arrays, no index part without arrays.
    assert find_temp_files(out) == []
    npz = {p.stem for p in (out / "shards").glob("*.npz")}
    parquet = {p.stem for p in (out / "shards").glob("*.parquet")}
    assert npz == parquet
    assert pd.read_parquet(out / "index.parquet")["key"].is_unique

    # The same codes as an export that was never interrupted.
    reference = tmp_path / "reference"
    export_manifest(small_checkpoint, manifest, reference, data_root, batch_size=8, progress=False, shard_size=16)
    ref = load(reference)
    position = pd.Series(np.arange(len(ref.index)), index=ref.index["key"])  # salted (study, path, frame)
    aligned = position.loc[store.index["key"]].to_numpy()
    assert np.array_equal(store.array("codes"), ref.array("codes")[aligned])
    np.testing.assert_allclose(store.array("continuous_mean"), ref.array("continuous_mean")[aligned], rtol=1e-5, atol=1e-6)
