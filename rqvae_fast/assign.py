"""Nearest-centroid assignment with plain PyTorch ops, chunked over rows (memory bounded).

``addmm`` computes ``||c||^2 + bias - 2 x.c`` for a chunk of rows, ``min`` picks the code; the row
norm ``||x||^2`` is added back only to report distances. Used by the k-means iterations (with an
optional per-code size penalty ``bias``) and by beam search, where candidate scores must be
combined across layers and the fused quantizer's greedy pass does not apply.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

CHUNK_ELEMENTS = 1 << 22  # rows x codes scored at a time (16 MiB of fp32 scores)


def chunk_rows(num_codes: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that a chunk's ``(rows, num_codes)`` score matrix holds ``elements``."""
    return max(1, elements // max(1, num_codes))


def sq_distances(x: torch.Tensor, centroids: torch.Tensor,
                 centroid_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(n, K)`` fp32 squared distances ``||x_i - c_k||^2`` (clamped at 0) of ``x (n, D)`` to
    ``centroids (K, D)``; ``centroid_sq (K,)`` may pass precomputed ``||c_k||^2``."""
    if centroid_sq is None:
        centroid_sq = centroids.pow(2).sum(dim=1)
    scores = torch.addmm(centroid_sq[None, :], x, centroids.t(), alpha=-2.0)
    return scores.add_(x.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0.0)


@torch.no_grad()
def nearest(x: torch.Tensor, centroids: torch.Tensor, bias: Optional[torch.Tensor] = None,
            row_sq: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(codes (N,) int64, sq_dist (N,) fp32)``: per row of ``x (N, D)`` the code minimising
    ``||x - c_k||^2 + bias_k`` over ``centroids (K, D)`` (``bias (K,)``, default 0; ties to the
    lowest code) and that row's squared distance to it (without the bias). ``row_sq (N,)`` may
    pass precomputed ``||x||^2`` (k-means iterations reuse it)."""
    n = x.shape[0]
    codes = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    offset = centroids.pow(2).sum(dim=1)
    if bias is not None:
        offset = offset + bias
    step = chunk_rows(centroids.shape[0])
    for lo in range(0, n, step):
        rows = x[lo:lo + step]
        scores = torch.addmm(offset[None, :], rows, centroids.t(), alpha=-2.0)
        best, idx = scores.min(dim=1)
        if bias is not None:
            best = best - bias.index_select(0, idx)
        codes[lo:lo + step] = idx
        norms = rows.pow(2).sum(dim=1) if row_sq is None else row_sq[lo:lo + step]
        dist[lo:lo + step] = (best + norms).clamp_min_(0.0)
    return codes, dist


def code_sums(x: torch.Tensor, codes: torch.Tensor, num_codes: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(counts (K,) fp32, sums (K, D) fp32)`` of the rows of ``x (N, D)`` per code ``codes (N,)``.

    On CPU the rows are sorted by code and summed per segment (``index_add_`` with many repeated
    indices is several times slower there); elsewhere ``index_add_``."""
    counts = torch.bincount(codes, minlength=num_codes)
    if x.device.type == "cpu" and x.shape[0] > 0 and hasattr(torch, "segment_reduce"):
        order = torch.argsort(codes)
        sums = torch.segment_reduce(x.index_select(0, order), "sum", lengths=counts, axis=0)
        sums = torch.nan_to_num(sums, nan=0.0)  # empty segments are 0 (not NaN) by contract
    else:
        sums = torch.zeros((num_codes, x.shape[1]), dtype=x.dtype, device=x.device)
        sums.index_add_(0, codes, x)
    return counts.to(torch.float32), sums


__all__ = ["CHUNK_ELEMENTS", "chunk_rows", "code_sums", "nearest", "sq_distances"]
