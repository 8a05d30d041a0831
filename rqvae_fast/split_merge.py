"""Split-merge moves: a way out of the local minima where Lloyd's k-means stops.

Lloyd only moves each centroid to the mean of its rows, so a converged k-means can keep one
centroid on two real clusters while two other centroids share one cluster: no single Lloyd step
undoes that. A *move* does: merge two codes ``i, j`` into one (the weighted mean of their
centroids) and use the freed code to split another code ``k`` in two (the means of a 2-means
partition of its rows). Both changes of the inertia (the sum of squared distances) are exact
between-group terms:

- merging ``i`` and ``j`` adds ``n_i n_j / (n_i + n_j) * ||m_i - m_j||^2``;
- splitting ``k`` into parts ``a, b`` removes ``n_a n_b / n_k * ||m_a - m_b||^2``;

so a move whose gain exceeds its cost lowers the inertia before any reassignment, and the Lloyd
iterations after it lower it further. :func:`split_merge` finds such moves; ``kmeans._lloyd``
tries them where Lloyd has converged.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .assign import row_sq_norms

SPLIT_CANDIDATES = 64  # 2-means is tried on at most this many codes (largest squared error first)
SPLIT_ITERS = 6  # Lloyd iterations of each 2-means


def merge_costs(centroids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(K, K)`` fp32: the inertia that merging codes ``i`` and ``j`` adds,
    ``n_i n_j / (n_i + n_j) ||c_i - c_j||^2``, for ``centroids (K, D)`` the means of their
    ``counts (K,)`` rows; ``inf`` on the diagonal and for empty codes."""
    sq = centroids.pow(2).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * centroids @ centroids.t()).clamp_min_(0.0)
    total = counts[:, None] + counts[None, :]
    cost = counts[:, None] * counts[None, :] / total.clamp_min(1.0) * dist
    cost = cost.masked_fill(counts[:, None] * counts[None, :] == 0, float("inf"))
    return cost.fill_diagonal_(float("inf"))


def two_means(rows: torch.Tensor, row_sq: torch.Tensor, iters: int = SPLIT_ITERS
              ) -> Tuple[float, torch.Tensor]:
    """2-means of ``rows (n, D)`` fp32 (``row_sq (n,)`` their squared norms), seeded by the row
    farthest from their mean and the row farthest from that one. Returns ``(gain, means (2, D))``:
    the inertia the split removes, ``n_a n_b / n ||m_a - m_b||^2``, and the two part means (gain
    0 when the rows do not split). Deterministic (no random draws)."""
    n = rows.shape[0]
    if n < 2:
        return 0.0, rows.new_zeros((2, rows.shape[1]))
    total = rows.sum(dim=0)
    # farthest from c: the largest |x|^2 - 2 x.c (|c|^2 is the same for every row)
    first = rows[int((row_sq - (2.0 / n) * (rows @ total)).argmax())]
    second = rows[int((row_sq - 2.0 * (rows @ first)).argmax())]
    means = torch.stack([first, second])
    side = None
    for _ in range(iters):
        # nearer to the second mean: x . (b - a) > (|b|^2 - |a|^2) / 2
        new_side = rows @ (means[1] - means[0]) > 0.5 * (means[1].dot(means[1])
                                                         - means[0].dot(means[0]))
        if side is not None and torch.equal(new_side, side):
            break
        side = new_side
        n_b = int(side.sum())
        if n_b == 0 or n_b == n:
            return 0.0, means
        sum_b = side.to(rows.dtype) @ rows
        means = torch.stack([(total - sum_b) / (n - n_b), sum_b / n_b])
    n_b = float(side.sum())
    gain = (n - n_b) * n_b / n * float((means[1] - means[0]).pow(2).sum())
    return gain, means


def split_merge(points: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor,
                counts: torch.Tensor, min_gain: float = 0.0,
                row_sq: Optional[torch.Tensor] = None, max_merged: float = float("inf")
                ) -> Tuple[torch.Tensor, int]:
    """Apply every profitable split-merge move, each code in at most one.

    ``points (n, D)`` fp32, their ``codes (n,)`` int64, ``centroids (K, D)`` fp32 the means of
    those codes' rows, ``counts (K,)`` and ``row_sq (n,)`` the rows' squared norms (computed
    when not given). The :data:`SPLIT_CANDIDATES` codes with the largest
    squared error are split by :func:`two_means`, in that order; each takes the cheapest merge
    of two codes not yet used, together at most ``max_merged`` rows, whose cost is below its
    gain by more than ``min_gain``.
    Returns ``(centroids (K, D), moves made)``; a copy when a move was made."""
    num_codes = centroids.shape[0]
    if num_codes < 3 or points.shape[0] < 3:
        return centroids, 0
    cost = merge_costs(centroids, counts)
    if max_merged != float("inf"):
        cost = cost.masked_fill(counts[:, None] + counts[None, :] > max_merged, float("inf"))
    if not bool(torch.isfinite(cost).any()):
        return centroids, 0
    # squared error of every code about its mean: sum |x|^2 - n |m|^2 (ranks the candidates)
    if row_sq is None:
        row_sq = row_sq_norms(points)
    sse = torch.zeros(num_codes, dtype=torch.float64, device=points.device)
    sse.index_add_(0, codes, row_sq.double())
    sse -= counts.double() * centroids.double().pow(2).sum(dim=1)
    cheapest = float(cost.min())
    order = torch.argsort(codes)
    starts = torch.cumsum(counts.long(), 0) - counts.long()
    candidates = torch.argsort(sse, descending=True)[:SPLIT_CANDIDATES].tolist()
    sse_host, starts_host, counts_host = sse.tolist(), starts.tolist(), counts.long().tolist()
    used = set()  # codes already in a move: their rows and columns of ``cost`` are inf
    updated, moves = centroids, 0
    for code in candidates:
        if sse_host[code] <= cheapest + min_gain:
            break  # the gain of a split is at most the code's squared error
        if code in used or counts_host[code] < 2:
            continue
        lo = starts_host[code]
        members = order[lo:lo + counts_host[code]]
        gain, halves = two_means(points.index_select(0, members), row_sq.index_select(0, members))
        # the cheapest merge of two other codes: hide this code's row and column, then put back
        saved_row, saved_col = cost[code].clone(), cost[:, code].clone()
        cost[code, :] = float("inf")
        cost[:, code] = float("inf")
        first, second = divmod(int(cost.argmin()), num_codes)
        merge_cost = float(cost[first, second])
        cost[code, :] = saved_row
        cost[:, code] = saved_col
        if not gain > merge_cost + min_gain:
            continue
        if moves == 0:
            updated = centroids.clone()
        total = counts[first] + counts[second]
        updated[first] = (counts[first] * centroids[first] + counts[second] * centroids[second]) \
            / total
        updated[second] = halves[0]
        updated[code] = halves[1]
        for index in (first, second, code):
            used.add(index)
            cost[index, :] = float("inf")
            cost[:, index] = float("inf")
        moves += 1
    return updated, moves


__all__: List[str] = ["merge_costs", "two_means", "split_merge", "SPLIT_CANDIDATES",
                      "SPLIT_ITERS"]
