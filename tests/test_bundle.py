"""``vqmed bundle``: the frozen encoder as a MONAI bundle that MONAI's own runner verifies and runs, offline,
giving the same codes as ``vqmed export`` on real Kermany chest X-rays."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", REPO.parent / "shared" / "data"))
KERMANY = DATA_ROOT / "chest_xray"
SIZE = 64
# every field of MONAI's bundle specification (docs: "MONAI Bundle Specification", metadata.json)
SPEC_FIELDS = ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
               "task", "description", "authors", "copyright", "network_data_format")


def _monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "CI": "1"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A small (untrained: the wiring is under test) 2D VQ-VAE checkpoint and its bundle from ``vqmed bundle``."""
    from vqmed.cli import main
    from vqmed.models_io.checkpoint import save_checkpoint
    from vqmed.networks import build_model

    tmp = tmp_path_factory.mktemp("bundle")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32), num_res_layers=(1, 1),
                            num_res_channels=(16, 16), downsample=4, num_embeddings=64, embedding_dim=16)
    state = {"model_name": "vqvae", "model_config": model.config, "model_state": model.state_dict(), "step": 0,
             "config": {"data": {"image_size": SIZE, "spatial_dims": 2, "channels": 1,
                                 "manifests": ["data_manifests/chest_xray.csv"], "splits": ["train"]}}}
    ckpt = save_checkpoint(state, tmp / "ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["bundle", "--model", str(ckpt), "--out", str(tmp / "vqmed_bundle")])
    assert exit_info.value.code == 0
    return ckpt, tmp / "vqmed_bundle"


def test_bundle_layout_and_metadata_carry_monai_spec_fields(bundle) -> None:
    _, root = bundle
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts", "docs/README.md"):
        assert (root / rel).is_file(), rel
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    missing = [f for f in SPEC_FIELDS if not meta.get(f)]
    assert not missing, f"metadata.json lacks {missing}"
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == __import__("monai").__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0] and meta["numpy_version"] == np.__version__
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == [SIZE, SIZE] and image["num_channels"] == 1 and image["dtype"] == "float32"
    assert pred["num_channels"] == 1 and pred["dtype"] == "int64" and pred["value_range"] == [0, 63]
    assert pred["spatial_shape"] == [SIZE // 4, SIZE // 4]
    for required in ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def"):
        assert required in image and required in pred, required
    assert "vqmed" in meta["required_packages_version"]
    # the weights load with weights_only=True; the TorchScript module carries both configs and gives the same codes
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(root / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == meta["version"] and json.loads(extra["inference.json"])["network_def"]
    from vqmed.export.bundle import FrozenEncoder

    inf = json.loads((root / "configs" / "inference.json").read_text())
    eager = FrozenEncoder(inf["network_def"]["model_name"], inf["network_def"]["model_config"])
    eager.load_state_dict(state)
    eager.eval()
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ts(x), eager(x))
    readme = (root / "docs" / "README.md").read_text()
    assert "chest_xray.csv" in readme and "python -m monai.bundle run" in readme


def test_monai_verify_net_in_out_passes_offline(bundle) -> None:
    _, root = bundle
    result = _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                           "--config_file", "configs/inference.json", "--device", "cpu", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified with no error" in result.stdout + result.stderr


@pytest.mark.skipif(not KERMANY.is_dir(), reason=f"Kermany chest X-rays not found at {KERMANY}")
def test_monai_bundle_run_gives_the_codes_of_vqmed_export(bundle, tmp_path, monkeypatch) -> None:
    from vqmed.data import build_manifest, write_manifest
    from vqmed.export import export_manifest, load

    ckpt, root = bundle
    # a few real X-rays of both classes, copied under a data root of their own
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for label in ("NORMAL", "PNEUMONIA"):
        for src in sorted((KERMANY / "test" / label).glob("*.jpeg"))[:3]:
            shutil.copy(src, images / f"{label}_{src.name}")
    # keep_paths: study ids are the file names, so each stored row finds its bundle output
    manifest, _ = build_manifest(images, tmp_path / "data", progress=False, keep_paths=True)
    write_manifest(manifest, tmp_path / "manifest.csv")
    monkeypatch.setenv("CI", "1")
    export_manifest(ckpt, tmp_path / "manifest.csv", tmp_path / "store", tmp_path / "data", keep_ids=True, progress=False,
                    batch_size=4)
    store = load(tmp_path / "store")

    result = _monai_bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(root),
                           "--dataset_dir", str(images), "--output_dir", str(tmp_path / "out"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p for p in images.iterdir())
    written = sorted((tmp_path / "out").glob("*.npz"))
    assert len(written) == len(files) == len(store) == 6
    position = {f"images/{p.stem}": i for i, p in enumerate(files)}
    codes, hist, qmean = store.array("codes"), store.array("code_histogram"), store.array("quantized_mean")
    for row, study in enumerate(store.index["study_id"]):
        with np.load(tmp_path / "out" / f"{position[study]:05d}.npz") as out:
            np.testing.assert_array_equal(out["codes"], codes[row])
            np.testing.assert_allclose(out["code_histogram"], hist[row], atol=1e-7)
            np.testing.assert_allclose(out["quantized_mean"], qmean[row], atol=1e-6)
    assert len({tuple(np.unique(c)) for c in codes}) > 1  # real images, different code maps
