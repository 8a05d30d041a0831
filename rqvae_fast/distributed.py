"""Keep codebooks identical across ranks with ``torch.distributed`` (no transport of our own).

EMA statistics of all layers are summed in ONE all-reduce per step. Nothing here runs a collective
when no process group is initialised or the world size is 1, and every collective is issued
unconditionally on every rank (an empty batch contributes zeros), so ranks cannot deadlock.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def world_size() -> int:
    """Size of the default process group, 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def should_sync(sync: Optional[bool]) -> bool:
    """``sync=None`` means: sync when running with more than one rank."""
    return (world_size() > 1) if sync is None else (bool(sync) and world_size() > 1)


def all_reduce_code_stats(
    counts: Sequence[torch.Tensor], sums: Sequence[torch.Tensor]
) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """Sum per-layer ``counts (K_l,)`` and ``sums (K_l, D)`` over ranks in one collective.

    Returns new tensors with the same shapes (the inputs are not modified).
    """
    sizes = [c.numel() for c in counts] + [s.numel() for s in sums]
    flat = torch.cat([c.reshape(-1).float() for c in counts] + [s.reshape(-1).float() for s in sums])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    pieces = flat.split(sizes)
    num = len(counts)
    new_counts = tuple(p.view_as(c) for p, c in zip(pieces[:num], counts))
    new_sums = tuple(p.view_as(s) for p, s in zip(pieces[num:], sums))
    return new_counts, new_sums


@torch.no_grad()
def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (no-op for one rank)."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=src)
