"""The ``vqmed`` command line: ``manifest | preview | pretrain | export | prior | benchmark | bundle | ui``.

Each sub-command parses and validates its arguments, then calls exactly one room of the library.
Heavy imports (torch, MONAI, MLflow) happen inside the sub-command so ``vqmed --help`` is instant.
Errors a user can fix (bad config, bad manifest, missing checkpoint) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def _writable_dir(out: str | Path, flag: str = "--out") -> Path:
    """``out`` as a folder this process can write (created if missing), else a :class:`UserError`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is an existing file; give a folder (new or existing) to write into")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".vqmed-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {out} is not writable ({exc.strerror or exc}); give a folder you can write to") from None
    return out


def _writable_file(out: str | Path, flag: str = "--out") -> Path:
    """``out`` as a file path this process can write (its folder created if missing), else a :class:`UserError`."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name such as {out / 'manifest.csv'}")
    _writable_dir(out.parent if str(out.parent) else ".", flag=f"{flag} {out}: folder")
    return out


def _image_size(value: int, spatial_dims: int = 2) -> int:
    from vqmed.config import image_size_problem

    problem = image_size_problem(value, spatial_dims)
    if problem:
        raise UserError(f"--image-size {problem}")
    return value


def _cmd_manifest_build(args: argparse.Namespace) -> int:
    from vqmed.data import build_manifest, resolve_data_root, write_manifest

    data_root = resolve_data_root(args.data_root)
    root = Path(args.root)
    if not root.is_absolute() and not root.exists():
        root = data_root / root
    out = _writable_file(args.out)
    manifest, report = build_manifest(root.resolve(), data_root, salt=args.salt, progress=not args.quiet,
                                      multiframe="volume" if args.volumes else "frames", keep_paths=args.keep_paths)
    write_manifest(manifest, out)
    print(f"wrote {len(manifest)} rows to {args.out}")
    print(json.dumps(report, indent=2, default=str))
    return 0


def _cmd_manifest_check(args: argparse.Namespace) -> int:
    from vqmed.data import ImageSpec, check_manifest, read_manifest, resolve_data_root

    spec = ImageSpec(image_size=_image_size(args.image_size), spatial_dims=2, channels=1)
    report = check_manifest(read_manifest(Path(args.file)), resolve_data_root(args.data_root), progress=not args.quiet,
                            decode=None if args.headers_only else spec, workers=args.workers)
    print(report.summary(keep_paths=args.keep_paths))
    return 0 if report.ok else 1


def _cmd_preview(args: argparse.Namespace) -> int:
    from vqmed.data import ImageSpec, preview_files

    spec = ImageSpec(image_size=_image_size(args.image_size), spatial_dims=2, channels=args.channels)
    out = _writable_dir(args.out)
    facts = preview_files([Path(f) for f in args.files], out, spec, keep_paths=args.keep_paths)
    for line in facts:
        print("  ".join(f"{k}={v}" for k, v in line.items()))
    failed = sum(1 for line in facts if line["status"] != "ok")
    if failed:
        print(f"vqmed preview: {failed} of {len(facts)} file(s) could not be read; reasons in {out / 'preview.tsv'}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vqmed.config import PretrainConfig, load_config
    from vqmed.training import pretrain

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out={args.out}")
    if args.data_root:
        overrides.append(f"data.data_root={args.data_root}")
    if args.keep_paths:
        overrides.append("data.keep_paths=true")
    cfg = load_config(PretrainConfig, args.config, overrides)
    summary = pretrain(cfg, resume=args.resume)
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vqmed.config import ExportConfig, load_config
    from vqmed.export import export_manifest

    # the flags are shorthands for --set overrides of the YAML config (or of ExportConfig's defaults)
    overrides = list(args.set or [])
    flags = {"model": args.model, "manifest": args.manifest, "out": args.out, "data_root": args.data_root,
             "batch_size": args.batch_size, "keep_ids": args.keep_ids, "nifti": args.nifti,
             "keep_paths": args.keep_paths}
    overrides += [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if args.arrays is not None:
        overrides.append(f"arrays={json.dumps([a.strip() for a in args.arrays.split(',') if a.strip()])}")
    cfg = load_config(ExportConfig, args.config, overrides)  # no --config: ExportConfig's defaults
    if cfg.out:
        _writable_dir(cfg.out)
    summary = export_manifest(
        cfg.model,
        Path(cfg.manifest),
        Path(cfg.out),
        data_root=cfg.data_root,
        batch_size=cfg.batch_size,
        keep_ids=cfg.keep_ids,
        write_nifti=cfg.nifti,
        progress=not args.quiet,
        cache_dir=cfg.cache_dir,
        device=cfg.device,
        arrays=cfg.arrays,
        keep_paths=cfg.keep_paths,
        grid=cfg.grid,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from vqmed.config import BenchmarkConfig, load_config
    from vqmed.downstream import run_benchmark

    overrides = list(args.set or [])
    cfg = load_config(BenchmarkConfig, args.config, overrides)
    out = Path(args.out) if args.out else Path(cfg.out)
    summary = run_benchmark(cfg, out)
    print(json.dumps(summary, indent=2, default=str)[:4000])
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from vqmed.export.bundle import write_bundle
    from vqmed.export.writer import image_spec
    from vqmed.models_io import load_model, model_fingerprint

    model, meta = load_model(args.model)
    meta["model_id"] = model_fingerprint(model, meta["model_name"], meta["model_config"])
    out = write_bundle(model, meta, image_spec(meta), Path(args.out), Path(args.benchmark) if args.benchmark else None)
    print(f"wrote MONAI bundle of model {meta['model_id']} to {out}")
    return 0


def _cmd_prior_train(args: argparse.Namespace) -> int:
    from vqmed.config import PriorConfig, load_config
    from vqmed.prior import train_prior

    overrides = list(args.set or [])
    overrides += [f"{key}={json.dumps(value)}" for key, value in {"export": args.export, "out": args.out}.items()
                  if value is not None]
    cfg = load_config(PriorConfig, args.config, overrides)
    print(json.dumps(train_prior(cfg, resume=args.resume), indent=2, default=str))
    return 0


def _cmd_prior_sample(args: argparse.Namespace) -> int:
    from vqmed.prior import sample_prior

    summary = sample_prior(args.prior, args.out, n=args.n, temperature=args.temperature, top_k=args.top_k,
                           export=args.export, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_prior_score(args: argparse.Namespace) -> int:
    from vqmed.prior import score_store

    summary = score_store(args.prior, args.export, flag_quantile=args.flag_quantile, heatmaps=args.heatmaps,
                          heatmap_dir=args.heatmap_dir, batch_size=args.batch_size)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_prior_qa(args: argparse.Namespace) -> int:
    from vqmed.config import QAConfig, load_config
    from vqmed.prior import run_qa

    cfg = load_config(QAConfig, args.config, list(args.set or []))
    run_qa(cfg, args.out)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from vqmed.tracking import serve_ui

    serve_ui(host=args.host, port=args.port, tracking_uri=args.tracking_uri, block=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqmed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    manifest = sub.add_parser("manifest", help="build or check a dataset manifest (CSV)")
    msub = manifest.add_subparsers(dest="manifest_command", required=True)
    build = msub.add_parser("build", help="scan a folder (class folders, DICOM archive, NIfTI, MNIST IDX)")
    build.add_argument("root", help="folder to scan (absolute, relative to the cwd, or relative to the data root)")
    build.add_argument("--out", required=True, help="manifest CSV to write")
    build.add_argument("--data-root", help="root the manifest paths are relative to (default: $VQMED_DATA_ROOT or ../shared/data)")
    build.add_argument("--salt", help="salt for hashed study/patient ids (default: $VQMED_ID_SALT or the per-user salt file)")
    build.add_argument("--volumes", action="store_true",
                       help="one row per volume (a multi-frame DICOM file, a DICOM series folder) instead of per frame")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument("--keep-paths", action="store_true",
                       help="ids of PNG/JPEG/IDX rows from their paths as text, and list skipped files by path "
                            "(off: salted ids, counts only; names may identify patients)")
    build.set_defaults(func=_cmd_manifest_build)
    check = msub.add_parser("check", help="decode every file and report the ones that would be quarantined, missing "
                                          "files, duplicate ids, patients in several splits")
    check.add_argument("file")
    check.add_argument("--data-root")
    check.add_argument("--headers-only", action="store_true", help="read headers only (fast; misses decoding errors)")
    check.add_argument("--image-size", type=int, default=64, help="size to decode to (as a model would; default 64)")
    check.add_argument("--workers", type=int, default=None, help="decoding processes (default: the CPU count)")
    check.add_argument("--keep-paths", action="store_true", help="name bad files by path (off: manifest line and study id)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=_cmd_manifest_check)

    preview = sub.add_parser("preview", help="write files as the model sees them (PNG) with their header facts")
    preview.add_argument("files", nargs="+")
    preview.add_argument("--out", required=True)
    preview.add_argument("--image-size", type=int, default=256)
    preview.add_argument("--channels", type=int, choices=(1, 3), default=1)
    preview.add_argument("--keep-paths", action="store_true", help="also write file paths / names into the outputs (off: outputs name studies by salted ids only)")
    preview.set_defaults(func=_cmd_preview)

    pre = sub.add_parser("pretrain", help="pretrain a VQ-VAE on unlabeled images (torchrun-ready)")
    pre.add_argument("--config", required=True, help="configs/pretrain/NAME.yaml")
    pre.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.epochs=3")
    pre.add_argument("--out", help="output directory (overrides `out` in the config)")
    pre.add_argument("--data-root", help="overrides data.data_root")
    pre.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints and the same MLflow run")
    pre.add_argument("--keep-paths", action="store_true", default=None, help="sets data.keep_paths: quarantine.csv lists file paths")
    pre.set_defaults(func=_cmd_pretrain)

    exp = sub.add_parser("export", help="export code maps and embeddings of every study with the frozen encoder")
    exp.add_argument("--config", help="configs/export/NAME.yaml (default: ExportConfig's defaults, as in configs/export/default.yaml)")
    exp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. batch_size=128")
    exp.add_argument("--model", help="checkpoint file, pretraining output dir, or MLflow run id (overrides `model`)")
    exp.add_argument("--manifest", help="manifest CSV (overrides `manifest`)")
    exp.add_argument("--out", help="store directory (overrides `out`)")
    exp.add_argument("--data-root", help="overrides `data_root`")
    exp.add_argument("--batch-size", type=int, help="images per encoder call (overrides `batch_size`)")
    exp.add_argument("--arrays", help="comma-separated feature arrays to write (overrides `arrays`; code maps always)")
    exp.add_argument("--keep-ids", action="store_true", default=None, help="keep the manifest's study ids instead of salted hashes")
    exp.add_argument("--nifti", action="store_true", default=None, help="also write 3D code maps as NIfTI on the scan's grid")
    exp.add_argument("--keep-paths", action="store_true", default=None, help="also write file paths / names into the outputs (off: outputs name studies by salted ids only)")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=_cmd_export)

    prior = sub.add_parser("prior", help="a transformer prior over exported code maps: train, sample, score, qa")
    psub = prior.add_subparsers(dest="prior_command", required=True)
    ptrain = psub.add_parser("train", help="train the prior on the code maps of an export (MLflow, checkpoints, --resume)")
    ptrain.add_argument("--config", required=True, help="configs/prior/NAME.yaml")
    ptrain.add_argument("--export", help="the export store (overrides `export`)")
    ptrain.add_argument("--out", help="output directory (overrides `out`)")
    ptrain.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.max_steps=100")
    ptrain.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints and the same MLflow run")
    ptrain.set_defaults(func=_cmd_prior_train)
    psample = psub.add_parser("sample", help="samples of a prior decoded by the VQ-VAE: PNG grids (and MLflow)")
    psample.add_argument("--prior", required=True, help="the prior's directory (prior train --out)")
    psample.add_argument("--out", required=True, help="where the PNG grids go")
    psample.add_argument("--n", type=int, help="number of samples (overrides sample.n)")
    psample.add_argument("--temperature", type=float, help="softmax temperature (overrides sample.temperature)")
    psample.add_argument("--top-k", type=int, help="draw among the k likeliest codes (overrides sample.top_k)")
    psample.add_argument("--export", help="the store whose model decodes (default: the prior's own)")
    psample.add_argument("--seed", type=int, help="sampling seed (default: the prior config's)")
    psample.set_defaults(func=_cmd_prior_sample)
    pscore = psub.add_parser("score", help="per-study bits per code as new columns of the export index")
    pscore.add_argument("--prior", required=True, help="the prior's directory")
    pscore.add_argument("--export", required=True, help="the store to score")
    pscore.add_argument("--flag-quantile", type=float, help="flag studies less likely than 1-q of the training split's")
    pscore.add_argument("--heatmaps", type=int, default=0, help="write heat maps of the N least likely studies")
    pscore.add_argument("--heatmap-dir", help="where the heat maps go (default EXPORT/prior_heatmaps)")
    pscore.add_argument("--batch-size", type=int, default=128)
    pscore.set_defaults(func=_cmd_prior_score)
    pqa = psub.add_parser("qa", help="AUROC of the likelihood at telling real test films from corrupted ones")
    pqa.add_argument("--config", required=True, help="configs/benchmark/qa.yaml")
    pqa.add_argument("--set", action="append", metavar="KEY=VALUE")
    pqa.add_argument("--out", help="output directory (overrides `out`)")
    pqa.set_defaults(func=_cmd_prior_qa)

    bench = sub.add_parser("benchmark", help="low-label benchmark of few-label classifiers on an export")
    bench.add_argument("--config", required=True, help="configs/benchmark/NAME.yaml")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE")
    bench.add_argument("--out", help="output directory (overrides `out` in the config)")
    bench.set_defaults(func=_cmd_benchmark)

    bundle = sub.add_parser("bundle", help="write the frozen encoder as a MONAI bundle (configs/, models/, docs/)")
    bundle.add_argument("--model", required=True, help="checkpoint file, pretraining output dir, or MLflow run id")
    bundle.add_argument("--out", required=True, help="bundle folder to write")
    bundle.add_argument("--benchmark", help="a `vqmed benchmark --out` folder whose summary table goes into docs/README.md")
    bundle.set_defaults(func=_cmd_bundle)

    ui = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or the project's local store")
    ui.set_defaults(func=_cmd_ui)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "bad input": shown as one line, exit status 2."""
    from vqmed.config import ConfigError

    errors: list[type[BaseException]] = [UserError, ConfigError, FileNotFoundError]
    for module, name in (
        ("vqmed.data", "ManifestError"),
        ("vqmed.data", "UnreadableImageError"),
        ("vqmed.models_io", "CheckpointError"),
        ("vqmed.tracking", "TrackingServerError"),
        ("vqmed.training", "DivergedError"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"vqmed {args.command}: error: {exc}", file=sys.stderr)
            code = 2
        else:
            raise
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
