"""Data parallelism with torch.distributed: ``torchrun --nproc-per-node N test_qvit.py ...``.

Every process runs the same script on its own share of the images: whole batches dealt round-robin
(:func:`shard_batches`), so each process sees exactly the batches a single process would have seen, and
no image twice. Calibration combines the processes' statistics inside the observers (min/max and
histogram counts all-reduced; see :mod:`models.ptq.observers`), so the scales equal a single process's;
evaluation results are gathered on rank 0 (:func:`gather_eval`), which alone prints and writes the run
folder. NCCL on CUDA devices (one GPU per process, ``LOCAL_RANK``), gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from utils.errors import UserError

__all__ = ["Dist", "check_same_everywhere", "gather_calibration", "gather_eval", "process_group", "shard_batches"]

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """Join the process group torchrun describes in the environment (a no-op for a plain ``python`` run).

    Yields the process's place and its device: ``cuda:LOCAL_RANK`` for a CUDA device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist(), device
        return
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun process {rank} wants cuda:{local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    try:
        yield Dist(rank, world, local_rank), device
    finally:
        dist.destroy_process_group()


def shard_batches(items: Sequence[T], batch_size: int, rank: int, world: int) -> list[T]:
    """This process's share of ``items``: the whole batches ``rank, rank + world, ...`` of ``batch_size``."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if len(batches) < world:
        raise UserError(f"{len(items)} images make {len(batches)} batch(es) of {batch_size}, fewer than the {world} processes")
    return [item for batch in batches[rank::world] for item in batch]


def _gather(obj: T, where: Dist) -> list[T]:
    """``obj`` of every process, in rank order, on every process."""
    parts: list = [None] * where.world
    dist.all_gather_object(parts, obj)
    return parts


def check_same_everywhere(value: str, what: str, where: Dist) -> None:
    """Refuse to go on when the processes disagree on ``value`` (e.g. the fingerprint of their weights)."""
    if where.active and len(set(_gather(value, where))) > 1:
        raise UserError(f"the {where.world} torchrun processes have different {what}; give every process the same inputs")


def gather_calibration(result, where: Dist):
    """Every process gets the :class:`~utils.engine.CalibrationResult` of all: images and unreadable files
    summed, the slowest process's seconds, overall and per pass (the scales themselves are already combined by the observers)."""
    if not where.active:
        return result
    parts = _gather(result, where)
    return dataclasses.replace(
        result,
        images=sum(p.images for p in parts),
        unreadable=sum(p.unreadable for p in parts),
        seconds=max(p.seconds for p in parts),
        passes={name: max(p.passes[name] for p in parts) for name in result.passes},
    )


def gather_eval(result, where: Dist):
    """Rank 0 gets every process's :class:`~utils.engine.EvalResult` combined (others get None).

    Arrays are concatenated and sums added; timings are the slowest process's (they ran in parallel).
    A process whose evaluation found no readable image (None) contributes nothing.
    """
    if not where.active:
        return result
    parts = _gather(result, where)
    present = [p for p in parts if p is not None]
    if not where.main or not present:
        return None
    return dataclasses.replace(
        present[0],
        labels=np.concatenate([p.labels for p in present]),
        fp32_top5=np.concatenate([p.fp32_top5 for p in present]),
        int8_top5=np.concatenate([p.int8_top5 for p in present]),
        cosine_sum=sum(p.cosine_sum for p in present),
        unreadable=sum(p.unreadable for p in present),
        seconds_fp32=max(p.seconds_fp32 for p in present),
        seconds_int8=max(p.seconds_int8 for p in present),
        seconds_wall=max(p.seconds_wall for p in present),
        non_finite_fp32=sum(p.non_finite_fp32 for p in present),
        non_finite_int8=sum(p.non_finite_int8 for p in present),
    )
