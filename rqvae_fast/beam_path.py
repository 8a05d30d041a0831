"""``residual_quantize(..., beam_size=B)`` with ``B > 1``: beam-search codes, then the usual values.

The codes keep the ``B`` paths of lowest squared reconstruction error per row across layers. On
a CUDA device with Triton and ``B <= 8`` they come from the beam-search kernel
(:func:`rqvae_fast.kernels.beam_search.beam_search`: every layer in one launch, fp32 ``"ieee"``
scores, path residuals in a small per-program scratch); elsewhere (CPU, larger beams) from
:func:`rqvae_fast.beam.beam_encode` (pure PyTorch, chunked over rows). Both rank candidates and
break ties the same way; ``layer_weights`` switches both to vector-quantize-pytorch's ranking
(a path scored by its weighted per-layer errors, see :mod:`rqvae_fast.beam`). The forward then gathers the chosen codes, sums the per-layer squared
errors and the per-code statistics with the PyTorch path (:mod:`rqvae_fast.torch_backend`, given
the indices instead of searching), and the backward is the usual one (the fused input-gradient
kernel on the Triton path), since it rebuilds everything from the saved indices.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import torch_backend
from ._triton_available import HAS_TRITON
from .backend import search_operands
from .beam import beam_encode

KERNEL_MAX_BEAM = 8  # the beam kernel's largest beam (rqvae_fast.kernels.config.MAX_BEAM)


def use_beam_kernel(x: torch.Tensor, beam_size: int, triton_path: Optional[bool] = None) -> bool:
    """Whether the beam kernel encodes ``x``: a CUDA tensor, Triton installed, ``beam_size <= 8``
    and ``triton_path`` not ``False`` (``None``: decided by the device alone)."""
    if triton_path is False or not HAS_TRITON or beam_size > KERNEL_MAX_BEAM:
        return False
    return x.device.type == "cuda" if triton_path is None else True


def encode_paths(rows: torch.Tensor, books: Sequence[torch.Tensor], beam_size: int,
                 triton_path: Optional[bool] = None, layer_weights: Optional[Sequence[float]] = None
                 ) -> torch.Tensor:
    """``(N, L)`` int64 beam-search codes of finite ``rows (N, D)``: the kernel where
    :func:`use_beam_kernel` says so, else :func:`rqvae_fast.beam.beam_encode`; ``layer_weights``
    (``None`` or ``L`` positive floats) as theirs."""
    if use_beam_kernel(rows, beam_size, triton_path):
        from .kernels.beam_search import beam_search

        return beam_search(rows, books, beam_size, layer_weights=layer_weights)[0]
    return beam_encode(rows, books, beam_size, layer_weights=layer_weights)[0]


def beam_indices(x: torch.Tensor, codes: torch.Tensor, layer_sizes: Sequence[int], beam_size: int,
                 active: int, triton_path: Optional[bool] = None,
                 layer_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``(N, L)`` int64 layer-local beam-search codes of ``x (N, D)`` through the first ``active``
    codebooks of ``codes (K_total, D)`` (stacked); -1 for dropped layers and for rows holding
    NaN/Inf (searched as zero rows, then marked). Raises if an active codebook holds NaN/Inf.
    ``triton_path``: see :func:`use_beam_kernel`; ``layer_weights``: ``None`` or one per layer of
    ``layer_sizes`` (the first ``active`` rank the search, see :mod:`rqvae_fast.beam`)."""
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
    weights = None if layer_weights is None else tuple(layer_weights)[:active]
    found = encode_paths(rows, books, beam_size, triton_path, weights)
    indices[:, :active] = torch.where(finite[:, None], found, -1)
    return indices


def beam_forward(x: torch.Tensor, codes: torch.Tensor, layer_sizes: Sequence[int], *, routing: int,
                 beam_size: int, with_stats: bool, active: int, triton_path: Optional[bool] = None,
                 layer_weights: Optional[Sequence[float]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward's outputs (``quantized, indices, sse, counts, sums``; see
    :func:`rqvae_fast.backend.forward_body`) for beam-search codes instead of greedy ones.
    ``triton_path``: see :func:`use_beam_kernel` (``None``: the kernel on CUDA);
    ``layer_weights``: see :func:`beam_indices`."""
    indices = beam_indices(x, codes, layer_sizes, beam_size, active, triton_path, layer_weights)
    with torch.autocast(device_type=x.device.type, enabled=False):
        search_codes, sq_norms = search_operands(codes)
        return torch_backend.residual_quantize_forward(
            x, codes, search_codes, sq_norms, layer_sizes, routing=routing, precision="ieee",
            with_stats=with_stats, active=active, given_indices=indices)
