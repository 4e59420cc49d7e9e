"""``vqmed preview``: each file as the model will see it (PNG) plus one line of header facts."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vqmed.data.cache import to_uint8
from vqmed.data.dataset import Quarantine
from vqmed.data.errors import UnreadableImageError
from vqmed.data.readers import DEFAULT_MAX_PIXELS
from vqmed.data.transforms import ImageSpec, deterministic_transform, run_transform

PREVIEW_COLUMNS = ["file", "status", "png", "format", "modality", "photometric", "size", "frames", "channels",
                   "colour", "encoding", "voi", "inverted", "reason"]


def to_png_array(img: np.ndarray) -> np.ndarray:
    """``[C,H,W]`` in [0, 1] -> uint8 ``HxW`` or ``HxWx3``; 3D ``[C,H,W,D]`` -> the three central
    orthogonal slices side by side: the middle 2D view, then the two cuts across it (last slice on top)."""
    if img.ndim == 4:
        _, h, w, d = img.shape
        across_rows = img[:, h // 2, :, ::-1].transpose(0, 2, 1)  # [C,D,W]
        across_cols = img[:, :, w // 2, ::-1].transpose(0, 2, 1)  # [C,D,H]
        img = np.concatenate([img[:, :, :, d // 2], across_rows, across_cols], axis=2)
    out = to_uint8(img)
    return out[0] if out.shape[0] == 1 else np.moveaxis(out, 0, -1)


def preview_files(
    files: list[Path], out_dir: Path, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS, keep_paths: bool = False
) -> list[dict[str, Any]]:
    """Write ``out_dir/NNN.png`` per file (the model's view, no augmentation; ``NNN`` = the file's position
    in ``files``) and ``out_dir/preview.tsv`` with one line of non-identifying header facts per file.
    File and folder names may identify a patient: they appear (``file`` column, ``NNN_<name>.png``) only
    with ``keep_paths``.

    Bad files do not stop the run: they get ``status = quarantined`` and a ``reason`` in the TSV, and
    a line in ``out_dir/quarantine.csv``.

    Args:
        files: files to preview (any supported format).
        out_dir: output folder (created).
        spec: size / dimensionality / channels of the model input.
        max_pixels: refuse files whose header declares more pixels than this.
        keep_paths: name files by path in the TSV and PNG names (off: by position).

    Returns:
        One dict per file with the :data:`PREVIEW_COLUMNS` keys.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = deterministic_transform(spec, max_pixels)
    quarantine = Quarantine()
    records: list[dict[str, Any]] = []
    for i, file in enumerate(files):
        file = Path(file)
        record = {key: "" for key in PREVIEW_COLUMNS}
        record["file"] = str(file) if keep_paths else f"{i:03d}"
        try:
            img, facts = run_transform(transform, file)
        except UnreadableImageError as exc:
            record.update(status="quarantined", reason=exc.reason)
            quarantine.add(str(file), exc.reason)
        else:
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", file.name)[:80]
            png = out_dir / (f"{i:03d}_{safe}.png" if keep_paths else f"{i:03d}.png")
            Image.fromarray(to_png_array(img)).save(png)
            record.update({k: facts[k] for k in PREVIEW_COLUMNS if k in facts})
            record.update(status="ok", png=png.name)
        records.append(record)
    with open(out_dir / "preview.tsv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PREVIEW_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    if len(quarantine):
        quarantine.write(out_dir / "quarantine.csv", keep_paths=keep_paths)
    return records
