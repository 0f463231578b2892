"""Rank helpers for ``torchrun``: all rank logic of the project lives here.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper is a no-op for a single
process, so the same code runs on a laptop and under::

    torchrun --nproc_per_node 2 -m purchase_intent.cli train --model transformer
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank, local rank and world size, from the process group or torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_world_size())
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))


def is_main() -> bool:
    return dist_info().rank == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)


def setup(device: str = "cpu") -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA). Idempotent."""
    info = dist_info()
    if info.is_distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(info.local_rank)
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(values: np.ndarray, op: str = "sum") -> np.ndarray:
    """``values`` summed (``op="sum"``) or maxed (``"max"``) over the ranks; itself in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    backend_cuda = dist.get_backend() == "nccl"
    t = torch.as_tensor(np.asarray(values, dtype=np.float64))
    t = t.to(f"cuda:{dist_info().local_rank}") if backend_cuda else t
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().numpy()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when distributed, else `model` itself."""
    if not dist_info().is_distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


class ShardedBatches:
    """Global batches of row indices, each split into one contiguous local shard per rank.

    Like ``DistributedSampler`` + ``BatchSampler``: every rank draws the same permutation
    (seeded by ``seed`` and the epoch set with :meth:`set_epoch`), cuts it into global batches of
    ``batch_size`` and takes its slice of each, so one step of W processes sees exactly the
    global batch one process would. A last global batch smaller than W is dropped when W > 1.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        info = dist_info()
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank = info.rank if rank is None else rank
        self.world_size = info.world_size if world_size is None else world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        batches = [order[i: i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.world_size > 1 and batches and len(batches[-1]) < self.world_size:
            batches.pop()
        return batches

    def __iter__(self):
        for b in self.global_batches():
            # (local indices, global batch size): the loss is scaled by local/global share
            yield np.array_split(b, self.world_size)[self.rank], len(b)

    def __len__(self) -> int:
        return len(self.global_batches())
