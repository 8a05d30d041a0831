"""Input gradient of the fused residual quantizer: one elementwise pass.

``grad_x = s * grad_quantized + sum_{l < COMMIT_LAYERS} coef_l * (r_l - e_l)`` with ``coef_l =
dL/dloss_l * 2 * beta / (N * D)`` read from device memory (no host sync). The seed's routing lets only layer 0's
commitment term reach the input (``COMMIT_LAYERS = 1``); the standard RQ-VAE routing lets all of
them (``COMMIT_LAYERS = L``). ``s`` is 1, or L for the per-layer straight-through routing. Residuals are rebuilt from the saved indices with the forward's own
arithmetic (``r_{l+1} = r_l - e_l``), so nothing ``(N, L, D)``-sized is kept between the passes.
Quantize dropout: only the first ``min(COMMIT_LAYERS, num_active)`` terms are summed, ``num_active``
being a runtime argument (one compiled kernel for every cutoff); the launcher's ``s`` accounts for
the active layers (see :func:`rqvae_fast.routing.grad_out_scale`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .config import input_grad_constexprs, input_grad_tiles
from .quantize_forward import check_active, device_arch
from .tiles import chosen_codes, chunk_tile, group_codebook_size
from .traceable import traceable


@triton.jit(do_not_specialize=["num_active"])
def _residual_quantize_input_grad_kernel(
    grad_out_ptr,     # (N, G * D) gradient of the quantized output (any float dtype), if HAS_GRAD_OUT
    x_ptr,            # (N, G * D) forward input
    codes_ptr,        # (G, K_total, D) stacked codebooks of every group
    layer_start_ptr,  # (L + 1,) int32 (the same for every group)
    idx_ptr,          # (G, N, L) int64 layer-local indices from the forward (-1: non-finite row)
    coef_ptr,         # (G, L) fp32 gradient scale of each layer's commitment term
    grad_x_ptr,       # (N, G * D) output, dtype of x
    grad_out_scale,   # fp32 multiplier of grad_out
    N,
    D,                # columns per group
    x_stride,         # row stride of grad_out, x and grad_x: G * D
    num_active,       # runtime: layers >= num_active were dropped in the forward (no term)
    NUM_LAYERS: tl.constexpr,
    COMMIT_LAYERS: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (i, j, g) owns rows [i * BLOCK_M, ...) x columns [j * BLOCK_D, ...) of group g: an
    # elementwise pass, so D is tiled like the rows and no register tile grows with D.
    group = tl.program_id(2).to(tl.int64)
    x_ptr += group * D
    grad_out_ptr += group * D
    grad_x_ptr += group * D
    codes_ptr += group * group_codebook_size(layer_start_ptr, NUM_LAYERS) * D
    idx_ptr += group * N * NUM_LAYERS
    coef_ptr += group * NUM_LAYERS
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_in, dim_in, offsets, tile_mask = chunk_tile(rows, dims, N, D, x_stride)

    residual = tl.load(x_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    direction = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for layer in range(tl.minimum(num_active, COMMIT_LAYERS)):
        code = chosen_codes(codes_ptr, layer_start_ptr, idx_ptr, layer, rows, dims, row_in, dim_in, D,
                            NUM_LAYERS)
        residual = residual - code
        direction += tl.load(coef_ptr + layer) * residual  # r_l - e_l: layer l's commitment direction

    grad = direction
    if HAS_GRAD_OUT:
        grad += grad_out_scale * tl.load(grad_out_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offsets, grad.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)


def residual_quantize_input_grad(
    grad_out: Optional[torch.Tensor],
    x: torch.Tensor,
    codes: torch.Tensor,
    layer_starts: torch.Tensor,
    indices: torch.Tensor,
    coef: torch.Tensor,
    *,
    commit_layers: int,
    grad_out_scale: float = 1.0,
    active: Optional[int] = None,
) -> torch.Tensor:
    """``(N, D)`` gradient of the input, in x's dtype; see the module docstring. ``active``: the
    forward's number of active layers (``None``: all)."""
    return residual_quantize_input_grad_grouped(
        grad_out, x, codes, layer_starts, indices, coef, commit_layers=commit_layers,
        grad_out_scale=grad_out_scale, active=active)


def residual_quantize_input_grad_grouped(
    grad_out: Optional[torch.Tensor],
    x: torch.Tensor,
    codes: torch.Tensor,
    layer_starts: torch.Tensor,
    indices: torch.Tensor,
    coef: torch.Tensor,
    *,
    commit_layers: int,
    grad_out_scale: float = 1.0,
    active: Optional[int] = None,
) -> torch.Tensor:
    """``(N, G * D)`` input gradient of ``G`` column groups in one launch (grid axis 2 = group):
    grad_out and x ``(N, G * D)`` contiguous, codes ``(G, K_total, D)``, indices ``(G, N, L)``,
    coef ``(G, L)`` fp32, all contiguous (2-D codes, indices and 1-D coef: one group); the rest as
    :func:`residual_quantize_input_grad`."""
    groups, dim = (codes.shape[0], codes.shape[2]) if codes.dim() == 3 else (1, codes.shape[1])
    n = x.shape[0]
    num_active = check_active(active, indices.shape[-1])
    tiles = input_grad_tiles(dim, device_arch(x.device))
    grad_x = torch.empty_like(x)
    if n > 0 and groups > 0:
        grid = (triton.cdiv(n, tiles.block_m), tiles.num_chunks, groups)
        consts = input_grad_constexprs(tiles, num_layers=indices.shape[-1], commit_layers=commit_layers,
                                       has_grad_out=grad_out is not None)
        traceable(_residual_quantize_input_grad_kernel)[grid](
            grad_out if grad_out is not None else x, x, codes, layer_starts, indices, coef, grad_x,
            float(grad_out_scale), n, dim, groups * dim, num_active, **consts, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
    return grad_x
