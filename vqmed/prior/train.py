"""Training a prior on a store's code maps: config in; checkpoints, ``final.pt``, an MLflow run and
``summary.json`` out.

The codes of the configured split are read once (a few MB); ``train.val_fraction`` of that split's patients
(grouped by the store's salted ``patient_key``, never the test split) give the validation bits per code,
reported beside the unigram code distribution of the training part (the prior's baseline). Checkpoints are
written atomically every ``train.checkpoint_every`` steps (:mod:`vqmed.models_io.checkpoint`: the previous one
kept, a torn file skipped), so a run killed at any moment, SIGKILL included, continues with ``--resume`` from
the last checkpoint at the same batch and in the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vqmed.atomic import atomic_write_json, remove_stale_temporaries
from vqmed.config import ConfigError, PriorConfig, to_dict
from vqmed.data import split_by_patient
from vqmed.export import ExportStore, load
from vqmed.models_io import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from vqmed.models_io.checkpoint import atomic_save, rng_state, set_rng_state
from vqmed.models_io.runtime import default_threads, init_runtime
from vqmed.prior.model import LN2, Level, PriorModel

__all__ = ["load_prior", "store_levels", "train_prior", "unigram_bits", "validation_split"]

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
FINAL = "final.pt"
KIND = "vqmed-prior"


def store_levels(store: ExportStore) -> list[Level]:
    """The code levels of a store: ``codes`` (and ``codes_top`` of a two-level model), their shapes and K."""
    arrays = store.meta.get("arrays", {})
    levels = [Level("codes", tuple(arrays["codes"]["shape"]), int(store.codebook.shape[0]))]
    if "codes_top" in arrays and store.codebook_top is not None:
        levels.append(Level("codes_top", tuple(arrays["codes_top"]["shape"]), int(store.codebook_top.shape[0])))
    return levels


def validation_split(index: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the rows whose patients (the store's salted ``patient_key``) are held out."""
    frame = pd.DataFrame({"patient_id": index["patient_key"].astype(str).to_numpy(), "study_id": index["key"].to_numpy(),
                          "position": np.arange(len(index))})
    _, val = split_by_patient(frame, fraction, seed)
    mask = np.zeros(len(index), dtype=bool)
    mask[val["position"].to_numpy()] = True
    return mask


def unigram_bits(train: np.ndarray, val: np.ndarray, num_codes: int) -> float:
    """Bits per code of ``val`` under the code frequencies of ``train`` (add-one smoothed): the baseline a
    prior that ignores context reaches."""
    counts = np.bincount(train.reshape(-1).astype(np.int64), minlength=num_codes).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    return float(-log_p[val.reshape(-1).astype(np.int64)].mean())


def _level_arrays(store: ExportStore, levels: list[Level], rows: np.ndarray) -> dict[str, torch.Tensor]:
    return {lv.array: torch.from_numpy(store.array(lv.array)[rows].astype(np.int64)) for lv in levels}


