"""The frozen encoder as a MONAI bundle, for tools that load bundles (MONAI's bundle runner, MONAI Label, Deploy).

``write_bundle`` lays out, following MONAI's bundle specification::

    DIR/configs/metadata.json   versions, task, network_data_format, the preprocessing in words
    DIR/configs/inference.json  vqmed's deterministic MONAI chain + the encoder + a writer of codes and features
    DIR/models/model.pt         the encoder's state dict (weights only)
    DIR/models/model.ts         the same network as TorchScript, with both configs inside
    DIR/docs/README.md          pretraining data, the preprocessing, the benchmark table, the two commands

``python -m monai.bundle run --config_file DIR/configs/inference.json --dataset_dir IMAGES --output_dir OUT``
then writes ``OUT/NNNNN.npz`` per image (the sorted readable files of ``IMAGES``): ``codes`` and the pooled
``code_histogram`` and ``quantized_mean``, the same values ``vqmed export`` stores for that image.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.transforms import MapTransform
from torch import nn

from vqmed.atomic import atomic_write, atomic_write_text
from vqmed.data import ImageSpec
from vqmed.data.readers import detect_format
from vqmed.data.transforms import PERCENTILES
from vqmed.networks import build_model

__all__ = ["FrozenEncoder", "SaveCodesd", "bundle_datalist", "bundle_metadata", "inference_config", "write_bundle"]

BUNDLE_VERSION = "0.1.0"
# The schema MONAI's model zoo validates metadata.json against (``verify_metadata`` downloads it).
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# Pooled features the bundle's writer stores beside the code map (both follow from the codes alone).
BUNDLE_FEATURES = ("code_histogram", "quantized_mean")


class FrozenEncoder(nn.Module):
    """A pretrained vqmed VQ model reduced to its encoder and codebook: images in, code maps out.

    Args:
        model_name: the vqmed model registry name (``vqvae``, ...).
        model_config: the model's constructor arguments, as stored in its checkpoint.

    ``forward`` takes ``[B, C, *spatial]`` in [0, 1] and returns the finest code map as ``[B, 1, *latent]`` int64:
    one channel, so that MONAI's ``verify_net_in_out`` and its writers see an ordinary label image.
    """

    def __init__(self, model_name: str, model_config: dict[str, Any]) -> None:
        super().__init__()
        self.model = build_model(model_name, **model_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model.encode(x)
        _, indices, _ = self.model.quantize(z)
        bottom = indices[0] if isinstance(indices, (tuple, list)) else indices
        return bottom.long().unsqueeze(1)


class SaveCodesd(MapTransform):
    """Write each image's code map and pooled features as ``OUTPUT_DIR/NNNNN.npz`` (``NNNNN`` = ``index_key``).

    No file name or header value is written: the number is the image's place in the bundle's sorted input list.

    Args:
        keys: the key of the predicted code map ``[1, *latent]``.
        output_dir: where the files go (created).
        network: the bundle's :class:`FrozenEncoder` (its codebook gives ``quantized_mean``).
        index_key: key of the image's position in the input list.
    """

    def __init__(self, keys: str, output_dir: str | Path, network: FrozenEncoder, index_key: str = "index") -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.network = network
        self.index_key = index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        quantizer = list(self.network.model.quantizers)[0]
        num_codes = int(quantizer.codebook.shape[0])
        for key in self.key_iterator(d):
            codes = torch.as_tensor(d[key]).long()[0]  # [*latent]
            flat = codes.reshape(-1)
            histogram = torch.bincount(flat.cpu(), minlength=num_codes).float() / flat.numel()
            # the codebook lookup, as the export's quantized_mean (exact, no straight-through rounding)
            quantized_mean = quantizer.codebook.detach()[flat].float().mean(dim=0).cpu()
            target = self.output_dir / f"{int(d[self.index_key]):05d}.npz"
            arrays = {"codes": codes.cpu().numpy().astype(np.uint16), "code_histogram": histogram.numpy(),
                      "quantized_mean": quantized_mean.numpy()}
            atomic_write(target, lambda handle: np.savez(handle, **arrays))
        return d


def bundle_datalist(folder: str | Path) -> list[dict[str, Any]]:
    """``[{"image": path, "index": i}]`` for the files in ``folder`` (recursively, sorted) that vqmed can read."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".") and detect_format(p))
    return [{"image": str(p), "index": i} for i, p in enumerate(paths)]


def _latent_shape(encoder: FrozenEncoder, spec: ImageSpec) -> list[int]:
    with torch.no_grad():
        return list(encoder(torch.zeros(1, *spec.shape)).shape[2:])


