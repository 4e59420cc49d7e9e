"""Disk full: an ``OSError(ENOSPC)`` injected into the one write function that stores a checkpoint
(``torch.save`` inside ``atomic_save``) or an export shard (``np.savez`` / ``DataFrame.to_parquet`` inside
the store's ``atomic_write``). The write fails half-way, as on a full disk; the error is clear and names
the file, and the previous checkpoint and the export store stay intact and loadable.

This is the only fake in the suite: a real full file system cannot be arranged without privileges.
"""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from vqmed.cli import main as vqmed_main
from vqmed.export import export_manifest, load
from vqmed.models_io import checkpoint as ckpt_module
from vqmed.models_io.checkpoint import LAST, PREVIOUS, CheckpointError, latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
KERMANY = REPO / "data_manifests" / "chest_xray.csv"


class DiskFull:
    """Wraps a write function: calls ``1..fail_at-1`` succeed; call ``fail_at`` (and later ones while
    ``sticky``) writes part of its bytes and then raises ``OSError(ENOSPC)``, as a full disk does."""

    def __init__(self, real, fail_at: int, sticky: bool = False, when=None) -> None:
        self.real, self.fail_at, self.sticky, self.when = real, fail_at, sticky, when
        self.calls = 0
        self.failures = 0

    def _fail_now(self, handle) -> bool:
        if self.when is not None and not self.when(handle):
            return False
        self.calls += 1
        return self.calls == self.fail_at or (self.sticky and self.calls > self.fail_at)

    def __call__(self, *args, **kwargs):
        handle = args[1] if len(args) > 1 and hasattr(args[1], "write") else (args[0] if hasattr(args[0], "write") else None)
        if not self._fail_now(handle):
            return self.real(*args, **kwargs)
        self.failures += 1
        buffer = io.BytesIO()
        self.real(*((a if a is not handle else buffer) for a in args), **kwargs)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 3])  # a third reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")


# ------------------------------------------------------------------------------------ checkpoints
@pytest.fixture()
def restore_mlflow():
    """The in-process runs point MLflow's global state at a temporary store: put it back afterwards."""
    uri = mlflow.get_tracking_uri()
    yield
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(uri)


def test_checkpoint_write_fails_mid_run_previous_checkpoint_survives(tmp_path, data_root, make_config, monkeypatch, capsys,
                                                                     restore_mlflow):
    config = make_config(tmp_path, [KERMANY], data_root, train={"epochs": 1, "max_steps": 8, "checkpoint_every": 2},
                         tracking={"experiment": "disk-full", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   "log_model": False})
    ckpt_dir = tmp_path / "run" / "checkpoints"
    monkeypatch.setenv("CI", "1")  # no progress bars in the captured output
    full = DiskFull(torch.save, fail_at=3)  # checkpoints at steps 2 and 4 are written, the one at 6 is not
    monkeypatch.setattr(ckpt_module.torch, "save", full)
    with pytest.raises(SystemExit) as info:
        vqmed_main(["pretrain", "--config", str(config)])
    mlflow.end_run()  # in-process: the failed run is still MLflow's active run (a CLI process would exit)
    monkeypatch.setattr(ckpt_module.torch, "save", full.real)
    err = capsys.readouterr().err
    assert info.value.code == 2 and full.failures == 1
    # One clear line: the file and the reason, no traceback.
    line = [ln for ln in err.splitlines() if ln.startswith("vqmed pretrain: error:")]
    assert len(line) == 1 and "Traceback" not in err, err[-2000:]
    assert f"{ckpt_dir / LAST}: cannot write checkpoint" in line[0] and "No space left on device" in line[0]
    # The previous good checkpoint is intact and is what a resume uses; no half-written file is left.
    assert not (ckpt_dir / LAST).exists()
    state, used = latest_checkpoint(ckpt_dir)
    assert used.name == PREVIOUS and state["step"] == 4
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [PREVIOUS]

    # Space is back: --resume completes the planned steps in the same MLflow run.
    with pytest.raises(SystemExit) as info:
        vqmed_main(["pretrain", "--config", str(config), "--resume"])
    assert info.value.code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8
    assert load_checkpoint(ckpt_dir / LAST)["step"] == 8 and load_checkpoint(ckpt_dir / PREVIOUS)["step"] == 6
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("disk-full").experiment_id])) == 1


