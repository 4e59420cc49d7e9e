"""DICOM through pydicom (+ the pylibjpeg decoders): headers, salted ids and display-ready pixels.

Pixels go through the DICOM display pipeline so that the model sees what a radiologist sees:
decode (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE via pylibjpeg) -> palette colour to
RGB -> Modality LUT (Rescale Slope/Intercept) -> VOI LUT or window -> invert MONOCHROME1 so that air
is dark and bone bright. MONAI's ``PydicomReader`` skips the last two steps, hence this module.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from vqmed.data.errors import UnreadableImageError
from vqmed.data.privacy import salted_id

PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Most pixels one 2D image or frame may declare (2**25, e.g. 5,792^2), for DICOM and, through
# vqmed.data.readers, for PNG/JPEG too: a small file claiming a huge frame would otherwise cost seconds
# and gigabytes to decode, while real 2D scans are far smaller (a mammogram: ~4,096 x 5,120 = 21 M).
MAX_2D_PIXELS = 1 << 25
# pydicom both warns and logs (its decoders log ERROR lines); with no handler configured Python's
# last-resort handler would print them on stderr. What they say goes into the file's reason instead.
logging.getLogger("pydicom").addHandler(logging.NullHandler())


@contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Collect the warnings pydicom raises while reading (one line each) instead of printing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        try:
            yield messages
        finally:
            messages.extend(" ".join(str(w.message).split()) for w in caught)


def _not_dicom_reason(path: Path, exc: Exception) -> str:
    """Why pydicom refused a file, in words a user can act on (not "use force=True")."""
    if is_dicom_file(path):
        return f"unreadable DICOM: {exc}"
    try:
        with Image.open(path) as im:
            kind = im.format
    except Exception:  # not an image either
        kind = None
    if kind:
        return (f"not a DICOM file: it is a {kind} image with a DICOM file name; rename it to "
                f".{'jpeg' if kind == 'JPEG' else kind.lower()} so that it is read as an image")
    return "not a DICOM file: no 'DICM' marker at byte 128 and no DICOM file meta header (a different or damaged file)"


def _truncated_reason(path: Path, facts: dict[str, Any], messages: list[str]) -> str | None:
    """A reason naming the truncation when the pixel data is cut short, else ``None``."""
    blob = Path(path).read_bytes()
    at = blob.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, little endian
    eof = any("end of file" in m.lower() for m in messages)
    if at < 0 and not eof:
        return None
    what = f"({facts['encoding']}, modality {facts['modality'] or '?'})"
    if at >= 0 and blob[at + 4:at + 6] in (b"OB", b"OW"):
        declared = int.from_bytes(blob[at + 8:at + 12], "little")
        found = len(blob) - (at + 12)
        if declared != 0xFFFFFFFF and found < declared:
            return f"truncated DICOM: pixel data has {found:,} of the {declared:,} bytes it declares {what}"
        if declared == 0xFFFFFFFF:
            return (f"truncated DICOM: the file ends after {found:,} bytes of encapsulated pixel data, before "
                    f"the end of its fragments {what}")
    return f"truncated DICOM: the file ({len(blob):,} bytes) ends inside its data {what}"

def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path) -> Dataset:
    """Read the header only (``stop_before_pixels=True``); raise :class:`UnreadableImageError`."""
    try:
        with _captured_warnings():
            return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise UnreadableImageError(path, _not_dicom_reason(Path(path), exc)) from exc
    except (OSError, ValueError, EOFError, AttributeError, KeyError, TypeError) as exc:
        raise UnreadableImageError(path, f"unreadable DICOM header: {exc}") from exc


def n_frames(ds: Dataset) -> int:
    """Number of frames declared by the header (1 when absent or malformed)."""
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def is_image(ds: Dataset) -> bool:
    """Whether the header describes pixels (Rows and Columns present), e.g. not a DICOMDIR or SR."""
    return bool(ds.get("Rows")) and bool(ds.get("Columns"))


def encoding_name(ds: Dataset) -> str:
    """Transfer syntax as a name, e.g. ``JPEG 2000 Image Compression (Lossless Only)``."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return str(tsyntax.name) if tsyntax is not None else "unknown transfer syntax"


