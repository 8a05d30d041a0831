"""``torch.autograd.Function`` of the fused quantizer: straight-through output and the seed's routing.

Forward returns ``(quantized, indices, loss, layer_losses, counts, sums)``; only ``quantized`` and
``loss`` carry gradients. The backward reuses what the forward produced:

- input:    ``grad_x = g_q + g_loss * 2 beta / (N D) * sum_{l in C} (r_l - e_l)``, with
  ``C = {0}`` for ``grad_mode="seed"`` and ``C = {0..L-1}`` for ``"full"`` (elementwise kernel);
- codebook: ``grad_e_k = g_loss * 2 / (N D) * (count_k e_k - sum_k)`` from the forward's per-code
  counts and residual sums (only when the loss holds codebook terms, i.e. not for EMA codebooks).
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import backend


class ResidualQuantizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, layer_sizes: Tuple[int, ...],
                commitment_cost: float, seed_residual: bool, codebook_loss: bool, precision: str,
                triton_path: bool, with_stats: bool):
        """x ``(N, D)`` contiguous, codes ``(K_total, D)`` contiguous (stacked codebooks)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            quantized, indices, sse, counts, sums = backend.forward(
                x, codes, layer_sizes, triton_path=triton_path, seed_residual=seed_residual,
                precision=precision, with_stats=with_stats)
        n, dim = x.shape
        inv_count = 1.0 / (n * dim) if n > 0 else 0.0
        weight = commitment_cost + (1.0 if codebook_loss else 0.0)
        layer_losses = sse * (weight * inv_count)
        loss = layer_losses.sum()

        ctx.save_for_backward(x, codes, indices, counts, sums)
        ctx.layer_sizes = layer_sizes
        ctx.commitment_cost = commitment_cost
        ctx.seed_residual = seed_residual
        ctx.codebook_loss = codebook_loss
        ctx.triton_path = triton_path
        ctx.inv_count = inv_count
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(indices, layer_losses, counts, sums)
        return quantized, indices, loss, layer_losses, counts, sums

    @staticmethod
    def backward(ctx, grad_quantized, _grad_indices, grad_loss, _grad_layer_losses, _grad_counts,
                 _grad_sums):
        x, codes, indices, counts, sums = ctx.saved_tensors
        grad_x = grad_codes = None
        if ctx.needs_input_grad[0] and (grad_quantized is not None or grad_loss is not None):
            scale = 2.0 * ctx.commitment_cost * ctx.inv_count
            coef = (grad_loss.float() * scale if grad_loss is not None
                    else torch.zeros((), dtype=torch.float32, device=x.device)).contiguous()
            commit_layers = 1 if ctx.seed_residual else len(ctx.layer_sizes)
            grad_x = backend.input_grad(
                grad_quantized.contiguous() if grad_quantized is not None else None,
                x, codes, ctx.layer_sizes, indices, coef,
                triton_path=ctx.triton_path, commit_layers=commit_layers)
        if ctx.needs_input_grad[1] and ctx.codebook_loss and grad_loss is not None:
            if counts.numel() != codes.shape[0]:
                raise RuntimeError("codebook gradient needs the forward's statistics (with_stats=True)")
            scale = grad_loss.float() * (2.0 * ctx.inv_count)
            grad_codes = (scale * (counts[:, None] * codes.float() - sums)).to(codes.dtype)
        return grad_x, grad_codes, None, None, None, None, None, None, None
