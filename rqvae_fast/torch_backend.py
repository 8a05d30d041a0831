"""The PyTorch implementation of the fused forward and input gradient (CPU, or no Triton).

Same contract, outputs and arithmetic as ``rqvae_fast.kernels``: rows are processed in chunks so the
``(chunk, K_l)`` score matrix stays cache-sized (about ``SCORES_PER_CHUNK`` entries) and memory does
not grow with N beyond the outputs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .routing import FULL, SEED

SCORES_PER_CHUNK = 1 << 19  # entries of one (rows, K_l) score matrix: 2 MiB of fp32, cache-sized
MIN_CHUNK_ROWS = 256


def first_copy_index(codebook: torch.Tensor) -> torch.Tensor:
    """``(K,)`` int64: for each code, the lowest index holding an identical code.

    A BLAS GEMM may round identical columns differently (edge columns take other micro-kernels),
    so ``argmin`` could pick a later copy of a duplicated code; mapping through this restores
    "ties go to the lowest index". Rows are keyed by a float64 projection, sorted stably, and
    neighbours are merged only when exactly equal.
    """
    num_codes, dim = codebook.shape
    weights = torch.linspace(1.0, 2.0, dim, dtype=torch.float64, device=codebook.device)
    order = torch.argsort(codebook.double() @ weights, stable=True)
    ordered = codebook[order]
    same = (ordered[1:] == ordered[:-1]).all(dim=1)
    starts = torch.cat([same.new_ones(1), ~same])
    leaders = order[starts]
    canonical = torch.empty_like(order)
    canonical[order] = leaders[starts.cumsum(dim=0) - 1]
    return canonical


def residual_quantize_forward(
    x: torch.Tensor,
    codes: torch.Tensor,
    search_codes: torch.Tensor,
    sq_norms: torch.Tensor,
    layer_sizes: Sequence[int],
    *,
    routing: int,
    precision: str,
    with_stats: bool,
    chunk_rows: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`rqvae_fast.kernels.residual_quantize_forward` (same inputs and outputs)."""
    n, dim = x.shape
    num_layers = len(layer_sizes)
    chunk_rows = chunk_rows or max(MIN_CHUNK_ROWS, SCORES_PER_CHUNK // max(layer_sizes))
    codes32 = codes.float()
    codebooks = codes32.split(list(layer_sizes))
    norms = sq_norms.split(list(layer_sizes))
    # bf16: operands rounded to bf16, products and sums in fp32 (as bf16 tensor cores do).
    bf16 = precision == "bf16"
    scored = search_codes.float()
    codebooks_t = [(c.bfloat16().float() if bf16 else c).t() for c in scored.split(list(layer_sizes))]
    canonical = [first_copy_index(c) for c in codebooks]
    starts = [0]
    for size in layer_sizes:
        starts.append(starts[-1] + size)

    quantized = torch.empty_like(x)
    indices = torch.empty((n, num_layers), dtype=torch.int64, device=x.device)
    sse = torch.zeros(num_layers, dtype=torch.float32, device=x.device)
    k_total = codes.shape[0]
    counts = torch.zeros(k_total if with_stats else 0, dtype=torch.float32, device=x.device)
    sums = torch.zeros((k_total if with_stats else 0, dim), dtype=torch.float32, device=x.device)

    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        x_chunk = x[lo:hi].float()
        row_ok = torch.isfinite(x_chunk).all(dim=1)
        residual = x_chunk
        total = torch.zeros_like(x_chunk)
        for layer in range(num_layers):
            lhs = residual.bfloat16().float() if bf16 else residual
            scores = torch.addmm(norms[layer], lhs, codebooks_t[layer], alpha=-2.0)
            best = canonical[layer].index_select(0, scores.argmin(dim=1))
            chosen = codebooks[layer].index_select(0, best)
            chosen = torch.where(row_ok[:, None], chosen, float("nan"))
            err = chosen - residual
            sse[layer] += (err * err).sum()
            indices[lo:hi, layer] = torch.where(row_ok, best, -1)
            if with_stats:
                slot = best + starts[layer]
                counts.index_add_(0, slot, row_ok.float())
                sums.index_add_(0, slot, torch.where(row_ok[:, None], residual, 0.0))
            if routing == SEED:
                straight_through = residual + err
                total = total + straight_through
                residual = residual - straight_through
            elif routing == FULL:
                total = total + chosen
                residual = residual - chosen
            else:
                total = total + (residual + err)
                residual = residual - chosen
        out = x_chunk + (total - x_chunk) if routing == FULL else total
        quantized[lo:hi] = out.to(x.dtype)
    return quantized, indices, sse, counts, sums


def residual_quantize_input_grad(
    grad_out: Optional[torch.Tensor],
    x: torch.Tensor,
    codes: torch.Tensor,
    layer_sizes: Sequence[int],
    indices: torch.Tensor,
    coef: torch.Tensor,
    *,
    commit_layers: int,
    grad_out_scale: float = 1.0,
) -> torch.Tensor:
    """See :func:`rqvae_fast.kernels.residual_quantize_input_grad`."""
    codebooks = codes.float().split(list(layer_sizes))
    residual = x.float()
    direction = torch.zeros_like(residual)
    for layer in range(commit_layers):
        local = indices[:, layer]
        ok = local >= 0
        code = codebooks[layer].index_select(0, local.clamp(min=0))
        residual = residual - torch.where(ok[:, None], code, float("nan"))
        direction += coef[layer] * residual
    grad = direction
    if grad_out is not None:
        grad = grad + grad_out.float() * grad_out_scale
    return grad.to(x.dtype)
