"""``residual_quantize(..., beam_size=B)`` with ``B > 1``: beam-search codes, then the usual values.

The codes come from :func:`rqvae_fast.beam.beam_encode` (pure PyTorch, chunked over rows; it keeps
the ``B`` paths of lowest squared reconstruction error per row across layers). **This is not in
the fused kernel**: the forward then gathers the chosen codes, sums the per-layer squared errors
and the per-code statistics with the PyTorch path (:mod:`rqvae_fast.torch_backend`, given the
indices instead of searching), and the backward is the usual one (the fused input-gradient kernel
on the Triton path), since it rebuilds everything from the saved indices.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from . import torch_backend
from .backend import search_operands
from .beam import beam_encode


def beam_indices(x: torch.Tensor, codes: torch.Tensor, layer_sizes: Sequence[int], beam_size: int,
                 active: int) -> torch.Tensor:
    """``(N, L)`` int64 layer-local beam-search codes of ``x (N, D)`` through the first ``active``
    codebooks of ``codes (K_total, D)`` (stacked); -1 for dropped layers and for rows holding
    NaN/Inf (searched as zero rows, then marked). Raises if an active codebook holds NaN/Inf."""
    n = x.shape[0]
    indices = torch.full((n, len(layer_sizes)), -1, dtype=torch.int64, device=x.device)
    if n == 0 or active == 0:
        return indices
    finite = torch.isfinite(x).all(dim=1)
    rows = torch.where(finite[:, None], x.float(), 0.0)
    books = list(codes.detach().float().split([int(s) for s in layer_sizes]))[:active]
    for layer, book in enumerate(books):
        if not bool(torch.isfinite(book).all()):
            raise ValueError(f"beam_size > 1 needs finite codebooks: codebook {layer} holds NaN/Inf")
    found, _ = beam_encode(rows, books, beam_size)
    indices[:, :active] = torch.where(finite[:, None], found, -1)
    return indices


def beam_forward(x: torch.Tensor, codes: torch.Tensor, layer_sizes: Sequence[int], *, routing: int,
                 beam_size: int, with_stats: bool, active: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward's outputs (``quantized, indices, sse, counts, sums``; see
    :func:`rqvae_fast.backend.forward_body`) for beam-search codes instead of greedy ones."""
    indices = beam_indices(x, codes, layer_sizes, beam_size, active)
    with torch.autocast(device_type=x.device.type, enabled=False):
        search_codes, sq_norms = search_operands(codes)
        return torch_backend.residual_quantize_forward(
            x, codes, search_codes, sq_norms, layer_sizes, routing=routing, precision="ieee",
            with_stats=with_stats, active=active, given_indices=indices)
