"""Cosine-similarity codebooks (vector-quantize-pytorch's ``use_cosine_sim=True``) on the fused search.

With unit-norm codes, ``argmin_k |c_k|^2 - 2 r.c_k`` (the fused kernel's score) ranks codes as
``argmax_k (r / |r|).c_k``, their score, so the fused pass gives the indices and the residual chain
``r_{l+1} = r_l - e_l``. What differs from the Euclidean case is done here in chunked PyTorch passes
that rebuild ``r_l`` from the indices (nothing ``(N, L, D)`` is kept):

- losses ``w * mean((e_l - t_l)^2)`` with the target ``t_l = n_l = r_l / max(|r_l|, 1e-6)``, or the
  raw ``r_l`` when a mask was given (vector-quantize-pytorch 1.32 does that);
- statistics: per-code counts and sums of ``n_l`` (their EMA averages normalised inputs);
- input gradient: per layer the output gradient goes to ``n_l`` (identity, or rotated onto ``e_l``
  with the rotation trick), the commitment term is added, and the sum passes the l2-norm Jacobian
  ``(v - (v.n) n) / |r_l|`` (``v / 1e-6`` below the clamp).

On the Triton path :class:`FusedCosineQuantizeFunction` does all of it inside the fused kernels
(the forward's cosine epilogue, ``COSINE`` in ``kernels/quantize_forward.py``, and the cosine
branch of ``kernels/rotation_grad.py``): one forward and one input-gradient launch, no chunked
pass. :class:`CosineQuantizeFunction` stays the PyTorch path and the kernels' oracle.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .rotation import CHUNK_ROWS, NORM_EPS, rotate_gradient


def _normalised(residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    norm = residual.norm(dim=1, keepdim=True)
    return residual / norm.clamp(min=NORM_EPS), norm


class CosineQuantizeFunction(torch.autograd.Function):
    """``(quantized (n, d), layer_losses (L,), counts (K_total,), sums (K_total, d))`` from rows,
    the layers' codebooks ``codes (K_total, d)`` (unit norm, no gradient) and ``indices (n, L)``."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, codes: torch.Tensor, layer_sizes: Tuple[int, ...],
                indices: torch.Tensor, weight: float, rotation: bool, raw_target: bool):
        n, dim = rows.shape
        starts = _starts(layer_sizes)
        book = codes.detach().float()
        sse = rows.new_zeros(len(layer_sizes), dtype=torch.float32)
        counts = rows.new_zeros(book.shape[0], dtype=torch.float32)
        sums = rows.new_zeros(book.shape, dtype=torch.float32)
        quantized = torch.empty((n, dim), dtype=torch.float32, device=rows.device)
        for begin in range(0, n, CHUNK_ROWS):
            end = min(n, begin + CHUNK_ROWS)
            residual = rows[begin:end].detach().float()
            total = torch.zeros_like(residual)
            for layer, start in enumerate(starts):
                index = indices[begin:end, layer]
                valid = (index >= 0).unsqueeze(1)  # -1: a non-finite row (NaN output and loss)
                code_id = start + index.clamp(min=0)
                code = torch.where(valid, book[code_id], float("nan"))
                unit, _ = _normalised(residual)
                target = residual if raw_target else unit
                sse[layer] += (code - target).square().sum()
                counts.index_add_(0, code_id, valid.squeeze(1).float())
                sums.index_add_(0, code_id, torch.where(valid, unit, 0.0))
                total += code
                residual = residual - code
            quantized[begin:end] = total
        inv = 1.0 / (n * dim) if n > 0 else 0.0
        ctx.save_for_backward(rows, codes, indices)
        ctx.layer_sizes, ctx.weight, ctx.rotation, ctx.raw_target, ctx.inv = (
            layer_sizes, weight, rotation, raw_target, inv)
        ctx.mark_non_differentiable(counts, sums)
        return quantized.to(rows.dtype), sse * (weight * inv), counts, sums

    @staticmethod
    def backward(ctx, grad_quantized, grad_losses, _grad_counts, _grad_sums):
        rows, codes, indices = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        n, dim = rows.shape
        starts = _starts(ctx.layer_sizes)
        book = codes.detach().float()
        coef = grad_losses.float() * (2.0 * ctx.weight * ctx.inv)
        grad_rows = torch.empty((n, dim), dtype=torch.float32, device=rows.device)
        for begin in range(0, n, CHUNK_ROWS):
            end = min(n, begin + CHUNK_ROWS)
            residual = rows[begin:end].detach().float()
            g = grad_quantized[begin:end].float()
            acc = torch.zeros_like(residual)
            for layer, start in enumerate(starts):
                code = book[start + indices[begin:end, layer].clamp(min=0)]
                unit, norm = _normalised(residual)
                v = rotate_gradient(g, unit, code) if ctx.rotation else g.clone()
                if ctx.raw_target:
                    acc += coef[layer] * (residual - code)
                else:
                    v += coef[layer] * (unit - code)
                inside = norm > NORM_EPS
                projected = (v - (v * unit).sum(1, keepdim=True) * unit) / norm.clamp(min=NORM_EPS)
                acc += torch.where(inside, projected, v / NORM_EPS)
                residual = residual - code
            grad_rows[begin:end] = acc
        return grad_rows.to(rows.dtype), None, None, None, None, None, None


