"""Manifests: one CSV row per image, paths relative to the data root.

Columns (``MANIFEST_COLUMNS``): ``study_id, path, split, label, patient_id, modality, format,
series_id, instance, frame``. The first six are required when reading; ``instance`` and ``frame``
are integers or empty. Rows are sorted by path and frame, so rebuilding gives the same file.

What a scan of ROOT produces, file by file:

- PNG/JPEG/TIFF/BMP in class folders (``[SPLIT/]LABEL/FILE``): label = the parent folder, split =
  the folder above it when that is ``train``/``val``/``test`` (e.g. ``chest_xray/train/NORMAL``,
  ``cifar10/test/cat``; ``stl10/train`` is the class "train" because ``stl10`` is no split).
  ``study_id`` = a salted hash of the path without its suffix; Kermany file names give the patient
  (:func:`kermany_patient_id`, salted too); otherwise every image is its own patient. File and folder
  names often carry a patient's name or MRN, so only ``keep_paths=True`` (``--keep-paths``) keeps the
  unsalted names as ids (the committed manifests of public data sets are built that way).
- DICOM (any name, found by suffix or the ``DICM`` magic; headers only): one row per instance, or per
  frame of a multi-frame instance; ``study_id``, ``series_id`` and ``patient_id`` are salted hashes
  (:mod:`vqmed.data.privacy`), never raw UIDs or patient ids. Labels from class folders as for images.
- DICOM series (``multiframe="volume"``, ``vqmed manifest build --volumes``): the single-frame instances of a
  folder sharing a Series Instance UID become one row, ``path`` = the folder, ``format`` = ``dicom_series``,
  ``frame`` = the series' place among the folder's series (sorted by UID), salted ids; a series that is not one
  regular grid (missing slice, uneven spacing, mixed orientations) is quarantined with that reason.
- NIfTI (``.nii``/``.nii.gz``, 2D or 3D), MetaImage (``.mha``/``.mhd``), NRRD: one row per file.
- IDX (MNIST, ``*-images-idx3-ubyte[.gz]``): one row per image with ``frame`` = its index; labels from
  the sibling ``*-labels-idx1-ubyte[.gz]``; split from the name (``t10k``/``test`` -> test, ``train``).

Class folders, every format: a file's folder is its label only when that folder sits directly under
ROOT or directly under a split folder (``[SPLIT/]LABEL/FILE``). Deeper folders (``PATIENT/STUDY/FILE``,
often named after the patient) are never labels: their rows stay unlabeled and the report warns.

Junk (``.DS_Store``, ``Thumbs.db``, ``._*``, other hidden files) is skipped and counted; files whose
header cannot be read are left out and listed in the scan report's ``quarantined``.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vqmed.atomic import atomic_write_text
from vqmed.data import dicom, itk
from vqmed.data.errors import DataRootError, ManifestError, UnreadableImageError
from vqmed.data.privacy import resolve_salt, salted_id
from vqmed.data.progress import progress_bar
from vqmed.data.readers import check_file, detect_format, idx_header, idx_labels_path, read_header, read_idx, safe_path

DATA_ROOT_ENV = "VQMED_DATA_ROOT"
MANIFEST_COLUMNS = ["study_id", "path", "split", "label", "patient_id", "modality", "format", "series_id", "instance", "frame"]
REQUIRED_COLUMNS = MANIFEST_COLUMNS[:6]
INT_COLUMNS = ("instance", "frame")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
_REPO_ROOT = Path(__file__).resolve().parents[2]

# Kermany et al. names. PNEUMONIA: personN_{bacteria|virus}_K; NORMAL: [NORMAL2-]IM-NNNN-MMMM[-...].
_KERMANY_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_KERMANY_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


# ----------------------------------------------------------------------------------- data root


def resolve_data_root(cli_value: str | Path | None = None) -> Path:
    """The folder manifest paths are relative to.

    Order: ``cli_value`` (``--data-root``), else ``$VQMED_DATA_ROOT``, else ``<cwd>/../shared/data``,
    else ``<repo root>/../shared/data``. An explicit value that is not a folder is an error (no
    silent fallback).

    Raises:
        DataRootError: naming what was tried.
    """
    for source, value in (("--data-root", cli_value), (DATA_ROOT_ENV, os.environ.get(DATA_ROOT_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise DataRootError(f"data root from {source} does not exist or is not a folder: {path}")
            return Path(os.path.abspath(path))
    tried = [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    for path in tried:
        if path.is_dir():
            return Path(os.path.abspath(path))
    raise DataRootError(
        "no data root found: pass --data-root, set VQMED_DATA_ROOT, or place the data at one of "
        + ", ".join(os.path.abspath(p) for p in tried)
    )


# ----------------------------------------------------------------------------------- building


def kermany_patient_id(name: str) -> str | None:
    """Patient id from a Kermany chest X-ray file name, or ``None`` for other names.

    ``person1946_bacteria_4875.jpeg`` -> ``person1946_bacteria``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``.

    The numbers are separate sequences per name family: person numbers are counted separately for
    bacterial and viral cases, and ``IM-`` / ``NORMAL2-IM-`` are two batches. Within each family the
    official train/test split never shares a number, while the bare numbers coincide 264 times across
    the split (e.g. train ``person1_bacteria_*`` and test ``person1_virus_*``): the family is part of
    the patient id.
    """
    m = _KERMANY_PERSON.match(name)
    if m:
        return f"{m.group(1)}_{m.group(2).lower()}"
    m = _KERMANY_IM.match(name)
    return m.group(1) if m else None


def build_manifest(
    root: Path,
    data_root: Path,
    salt: str | None = None,
    progress: bool = True,
    multiframe: str = "frames",
    labels_from_folders: bool | None = None,
    keep_paths: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Scan ROOT (a folder or one file inside the data root) and return ``(manifest, scan_report)``.

    Args:
        root: what to scan; relative paths that do not exist from the working directory are taken
            relative to ``data_root``.
        data_root: folder that manifest paths are relative to; ``root`` must lie inside it.
        salt: salt for DICOM ids (else ``$VQMED_ID_SALT``, else the per-user salt file); only
            resolved when DICOM files are found.
        progress: show a tqdm bar (off when ``CI`` is set).
        multiframe: ``frames`` = one row per frame of a multi-frame DICOM (2D training), ``volume`` =
            one row per instance (3D).
        labels_from_folders: ``None`` = class folders (``[SPLIT/]LABEL/FILE`` under ROOT) give labels for
            every format; ``True`` = the parent folder of every file; ``False`` = no labels.
        keep_paths: image/IDX ids are the path (and Kermany patient) as text instead of salted hashes,
            and the report lists file paths; off by default (names may identify patients).

    Returns:
        The manifest (``MANIFEST_COLUMNS``) and a JSON-able report: ``files_seen``, ``rows``,
        ``by_format``, ``skipped_junk`` (+ ``junk_files``), ``skipped_unknown`` (+ ``unknown_files``),
        ``skipped_non_image`` (DICOM without pixels, e.g. DICOMDIR; IDX labels files), ``quarantined_headers`` (+
        ``quarantined``: ``[path, reason]``), ``splits``, ``labels``.
    """
    if multiframe not in ("frames", "volume"):
        raise ValueError(f"multiframe must be 'frames' or 'volume', got {multiframe!r}")
    data_real = os.path.realpath(data_root)
    root = Path(root)
    if not root.exists() and not root.is_absolute() and (Path(data_root) / root).exists():
        root = Path(data_root) / root
    if not root.exists():
        raise FileNotFoundError(f"nothing to scan: {root} does not exist")
    root_real = os.path.realpath(root)
    if os.path.commonpath([data_real, root_real]) != data_real:
        raise DataRootError(f"{root} is outside the data root {data_root}; pass --data-root with a folder that "
                            "contains it (manifests hold paths relative to the data root)")

    files, junk, hidden_dirs = _walk(root_real)
    report: dict[str, Any] = {
        "root": os.path.relpath(root_real, data_real), "data_root": str(data_root), "files_seen": len(files) + len(junk),
        "rows": 0, "by_format": {}, "skipped_junk": len(junk), "junk_files": [_rel(p, data_real) for p in junk[:20]],
        "skipped_hidden_dirs": hidden_dirs, "skipped_unknown": 0, "unknown_files": [], "skipped_non_image": 0,
        "quarantined_headers": 0, "quarantined": [],
    }
    root_dir = root_real if os.path.isdir(root_real) else os.path.dirname(root_real)
    state = {"salt": salt, "salt_resolved": None, "keep_paths": keep_paths}
    rows: list[dict[str, Any]] = []
    by_format: Counter = Counter()
    for path in progress_bar(files, total=len(files), desc=f"scan {report['root']}", enable=progress):
        rel = _rel(path, data_real)
        fmt = detect_format(Path(path))
        if fmt is None:
            report["skipped_unknown"] += 1
            if len(report["unknown_files"]) < 20:
                report["unknown_files"].append(rel)
            continue
        folder_split, folder_label = _folder_labels(path, root_dir, data_real, labels_from_folders is True)
        try:
            new = _file_rows(Path(path), rel, fmt, data_real, state, multiframe, (folder_split, folder_label),
                             labels_from_folders)
        except UnreadableImageError as exc:
            report["quarantined"].append([rel, exc.reason])
            continue
        if not new:  # DICOM without pixels (DICOMDIR, SR, ...) or an IDX labels file
            report["skipped_non_image"] += 1
            continue
        by_format[new[0]["format"]] += 1
        rows.extend(new)

    if multiframe == "volume":
        rows = _series_rows(rows, data_real, state, report, by_format)
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    df = _normalise(df).sort_values(["path", "frame"], na_position="first", kind="stable").reset_index(drop=True)
    report["rows"] = len(df)
    report["by_format"] = {k: v for k, v in sorted(by_format.items()) if v}
    report["quarantined_headers"] = len(report["quarantined"])
    report["splits"] = {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()}
    report["labels"] = {str(k): int(v) for k, v in df["label"].value_counts().sort_index().items()}
    unlabeled = int((df["label"] == "").sum())
    if unlabeled:
        report["warning"] = (f"{unlabeled} of {len(df)} rows have no label (labels come from [SPLIT/]LABEL/FILE "
                             "folders right under the scanned folder; add them to the manifest's label column)")
    if not keep_paths:  # the user's own manifest keeps the paths; the report (often a log) does not
        report["quarantined"] = [reason for _, reason in report["quarantined"]]
        for key in ("junk_files", "unknown_files"):
            report[key] = f"{len(report[key])} (listed with --keep-paths)" if report[key] else []
    return df, report


