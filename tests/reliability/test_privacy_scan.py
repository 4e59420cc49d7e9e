"""Privacy: 40 copies of the real RSNA chest DICOM carrying distinctive patient names, ids, birth and
study dates, accession numbers and UIDs (plus one with its pixel data cut and one with its header cut),
stored as a PACS export would (``PATIENT-NAME_MRN/ACCESSION_DATE/SOP-UID.dcm``: the identifiers are in the
folder and file names too), and 8 real Kermany X-rays saved as PNG (identifiers in a text chunk) and JPEG
(identifiers in the EXIF description and the JPEG comment) under folders and file names made of a
patient's name, MRN, accession number and date, go with 120 real Kermany X-rays through ``vqmed manifest
build`` -> ``pretrain`` -> ``export`` -> ``benchmark`` -> ``preview``. Then every byte of every output (manifests, run directory, checkpoints, quarantine
reports, the MLflow sqlite store and its artifacts, the image cache, the export store and its Parquet
index, the benchmark outputs, and each step's stdout/stderr) is scanned for every one of those values,
in several spellings: none may appear.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

from vqmed.data import read_manifest

N_PATIENTS, STUDIES_PER_PATIENT = 10, 4
DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%d.%m.%Y", "%m/%d/%Y", "%d/%m/%Y", "%Y/%m/%d", "%Y.%m.%d")


def _identity(p: int, s: int) -> dict[str, str]:
    """Distinctive, realistic-looking identifiers of patient ``p``'s study ``s``."""
    family, given = f"Vrzbqkowsk{'abcdefghij'[p]}", f"Zelphin{'abcdefghij'[p]}ria"
    birth = dt.date(1923, 4, 17) + dt.timedelta(days=371 * p)
    study = dt.date(2001, 11, 9) + dt.timedelta(days=97 * p + 13 * s)
    uid = f"1.2.826.0.1.3680043.8.498.73519{p:02d}{s:02d}"
    return {
        "PatientName": f"{family}^{given}", "family": family, "given": given, "PatientID": f"PQX-{7100 + p}-ZK",
        "PatientBirthDate": birth.strftime("%Y%m%d"), "AccessionNumber": f"ACZ{880000 + 10 * p + s}W9",
        "StudyInstanceUID": f"{uid}.1", "SeriesInstanceUID": f"{uid}.2", "SOPInstanceUID": f"{uid}.3",
        "StudyDate": study.strftime("%Y%m%d"), "ReferringPhysicianName": f"Dr^Quorvantis{p}",
        "InstitutionName": f"Oxbrelm Infirmary {p}", "_birth": birth, "_study": study,
    }


def _secrets(identities: list[dict]) -> set[str]:
    """Every value, and the spellings a program might give it (dates in many formats, names as text)."""
    out: set[str] = set()
    for ident in identities:
        for key, value in ident.items():
            if not key.startswith("_"):
                out.add(value)
        out.add(f"{ident['given']} {ident['family']}")
        out.add(ident["ReferringPhysicianName"].split("^")[1])
        for date in (ident["_birth"], ident["_study"]):
            out.update(date.strftime(f) for f in DATE_FORMATS)
    return out


def _write_dicoms(folder: Path, template: Path) -> list[dict]:
    folder.mkdir(parents=True)
    identities = []
    for p in range(N_PATIENTS):
        for s in range(STUDIES_PER_PATIENT):
            ident = _identity(p, s)
            ds = pydicom.dcmread(template)
            for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
                        "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "ReferringPhysicianName", "InstitutionName"):
                setattr(ds, key, ident[key])
            ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident["StudyDate"]
            ds.file_meta.MediaStorageSOPInstanceUID = ident["SOPInstanceUID"]
            # As PACS exports name them: patient folder, study folder, file named by SOP Instance UID.
            where = folder / f"{ident['family']}^{ident['given']}_{ident['PatientID']}" / f"{ident['AccessionNumber']}_{ident['StudyDate']}"
            where.mkdir(parents=True, exist_ok=True)
            ds.save_as(where / f"{ident['SOPInstanceUID']}.dcm")
            identities.append(ident)
    # Two broken ones that still carry identifiers: pixel data cut (header readable), header cut.
    for name, (p, cut) in {"cut_pixels.dcm": (0, 0.6), "cut_header.dcm": (1, None)}.items():
        ident = _identity(p, 9)
        ds = pydicom.dcmread(template)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
                    "SeriesInstanceUID", "SOPInstanceUID", "StudyDate"):
            setattr(ds, key, ident[key])
        ds.save_as(folder / name)
        blob = (folder / name).read_bytes()
        end = blob.index(ident["PatientID"].encode()) + 40 if cut is None else int(len(blob) * cut)
        (folder / name).write_bytes(blob[:end])
        identities.append(ident)
    return identities


N_PLANTED = 8


