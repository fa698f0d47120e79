"""Collectives for distributed calibration (``torchrun``): an all-reduce that is a no-op in one process.

Observers, GPTQ, the scale search and bias correction sum or bound their statistics across processes
with :func:`all_reduce_`, so that every process ends with what one process would compute on all the
batches (see :mod:`models.ptq.observers`). :func:`first_error_everywhere` lets a step that failed in
one process (no readable image in its share) fail in every process at once, with one message, instead
of leaving the others waiting in the next collective until the process group times out.
:func:`gather_batches` gives every process all the batches the processes hold, in one process's order
(block reconstruction learns on all the calibration images in every process).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_reduce_", "first_error_everywhere", "gather_batches", "is_distributed"]


def is_distributed() -> bool:
    """True inside a torch.distributed process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def all_reduce_(t: Tensor, op: str) -> Tensor:
    """In-place all-reduce (``"min"``, ``"max"`` or ``"sum"``) across the process group; a no-op in one process."""
    if is_distributed():
        torch.distributed.all_reduce(t, op={"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX,
                                            "sum": torch.distributed.ReduceOp.SUM}[op])  # fmt: skip
    return t


def first_error_everywhere(message: str | None) -> str | None:
    """This step's error as every process sees it: the first failing process's message (prefixed with its
    rank) in every process, None when none failed. One process: ``message`` itself. Every process must
    call it at the same step."""
    if not is_distributed():
        return message
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, message)
    return next((f"process {rank}: {m}" for rank, m in enumerate(parts) if m is not None), None)


def gather_batches(batches: list[Tensor]) -> list[Tensor]:
    """Every process's batches, in every process, in the order one process would have read them: the
    shards are whole batches dealt round-robin (utils.distributed.shard_batches), so process 0's first,
    process 1's first, ..., process 0's second, ... One process: ``batches`` itself."""
    if not is_distributed():
        return batches
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, [b.cpu() for b in batches])  # gloo and NCCL alike
    device = batches[0].device if batches else torch.device("cpu")
    longest = max(len(part) for part in parts)
    return [part[i].to(device) for i in range(longest) for part in parts if i < len(part)]