def header_facts(ds: Dataset) -> dict[str, Any]:
    """Non-identifying header facts for previews and logs (no names, ids, dates or UIDs)."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    voi = "VOI LUT" if ds.get("VOILUTSequence") else ("window" if "WindowCenter" in ds else "none")
    sop = ds.get("SOPClassUID")
    return {
        "format": "dicom",
        "modality": str(ds.get("Modality", "") or ""),
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "size": f"{rows}x{cols}" if rows and cols else "",
        "frames": n_frames(ds),
        "channels": int(ds.get("SamplesPerPixel", 1) or 1),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "encoding": encoding_name(ds),
        "voi": voi,
        "sop_class": str(getattr(sop, "name", "")) if sop else "",
    }


def header_ids(ds: Dataset, salt: str) -> dict[str, Any]:
    """Salted ids for the manifest: study, series, patient, plus the (non-identifying) instance number.

    A missing PatientID makes the study its own patient (conservative for split-leak checks)."""
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    patient = str(ds.get("PatientID", "") or "")
    try:
        instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") is not None else None
    except (TypeError, ValueError):
        instance = None
    return {
        "study_id": salted_id("study", study_uid, salt) if study_uid else "",
        "series_id": salted_id("series", series_uid, salt) if series_uid else "",
        "patient_id": salted_id("patient", patient, salt) if patient else salted_id("patient-of-study", study_uid, salt),
        "instance": instance,
    }


def read_pixels(
    path: Path, frame: int | None, spatial_dims: int, max_pixels: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a DICOM file to display values, channel first.

    Args:
        path: the DICOM file.
        frame: frame to read from a multi-frame file (2D only); ``None`` = the middle frame.
        spatial_dims: 2 gives ``[C,H,W]``; 3 stacks all frames of a multi-frame file as ``[C,H,W,D]``.
        max_pixels: refuse (before decoding) files whose header declares more pixels than this.

    Returns:
        float32 array in display orientation (air dark) and unscaled, plus :func:`header_facts`.

    Raises:
        UnreadableImageError: corrupt file, no pixel data, unsupported encoding, absurd size, ...
    """
    # One function on purpose (~80 lines): the display chain (header checks, decode, frame choice, modality LUT,
    # VOI LUT or window, MONOCHROME1 inversion) runs in this order and each step reads what the previous found.
    try:
        with _captured_warnings() as messages:
            ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise UnreadableImageError(path, _not_dicom_reason(Path(path), exc)) from exc
    except (OSError, ValueError, EOFError, AttributeError, KeyError, TypeError) as exc:
        raise UnreadableImageError(path, f"unreadable DICOM: {exc}") from exc
    facts = header_facts(ds)
    if not any(tag in ds for tag in PIXEL_TAGS):
        # A file cut inside its pixel data reads as an empty dataset (pydicom only warns): say so.
        header = read_header(path)
        truncated = _truncated_reason(path, header_facts(header), messages) if is_image(header) else None
        facts = header_facts(header)
        raise UnreadableImageError(path, truncated or f"DICOM has no pixel data (modality {facts['modality'] or '?'})")
    rows, cols, frames = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), n_frames(ds)
    if rows <= 0 or cols <= 0:
        raise UnreadableImageError(path, "DICOM header declares no image size (Rows/Columns)")
    if spatial_dims == 3 and frames < 2:
        raise UnreadableImageError(path, "single-frame DICOM cannot make a 3D input (series stacking is not supported)")
    if spatial_dims == 2:
        frame = frames // 2 if frame is None else int(frame)
        if not 0 <= frame < frames:
            raise UnreadableImageError(path, f"frame {frame} out of range (file has {frames})")
        declared = rows * cols
    else:
        frame = None
        declared = rows * cols * frames
    if declared > max_pixels:
        raise UnreadableImageError(path, f"header declares {declared:,} pixels, more than max_pixels={max_pixels:,}")
    if rows * cols > MAX_2D_PIXELS:
        # One frame beyond what a real 2D scan needs (see readers.MAX_2D_PIXELS): a 130 KB JPEG DICOM
        # claiming 12,000 x 12,000 pixels otherwise decodes for seconds into ~700 MB.
        raise UnreadableImageError(
            path, f"header declares {rows}x{cols} pixels per frame, more than the 2D limit of {MAX_2D_PIXELS:,}"
        )

    if "PixelData" in ds:
        tsyntax = ds.file_meta.TransferSyntaxUID
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError as exc:
            raise UnreadableImageError(path, f"unsupported encoding {facts['encoding']}: no pixel decoder") from exc
        if not decoder.is_available:
            raise UnreadableImageError(path, f"unsupported encoding {facts['encoding']}: no decoder plugin installed")
    try:
        with _captured_warnings() as decode_messages:
            # index=None decodes every frame; an int decodes only that frame (cheap for multi-frame files).
            arr = pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as exc:  # decoders raise RuntimeError/ValueError/...; all mean "cannot decode"
        said = "; ".join(dict.fromkeys(messages + decode_messages))
        raise UnreadableImageError(
            path, f"pixel data cannot be decoded ({facts['encoding']}): {exc}" + (f" (pydicom: {said})" if said else "")
        ) from exc

    photometric = facts["photometric"]
    samples = facts["channels"]
    try:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            samples = 3
        elif samples == 1:
            arr = apply_modality_lut(arr, ds)  # Rescale Slope/Intercept or Modality LUT
            arr = apply_voi_lut(arr, ds, index=0)  # VOI LUT Sequence, else Window Center/Width
    except Exception as exc:
        raise UnreadableImageError(path, f"cannot apply LUT/window: {exc}") from exc
    arr = np.asarray(arr, dtype=np.float32)
    if photometric == "MONOCHROME1":
        # MONOCHROME1: the minimum is displayed white. Negate so air is dark and bone bright; the
        # min-max scaling that follows makes this equal to inverting within the display range.
        arr = arr.max() - arr
    facts["inverted"] = photometric == "MONOCHROME1"

    # Channel first: [H,W] -> [1,H,W]; [H,W,3] -> [3,H,W]; 3D: [F,H,W(,3)] -> [C,H,W,F].
    arr = arr[None] if samples == 1 else np.moveaxis(arr, -1, 0)
    if spatial_dims == 3:
        arr = np.moveaxis(arr, 1, -1)  # [C,F,H,W] -> [C,H,W,F]
    facts["frame"] = frame
    return np.ascontiguousarray(arr), facts