class FusedCosineQuantizeFunction(torch.autograd.Function):
    """The Triton path of cosine codebooks: search, losses, statistics in one forward launch, the
    input gradient in one launch. Returns ``quantized (n, d)``, ``indices (n, L)`` (``-1`` past
    ``active``), ``layer_losses (L,)`` (0 past ``active``), ``counts (K_total,)``, ``sums
    (K_total, d)`` (of the normalised rows; zeros past ``active`` and ``(0,)``/``(0, d)`` without
    ``with_stats``). ``codes (K_total, d)``: every layer's unit codes (no gradient)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, codes: torch.Tensor, layer_sizes: Tuple[int, ...], weight: float,
                rotation: bool, raw_target: bool, precision: str, with_stats: bool, active: int):
        from . import backend, routing
        from .kernels.quantize_forward import residual_quantize_forward

        rows = rows.contiguous()
        codes = codes.detach().contiguous()
        cosine = 2 if raw_target else 1
        with torch.autocast(device_type=rows.device.type, enabled=False):
            search_codes, sq_norms = backend.search_operands(codes)
            starts = backend.layer_starts(list(layer_sizes), rows)
            quantized, indices, sse, counts, sums = residual_quantize_forward(
                rows.detach(), codes, search_codes, sq_norms, starts, list(layer_sizes),
                routing=routing.LAYER_STE, precision=precision, with_stats=with_stats, active=active,
                cosine=cosine)
        n, dim = rows.shape
        inv = 1.0 / (n * dim) if n > 0 else 0.0
        ctx.save_for_backward(rows, codes, indices)
        ctx.layer_sizes, ctx.weight, ctx.rotation, ctx.cosine, ctx.inv, ctx.active = (
            layer_sizes, weight, rotation, cosine, inv, active)
        ctx.mark_non_differentiable(indices, counts, sums)
        return quantized, indices, sse * (weight * inv), counts, sums

    @staticmethod
    def backward(ctx, grad_quantized, _grad_indices, grad_losses, _grad_counts, _grad_sums):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        from . import backend
        from .kernels.rotation_grad import rotation_input_grad_triton

        rows, codes, indices = ctx.saved_tensors
        coef = (grad_losses.float() * (2.0 * ctx.weight * ctx.inv)).contiguous()
        with torch.autocast(device_type=rows.device.type, enabled=False):
            grad = rotation_input_grad_triton(
                grad_quantized.contiguous(), rows, codes, backend.layer_starts(list(ctx.layer_sizes), rows),
                indices, coef, NORM_EPS, ctx.active, rotate=ctx.rotation, cosine=ctx.cosine)
        return grad, None, None, None, None, None, None, None, None


def _starts(layer_sizes: Sequence[int]) -> List[int]:
    starts = [0]
    for size in layer_sizes[:-1]:
        starts.append(starts[-1] + int(size))
    return starts