def _file_rows(path: Path, rel: str, fmt: str, data_real: str, state: dict[str, Any], multiframe: str,
               folder: tuple[str, str], labels_from_folders: bool | None) -> list[dict[str, Any]]:
    """The manifest rows of one file (several for a multi-frame DICOM or an IDX file; none for a DICOM
    without pixels or an IDX labels file), from its header only.

    Raises:
        UnreadableImageError: broken link, no permission, empty file, a link escaping the data root, a bad header.
    """
    folder_split, folder_label = folder
    check_file(path)  # broken link, no permission, empty file: a clear reason
    if os.path.commonpath([data_real, os.path.realpath(path)]) != data_real:
        raise UnreadableImageError(rel, "symbolic link escapes the data root")
    if fmt == "dicom":
        return _dicom_rows(path, rel, state, multiframe, folder_split, folder_label, labels_from_folders)
    if fmt == "idx":
        return _idx_rows(path, rel, folder_split, state)
    facts = read_header(path, fmt)
    use = labels_from_folders is not False
    study = _strip_suffix(rel)
    patient = kermany_patient_id(path.name) or study
    study, patient = _name_id(state, "study", study), _name_id(state, "patient", patient)
    return [_row(study, rel, folder_split if use else "", folder_label if use else "", patient, "", facts["format"])]


