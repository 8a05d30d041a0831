"""``torch.autograd.Function`` of the fused quantizer: straight-through output and gradient routing.

Forward returns ``(quantized, indices, layer_losses, counts, sums)``; ``quantized`` and
``layer_losses`` carry gradients. ``layer_losses[l] = w * sse_l / (N D)`` with ``w = 1 + beta``
(codebook + commitment terms) or ``w = beta`` (commitment only, for EMA codebooks). The backward
reuses what the forward produced (``g_l`` = gradient of ``layer_losses[l]``):

- input:    ``grad_x = s g_q + sum_{l in C} g_l * 2 beta / (N D) * (r_l - e_l)`` with ``C = {0}``
  for ``grad_mode="seed"``, ``C = {0..L-1}`` otherwise, ``s = L`` for ``"layer_ste"``, else 1
  (see :mod:`rqvae_fast.routing`); one elementwise pass rebuilding ``r_l`` from the saved indices.
  ``grad_mode="rotation"`` replaces ``s g_q`` by the sum of the layers' rotated gradients
  (:mod:`rqvae_fast.rotation`, chunked PyTorch; ``kernels/rotation_grad.py`` on the Triton path).
- codebook: ``grad_e_k = g_l * 2 / (N D) * (count_k e_k - sum_k)`` from the forward's per-code
  counts and residual sums, when the loss holds codebook terms.

Quantize dropout (``active < L``): the dropped layers' losses are 0 and their statistics zero, so
their codebooks get a zero gradient; the input gradient sums the active layers' terms only.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import backend, routing
from .rotation import rotation_input_grad


def finish_forward(ctx, saved, sse: torch.Tensor, elements: int, **settings) -> torch.Tensor:
    """The end of a quantize forward shared by the plain and grouped functions: the per-layer losses
    ``sse * (commitment_cost + codebook_loss) / elements`` (``elements`` = rows x dims), and what
    the backward needs on ``ctx``: ``saved = (x, codes, indices, counts, sums)`` and ``settings``
    (``layer_sizes``, ``commitment_cost``, ``routing_mode``, ``codebook_loss``, ``triton_path``,
    ``active``) as attributes, plus ``inv_count``."""
    inv_count = 1.0 / elements if elements > 0 else 0.0
    weight = settings["commitment_cost"] + (1.0 if settings["codebook_loss"] else 0.0)
    ctx.save_for_backward(*saved)
    for name, value in settings.items():
        setattr(ctx, name, value)
    ctx.inv_count = inv_count
    ctx.mark_non_differentiable(*saved[2:])
    return sse * (weight * inv_count)


class ResidualQuantizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, layer_sizes: Tuple[int, ...],
                commitment_cost: float, routing_mode: int, codebook_loss: bool, precision: str,
                triton_path: bool, with_stats: bool, deterministic: bool, active: int = -1,
                beam_size: int = 1, beam_weights=None):
        """x ``(N, D)`` contiguous, codes ``(K_total, D)`` contiguous (stacked codebooks); only the
        first ``active`` layers run (``0 <= active <= L``, quantize dropout; ``-1``: all).
        ``beam_size > 1``: beam-search codes (:mod:`rqvae_fast.beam_path`: the beam kernel on CUDA), ranked
        by ``beam_weights`` (a tuple, one per layer) when given."""
        active = len(layer_sizes) if active < 0 else active
        if beam_size > 1:
            from .beam_path import beam_forward

            quantized, indices, sse, counts, sums = beam_forward(
                x, codes, list(layer_sizes), routing=routing.forward_routing(routing_mode),
                beam_size=beam_size, with_stats=with_stats, active=active, layer_weights=beam_weights,
                triton_path=None if triton_path else False)  # backend="torch": no beam kernel
        else:
            quantized, indices, sse, counts, sums = backend.fused_forward(
                x, codes, list(layer_sizes), routing.forward_routing(routing_mode), precision, triton_path,
                with_stats, deterministic, active)
        n, dim = x.shape
        layer_losses = finish_forward(ctx, (x, codes, indices, counts, sums), sse, n * dim,
                                      layer_sizes=layer_sizes, commitment_cost=commitment_cost,
                                      routing_mode=routing_mode, codebook_loss=codebook_loss,
                                      triton_path=triton_path, active=active)
        return quantized, indices, layer_losses, counts, sums

    @staticmethod
    def backward(ctx, grad_quantized, _grad_indices, grad_layer_losses, _grad_counts, _grad_sums):
        x, codes, indices, counts, sums = ctx.saved_tensors
        layer_sizes = ctx.layer_sizes
        num_layers = len(layer_sizes)
        grad_losses = grad_layer_losses.float()
        grad_x = grad_codes = None
        if ctx.needs_input_grad[0]:
            coef = (grad_losses * (2.0 * ctx.commitment_cost * ctx.inv_count)).contiguous()
            if ctx.routing_mode == routing.ROTATION and ctx.triton_path:
                from .kernels.rotation_grad import rotation_input_grad_triton

                grad_x = rotation_input_grad_triton(
                    grad_quantized, x, codes, backend.layer_starts(list(layer_sizes), x), indices, coef,
                    active=ctx.active)
            elif ctx.routing_mode == routing.ROTATION:  # chunked PyTorch pass
                grad_x = rotation_input_grad(grad_quantized, x, codes, layer_sizes, indices, coef,
                                             active=ctx.active)
            else:
                grad_x = backend.fused_input_grad(
                    grad_quantized.contiguous(), x, codes, list(layer_sizes), indices, coef,
                    ctx.triton_path, routing.commit_layers(ctx.routing_mode, num_layers),
                    routing.grad_out_scale(ctx.routing_mode, ctx.active), ctx.active)
        if ctx.needs_input_grad[1] and ctx.codebook_loss:
            if counts.shape[0] != codes.shape[0]:
                raise RuntimeError("codebook gradient needs the forward's statistics (with_stats=True)")
            per_layer = grad_losses * (2.0 * ctx.inv_count)
            per_code = torch.cat([per_layer[l].expand(size) for l, size in enumerate(layer_sizes)])
            grad_codes = (per_code[:, None] * (counts[:, None] * codes.float() - sums)).to(codes.dtype)
        return grad_x, grad_codes, None, None, None, None, None, None, None, None, None, None, None
