"""Fused residual-quantization forward: every layer in one launch.

Each program owns ``BLOCK_M`` rows and keeps their residual in registers while it walks the layers.
Per layer it streams the layer's codebook in ``BLOCK_K`` tiles, scores ``||c||^2 - 2 r.c`` with
``tl.dot`` and keeps a running (min, argmin) -- ties to the lowest index, like ``torch.argmin`` --
so no ``N x K`` matrix ever exists. It then gathers the chosen code, updates the residual, adds the
layer's squared error to a per-program partial sum and (optionally) scatters the per-code count and
residual sum that both the codebook gradient and the EMA update need.

Rows holding NaN/Inf get index -1 and a NaN output, and stay out of the statistics.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from .config import tile_config
from .tiles import row_tile
from .traceable import traceable


@triton.jit
def _residual_quantize_fwd_kernel(
    x_ptr,            # (N, D) input rows, any float dtype
    codes_ptr,        # (K_total, D) all codebooks stacked, any float dtype (gathered)
    search_ptr,       # (K_total, D) the same with non-finite codes zeroed (scored)
    sq_norm_ptr,      # (K_total,) fp32 squared code norms, +inf for non-finite codes
    layer_start_ptr,  # (L + 1,) int32: codebook l is rows [start[l], start[l+1]) of codes
    out_ptr,          # (N, D) quantized output, dtype of x
    idx_ptr,          # (N, L) int64 chosen code per layer (layer-local), -1 for non-finite rows
    sse_ptr,          # (num_programs, L) fp32 per-program sum of squared errors
    count_ptr,        # (K_total,) int32 rows per code             (written if WITH_STATS)
    sum_ptr,          # (K_total, D) fp32 sum of residuals per code (written if WITH_STATS)
    N,
    D,
    NUM_LAYERS: tl.constexpr,
    ROUTING: tl.constexpr,        # 0 seed, 1 full, 2 layer_ste (see rqvae_fast.routing)
    WITH_STATS: tl.constexpr,
    PRECISION: tl.constexpr,      # "ieee" | "tf32" | "bf16"
    BF16_AS_FP32: tl.constexpr,   # bf16-rounded operands, fp32 dot (the interpreter's bf16 dot is wrong)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, dims, row_in, dim_in, offsets, tile_mask = row_tile(pid, N, D, BLOCK_M, BLOCK_D)

    x = tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    row_ok = row_in & (tl.max(bad.to(tl.int32), axis=1) == 0)
    # Non-finite rows run on zeros (so every score stays finite) and are marked at the end.
    x = tl.where(row_ok[:, None], x, 0.0)

    residual = x
    total = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for layer in range(NUM_LAYERS):
        k_start = tl.load(layer_start_ptr + layer)
        k_end = tl.load(layer_start_ptr + layer + 1)

        # --- nearest code: running min over codebook tiles -----------------------------------
        if PRECISION == "bf16":
            lhs = residual.to(tl.bfloat16)
            if BF16_AS_FP32:
                lhs = lhs.to(tl.float32)
        else:
            lhs = residual
        best = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK_M,), dtype=tl.int32) + k_start
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_in = ks < k_end
            codes = tl.load(search_ptr + ks[:, None] * D + dims[None, :],
                            mask=k_in[:, None] & dim_in[None, :], other=0.0).to(tl.float32)
            if PRECISION == "bf16":
                if BF16_AS_FP32:  # products of bf16 values are exact in fp32
                    dots = tl.dot(lhs, tl.trans(codes.to(tl.bfloat16).to(tl.float32)),
                                  input_precision="ieee")
                else:
                    dots = tl.dot(lhs, tl.trans(codes.to(tl.bfloat16)))
            else:
                dots = tl.dot(lhs, tl.trans(codes), input_precision=PRECISION)
            # Codes past the layer's end load as zero vectors with +inf norm: never chosen.
            sq_norm = tl.load(sq_norm_ptr + ks, mask=k_in, other=float("inf"))
            dist = sq_norm[None, :] - 2.0 * dots
            tile_best = tl.min(dist, axis=1)
            tile_idx = tl.argmin(dist, axis=1).to(tl.int32) + k0
            better = tile_best < best  # strict: an earlier tile wins ties
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx, best_idx)

        # --- gather, residual update, loss partial, statistics ---------------------------------
        code_mask = row_ok[:, None] & dim_in[None, :]
        chosen = tl.load(codes_ptr + best_idx.to(tl.int64)[:, None] * D + dims[None, :],
                         mask=code_mask, other=0.0).to(tl.float32)
        err = chosen - residual
        row_sse = tl.where(row_ok, tl.sum(err * err, axis=1), float("nan"))
        tl.store(sse_ptr + pid * NUM_LAYERS + layer, tl.sum(tl.where(row_in, row_sse, 0.0), axis=0))
        local_idx = tl.where(row_ok, best_idx - k_start, -1)
        tl.store(idx_ptr + rows * NUM_LAYERS + layer, local_idx.to(tl.int64), mask=row_in)

        if WITH_STATS:
            tl.atomic_add(count_ptr + best_idx, tl.full((BLOCK_M,), 1, tl.int32), mask=row_ok)
            tl.atomic_add(sum_ptr + best_idx.to(tl.int64)[:, None] * D + dims[None, :], residual,
                          mask=code_mask)

        if ROUTING == 0:    # seed: the next residual subtracts the straight-through output
            straight_through = residual + err
            total = total + straight_through
            residual = residual - straight_through
        elif ROUTING == 1:  # full: one straight-through estimator on the total, below
            total = total + chosen
            residual = residual - chosen
        else:               # layer_ste: a straight-through output per layer, detached residual
            total = total + (residual + err)
            residual = residual - chosen

    if ROUTING == 1:
        out = x + (total - x)
    else:
        out = total
    out = tl.where(row_ok[:, None], out, float("nan"))
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=tile_mask)


def residual_quantize_forward(
    x: torch.Tensor,
    codes: torch.Tensor,
    search_codes: torch.Tensor,
    sq_norms: torch.Tensor,
    layer_starts: torch.Tensor,
    layer_sizes: Sequence[int],
    *,
    routing: int,
    precision: str,
    with_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused forward.

    x ``(N, D)`` contiguous; codes and search_codes ``(K_total, D)`` contiguous (see
    :func:`rqvae_fast.backend.search_operands`); sq_norms ``(K_total,)`` fp32;
    layer_starts ``(L + 1,)`` int32 on x's device. Returns ``quantized (N, D)`` in x's dtype,
    ``indices (N, L)`` int64, ``sse (L,)`` fp32, ``counts (K_total,)`` fp32, ``sums (K_total, D)`` fp32
    (empty, ``(0,)`` and ``(0, D)``, when ``with_stats`` is false).
    """
    n, dim = x.shape
    num_layers = len(layer_sizes)
    k_total = codes.shape[0]
    cfg = tile_config(dim)
    grid = (triton.cdiv(n, cfg.block_m),)
    quantized = torch.empty_like(x)
    indices = torch.empty((n, num_layers), dtype=torch.int64, device=x.device)
    sse_partial = torch.empty((grid[0], num_layers), dtype=torch.float32, device=x.device)
    counts = torch.zeros(k_total if with_stats else 1, dtype=torch.int32, device=x.device)
    sums = torch.zeros((k_total, dim) if with_stats else (1, 1), dtype=torch.float32, device=x.device)
    if n > 0:
        traceable(_residual_quantize_fwd_kernel)[grid](
            x, codes, search_codes, sq_norms, layer_starts, quantized, indices, sse_partial, counts, sums, n, dim,
            NUM_LAYERS=num_layers, ROUTING=routing, WITH_STATS=with_stats,
            PRECISION=precision, BF16_AS_FP32=x.device.type == "cpu", BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps,
        )
    if not with_stats:
        counts, sums = counts[:0], sums.new_empty((0, dim))
    return quantized, indices, sse_partial.sum(dim=0), counts.float(), sums