def _write_images(folder: Path, sources: list[Path]) -> list[dict]:
    """Real X-rays as PNG (identifiers in a tEXt chunk) and JPEG (EXIF description and JPEG comment), under
    ``NAME_MRN/ACCESSION_DATE.png``-style folder and file names."""
    from PIL import Image, PngImagePlugin

    identities = []
    for k, src in enumerate(sources):
        ident = _identity(k % N_PATIENTS, 5 + k // N_PATIENTS)
        where = folder / f"{ident['given']} {ident['family']}_{ident['PatientID']}"
        where.mkdir(parents=True, exist_ok=True)
        words = f"{ident['PatientName']} {ident['PatientID']} {ident['AccessionNumber']} {ident['StudyDate']}"
        with Image.open(src) as im:
            im = im.convert("L")
            if k % 2 == 0:
                info = PngImagePlugin.PngInfo()
                info.add_text("Comment", words)
                im.save(where / f"{ident['AccessionNumber']}_{ident['StudyDate']}.png", pnginfo=info)
            else:
                exif = Image.Exif()
                exif[0x010E] = words  # ImageDescription
                im.save(where / f"{ident['AccessionNumber']}_{ident['_study'].strftime('%Y-%m-%d')}.jpg",
                        exif=exif.tobytes(), comment=words.encode())
        identities.append(ident)
    return identities


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data_root, kermany, make_config, run_cli):
    tmp = tmp_path_factory.mktemp("privacy")
    root, out = tmp / "root", tmp / "out"  # inputs (identifiers on purpose) | everything the tool writes
    out.mkdir()
    identities = _write_dicoms(root / "archive", data_root / "dicom" / "chest" / "cr_chest_pa_rsna_jpeg_baseline.dcm")
    picks = pd.concat([g.head(30) for _, g in kermany.groupby(["split", "label"])])
    for rel in picks["path"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / rel, root / rel)
    others = kermany[kermany["split"].eq("train") & ~kermany["path"].isin(picks["path"])].head(N_PLANTED)
    planted = _write_images(root / "planted", [data_root / rel for rel in others["path"]])
    identities += planted
    # Control: the planted names and metadata are really in the inputs.
    blob = b"".join(p.read_bytes() + str(p).encode() for p in (root / "planted").rglob("*") if p.is_file())
    assert planted[0]["PatientID"].encode() in blob and planted[1]["AccessionNumber"].encode() in blob
    logs, steps = out / "logs", {}
    logs.mkdir()

    built = out / "manifest.csv"
    steps["manifest"] = run_cli("manifest", "build", root, "--data-root", root, "--out", built, "--quiet",
                                log=logs / "manifest.log")
    assert steps["manifest"].returncode == 0, steps["manifest"].stderr[-3000:]
    manifest = read_manifest(built)
    # The DICOM archive has no split folders: give its patients splits and labels (by patient, so that
    # no patient is in both splits), as a curator would.
    dicom = (manifest["format"] == "dicom") | manifest["path"].str.startswith("planted/")
    patients = sorted(manifest.loc[dicom, "patient_id"].unique())
    for k, patient in enumerate(patients):
        rows = dicom & (manifest["patient_id"] == patient)
        manifest.loc[rows, "split"] = "train" if k < 6 else "test"
        manifest.loc[rows, "label"] = "PNEUMONIA" if k % 2 else "NORMAL"
    labeled = out / "manifest_labeled.csv"
    manifest.to_csv(labeled, index=False)

    config = make_config(out, [labeled], root, data={"splits": [], "max_images": None},
                         train={"epochs": 1, "max_steps": 8, "checkpoint_every": 4},
                         tracking={"experiment": "privacy", "tracking_uri": f"sqlite:///{out / 'mlflow.db'}"})
    steps["pretrain"] = run_cli("pretrain", "--config", config, log=logs / "pretrain.log", cwd=out, timeout=900)
    assert steps["pretrain"].returncode == 0, steps["pretrain"].stderr[-3000:]
    steps["export"] = run_cli("export", "--model", out / "run", "--manifest", labeled, "--out", out / "store",
                              "--data-root", root, "--batch-size", "32", log=logs / "export.log", cwd=out, timeout=900)
    assert steps["export"].returncode == 0, steps["export"].stderr[-3000:]

    bench = {
        "name": "privacy-benchmark", "seed": 0, "out": str(out / "bench"), "export": str(out / "store"),
        "data_root": str(root), "image_size": 32, "threads": 1, "cache_dir": str(out / "bench_cache"),
        "budgets": {"fractions": [], "per_class": [5], "draws": 1},
        "probes": {"variants": ["quantized_mean", "code_histogram"], "classifiers": ["logreg"], "cv_folds": 2,
                   "logreg_c": [0.1], "report_candidates": False},
        "baselines": {"raw_pixels": True, "pca": False, "random_encoder": False, "cnn_scratch": False},
        "metrics": {"bootstrap": 20},
        "tracking": {"experiment": "privacy-benchmark", "tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
    }
    (out / "bench.yaml").write_text(yaml.safe_dump(bench))
    steps["benchmark"] = run_cli("benchmark", "--config", out / "bench.yaml", log=logs / "benchmark.log", cwd=out,
                                 timeout=900)
    previewed = sorted(p for p in root.rglob("*") if p.suffix in (".png", ".jpg", ".dcm") and "cut_" not in p.name)[:6]
    previewed += sorted((root / "planted").rglob("*.*"))[:2]
    steps["preview"] = run_cli("preview", *previewed, "--out", out / "preview", "--image-size", "32",
                               log=logs / "preview.log", cwd=out)
    print({name: f"rc {r.returncode}, {r.seconds:.0f}s" for name, r in steps.items()})
    return {"root": root, "out": out, "identities": identities, "steps": steps, "manifest": manifest}


def test_pipeline_saw_the_dicoms(pipeline):
    """The identifiers went all the way through: DICOM rows trained on, exported, one quarantined."""
    out, manifest = pipeline["out"], pipeline["manifest"]
    assert (manifest["format"] == "dicom").sum() == N_PATIENTS * STUDIES_PER_PATIENT + 1  # + the cut pixels
    store = pd.read_parquet(out / "store" / "index.parquet")
    assert (store["format"] == "dicom").sum() == N_PATIENTS * STUDIES_PER_PATIENT and len(store) == 160 + N_PLANTED
    quarantined = pd.read_csv(out / "store" / "quarantine.csv")
    assert list(quarantined.columns) == ["study_id", "reason"] and len(quarantined) == 1
    assert "path" not in store.columns and store["study_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert manifest["study_id"].str.fullmatch(r"[0-9a-f]{16}").all()  # PNG/JPEG too: salted, not the path
    assert (out / "run" / "quarantine.csv").is_file()
    # The header cut short is left out of the manifest (pydicom reads what is there: no Rows, so the
    # scan counts it as a non-image file rather than quarantining it).
    report = json.loads(pipeline["steps"]["manifest"].stdout.split("\n", 1)[1])
    assert "archive/cut_header.dcm" not in set(manifest["path"])
    assert report["skipped_non_image"] + report["quarantined_headers"] == 1


def test_no_identifier_in_any_output(pipeline):
    out, identities = pipeline["out"], pipeline["identities"]
    secrets = sorted(_secrets(identities))
    needles = [(s, s.encode()) for s in secrets] + [(s + " (UTF-16)", s.encode("utf-16-le")) for s in secrets]
    # Control: the scanner finds them in the inputs.
    sample = next((pipeline["root"] / "archive").rglob(f"{identities[0]['SOPInstanceUID']}.dcm")).read_bytes()
    assert identities[0]["PatientID"].encode() in sample and identities[0]["StudyInstanceUID"].encode() in sample

    # Everything the tool wrote, file names included; the user's own manifests keep the paths by design
    # (they are the inputs the user keeps), and each log's first line is this harness echoing the user's command.
    files = sorted(p for p in out.rglob("*") if p.is_file())
    found, scanned_bytes = [], 0
    for path in files:
        blob = path.read_bytes()
        if path.name in ("manifest.csv", "manifest_labeled.csv") and path.parent == out:
            blob = b""
        elif path.suffix == ".log" and path.parent.name == "logs":
            blob = blob.split(b"\n", 1)[1]
        blob += str(path.relative_to(out)).encode()
        scanned_bytes += len(blob)
        lower = blob.lower()
        for label, needle in needles:
            if needle in blob or needle.lower() in lower:
                found.append(f"{label!r} in {path.relative_to(out)}")
    kinds = {p.suffix for p in files}
    print(f"\nscanned {len(files)} output files ({scanned_bytes / 1e6:.1f} MB) for {len(secrets)} values x 2 encodings")
    # The scan covered every kind of output.
    for must in ("mlflow.db", "index.parquet", "quarantine.csv", "summary.json", "final.pt", "last.pt", "manifest.csv",
                 "pretrain.log", "export.log", "manifest.log", "benchmark.log", "store.json", "preview.tsv", "preview.log",
                 "000.png"):
        assert any(p.name == must for p in files), must
    assert {".npz", ".npy", ".parquet", ".png", ".json", ".pt"} <= kinds
    assert any("mlartifacts" in p.parts for p in files) and any(p.name.startswith("chunk-") for p in files)
    assert not found, "identifiers leaked:\n" + "\n".join(found[:50])


def test_benchmark_step_ran_on_the_export(pipeline):
    """The last step of the pipeline (its outputs are part of the scan above when it succeeds)."""
    result = pipeline["steps"]["benchmark"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (pipeline["out"] / "bench" / "summary.json").is_file()
    assert pipeline["steps"]["preview"].returncode == 0, pipeline["steps"]["preview"].stderr[-3000:]
