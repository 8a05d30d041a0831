"""Keep codebooks identical across ranks with ``torch.distributed`` (no transport of our own).

EMA statistics of all layers are summed in ONE all-reduce per step. Nothing here runs a collective
when no process group is initialised or the world size is 1, and every collective is issued
unconditionally on every rank (an empty batch contributes zeros), so ranks cannot deadlock.

Helpers for data-dependent initialisation (k-means, dead-code re-seeding) move equal-size tensors
only (``all_gather`` of padded rows, coalesced ``broadcast``), so they also work with NCCL and with
ranks that hold different numbers of rows, including none.
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


def rank() -> int:
    """Rank in the default process group, 0 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


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


def all_gather_equal(tensor: torch.Tensor) -> torch.Tensor:
    """``(world, *tensor.shape)``: every rank's ``tensor`` (same shape and dtype on all ranks), in
    rank order; one ``all_gather``. Without a multi-rank group: ``tensor[None]``."""
    if world_size() == 1:
        return tensor.unsqueeze(0).clone()
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate ``rows (n_r, D)`` of every rank in rank order -> ``(sum_r n_r, D)`` on every
    rank; ``n_r`` may differ (0 included). Two collectives: the row counts, then the rows padded
    to the largest count. Without a multi-rank group: a copy of ``rows``."""
    if rows.dim() != 2:
        raise ValueError(f"all_gather_rows expects a 2-D (N, D) tensor, got shape {tuple(rows.shape)}")
    if world_size() == 1:
        return rows.clone()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = all_gather_equal(count).flatten().tolist()
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = all_gather_equal(padded)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)], dim=0)


@torch.no_grad()
def broadcast_coalesced_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Like :func:`broadcast_`, but one ``broadcast`` per dtype for all ``tensors`` together."""
    if world_size() == 1 or not tensors:
        return
    groups: dict = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        for tensor, piece in zip(group, flat.split([t.numel() for t in group])):
            tensor.copy_(piece.view_as(tensor))