def _name_id(state: dict[str, Any], kind: str, name: str) -> str:
    """An id made from a path or file name: salted unless ``keep_paths`` (names may identify a patient)."""
    if state["keep_paths"]:
        return name
    if state["salt_resolved"] is None:
        state["salt_resolved"] = resolve_salt(state["salt"])
    return salted_id(kind, name, state["salt_resolved"])


def _walk(root_real: str) -> tuple[list[str], list[str], int]:
    if os.path.isfile(root_real):
        return [root_real], [], 0
    files, junk, hidden_dirs = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root_real, followlinks=False):
        hidden = [d for d in dirnames if d.startswith(".")]
        hidden_dirs += len(hidden)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            (junk if name.lower() in JUNK_NAMES or name.startswith(".") else files).append(full)
    return files, junk, hidden_dirs


def _rel(path: str, data_real: str) -> str:
    return Path(os.path.relpath(path, data_real)).as_posix()


def _strip_suffix(rel: str) -> str:
    for suffix in (".nii.gz", ".gz"):
        if rel.lower().endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    stem, ext = os.path.splitext(rel)
    return stem if ext and "/" not in ext else rel


def _folder_labels(path: str, root_dir: str, data_real: str, any_depth: bool = False) -> tuple[str, str]:
    """(split, label) from class folders: label = parent folder below ROOT, split = the folder above it.

    The parent is a label only when it sits directly under ROOT or under a split folder (unless
    ``any_depth``): deeper folders of an archive are patients or studies, not classes."""
    parent = os.path.dirname(path)
    below_root = Path(os.path.relpath(parent, root_dir)).parts
    below_root = () if below_root == (".",) else below_root
    if not below_root:
        return "", ""
    label = below_root[-1]
    above = Path(os.path.relpath(parent, data_real)).parts
    split = SPLIT_NAMES.get(above[-2].lower(), "") if len(above) >= 2 else ""
    if not any_depth and len(below_root) > 1 and not split:
        return "", ""
    return split, label


