"""Unsafe checkpoints: a checkpoint carrying a pickled object whose ``__reduce__`` runs a shell command is
refused by every loader (``load_checkpoint``, ``latest_checkpoint``, ``load_model``, ``vqmed export
--model``, ``vqmed pretrain --resume``) with a ``CheckpointError``, and the command never runs.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from vqmed.cli import main as vqmed_main
from vqmed.models_io import CheckpointError, load_model
from vqmed.models_io.checkpoint import FORMAT, LAST, PREVIOUS, latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[2]


class Exploit:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint does to ``torch.load`` without
    ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture()
def evil(tmp_path, small_checkpoint):
    """Malicious files next to a good checkpoint: the real model state plus the exploit, in torch's zip
    format, in its legacy format, and as a bare pickle."""
    marker = tmp_path / "PWNED"
    good = torch.load(small_checkpoint, weights_only=True)
    payload = {**good, "format": FORMAT, "extra": {"note": Exploit(marker)}}
    files = {"zip": tmp_path / "evil.pt", "legacy": tmp_path / "evil_legacy.pt", "pickle": tmp_path / "evil_pickle.pt"}
    torch.save(payload, files["zip"])
    torch.save(payload, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"].write_bytes(pickle.dumps(payload))
    return marker, files, good


def test_the_exploit_is_real(tmp_path):
    """Control: ``torch.load(..., weights_only=False)`` of such a file runs the command, so the refusals
    below mean something (another marker, so the real one stays a clean signal)."""
    control_marker, path = tmp_path / "CONTROL_MARKER", tmp_path / "control.pt"
    torch.save({"extra": Exploit(control_marker)}, path)
    torch.load(path, weights_only=False)
    assert control_marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_load_checkpoint_and_load_model_refuse(kind, evil, tmp_path):
    marker, files, _ = evil
    path = files[kind]
    with pytest.raises(CheckpointError, match="cannot load checkpoint safely") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        load_model(path)
    # As a run directory's final.pt, and as both checkpoints of a run.
    run = tmp_path / f"run_{kind}"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run / "final.pt")
    with pytest.raises(CheckpointError):
        load_model(run)
    shutil.copy(path, run / "checkpoints" / LAST)
    shutil.copy(path, run / "checkpoints" / PREVIOUS)
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        latest_checkpoint(run / "checkpoints")
    assert not marker.exists(), "the pickled command ran"


def test_a_malicious_last_checkpoint_falls_back_to_the_good_previous_one(evil, tmp_path):
    marker, files, good = evil
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    torch.save({**good, "format": FORMAT, "step": 7}, ckpt / PREVIOUS)
    shutil.copy(files["zip"], ckpt / LAST)
    state, used = latest_checkpoint(ckpt)
    assert used.name == PREVIOUS and state["step"] == 7
    assert not marker.exists()


def test_cli_refuses_unsafe_checkpoints(evil, tmp_path, kermany, data_root, make_config, monkeypatch, capsys):
    marker, files, _ = evil
    monkeypatch.setenv("CI", "1")
    manifest = tmp_path / "rows.csv"
    kermany.head(4).to_csv(manifest, index=False)
    for path in files.values():
        with pytest.raises(SystemExit) as info:
            vqmed_main(["export", "--model", str(path), "--manifest", str(manifest), "--out", str(tmp_path / "store"),
                        "--data-root", str(data_root), "--quiet"])
        err = capsys.readouterr().err
        assert info.value.code == 2, err
        assert err.startswith(f"vqmed export: error: {path}: cannot load checkpoint safely") and "Traceback" not in err
    assert not (tmp_path / "store" / "shards").exists() or not list((tmp_path / "store" / "shards").iterdir())

    # `vqmed pretrain --resume` on a run whose checkpoints were replaced by malicious ones.
    config = make_config(tmp_path, [REPO / "data_manifests" / "chest_xray.csv"], data_root)
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copy(files["zip"], ckpt / LAST)
    shutil.copy(files["legacy"], ckpt / PREVIOUS)
    with pytest.raises(SystemExit) as info:
        vqmed_main(["pretrain", "--config", str(config), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no loadable checkpoint" in err and "Traceback" not in err
    assert not marker.exists(), "the pickled command ran"
