"""Input gradient of the rotation-trick routing (``grad_mode="rotation"``): one elementwise pass.

Per block of rows, for every layer: rebuild ``r_l`` from the saved indices (``r_{l+1} = r_l - e_l``),
gather ``e_l``, and add ``lam (g - 2 (g.w) w + 2 (g.q) u) + coef_l (r_l - e_l)`` with
``u = r_l/|r_l|``, ``q = e_l/|e_l|``, ``w = (u + q)/|u + q|``, ``lam = |e_l|/|r_l|`` (norms clamped at
``EPS``); see :mod:`rqvae_fast.rotation` for the math and the PyTorch version it must equal. The whole
padded row sits in one tile, so the row reductions are in registers; nothing ``(N, L, D)`` is kept.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .quantize_forward import check_active
from .tiles import chosen_codes, row_tile
from .traceable import traceable


@triton.jit(do_not_specialize=["num_active"])
def _rotation_input_grad_kernel(
    grad_out_ptr,     # (N, D) gradient of the quantized output, if HAS_GRAD_OUT
    x_ptr,            # (N, D) forward input
    codes_ptr,        # (K_total, D) stacked codebooks
    layer_start_ptr,  # (L + 1,) int32
    idx_ptr,          # (N, L) int64 layer-local indices (-1: non-finite row)
    coef_ptr,         # (L,) fp32 commitment coefficients
    grad_x_ptr,       # (N, D) output, dtype of x
    N,
    D,
    num_active,       # runtime: only layers [0, num_active) ran in the forward (quantize dropout)
    EPS: tl.constexpr,
    NUM_LAYERS: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, dims, row_in, dim_in, offsets, tile_mask = row_tile(pid, N, D, BLOCK_M, BLOCK_D)
    residual = tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_GRAD_OUT:
        g = tl.load(grad_out_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for layer in range(num_active):
        code = chosen_codes(codes_ptr, layer_start_ptr, idx_ptr, layer, rows, dims, row_in, dim_in, D,
                            NUM_LAYERS)
        if HAS_GRAD_OUT:
            r_norm = tl.maximum(tl.sqrt(tl.sum(residual * residual, axis=1)), EPS)
            e_norm = tl.sqrt(tl.sum(code * code, axis=1))
            u = residual / r_norm[:, None]
            q = code / tl.maximum(e_norm, EPS)[:, None]
            w = u + q
            w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), EPS)[:, None]
            g_w = tl.sum(g * w, axis=1)
            g_q = tl.sum(g * q, axis=1)
            acc += (e_norm / r_norm)[:, None] * (g - 2.0 * g_w[:, None] * w + 2.0 * g_q[:, None] * u)
        acc += tl.load(coef_ptr + layer) * (residual - code)
        residual = residual - code
    tl.store(grad_x_ptr + offsets, acc.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)


def rotation_input_grad_triton(grad_out: Optional[torch.Tensor], x: torch.Tensor, codes: torch.Tensor,
                               layer_starts: torch.Tensor, indices: torch.Tensor, coef: torch.Tensor,
                               eps: float = 1e-6, active: Optional[int] = None) -> torch.Tensor:
    """``(N, D)`` input gradient in x's dtype. ``x``, ``codes``, ``indices (N, L)`` contiguous;
    ``layer_starts (L + 1,)`` int32 offsets of the layers in ``codes``; ``coef (L,)`` fp32;
    ``active``: the forward's number of active layers (``None``: all; the rest add nothing)."""
    n, dim = x.shape
    num_active = check_active(active, indices.shape[1])
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = 32 if block_d <= 128 else 16
    grad_x = torch.empty_like(x)
    if n > 0:
        grid = (triton.cdiv(n, block_m),)
        traceable(_rotation_input_grad_kernel)[grid](
            grad_out.contiguous() if grad_out is not None else x, x, codes, layer_starts, indices,
            coef.float().contiguous(), grad_x, n, dim, num_active, EPS=eps, NUM_LAYERS=indices.shape[1],
            HAS_GRAD_OUT=grad_out is not None, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=4 if block_d <= 128 else 8)
    return grad_x