def _row(study: str, rel: str, split: str, label: str, patient: str, modality: str, fmt: str,
         series: str = "", instance: int | None = None, frame: int | None = None) -> dict[str, Any]:
    return {"study_id": study, "path": rel, "split": split, "label": label, "patient_id": patient,
            "modality": modality, "format": fmt, "series_id": series, "instance": instance, "frame": frame}


def _dicom_rows(path: Path, rel: str, state: dict, multiframe: str, split: str, label: str,
                labels_from_folders: bool | None) -> list[dict[str, Any]]:
    ds = dicom.read_header(path)
    if not dicom.is_image(ds):
        return []
    if state["salt_resolved"] is None:
        state["salt_resolved"] = resolve_salt(state["salt"])
    ids = dicom.header_ids(ds, state["salt_resolved"])
    if not ids["study_id"]:
        raise UnreadableImageError(rel, "DICOM header lacks StudyInstanceUID")
    if labels_from_folders is False:
        split, label = "", ""
    modality = str(ds.get("Modality", "") or "")
    frames = dicom.n_frames(ds)
    per_frame = range(frames) if multiframe == "frames" and frames > 1 else [None]
    return [_row(ids["study_id"], rel, split, label, ids["patient_id"], modality, "dicom", ids["series_id"],
                 ids["instance"], f) for f in per_frame]


def _series_rows(rows: list[dict[str, Any]], data_real: str, state: dict, report: dict[str, Any],
                 by_format: Counter) -> list[dict[str, Any]]:
    """Replace the single-frame DICOM instances of each series (2 slices or more) by one ``dicom_series`` row of
    its folder; a series that is no regular grid goes to ``report["quarantined"]`` with the reason."""
    folders = sorted({os.path.dirname(r["path"]) for r in rows if r["format"] == "dicom" and r["frame"] is None})
    replaced: set[str] = set()
    series_rows = []
    for folder in folders:
        by_name = {os.path.basename(r["path"]): r for r in rows
                   if r["format"] == "dicom" and r["frame"] is None and os.path.dirname(r["path"]) == folder}
        try:
            found = itk.series_in_folder(Path(data_real) / folder)
        except UnreadableImageError as exc:
            report["quarantined"].append([folder, exc.reason])
            continue
        for index, files in enumerate(found):
            names = [os.path.basename(f) for f in files if os.path.basename(f) in by_name]
            if len(names) < 2:
                continue  # a lone slice keeps its own row
            first = by_name[names[0]]
            replaced.update(by_name[n]["path"] for n in names)
            try:
                problem = itk.series_problem([dicom.read_header(Path(f)) for f in files])
            except UnreadableImageError as exc:
                problem = exc.reason
            if problem:
                report["quarantined"].append([folder, f"series {index}: {problem}"])
                continue
            series_rows.append(_row(first["study_id"], folder, first["split"], first["label"], first["patient_id"],
                                    first["modality"], "dicom_series", first["series_id"], None, index))
    by_format["dicom"] -= len(replaced)
    by_format["dicom_series"] += len(series_rows)
    return [r for r in rows if r["path"] not in replaced] + series_rows