def bundle_metadata(encoder: FrozenEncoder, meta: dict[str, Any], spec: ImageSpec) -> dict[str, Any]:
    """``configs/metadata.json``: every field of MONAI's bundle specification, and the network's inputs and outputs."""
    import importlib.metadata as im

    def version(package: str) -> str:
        try:
            return im.version(package)
        except im.PackageNotFoundError:
            return ""

    num_codes = int(list(encoder.model.quantizers)[0].codebook.shape[0])
    latent = _latent_shape(encoder, spec)
    axes = ["height", "width", "depth"][: spec.spatial_dims]
    packages = {name: version(name) for name in ("vqmed", "pydicom", "nibabel", "SimpleITK", "pillow", "pytorch-ignite", "fire")}
    return {
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "frozen vqmed encoder exported by `vqmed bundle`"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {k: v for k, v in packages.items() if v},
        "optional_packages_version": {},
        "name": f"vqmed {meta['model_name']} encoder",
        "task": "Self-supervised feature extraction: discrete code maps and pooled embeddings of medical images",
        "description": (
            f"The frozen encoder and codebook of a vqmed {meta['model_name']} pretrained without labels. "
            "Each image becomes a code map (codebook indices on the latent grid) and pooled features "
            "(bag of codes, mean code vector) for few-label classifiers."
        ),
        "authors": "vqmed contributors",
        "copyright": "Copyright (c) vqmed contributors; Apache-2.0",
        "data_source": ", ".join(Path(m).stem for m in ((meta.get("config") or {}).get("data") or {}).get("manifests", []))
        or "see docs/README.md",
        "data_type": "dicom, png, jpeg, tiff, nifti, metaimage, nrrd, idx",
        "image_classes": f"{spec.channels} channel(s), intensities min-max scaled to [0, 1]",
        "pred_classes": f"{num_codes} codebook entries",
        "intended_use": "Feature extraction for research; not for diagnostic use",
        "preprocessing": preprocessing_in_words(spec),
        "vqmed_model_id": meta.get("model_id", ""),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "any (X-ray, CT, MR, ...)",
                    "num_channels": spec.channels,
                    "spatial_shape": [spec.image_size] * spec.spatial_dims,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): "intensity" for i in range(spec.channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "num_channels": 1,
                    "spatial_shape": latent,
                    "dtype": "int64",
                    "value_range": [0, num_codes - 1],
                    "is_patch_data": False,
                    "channel_def": {"0": f"codebook index on the {'x'.join(map(str, latent))} latent grid ({', '.join(axes)})"},
                }
            },
        },
    }


def preprocessing_in_words(spec: ImageSpec) -> str:
    """The deterministic chain of :mod:`vqmed.data.transforms`, said in one paragraph."""
    grid = "x".join([str(spec.image_size)] * spec.spatial_dims)
    colour = "RGB to luminance (BT.601)" if spec.channels == 1 else "grey repeated to 3 channels"
    return (
        "Read with the format's own library in display orientation (DICOM: modality LUT, VOI LUT or window, "
        "MONOCHROME1 inverted; NIfTI/MetaImage/NRRD/DICOM series: RAS+, axial slices inferior to superior); "
        f"{colour}; "
        + (f"resampled to {'x'.join(f'{v:g}' for v in spec.spacing)} mm voxels and centre-cropped/padded to {grid}; "
           if spec.spacing else f"resized to {grid} with area interpolation; ")
        + "per-image min-max scaling to [0, 1]; "
        "rounded to 8 bits (k / 255), as vqmed's datasets store images."
    )


