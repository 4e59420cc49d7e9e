"""The pretraining engine: config in; checkpoints, an MLflow run and ``summary.json`` out.

The engine does engine work only: data loading, steps, DDP, AMP, checkpoints, resume, signals and the
tracking calls. What a step minimises is the configured objective's business
(:mod:`vqmed.training.objectives`); the objective's own weights (a projector, ...) are optimised,
checkpointed and resumed together with the model's.

One code path serves one CPU process and ``torchrun --nproc_per_node=N -m vqmed pretrain ...`` on CPUs
(gloo) or GPUs (NCCL): the model is wrapped in DistributedDataParallel when the process group is up,
the quantizer keeps its codebook in sync across ranks itself, and only rank 0 logs and writes files.
A run stops cleanly on SIGINT/SIGTERM (checkpoint, then exit) and ``--resume`` continues the same MLflow
run at the exact batch where the last checkpoint was taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from vqmed.atomic import atomic_write_json, remove_stale_temporaries
from vqmed.config import ConfigError, PretrainConfig, to_dict
from vqmed.data import ImageDataset, ImageSpec, ManifestError, load_manifests, resolve_data_root, split_by_patient
from vqmed.data.augment import BatchAugmentation
from vqmed.models_io import model_fingerprint
from vqmed.models_io.checkpoint import atomic_save, latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from vqmed.models_io.runtime import (
    ResumableSampler,
    Runtime,
    any_rank,
    barrier,
    default_threads,
    init_runtime,
    shutdown,
)
from vqmed.networks import build_model
from vqmed.tracking import check_tracking_server
from vqmed.training.control import (History, StopRequest, leave_stop_signals_to_main, lr_at, model_arguments,
                                    seed_everything)
from vqmed.training.evaluation import codebook_stats, final_figures, validate
from vqmed.training.objectives import Objective, build_objective

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


def _quiet() -> bool:
    return bool(os.environ.get("CI"))


class ObjectiveStep(nn.Module):
    """The model and its objective as one module, so that DDP wraps (and syncs the gradients of) both.

    Args:
        model: the VQ model being pretrained.
        objective: the pretraining objective.
    """

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective(self.model, views)


class Trainer:
    """Holds the state of one pretraining run; :func:`pretrain` is the public entry point."""

    def __init__(self, cfg: PretrainConfig, resume: bool) -> None:
        self.cfg = cfg
        self.rt: Runtime = init_runtime(cfg.train.device)
        torch.set_num_threads(cfg.train.threads or default_threads(self.rt))
        seed_everything(cfg.seed + self.rt.rank)
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.found = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir.exists() else None
        if not resume and (self.found is not None or (self.out / RUN_FILE).exists()):
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        if self.rt.is_main:
            # Before anything is written or decoded: an unreachable server would otherwise hang for minutes.
            check_tracking_server(cfg.tracking.tracking_uri)
            self.out.mkdir(parents=True, exist_ok=True)
            # Half-written files of a run killed mid-write (the renamed ones are whole).
            remove_stale_temporaries(self.out, (RUN_FILE, SUMMARY_FILE, "final.pt"))
            remove_stale_temporaries(self.ckpt_dir)
        self.spec = ImageSpec.from_config(cfg.data)
        self._build_model()
        self._build_data()
        self._build_optimizer()
        self.history = History()
        self.step = 0
        self.epoch = 0
        self.run_id: str | None = None
        self.frames: list[np.ndarray] = []
        if self.found is not None:
            self._restore(self.found[0])

    # ----------------------------------------------------------------------------------------- set-up
    def _build_data(self) -> None:
        cfg = self.cfg
        self.data_root = resolve_data_root(cfg.data.data_root)
        try:
            manifest = load_manifests(cfg.data.manifests, cfg.data.splits, cfg.data.max_images, cfg.seed)
        except ManifestError as exc:
            raise ConfigError(f"data.{exc}") from None
        train_rows, val_rows = split_by_patient(manifest, cfg.data.val_fraction, cfg.seed)
        self.manifest = manifest
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else None
        progress = self.rt.is_main and not _quiet()

        objective = self.objective

        def dataset(rows: pd.DataFrame) -> ImageDataset:
            return ImageDataset(rows, self.data_root, self.spec, cache_dir=cache, fail_fast=cfg.data.fail_fast,
                                progress=progress)

        # Rank 0 decodes and fills the cache; the other ranks then read it instead of decoding too.
        if not self.rt.is_main:
            barrier(self.rt)
        # Both yield the images as they are: the training batches become the objective's views on the device.
        self.train_set = dataset(train_rows)
        self.val_set = dataset(val_rows)
        self.augmentation = BatchAugmentation(self.spec.spatial_dims, objective.augmentation) if cfg.data.augment else None
        if self.rt.is_main:
            barrier(self.rt)
            quarantine = self.out / "quarantine.csv"
            entries = list(self.train_set.quarantine.entries) + list(self.val_set.quarantine.entries)
            if entries:
                self.train_set.quarantine.merge(self.val_set.quarantine)
                self.train_set.quarantine.write(quarantine, keep_paths=cfg.data.keep_paths)
                print(f"quarantined {len(entries)} unreadable file(s): see {quarantine}")
        if len(self.train_set) < cfg.train.batch_size * self.rt.world_size:
            raise ConfigError(
                f"only {len(self.train_set)} training images for batch_size {cfg.train.batch_size} x "
                f"{self.rt.world_size} process(es)"
            )
        self.sampler = ResumableSampler(self.train_set, self.rt, cfg.train.batch_size, cfg.seed)
        self.loader = DataLoader(
            self.train_set,
            batch_size=cfg.train.batch_size,
            sampler=self.sampler,
            num_workers=cfg.train.num_workers,
            drop_last=True,
            # Workers only read the cache (augmentation happens on the device, in _views): nothing to keep.
            persistent_workers=False,
            pin_memory=self.rt.device.type == "cuda",
            # A private generator: creating an iterator must not draw from the global RNG, or a resumed
            # run would see a shifted random stream (codebook restarts) compared with an uninterrupted one.
            generator=torch.Generator(),
            worker_init_fn=leave_stop_signals_to_main,
        )
        self.steps_per_epoch = len(self.sampler) // cfg.train.batch_size
        planned = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(planned, cfg.train.max_steps) if cfg.train.max_steps else planned

    def _build_model(self) -> None:
        cfg = self.cfg
        self.model_args = model_arguments(cfg)
        try:
            self.model = build_model(cfg.model.name, **self.model_args).to(self.rt.device)
        except ValueError as exc:  # unknown or invalid constructor argument: the user's config is wrong
            raise ConfigError(f"model.params: {exc}") from None
        self.channels_last = cfg.train.channels_last and cfg.data.spatial_dims == 2
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.objective: Objective = build_objective(cfg.objective.name, cfg.objective.params, self.model, self.spec.shape)
        # Model and objective in one module: DDP syncs the gradients of both (a projector's too).
        self.trainable = ObjectiveStep(self.model, self.objective)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        # The model's parameters first, then the objective's (none for reconstruction).
        self.optimizer = torch.optim.AdamW(self.trainable.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, self.total_steps, cfg) / cfg.train.lr
        )
        self.net: nn.Module = self.trainable
        if self.rt.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                self.trainable, device_ids=[self.rt.local_rank] if self.rt.device.type == "cuda" else None
            )
        on_cuda = self.rt.device.type == "cuda"
        if cfg.train.compile and on_cuda:
            self.net = torch.compile(self.net)
        # Mixed precision only on CUDA: this CPU has no native bf16 and autocast there is ~25x slower.
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if on_cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _restore(self, state: dict[str, Any]) -> None:
        name = state.get("objective_name", "reconstruction")
        if name != self.cfg.objective.name:
            raise ConfigError(f"objective.name: the checkpoint was trained with {name!r}, the config says "
                              f"{self.cfg.objective.name!r}; resume with the same objective or choose another --out")
        self.model.load_state_dict(state["model_state"])
        self.objective.load_state_dict(state.get("objective_state", {}))
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.history.series = {k: [list(map(float, v)) for v in vals] for k, vals in state["history"].items()}
        self.frames = [f.numpy() for f in state.get("frames", [])]
        self.run_id = state.get("mlflow_run_id")
        set_rng_state(state["rng"][min(self.rt.rank, len(state["rng"]) - 1)])
        if self.rt.is_main:
            print(f"resumed from {self.found[1]} at step {self.step} (epoch {self.epoch})")

    # ------------------------------------------------------------------------------------- tracking
    def _start_tracking(self) -> None:
        if not self.rt.is_main:
            return
        from vqmed.tracking import flush_backlog, log_dataset_input, log_params, set_backlog_dir, setup_mlflow, start_run

        # What a server that dies mid-run cannot take is kept here and sent when it is back (or by --resume).
        set_backlog_dir(self.out / "tracking_backlog")
        setup_mlflow(self.cfg.tracking.tracking_uri, self.cfg.tracking.experiment)
        run_file = self.out / RUN_FILE
        if self.run_id is None and run_file.exists():
            self.run_id = json.loads(run_file.read_text())["mlflow_run_id"]
        if self.run_id is not None:
            start_run(run_id=self.run_id)
            flush_backlog()
            return
        run = start_run(run_name=self.cfg.name)
        self.run_id = run.info.run_id
        atomic_write_json(run_file, {"mlflow_run_id": self.run_id})
        log_params(to_dict(self.cfg))
        log_params({"resolved.total_steps": self.total_steps, "resolved.train_images": len(self.train_set),
                    "resolved.val_images": len(self.val_set), "resolved.world_size": self.rt.world_size})
        log_dataset_input(self.manifest, name=self.cfg.name, context="training")

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if not self.rt.is_main:
            return
        from vqmed.tracking import log_metrics

        for name, value in metrics.items():
            self.history.add(name, step, value)
        log_metrics(metrics, step=step)

    # ----------------------------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        # Every rank holds the same state; gather RNG states so each rank resumes its own stream.
        rngs = [rng_state()]
        if self.rt.distributed:
            gathered: list[Any] = [None] * self.rt.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not self.rt.is_main:
            return
        save_checkpoint(self._state(rngs), self.ckpt_dir)

    def _state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model_name": self.cfg.model.name,
            "model_config": self.model_args,
            "model_state": self.model.state_dict(),
            "objective_name": self.cfg.objective.name,
            "objective_config": self.objective.config(),
            "objective_state": self.objective.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "rng": rngs,
            "history": self.history.as_dict(),
            "frames": [torch.from_numpy(f) for f in self.frames],
            "mlflow_run_id": self.run_id,
            "config": to_dict(self.cfg),
        }

    def _snapshot(self, path: Path) -> None:
        """A model-only checkpoint (no optimiser state), loadable by ``load_model`` and ``vqmed export``."""
        if self.rt.is_main:
            state = {k: v for k, v in self._state([rng_state()]).items()
                     if k not in ("optimizer_state", "scheduler_state", "frames")}
            atomic_save({"format": "vqmed-checkpoint-v1", **state}, path)

    def _keep_snapshot(self) -> None:
        """``checkpoints/step_NNNNNN.pt`` at the steps of ``train.keep_checkpoints_at`` (compute curves)."""
        if self.step in self.cfg.train.keep_checkpoints_at:
            self._snapshot(self.ckpt_dir / f"step_{self.step:06d}.pt")

    # -------------------------------------------------------------------------------------- training
    def _batches(self, skip: int) -> Iterator[tuple[torch.Tensor, float]]:
        """Yield (views ``[B, views, C, *spatial]``, seconds waited for them) for the rest of the epoch."""
        self.sampler.set_epoch(self.epoch, skip_batches=skip)
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            images = batch["image"].to(self.rt.device, non_blocking=True)
            views = self._views(images)
            shape = views.shape
            views = views.reshape(-1, *shape[2:])  # [B * views, C, *spatial]: one layout change for all
            if self.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            yield views.view(shape), time.perf_counter() - start

    def _views(self, images: torch.Tensor) -> torch.Tensor:
        """The objective's views ``[B, views, C, *spatial]`` of a batch ``[B, C, *spatial]``.

        The draw of step ``s`` depends only on (seed, rank, s): a resumed run augments exactly as the run it continues.
        """
        count = self.objective.views
        if self.augmentation is None:
            return images.unsqueeze(1).expand(-1, count, *images.shape[1:])
        draw = int(np.random.SeedSequence([self.cfg.seed, self.rt.rank, self.step]).generate_state(1)[0])
        generator = torch.Generator(device=self.rt.device).manual_seed(draw)
        return self.augmentation(images, count, generator)

    def _train_step(self, views: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a batch of views ``[B, views, C, *spatial]``; returns the logged metrics."""
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        with autocast:
            loss, metrics = self.net(views)
        if not torch.isfinite(loss.detach()).item():
            # A NaN or infinite loss would otherwise train on: one step turns every weight into NaN and the
            # run writes NaN checkpoints. Stop before the step, so the checkpoints on disk stay good.
            terms = ", ".join(f"{name}={value.item():.4g}" for name, value in metrics.items())
            found = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir.exists() else None
            kept = (f"the checkpoint of step {found[0]['step']} in {self.ckpt_dir} is the last good state"
                    if found else "no checkpoint was written yet")
            raise DivergedError(
                f"step {self.step + 1}: the loss is not finite ({terms}); nothing was stepped and {kept}: lower "
                "train.lr or set train.grad_clip, then start again (or --resume from that checkpoint)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {f"train/{name}": value.item() for name, value in metrics.items()}

    def _quantizers(self) -> list[nn.Module]:
        return list(self.model.quantizers)

    def run(self) -> dict[str, Any] | None:
        cfg = self.cfg
        self._start_tracking()
        if self.step == 0:
            self._keep_snapshot()  # step 0: the random initialisation, the compute curve's first point
        deadline = time.monotonic() + cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
        images_seen, train_seconds = 0, 0.0
        stopped_by: int | None = None
        with StopRequest() as stop:
            while self.step < self.total_steps and self.epoch < cfg.train.epochs:
                skip = self.step - self.epoch * self.steps_per_epoch
                for quantizer in self._quantizers():
                    quantizer.reset_stats()
                self.net.train()
                waited, stepped, epoch_images = 0.0, 0.0, 0
                bar = self._progress(skip)
                tick = time.perf_counter()
                for views, wait in self._batches(skip):
                    metrics = self._train_step(views)
                    self.step += 1
                    now = time.perf_counter()
                    waited += wait
                    stepped += now - tick
                    tick = now
                    epoch_images += views.shape[0] * self.rt.world_size
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", img_s=f"{epoch_images / max(stepped, 1e-9):.1f}")
                    if self.step % cfg.train.log_every == 0:
                        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
                        metrics["train/images_per_second"] = epoch_images / max(stepped, 1e-9)
                        self._log(metrics, self.step)
                    out_of_time = deadline is not None and time.monotonic() > deadline
                    if any_rank(stop.signal is not None or out_of_time, self.rt):
                        stopped_by = stop.signal if stop.signal is not None else 0
                        break
                    self._keep_snapshot()
                    if self.step >= self.total_steps:
                        break
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self._checkpoint()
                if bar is not None:
                    bar.close()
                images_seen += epoch_images
                train_seconds += stepped
                epoch_done = self.step - self.epoch * self.steps_per_epoch >= self.steps_per_epoch
                if epoch_done or self.step >= self.total_steps or stopped_by == 0:
                    self._end_epoch(waited, stepped, epoch_images)
                    if epoch_done:
                        self.epoch += 1
                self._checkpoint()
                if stopped_by is not None:
                    break
        if stopped_by:  # a signal: the checkpoint is written, leave the MLflow run open for --resume
            if self.rt.is_main:
                print(f"stopped by signal {stopped_by} at step {self.step}; continue with --resume")
            shutdown(self.rt)
            raise SystemExit(128 + stopped_by)
        summary = self._finish(images_seen / train_seconds if train_seconds else float("nan"))
        shutdown(self.rt)
        return summary

    def _progress(self, skip: int):
        if not self.rt.is_main or _quiet():
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}",
                    unit="step", leave=False)

    # ------------------------------------------------------------------------------------ validation
    def _end_epoch(self, waited: float, stepped: float, epoch_images: int) -> None:
        stats = self.last_stats = codebook_stats(self.model.quantizers)
        val = self.last_val = self.validate()  # every rank validates its shard; MONAI's metrics gather the results
        if not self.rt.is_main:
            return
        metrics = {**val["metrics"], **{k: v for k, v in stats.items() if not isinstance(v, np.ndarray)}}
        if stepped > 0:
            metrics["epoch/data_wait_fraction"] = waited / stepped
            metrics["epoch/train_images_per_second"] = epoch_images / stepped
        metrics["epoch/epoch"] = self.epoch + 1
        self._log(metrics, self.step)
        if (self.epoch % self.cfg.tracking.gif_every) == 0 or self.step >= self.total_steps:
            self.frames.append(val["reconstructions"][0])
        from vqmed.tracking import log_figure, reconstruction_grid

        log_figure(reconstruction_grid(val["originals"], val["reconstructions"], n=self.cfg.train.val_images),
                   f"reconstructions/epoch_{self.epoch + 1:03d}.png")

    def validate(self) -> dict[str, Any]:
        """This rank's share of the validation images through the model (see :func:`validate`)."""
        return validate(self.model, self.val_set, self.rt, self.cfg.train.batch_size, self.cfg.data.spatial_dims,
                        self.channels_last, self.cfg.train.val_images)

    # -------------------------------------------------------------------------------------- the end
    def _finish(self, images_per_second: float) -> dict[str, Any] | None:
        # Every rank reports a hash of its weights and codebooks: DDP must leave them identical.
        hashes = [model_fingerprint(self.model, self.cfg.model.name, self.model_args)]
        if self.rt.distributed:
            gathered: list[Any] = [None] * self.rt.world_size
            torch.distributed.all_gather_object(gathered, hashes[0])
            hashes = gathered
        if not hasattr(self, "last_stats"):
            # Resumed after the last epoch had already ended: validate once more for the summary.
            self.last_stats = codebook_stats(self.model.quantizers)  # every rank: statistics and metrics are all-reduced
            self.last_val = self.validate()
        if not self.rt.is_main:
            return None
        from vqmed.tracking import end_run, log_artifact, log_metrics

        final = self.out / "final.pt"
        self._snapshot(final)
        log_artifact(final, artifact_path="checkpoints")
        final_figures(self.out / "figures", self.frames, self.history.as_dict(), self.last_stats, self.last_val,
                      self.cfg.train.val_images)
        if self.cfg.tracking.log_model:
            self._log_mlflow_model()
        val = self.last_val["metrics"]
        summary = {
            "val_psnr": val["val_psnr"],
            "val_mse": val["val_mse"],
            "val_ssim": val["val_ssim"],
            "codebook_usage": self.last_stats["codebook/usage"],
            "perplexity": self.last_stats["codebook/perplexity"],
            "objective": self.cfg.objective.name,
            "epochs": self.epoch,
            "steps": self.step,
            "train_images_per_second": images_per_second,
            "world_size": self.rt.world_size,
            "rank_state_hashes": hashes,
            "mlflow_run_id": self.run_id,
            "checkpoint": str(final.resolve()),
        }
        log_metrics({"final/val_psnr": summary["val_psnr"], "final/codebook_usage": summary["codebook_usage"]},
                    step=self.step)
        atomic_write_json(self.out / SUMMARY_FILE, summary)
        log_artifact(self.out / SUMMARY_FILE)
        end_run()
        _report_backlog(self.out)
        return summary

    def _log_mlflow_model(self) -> None:
        from vqmed.tracking import log_torch_model

        model = self.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
        log_torch_model(
            model,
            name="model",
            # pickle, not pt2: torch.export cannot trace the quantizer's data-dependent codebook updates.
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai", "vqmed"],
            metadata={"model_name": self.cfg.model.name, "model_config": json.dumps(self.model_args)},
        )


class DivergedError(FloatingPointError):
    """The pretraining loss became NaN or infinite; raised before the step, the checkpoints are intact."""


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict[str, Any] | None:
    """Pretrain the configured model; returns the summary on rank 0 (``None`` on other ranks)."""
    return Trainer(cfg, resume).run()


def _report_backlog(out: Path) -> None:
    """Send what a tracking server that died mid-run could not take; warn (not fail) about what is still left."""
    from vqmed.tracking import backlog_size, flush_backlog

    flush_backlog()
    left = backlog_size()
    if left:
        print(f"vqmed: warning: the training finished, but {left} tracking entries could not be sent to the MLflow "
              f"server; they are kept in {out / 'tracking_backlog'} and sent by `vqmed pretrain --resume` with the same "
              "--out once the server is back", file=sys.stderr, flush=True)
