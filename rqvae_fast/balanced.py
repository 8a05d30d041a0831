"""Size-balanced residual codes for a whole catalogue (capacity-constrained assignment).

Greedy encoding gives every row its nearest code independently, so dense regions pile many items
onto one full ID. :func:`balanced_encode` assigns a set of rows jointly at the last layer (every
layer with ``all_layers=True``): within a group of rows sharing the codes chosen so far (the ID
prefix), a code accepts at most
``capacity = max(1, ceil(slack * group_size / K))`` rows. Rows claim their ``candidates``
nearest codes in turn (round ``r`` offers every row still unplaced its ``r``-th nearest code; a
code with room takes the closest claimants first); a row whose candidates are all full takes its
nearest code. At the last layer groups are small, so the capacity is mostly 1 and colliding
items spread to their next-nearest free codes: fewer collisions for a little more error.

The codes depend on the whole set (that is the point); encoding one new item later with the
plain nearest-code rule may give it another ID.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch

from .assign import chunk_rows, sq_distances
from .beam import _check

BALANCE_SLACK = 1.5  # a code may take 1.5x its even share of a prefix group
BALANCE_CANDIDATES = 8  # nearest codes a row may claim before it falls back to its nearest


def _candidates(residual: torch.Tensor, book: torch.Tensor, count: int):
    """``(codes (N, count) int64, sq_dist (N, count))``: each row's ``count`` nearest codes."""
    n = residual.shape[0]
    codes = torch.empty((n, count), dtype=torch.int64)
    dist = torch.empty((n, count), dtype=torch.float32)
    step = chunk_rows(book.shape[0])
    book_sq = book.pow(2).sum(dim=1)
    for lo in range(0, n, step):
        scores = sq_distances(residual[lo:lo + step], book, book_sq)
        # stable sort: ties go to the lowest code, as in greedy encoding
        order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        codes[lo:lo + step] = order.cpu()
        dist[lo:lo + step] = scores.gather(1, order).cpu()
    return codes.numpy(), dist.numpy()


def capacity_assign(groups: np.ndarray, cand_codes: np.ndarray, cand_dist: np.ndarray,
                    num_codes: int, slack: float = BALANCE_SLACK) -> np.ndarray:
    """``(N,)`` int64 codes: rows in ``groups (N,)`` (int64 prefix ids) claim their candidate
    codes ``cand_codes (N, C)`` (nearest first, squared distances ``cand_dist (N, C)``) under a
    per-(group, code) capacity ``max(1, ceil(slack * group_size / num_codes))``."""
    n, rounds = cand_codes.shape
    _, group_idx, group_size = np.unique(groups, return_inverse=True, return_counts=True)
    group_idx = group_idx.reshape(-1)
    capacity = np.maximum(1, np.ceil(slack * group_size / num_codes)).astype(np.int64)
    cells = group_idx[:, None].astype(np.int64) * num_codes + cand_codes
    cell_ids, cell_of = np.unique(cells, return_inverse=True)
    cell_of = cell_of.reshape(n, rounds)
    load = np.zeros(cell_ids.size, dtype=np.int64)
    cell_cap = capacity[cell_ids // num_codes]
    chosen = np.full(n, -1, dtype=np.int64)
    for r in range(rounds):
        rows = np.flatnonzero(chosen < 0)
        if rows.size == 0:
            break
        cell = cell_of[rows, r]
        order = np.lexsort((rows, cand_dist[rows, r], cell))  # by cell, then distance, then row
        cell_sorted = cell[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = cell_sorted[1:] != cell_sorted[:-1]
        starts = np.flatnonzero(first)
        rank = np.arange(order.size) - np.repeat(starts, np.diff(np.append(starts, order.size)))
        take = load[cell_sorted] + rank < cell_cap[cell_sorted]
        won = order[take]
        chosen[rows[won]] = cand_codes[rows[won], r]
        np.add.at(load, cell[won], 1)
    unplaced = chosen < 0
    chosen[unplaced] = cand_codes[unplaced, 0]
    return chosen


@torch.no_grad()
def balanced_encode(x: torch.Tensor, codebooks: Sequence[torch.Tensor], *,
                    slack: float = BALANCE_SLACK, candidates: int = BALANCE_CANDIDATES,
                    all_layers: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-balanced codes of the set ``x (N, D)``: ``(indices (N, L) int64, sq_error (N,) fp32)``
    on ``x``'s device; see the module docstring. ``slack >= 1`` (inf: greedy encoding).
    By default only the last layer is constrained (it decides collisions; earlier layers are
    greedy); ``all_layers=True`` constrains every layer (more even prefixes, more error)."""
    if not slack >= 1.0:
        raise ValueError(f"slack must be >= 1, got {slack}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    points, books = _check(x, codebooks, 1)
    n = points.shape[0]
    residual = points.clone()
    groups = np.zeros(n, dtype=np.int64)
    codes = []
    for layer, book in enumerate(books):
        size = book.shape[0]
        cand_codes, cand_dist = _candidates(residual, book, min(candidates, size))
        if math.isinf(slack) or (not all_layers and layer < len(books) - 1):
            chosen = cand_codes[:, 0]
        else:
            chosen = capacity_assign(groups, cand_codes, cand_dist, size, slack)
        code = torch.from_numpy(chosen).to(points.device)
        residual -= book.index_select(0, code)
        codes.append(code)
        _, groups = np.unique(groups * size + chosen, return_inverse=True)
        groups = groups.reshape(-1).astype(np.int64)
    indices = torch.stack(codes, dim=1) if n else torch.empty((0, len(books)), dtype=torch.int64,
                                                               device=points.device)
    return indices, residual.pow(2).sum(dim=1)


__all__ = ["BALANCE_CANDIDATES", "BALANCE_SLACK", "balanced_encode", "capacity_assign"]