def load_prior(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[PriorModel, dict[str, Any]]:
    """A trained prior (``DIR/final.pt``, else the newest checkpoint) in eval mode, and its checkpoint state."""
    directory = Path(directory)
    if (directory / FINAL).is_file():
        state = load_checkpoint(directory / FINAL, map_location)
    else:
        found = latest_checkpoint(directory / "checkpoints", map_location) if (directory / "checkpoints").is_dir() else None
        if found is None:
            raise CheckpointError(f"{directory}: no prior here (no {FINAL} or checkpoints/last.pt)")
        state = found[0]
    if state.get("kind") != KIND:
        raise CheckpointError(f"{directory}: not a prior checkpoint (kind {state.get('kind')!r})")
    model = PriorModel.from_description(state["prior"])
    model.load_state_dict(state["model_state"])
    return model.eval(), state


class PriorTrainer:
    """One prior training run; :func:`train_prior` is the public entry point."""

    def __init__(self, cfg: PriorConfig, resume: bool) -> None:
        self.cfg = cfg
        self.rt = init_runtime(cfg.train.device)
        self.device = self.rt.device
        torch.set_num_threads(cfg.train.threads or default_threads(self.rt))
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        found = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
        if not resume and (found is not None or (self.out / RUN_FILE).exists()):
            raise ConfigError(f"{self.out} already holds a prior run; pass --resume to continue it or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        remove_stale_temporaries(self.ckpt_dir)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self._load_codes()
        self.model = PriorModel(self.levels, cfg.net.attn_layers_dim, cfg.net.attn_layers_depth,
                                cfg.net.attn_layers_heads, cfg.net.embedding_dropout_rate, cfg.net.ordering).to(self.device)
        self.steps_per_epoch = max(1, self.n_train // cfg.train.batch_size)
        planned = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(planned, cfg.train.max_steps) if cfg.train.max_steps else planned
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.epoch = 0, 0
        self.history: dict[str, list[list[float]]] = {}
        self.run_id: str | None = None
        self.seconds = 0.0
        if found is not None:
            self._restore(found[0], found[1])

    # ------------------------------------------------------------------------------------------ set-up
    def _load_codes(self) -> None:
        cfg = self.cfg
        self.store = load(cfg.export)
        index = self.store.index
        rows = np.flatnonzero((index["split"].astype(str) == cfg.split).to_numpy()) if "split" in index.columns else np.array([])
        if len(rows) < 2:
            raise ConfigError(f"split: the store {cfg.export} has {len(rows)} studies of split {cfg.split!r}")
        self.levels = store_levels(self.store)
        is_val = validation_split(index.iloc[rows].reset_index(drop=True), cfg.train.val_fraction, cfg.seed)
        self.train_rows, self.val_rows = rows[~is_val], rows[is_val]
        self.train_codes = _level_arrays(self.store, self.levels, self.train_rows)
        self.val_codes = _level_arrays(self.store, self.levels, self.val_rows)
        self.n_train = len(self.train_rows)
        if self.n_train < self.cfg.train.batch_size:
            raise ConfigError(f"train.batch_size: {self.cfg.train.batch_size} is more than the {self.n_train} training code maps")
        # the baseline: every level's unigram code lengths, weighted by its share of the codes
        total = sum(lv.length for lv in self.levels)
        self.unigram = sum(unigram_bits(self.train_codes[lv.array].numpy(), self.val_codes[lv.array].numpy(), lv.num_codes)
                           * lv.length / total for lv in self.levels)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 5% of the peak."""
        warmup = self.cfg.train.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        if state.get("kind") != KIND:
            raise CheckpointError(f"{path}: not a prior checkpoint")
        if state["prior"] != self.model.describe():
            raise ConfigError(f"net: the checkpoint {path} holds another prior ({state['prior']}); resume with the same config")
        if state["export"]["model_id"] != self.store.meta.get("model_id"):
            raise ConfigError(f"export: the checkpoint {path} was trained on codes of another model; resume on the same store")
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.history = {k: [list(map(float, p)) for p in v] for k, v in state["history"].items()}
        self.run_id = state.get("mlflow_run_id")
        self.seconds = float(state.get("seconds", 0.0))
        set_rng_state(state["rng"])
        print(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    # ---------------------------------------------------------------------------------------- tracking
    def _start_tracking(self) -> None:
        from vqmed.tracking import log_params, set_tags, setup_mlflow, start_run

        setup_mlflow(self.cfg.tracking.tracking_uri, self.cfg.tracking.experiment)
        run_file = self.out / RUN_FILE
        # the run of the checkpoint, else the one a run killed before its first checkpoint recorded
        self.run_id = self.run_id or (json.loads(run_file.read_text())["mlflow_run_id"] if run_file.exists() else None)
        if self.run_id:
            start_run(run_id=self.run_id)
            return
        self.run_id = start_run(run_name=self.cfg.name).info.run_id
        atomic_write_json(run_file, {"mlflow_run_id": self.run_id})
        log_params(to_dict(self.cfg))
        log_params({"resolved.total_steps": self.total_steps, "resolved.train_studies": self.n_train,
                    "resolved.val_studies": len(self.val_rows), "resolved.parameters": sum(p.numel() for p in self.model.parameters()),
                    "resolved.levels": ",".join(f"{lv.array}:{'x'.join(map(str, lv.shape))}/K={lv.num_codes}" for lv in self.levels)})
        set_tags({"export_model_id": self.store.meta.get("model_id"), "export_codebook_hash": self.store.meta.get("codebook_hash"),
                  "pretrain_run_id": self.store.meta.get("pretrain_run_id")})

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from vqmed.tracking import log_metrics

        for name, value in metrics.items():
            self.history.setdefault(name, []).append([float(step), float(value)])
        log_metrics(metrics, step=step)

    # -------------------------------------------------------------------------------------- checkpoints
    def _state(self, with_optimizer: bool = True) -> dict[str, Any]:
        state = {
            "kind": KIND,
            "prior": self.model.describe(),
            "model_state": self.model.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "rng": rng_state(),
            "history": self.history,
            "mlflow_run_id": self.run_id,
            "seconds": self.seconds,
            "config": to_dict(self.cfg),
            "unigram_bits_per_code": self.unigram,
            "export": {"directory": str(Path(self.cfg.export).resolve()), "model_id": self.store.meta.get("model_id"),
                       "codebook_hash": self.store.meta.get("codebook_hash")},
        }
        if with_optimizer:
            state["optimizer_state"] = self.optimizer.state_dict()
            state["scheduler_state"] = self.scheduler.state_dict()
        return state

    def _checkpoint(self) -> None:
        save_checkpoint(self._state(), self.ckpt_dir)

    # ----------------------------------------------------------------------------------------- training
    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's batch order: a permutation seeded by (seed, epoch), so a resumed run sees the same one."""
        return torch.randperm(self.n_train, generator=torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch))

    def validate(self) -> float:
        """Validation bits per code (every level's codes together), the model in eval mode."""
        self.model.eval()
        total_nats, count = 0.0, 0
        n = len(self.val_rows)
        with torch.no_grad():
            for start in range(0, n, 128):
                batch = {k: v[start:start + 128].to(self.device) for k, v in self.val_codes.items()}
                loss, _ = self.model.loss(batch)
                size = next(iter(batch.values())).shape[0]
                total_nats += float(loss) * size
                count += size
        self.model.train()
        return total_nats / max(1, count) / LN2

    def run(self) -> dict[str, Any]:
        cfg = self.cfg.train
        self._start_tracking()
        if self.step == 0:
            self._log({"val/bits_per_code": self.validate(), "val/unigram_bits_per_code": self.unigram}, 0)
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
        bar = None
        if not os.environ.get("CI"):
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="prior", unit="step", dynamic_ncols=True)
        self.model.train()
        tick = time.perf_counter()
        try:
            while self.step < self.total_steps:
                order = self._order(self.epoch)
                skip = self.step - self.epoch * self.steps_per_epoch
                for b in range(skip, self.steps_per_epoch):
                    pick = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    batch = {k: v[pick].to(self.device) for k, v in self.train_codes.items()}
                    loss, parts = self.model.loss(batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.step += 1
                    now = time.perf_counter()
                    self.seconds += now - tick
                    tick = now
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(bits=f"{loss.item() / LN2:.3f}")
                    if self.step % cfg.log_every == 0:
                        metrics = {"train/bits_per_code": loss.item() / LN2, "train/lr": self.scheduler.get_last_lr()[0]}
                        metrics.update({f"train/bits_{k.split('/')[1]}": float(v) / LN2 for k, v in parts.items()})
                        self._log(metrics, self.step)
                    last = self.step >= self.total_steps or (deadline is not None and time.monotonic() > deadline)
                    if self.step % cfg.val_every == 0 or last:
                        self._log({"val/bits_per_code": self.validate(), "val/unigram_bits_per_code": self.unigram}, self.step)
                        tick = time.perf_counter()  # validation time is not training time
                    if b + 1 == self.steps_per_epoch:
                        self.epoch += 1
                    if self.step % cfg.checkpoint_every == 0 or last:
                        self._checkpoint()
                        tick = time.perf_counter()
                    if last:
                        break
                if deadline is not None and time.monotonic() > deadline:
                    break
        finally:
            if bar is not None:
                bar.close()
        return self._finish()

    # ------------------------------------------------------------------------------------------ the end
    def _finish(self) -> dict[str, Any]:
        from vqmed.tracking import end_run, log_artifact, log_figure, log_metrics, loss_curves

        from vqmed.prior.sample import log_samples

        self.model.eval()
        val_bits = self.history["val/bits_per_code"][-1][1] if self.history.get("val/bits_per_code") else self.validate()
        final = self.out / FINAL
        atomic_save({"format": "vqmed-checkpoint-v1", **self._state(with_optimizer=False)}, final)
        log_artifact(final, artifact_path="checkpoints")
        figures = self.out / "figures"
        figures.mkdir(exist_ok=True)
        curves = loss_curves(self.history, title=f"Prior over {self.cfg.export}: bits per code")
        curves.savefig(figures / "prior_curves.png", dpi=120)
        log_figure(curves, "prior_curves.png")
        sample_files = log_samples(self.model, self.store, self.cfg.sample, figures, self.cfg.seed, self.device)
        summary = {
            "val_bits_per_code": val_bits,
            "unigram_bits_per_code": self.unigram,
            "improvement_over_unigram": 1.0 - val_bits / self.unigram,
            "steps": self.step,
            "epochs": self.epoch,
            "train_seconds": round(self.seconds, 1),
            "train_studies": self.n_train,
            "val_studies": int(len(self.val_rows)),
            "levels": self.model.describe()["levels"],
            "prior_id": self.model.fingerprint(),
            "mlflow_run_id": self.run_id,
            "checkpoint": str(final.resolve()),
            "figures": [str(p) for p in sample_files],
        }
        log_metrics({"final/val_bits_per_code": val_bits, "final/improvement_over_unigram": summary["improvement_over_unigram"]},
                    step=self.step)
        atomic_write_json(self.out / SUMMARY_FILE, summary)
        log_artifact(self.out / SUMMARY_FILE)
        end_run()
        return summary


def train_prior(cfg: PriorConfig, resume: bool = False) -> dict[str, Any]:
    """Train the configured prior on its export's codes; returns the summary (also ``OUT/summary.json``)."""
    return PriorTrainer(cfg, resume).run()