def test_checkpoint_disk_stays_full_no_checkpoint_is_lost(tmp_path, monkeypatch):
    """Every save fails: the two good checkpoints written before stay loadable, whatever the retries."""
    model = torch.nn.Linear(4, 2)
    state = {"model_state": model.state_dict(), "step": 1}
    ckpt_module.save_checkpoint(state, tmp_path)
    ckpt_module.save_checkpoint({**state, "step": 2}, tmp_path)
    monkeypatch.setattr(ckpt_module.torch, "save", DiskFull(torch.save, fail_at=1, sticky=True))
    for step in (3, 4, 5):
        with pytest.raises(CheckpointError, match="No space left on device"):
            ckpt_module.save_checkpoint({**state, "step": step}, tmp_path)
    monkeypatch.undo()
    state_found, used = latest_checkpoint(tmp_path)
    assert (used.name, state_found["step"]) == (PREVIOUS, 2)
    assert [p.name for p in tmp_path.iterdir()] == [PREVIOUS]


def test_torn_last_checkpoint_never_replaces_the_good_previous_one(tmp_path, monkeypatch):
    """A truncated last.pt (the run resumed from last.prev.pt) followed by a failing save still leaves
    the good last.prev.pt: the torn file is dropped, not rotated over it."""
    state = {"model_state": torch.nn.Linear(4, 2).state_dict(), "step": 1}
    ckpt_module.save_checkpoint(state, tmp_path)
    ckpt_module.save_checkpoint({**state, "step": 2}, tmp_path)
    blob = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(blob[:100])
    assert latest_checkpoint(tmp_path)[0]["step"] == 1  # fell back to last.prev.pt
    monkeypatch.setattr(ckpt_module.torch, "save", DiskFull(torch.save, fail_at=1))
    with pytest.raises(CheckpointError):
        ckpt_module.save_checkpoint({**state, "step": 3}, tmp_path)
    monkeypatch.undo()
    found, used = latest_checkpoint(tmp_path)
    assert (used.name, found["step"]) == (PREVIOUS, 1)


# ------------------------------------------------------------------------------------------ export
def _store_rows(out: Path) -> pd.DataFrame:
    store = load(out)
    index = store.index
    assert index["key"].is_unique
    for name in store.array_names:  # every array of every indexed study loads from its shard
        assert store.array(name).shape[0] == len(index)
    return index


@pytest.mark.parametrize("where", ["shard arrays", "shard index part", "merged index"])
def test_export_write_fails_store_stays_loadable(where, small_checkpoint, kermany, data_root, tmp_path, monkeypatch,
                                                 find_temp_files):
    rows = kermany.iloc[::40].head(96).reset_index(drop=True)
    first, everything = tmp_path / "first.csv", tmp_path / "all.csv"
    rows.head(32).to_csv(first, index=False)
    rows.to_csv(everything, index=False)
    out = tmp_path / "store"
    export_manifest(small_checkpoint, first, out, data_root, progress=False, shard_size=16)
    before = _store_rows(out)
    codes_before = pd.Series(list(load(out).array("codes")), index=before["key"])
    assert len(before) == 32

    if where == "shard arrays":  # the second new shard's np.savez runs out of space
        full = DiskFull(np.savez, fail_at=2)
        monkeypatch.setattr(np, "savez", full)
    else:
        is_index = lambda h: Path(h.name).name.endswith("-index.parquet")
        wanted = is_index if where == "merged index" else (lambda h: not is_index(h))
        full = DiskFull(pd.DataFrame.to_parquet, fail_at=2 if where == "shard index part" else 1, when=wanted)
        monkeypatch.setattr(pd.DataFrame, "to_parquet", lambda self, *a, **k: full(self, *a, **k))
    with pytest.raises(OSError) as info:
        export_manifest(small_checkpoint, everything, out, data_root, progress=False, shard_size=16)
    monkeypatch.undo()
    assert full.failures == 1
    assert info.value.errno == errno.ENOSPC and str(out) in str(info.value), str(info.value)  # names the file
    # The store is intact: it loads, it holds what was committed (old rows untouched), no temp file.
    after = _store_rows(out)
    assert set(before["key"]) <= set(after["key"]) and len(after) == {"shard arrays": 48, "shard index part": 48,
                                                                    "merged index": 96}[where]
    assert find_temp_files(out) == []
    codes_after = pd.Series(list(load(out).array("codes")), index=after["key"])
    assert all(np.array_equal(codes_before[k], codes_after[k]) for k in before["key"])

    # Space is back: the re-run exports only what is missing and leaves no orphan arrays.
    summary = export_manifest(small_checkpoint, everything, out, data_root, progress=False, shard_size=16)
    assert summary["exported"] == 96 - len(after) and summary["index_rows"] == 96
    final = _store_rows(out)
    assert len(final) == 96 and sorted(final["row"]) == list(range(len(rows)))  # every manifest row once
    assert {p.stem for p in (out / "shards").glob("*.npz")} == {p.stem for p in (out / "shards").glob("*.parquet")}
    assert find_temp_files(out) == []