def _idx_rows(path: Path, rel: str, folder_split: str, state: dict[str, Any]) -> list[dict[str, Any]]:
    _, shape = idx_header(path)
    if len(shape) == 1:
        return []  # a labels file (read with its images file)
    # (IDX ids: the file path plus the image index, salted unless keep_paths)
    if len(shape) != 3:
        raise UnreadableImageError(rel, f"IDX file holds {len(shape)}-D data, expected N x H x W images")
    labels = [""] * shape[0]
    labels_path = idx_labels_path(path)
    if labels_path is not None:
        values = read_idx(labels_path)
        if values.shape != (shape[0],):
            raise UnreadableImageError(rel, f"labels file {labels_path.name} holds {values.shape}, expected ({shape[0]},)")
        labels = [str(int(v)) for v in values]
    lower = path.name.lower()
    split = "test" if lower.startswith(("t10k", "test")) else "train" if lower.startswith("train") else folder_split
    stem = _strip_suffix(rel)
    ids = [_name_id(state, "study", f"{stem}/{i:05d}") for i in range(shape[0])]
    return [_row(ids[i], rel, split, labels[i], ids[i], "", "idx", frame=i) for i in range(shape[0])]


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Fixed column order, strings for text columns, nullable Int64 for instance/frame."""
    out = df.copy()
    for col in MANIFEST_COLUMNS:
        if col not in out.columns:
            out[col] = None if col in INT_COLUMNS else ""
    for col in out.columns:
        if col in INT_COLUMNS:
            out[col] = pd.array([None if pd.isna(v) or v == "" else int(v) for v in out[col]], dtype="Int64")
        else:
            out[col] = out[col].fillna("").astype(str)
    extras = [c for c in out.columns if c not in MANIFEST_COLUMNS]
    return out[MANIFEST_COLUMNS + extras]


# ----------------------------------------------------------------------------------- file I/O


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Write a manifest CSV (UTF-8, ``\\n`` line ends), atomically (temp file + rename)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: cannot write a manifest without columns {missing}")
    out = _normalise(df)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, out.to_csv(index=False, lineterminator="\n"))


def read_manifest(path: Path) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Raises:
        ManifestError: naming the file and the row (CSV line) for a missing file, bad UTF-8, missing
            columns, a wrong number of fields, an empty ``path``/``study_id`` or a non-integer
            ``frame``/``instance``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(f"{path}: line {line} is not valid UTF-8 (byte {exc.start})") from exc
    if "\x00" in text:
        # Valid UTF-8 but binary (or UTF-16 text without a BOM): no manifest field may hold a NUL byte.
        line = text[: text.index("\x00")].count("\n") + 1
        raise ManifestError(
            f"{path}: line {line} contains a NUL byte (a binary file, or UTF-16 text? manifests are UTF-8 CSV)"
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        records = list(reader)
    except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit: binary junk
        raise ManifestError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from exc
    if not records:
        raise ManifestError(f"{path}: empty file (no header)")
    header = [h.strip() for h in records[0]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; header is {header}")
    if len(set(header)) != len(header):
        raise ManifestError(f"{path}: duplicate column names in header {header}")
    body = []
    for n, rec in enumerate(records[1:], start=2):
        if not rec:
            continue  # blank line
        if len(rec) != len(header):
            raise ManifestError(f"{path}: row at line {n} has {len(rec)} fields, the header has {len(header)}")
        body.append((n, rec))
    df = pd.DataFrame([rec for _, rec in body], columns=header, dtype=str)
    lines = [n for n, _ in body]
    for col in ("path", "study_id"):
        empty = np.flatnonzero(df[col].str.strip().eq("").to_numpy()) if len(df) else []
        if len(empty):
            raise ManifestError(f"{path}: row at line {lines[empty[0]]} has an empty {col!r}")
    for col in INT_COLUMNS:
        if col in df.columns:
            for i, value in enumerate(df[col].tolist()):
                if value != "" and not (value.isdigit() and value.isascii()):
                    raise ManifestError(f"{path}: row at line {lines[i]}, column {col!r}: {value!r} is not a non-negative integer")
    return _normalise(df)


# ----------------------------------------------------------------------------------- checking


@dataclass
class CheckReport:
    """What :func:`check_manifest` found.

    Args:
        n_rows: rows checked.
        n_files: distinct files.
        missing: ``(row, path)`` for files that do not exist.
        unreadable: ``(row, path, reason)`` for every row the loaders would quarantine (decoded), or whose
            header cannot be read (``--headers-only``), frames out of range, paths escaping the data root.
        duplicate_study_ids: study ids listed twice for the same image (same series, instance and
            frame), or spread over several patients or splits.
        split_leaks: patient id -> the splits it appears in, for patients in more than one
            (non-empty) split.
        decoded: whether every file was decoded (else headers only).
    """

    n_rows: int = 0
    n_files: int = 0
    missing: list[tuple[int, str]] = field(default_factory=list)
    unreadable: list[tuple[int, str, str]] = field(default_factory=list)
    duplicate_study_ids: list[str] = field(default_factory=list)
    split_leaks: dict[str, list[str]] = field(default_factory=dict)
    decoded: bool = False

    @property
    def ok(self) -> bool:
        """No missing or unreadable file, no duplicate study, no patient in two splits."""
        return not (self.missing or self.unreadable or self.duplicate_study_ids or self.split_leaks)

    def summary(self, keep_paths: bool = False) -> str:
        """Human-readable lines, ending in OK or FAILED. Every file that would be quarantined is listed,
        by manifest line (CSV line, header = 1) and, with ``keep_paths``, by path."""
        lines = [f"{self.n_rows} rows, {self.n_files} files ({'decoded' if self.decoded else 'headers only'})"]

        def where(row: int, path: str) -> str:
            return f"line {row + 2}: {path}" if keep_paths else f"line {row + 2}"

        def part(title: str, items: list, fmt, limit: int | None = 5) -> None:
            lines.append(f"{title}: {len(items)}")
            shown = items if limit is None else items[:limit]
            lines.extend(f"  {fmt(x)}" for x in shown)
            if len(items) > len(shown):
                lines.append(f"  ... and {len(items) - len(shown)} more")

        part("missing files", self.missing, lambda x: where(*x))
        part("files that would be quarantined" if self.decoded else "unreadable headers", self.unreadable,
             lambda x: f"{where(x[0], x[1])}: {x[2]}", limit=None)
        part("duplicate study ids", self.duplicate_study_ids, str)
        part("patients in more than one split", sorted(self.split_leaks.items()), lambda x: f"{x[0]}: {', '.join(x[1])}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def duplicate_study_ids(df: pd.DataFrame) -> list[str]:
    """Study ids listed twice for the same image (same series, instance and frame), or spread over
    several patients or splits, sorted."""
    df = _normalise(df)
    image_key = ["study_id", "series_id", "instance", "frame"]
    keyed = df[image_key].astype(str)
    dup = set(df.loc[keyed.duplicated(keep=False).to_numpy(), "study_id"])
    per_study = df.groupby("study_id", sort=True).agg(patients=("patient_id", "nunique"), splits=("split", "nunique"))
    dup |= set(per_study.index[(per_study["patients"] > 1) | (per_study["splits"] > 1)])
    return sorted(dup)


def _decode_reason(job: tuple[str, int | None, Any]) -> str | None:
    """Decode one file as the loaders do; the quarantine reason, or ``None`` when it loads (worker process)."""
    from vqmed.data.transforms import load_image

    path, frame, spec = job
    try:
        load_image(Path(path), spec, frame)
    except UnreadableImageError as exc:
        return exc.reason
    return None


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def check_manifest(df: pd.DataFrame, data_root: Path, progress: bool = True, decode: Any = None,
                   workers: int | None = None) -> CheckReport:
    """Check a manifest against the files: existence, readable files, duplicates, split leaks.

    Args:
        df: the manifest.
        data_root: folder the manifest paths are relative to.
        progress: show a progress bar (off when ``CI`` is set).
        decode: an :class:`~vqmed.data.ImageSpec`: decode every file with the loaders' own chain in
            ``workers`` processes, so that ``unreadable`` lists exactly what a run would quarantine,
            with the same reasons; ``None``: headers only (fast; decoding problems show up later).
        workers: decoding processes (``None``: the CPU count).
    """
    df = _normalise(df)
    report = CheckReport(n_rows=len(df), n_files=int(df["path"].nunique()), decoded=decode is not None)
    header_cache: dict[str, dict | str] = {}
    for pos, (rel, frame) in progress_bar(
        enumerate(zip(df["path"].tolist(), df["frame"].tolist())), total=len(df), desc="check files",
        enable=progress and decode is None,
    ):
        if rel not in header_cache:
            try:
                path = safe_path(Path(data_root), rel)
                if not path.exists() and not path.is_symlink():
                    header_cache[rel] = "missing"
                else:
                    header_cache[rel] = read_header(path) if decode is None else {}
            except UnreadableImageError as exc:
                header_cache[rel] = exc.reason
        facts = header_cache[rel]
        if facts == "missing":
            report.missing.append((pos, rel))
        elif isinstance(facts, str):
            report.unreadable.append((pos, rel, facts))
        elif decode is None and not pd.isna(frame) and int(frame) >= int(facts.get("frames", 1) or 1):
            report.unreadable.append((pos, rel, f"frame {int(frame)} out of range (file has {facts.get('frames')})"))
    if decode is not None:
        report.unreadable += _decode_all(df, data_root, header_cache, decode, workers, progress)
        report.unreadable.sort()

    report.duplicate_study_ids = duplicate_study_ids(df)

    splits_of: dict[str, set[str]] = defaultdict(set)
    for patient, split in zip(df["patient_id"].tolist(), df["split"].tolist()):
        if patient and split:
            splits_of[patient].add(split)
    report.split_leaks = {p: sorted(s) for p, s in sorted(splits_of.items()) if len(s) > 1}
    return report


def _decode_all(df: pd.DataFrame, data_root: Path, header_cache: dict, spec: Any, workers: int | None,
                progress: bool) -> list[tuple[int, str, str]]:
    """Decode every (file, frame) whose file exists, in parallel; ``(row, path, reason)`` for the failures."""
    from concurrent.futures import ProcessPoolExecutor

    jobs: dict[tuple[str, int | None], list[int]] = defaultdict(list)
    for pos, (rel, frame) in enumerate(zip(df["path"].tolist(), df["frame"].tolist())):
        if isinstance(header_cache.get(rel), dict):
            jobs[(rel, None if pd.isna(frame) else int(frame))].append(pos)
    items = list(jobs)
    args = [(str(Path(data_root) / rel), frame, spec) for rel, frame in items]
    workers = max(1, min(workers or os.cpu_count() or 1, len(items) or 1))
    if workers == 1:
        reasons = map(_decode_reason, args)
    else:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_single_thread)
        reasons = pool.map(_decode_reason, args, chunksize=max(1, min(32, len(args) // (4 * workers) or 1)))
    out = []
    try:
        for (rel, _), reason in progress_bar(zip(items, reasons), total=len(items), desc="decode files", enable=progress):
            if reason is not None:
                out.extend((pos, rel, reason) for pos in jobs[(rel, _)])
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    return out