def _deterministic_chain(spec: ImageSpec) -> list[dict[str, Any]]:
    """vqmed.data.transforms.deterministic_transform as MONAI bundle config items (same transforms, order, args)."""
    lo, hi = PERCENTILES
    scale = ({"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0} if spec.intensity == "minmax"
             else {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": lo, "upper": hi,
                   "b_min": 0.0, "b_max": 1.0, "clip": True})
    chain = [
        {"_target_": "vqmed.data.transforms.LoadMedicalImaged", "keys": "image", "spatial_dims": spec.spatial_dims},
        {"_target_": "vqmed.data.transforms.CheckDegenerated", "keys": "image"},
        {"_target_": "vqmed.data.transforms.ToChannelsd", "keys": "image", "channels": spec.channels},
        {"_target_": "vqmed.data.transforms.ToGridd", "keys": "image",
         "spec": {"_target_": "vqmed.data.ImageSpec", "image_size": spec.image_size, "spatial_dims": spec.spatial_dims,
                  "channels": spec.channels, "spacing": list(spec.spacing) if spec.spacing else None,
                  "resize": spec.resize, "intensity": spec.intensity}},
        scale,
    ]
    if spec.resize != "squeeze" and not spec.spacing:
        chain.append({"_target_": "ResizeWithPadOrCropd", "keys": "image",
                      "spatial_size": [spec.image_size] * spec.spatial_dims})
    chain.append({"_target_": "EnsureTyped", "keys": "image", "data_type": "numpy", "dtype": "$np.float32",
                  "track_meta": False})
    return chain


def inference_config(spec: ImageSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """``configs/inference.json``: vqmed's deterministic MONAI chain, the encoder and :class:`SaveCodesd`."""
    return {
        "imports": ["$from vqmed.export.bundle import bundle_datalist"],
        "bundle_root": ".",
        "dataset_dir": "images",
        "output_dir": "$@bundle_root + '/eval'",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "vqmed.export.bundle.FrozenEncoder", "model_name": meta["model_name"],
                        "model_config": meta["model_config"]},
        "network": "$@network_def.to(@device)",
        # the same transforms, arguments and order as vqmed.data.transforms.deterministic_transform, then the
        # 8-bit storage of vqmed.data.ImageDataset
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                *_deterministic_chain(spec),
                # vqmed's datasets hold images as 8 bits (the model trained and exports on exactly these values)
                {"_target_": "vqmed.data.cache.Round8Bitd", "keys": "image"},
                # header facts hold None values the default collate cannot batch; they are not an input
                {"_target_": "DeleteItemsd", "keys": "facts"},
            ],
        },
        "datalist": "$bundle_datalist(@dataset_dir)",
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 8, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "vqmed.export.bundle.SaveCodesd", "keys": "pred", "output_dir": "@output_dir",
                            "network": "@network"}],
        },
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"},
                      "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _readme(meta: dict[str, Any], spec: ImageSpec, metadata: dict[str, Any], benchmark: str | None) -> str:
    data = (meta.get("config") or {}).get("data") or {}
    manifests = data.get("manifests") or []
    lines = [
        f"# {metadata['name']}", "", metadata["description"], "",
        "## Pretraining data", "",
        f"- manifests: {', '.join(Path(m).name for m in manifests) or 'not recorded'}",
        f"- splits: {', '.join(data.get('splits') or []) or 'all'}; images: {data.get('max_images') or 'all'}",
        f"- model: `{meta['model_name']}`, vqmed model id `{meta.get('model_id', '')}`, step {meta.get('step')}",
        "", "## Preprocessing", "", metadata["preprocessing"], "",
        "## Inputs and outputs", "",
        f"- input `image`: float32 `[{spec.channels}, {', '.join(map(str, metadata['network_data_format']['inputs']['image']['spatial_shape']))}]` in [0, 1]",
        f"- output `pred`: int64 code map `[1, {', '.join(map(str, metadata['network_data_format']['outputs']['pred']['spatial_shape']))}]`; "
        f"the writer stores `codes`, `code_histogram` and `quantized_mean` per image as `NNNNN.npz` (the input files in sorted order)",
        "", "## Run it with MONAI", "", "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir IMAGES --output_dir OUT",
        "python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json",
        "```", "", "## Benchmark (few-label probes on the frozen features)", "",
        benchmark.strip() if benchmark else "No benchmark was given (`vqmed bundle --benchmark DIR` adds `DIR/summary.md`).",
        "",
    ]
    return "\n".join(lines)


def write_bundle(model: nn.Module, meta: dict[str, Any], spec: ImageSpec, out: Path, benchmark: Path | None = None) -> Path:
    """Write the bundle of a frozen model (see the module docstring) and return its folder.

    Args:
        model: the pretrained vqmed model (from :func:`vqmed.models_io.load_model`).
        meta: its metadata (``model_name``, ``model_config``, ``config``, ``step``, ``model_id``).
        spec: the image spec it was pretrained with.
        out: the bundle folder (created; files in it are replaced).
        benchmark: a ``vqmed benchmark --out`` folder (or its ``summary.md``) whose table goes into docs/README.md.
    """
    out = Path(out)
    encoder = FrozenEncoder(meta["model_name"], meta["model_config"])
    encoder.model.load_state_dict(model.state_dict())
    encoder.eval()
    metadata = bundle_metadata(encoder, meta, spec)
    inference = inference_config(spec, meta)
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "configs" / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    atomic_write_text(out / "configs" / "inference.json", json.dumps(inference, indent=2) + "\n")
    atomic_write(out / "models" / "model.pt", lambda handle: torch.save(encoder.state_dict(), handle))
    # Traced, not scripted: the quantizer's nearest-code search is plain tensor code, the same for every input
    # of the bundle's fixed size; verify=True checks the traced module against the eager one.
    from monai.networks.utils import convert_to_torchscript

    example = torch.rand(2, *spec.shape, generator=torch.Generator().manual_seed(0))
    extra = {"metadata.json": json.dumps(metadata).encode(), "inference.json": json.dumps(inference).encode()}
    traced = convert_to_torchscript(encoder, extra_files=None, verify=True, inputs=[example], use_trace=True, rtol=0, atol=0)
    atomic_write(out / "models" / "model.ts", lambda handle: torch.jit.save(traced, handle, _extra_files=extra))
    summary = None
    if benchmark is not None:
        path = Path(benchmark)
        path = path / "summary.md" if path.is_dir() else path
        summary = path.read_text()
    atomic_write_text(out / "docs" / "README.md", _readme(meta, spec, metadata, summary))
    return out

