"""One code path for one process or many: torchrun environment, device choice, resumable sampling."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class Runtime:
    """Where this process runs.

    Args:
        rank: global rank (0 when not distributed).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: the torch device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str = "auto") -> Runtime:
    """Join the process group when started by ``torchrun`` (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def default_threads(runtime: Runtime) -> int:
    """Intra-op threads: the usable cores shared evenly by the processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(runtime.world_size)))
    return max(1, cores // max(1, local_world))


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True on every rank if ``flag`` is true on any rank (keeps ranks stepping in lock-step)."""
    if not runtime.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=runtime.device if runtime.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way, for exact resumption after a kill.

    The permutation of an epoch depends only on ``seed`` and the epoch (``set_epoch``), so a resumed
    run skips the ``skip_batches`` it already trained on and sees exactly the batches the uninterrupted
    run would have seen.

    Args:
        dataset: the dataset to sample from.
        runtime: process placement (rank, world size).
        batch_size: batch size per process (to convert skipped batches to samples).
        seed: base seed of the shuffling.
    """

    def __init__(self, dataset, runtime: Runtime, batch_size: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip_batches * self.batch_size :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip_batches * self.batch_size)
