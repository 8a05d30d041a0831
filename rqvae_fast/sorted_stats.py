"""Per-code statistics without floating-point atomics, for ``deterministic=True``.

The fused kernel scatters each row's residual into its code's sum with atomic adds, whose order,
and so whose rounding, varies from run to run on a GPU. Here rows are instead sorted by code
(stable sort) and each code's sum is the difference of a float64 running sum at the code's segment
ends: bit-identical across runs, at the price of rebuilding every layer's residual ``(N, D)``,
a sort per layer and the float64 scan.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .routing import SEED


def sorted_code_statistics(x: torch.Tensor, codes: torch.Tensor, layer_sizes: Sequence[int],
                           indices: torch.Tensor, routing: int, active: Optional[int] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``counts (K_total,)`` fp32 and ``sums (K_total, D)`` fp32 of the residuals each code took.

    x ``(N, D)``, codes ``(K_total, D)`` stacked, indices ``(N, L)`` int64 layer-local (-1 for
    non-finite rows); residuals are rebuilt with the forward kernel's own arithmetic. Only the
    first ``active`` layers (``None``: all) have statistics; the others' are zero.
    """
    codes32 = codes.float()
    num_active = len(layer_sizes) if active is None else active
    if num_active == 0 or indices.shape[0] == 0:
        return (torch.zeros(codes.shape[0], dtype=torch.float32, device=x.device),
                torch.zeros(codes.shape, dtype=torch.float32, device=x.device))
    finite = indices[:, 0] >= 0
    residual = torch.where(finite[:, None], x.float(), 0.0)
    counts, sums = [], []
    start = 0
    for layer, size in enumerate(layer_sizes):
        if layer >= num_active:
            counts.append(torch.zeros(size, dtype=torch.float32, device=x.device))
            sums.append(torch.zeros((size, x.shape[1]), dtype=torch.float32, device=x.device))
            continue
        local = indices[:, layer]
        key = torch.where(finite, local, size)  # non-finite rows sort into a trailing bucket
        order = torch.argsort(key, stable=True)
        # Segment bounds by binary search (static shapes, so it traces under torch.compile).
        bounds = torch.searchsorted(key[order], torch.arange(size + 1, device=key.device))
        running = torch.cat([residual.new_zeros((1, residual.shape[1]), dtype=torch.float64),
                             residual.index_select(0, order).double().cumsum(dim=0)])
        sums.append((running[bounds[1:]] - running[bounds[:-1]]).float())
        counts.append((bounds[1:] - bounds[:-1]).float())

        chosen = codes32[start:start + size].index_select(0, local.clamp(min=0))
        chosen = torch.where(finite[:, None], chosen, 0.0)
        if routing == SEED:
            residual = residual - (residual + (chosen - residual))
        else:
            residual = residual - chosen
        start += size
    return torch.cat(counts), torch.cat(sums)
