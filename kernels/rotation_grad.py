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
from .tiles import chosen_codes, group_codebook_size, row_tile
from .traceable import traceable


@triton.jit
def _rotated(g, src, code, EPS: tl.constexpr):
    """``lam (g - 2 (g.w) w + 2 (g.q) u)``: ``g`` through the rotation and rescaling mapping each
    row of ``src`` onto the same row of ``code`` (see :func:`rqvae_fast.rotation.rotate_gradient`)."""
    r_norm = tl.maximum(tl.sqrt(tl.sum(src * src, axis=1)), EPS)
    e_norm = tl.sqrt(tl.sum(code * code, axis=1))
    u = src / r_norm[:, None]
    q = code / tl.maximum(e_norm, EPS)[:, None]
    w = u + q
    w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), EPS)[:, None]
    g_w = tl.sum(g * w, axis=1)
    g_q = tl.sum(g * q, axis=1)
    return (e_norm / r_norm)[:, None] * (g - 2.0 * g_w[:, None] * w + 2.0 * g_q[:, None] * u)


@triton.jit(do_not_specialize=["num_active"])
def _rotation_input_grad_kernel(
    grad_out_ptr,     # (N, G * D) gradient of the quantized output, if HAS_GRAD_OUT
    x_ptr,            # (N, G * D) forward input
    codes_ptr,        # (G, K_total, D) stacked codebooks of every group
    layer_start_ptr,  # (L + 1,) int32 (the same for every group)
    idx_ptr,          # (G, N, L) int64 layer-local indices (-1: non-finite row)
    coef_ptr,         # (G, L) fp32 commitment coefficients
    grad_x_ptr,       # (N, G * D) output, dtype of x
    N,
    D,                # columns per group
    x_stride,         # row stride of grad_out, x and grad_x: G * D
    num_active,       # runtime: only layers [0, num_active) ran in the forward (quantize dropout)
    EPS: tl.constexpr,
    NUM_LAYERS: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROTATE: tl.constexpr = True,   # False: the output gradient passes straight through (cosine only)
    COSINE: tl.constexpr = 0,      # cosine codebooks: 0 off; 1 / 2 the forward's target n_l / r_l
):
    pid = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)  # group g: its columns, codebooks, indices, coefficients
    x_ptr += group * D
    grad_out_ptr += group * D
    grad_x_ptr += group * D
    codes_ptr += group * group_codebook_size(layer_start_ptr, NUM_LAYERS) * D
    idx_ptr += group * N * NUM_LAYERS
    coef_ptr += group * NUM_LAYERS
    rows, dims, row_in, dim_in, offsets, tile_mask = row_tile(pid, N, D, x_stride, BLOCK_M, BLOCK_D)
    residual = tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_GRAD_OUT:
        g = tl.load(grad_out_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for layer in range(num_active):
        code = chosen_codes(codes_ptr, layer_start_ptr, idx_ptr, layer, rows, dims, row_in, dim_in, D,
                            NUM_LAYERS)
        coef = tl.load(coef_ptr + layer)
        if COSINE == 0:
            if HAS_GRAD_OUT:
                acc += _rotated(g, residual, code, EPS)
            acc += coef * (residual - code)
        else:
            # the layer quantized n = r / max(|r|, EPS): its output gradient (rotated onto e, or
            # straight through) and commitment term reach n, then the l2-norm Jacobian reaches r
            norm = tl.sqrt(tl.sum(residual * residual, axis=1))
            clamped = tl.maximum(norm, EPS)
            unit = residual / clamped[:, None]
            v = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            if HAS_GRAD_OUT:
                if ROTATE:
                    v = _rotated(g, unit, code, EPS)
                else:
                    v = g
            if COSINE == 1:
                v += coef * (unit - code)
            else:  # 1.32's masked target: the raw residual, no normalisation in the term
                acc += coef * (residual - code)
            v_n = tl.sum(v * unit, axis=1)
            projected = (v - v_n[:, None] * unit) / clamped[:, None]
            acc += tl.where((norm > EPS)[:, None], projected, v / EPS)
        residual = residual - code
    tl.store(grad_x_ptr + offsets, acc.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)


def rotation_input_grad_triton(grad_out: Optional[torch.Tensor], x: torch.Tensor, codes: torch.Tensor,
                               layer_starts: torch.Tensor, indices: torch.Tensor, coef: torch.Tensor,
                               eps: float = 1e-6, active: Optional[int] = None, *, rotate: bool = True,
                               cosine: int = 0) -> torch.Tensor:
    """``(N, D)`` input gradient in x's dtype. ``x``, ``codes``, ``indices (N, L)`` contiguous;
    ``layer_starts (L + 1,)`` int32 offsets of the layers in ``codes``; ``coef (L,)`` fp32;
    ``active``: the forward's number of active layers (``None``: all; the rest add nothing)."""
    return rotation_input_grad_triton_grouped(grad_out, x, codes, layer_starts, indices,
                                              coef, eps=eps, active=active, rotate=rotate,
                                              cosine=cosine)


def rotation_input_grad_triton_grouped(grad_out: Optional[torch.Tensor], x: torch.Tensor,
                                       codes: torch.Tensor, layer_starts: torch.Tensor,
                                       indices: torch.Tensor, coef: torch.Tensor, eps: float = 1e-6,
                                       active: Optional[int] = None, *, rotate: bool = True,
                                       cosine: int = 0) -> torch.Tensor:
    """``(N, G * D)`` input gradient of ``G`` column groups in one launch (grid axis 1 = group):
    x and grad_out ``(N, G * D)``, codes ``(G, K_total, D)``, indices ``(G, N, L)`` contiguous,
    coef ``(G, L)``; the rest as :func:`rotation_input_grad_triton`. ``cosine`` (1 or 2, the
    forward's epilogue): the gradient of cosine codebooks (:mod:`rqvae_fast.cosine`), with the
    output gradient rotated (``rotate``) or straight through. 2-D codes, indices and 1-D coef:
    one group."""
    groups, dim = (codes.shape[0], codes.shape[2]) if codes.dim() == 3 else (1, codes.shape[1])
    n = x.shape[0]
    num_active = check_active(active, indices.shape[-1])
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = 32 if block_d <= 128 else 16
    grad_x = torch.empty_like(x)
    if n > 0 and groups > 0:
        grid = (triton.cdiv(n, block_m), groups)
        traceable(_rotation_input_grad_kernel)[grid](
            grad_out.contiguous() if grad_out is not None else x, x, codes, layer_starts, indices,
            coef.float().contiguous(), grad_x, n, dim, groups * dim, num_active, EPS=eps,
            NUM_LAYERS=indices.shape[-1], HAS_GRAD_OUT=grad_out is not None, BLOCK_M=block_m,
            BLOCK_D=block_d, ROTATE=rotate, COSINE=cosine, num_warps=4 if block_d <= 128 else 8)
    return grad_x
