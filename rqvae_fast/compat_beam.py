"""Beam search of :class:`rqvae_fast.compat.ResidualVQ` through ``residual_quantize(beam_size=B)``.

vector-quantize-pytorch scores a path by ``sum_l w_l * commitment_weight * mean_d (e_l - r_l)^2``
(``w = beam_score_quantizer_weights``), keeps ``B`` paths per layer and 1 at the last active
layer. That is :func:`rqvae_fast.beam.beam_encode`'s weighted ranking with per-layer weights
``a_l = w_l * commitment_weight / D`` (``D`` = codebook_dim): the least-score path is the one kept
at the last layer. So the fused path runs ``residual_quantize(beam_size=B, beam_weights=a)``
(the beam kernel on CUDA, ``beam_encode`` elsewhere), then the greedy fused path's losses, output
and EMA step from the winning path. :func:`fused_beam_applies` says when that equals the
layer-by-layer path (:func:`rqvae_fast.compat_layers.forward_layers`) and the beam kernel would
encode; otherwise the latter runs (on CPU it is faster than ``beam_encode``, which sorts all
``B x K`` candidates per row: N 16384, D 32, K 256, L 3, B 4, eval, 2 shared cores, noisy: layered
median 1547 / min 805 ms, through ``beam_encode`` 1969 / 1385 ms).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .beam_path import use_beam_kernel
from .functional import residual_quantize


def fused_beam_applies(model, rows: torch.Tensor, beam: int, sampling: bool) -> bool:
    """Whether ``model``'s beam search of ``rows (n, D)`` takes the fused path: ``beam > 1`` and
    the beam kernel encodes ``rows`` (:func:`rqvae_fast.beam_path.use_beam_kernel`: CUDA, Triton,
    ``beam <= 8``); Euclidean, separate, explicit codebooks, already initialised; no Gumbel sampling, no
    ``quant_grad_frac``, no dead-code reset; ``commitment_weight > 0`` (0 makes every score 0:
    theirs then keeps paths by tie order) and positive finite ``beam_score_quantizer_weights``;
    in eval mode, nothing needing a gradient (their eval losses carry one)."""
    if beam <= 1 or sampling or not use_beam_kernel(rows, beam):
        return False
    if (model.use_cosine_sim or model.shared_codebook or model.implicit_neural_codebook
            or model.quant_grad_frac > 0 or model.threshold_ema_dead_code > 0 or model._needs_init):
        return False
    scores = model.beam_score_weights
    if not model.commitment_weight > 0 or not bool((torch.isfinite(scores) & (scores > 0)).all()):
        return False
    if not model.training and torch.is_grad_enabled() and (rows.requires_grad or model.learnable_codebook):
        return False
    return True


def beam_layer_weights(model, dim: int) -> List[float]:
    """``a_l = beam_score_quantizer_weights[l] * commitment_weight / dim`` for every layer."""
    return [float(w) * model.commitment_weight / dim for w in model.beam_score_weights.tolist()]


def forward_beam_fused(model, rows: torch.Tensor, *, active: int, beam: int, freeze: bool, sync: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(quantized (n, D), indices (n, Q) int64 (-1 for dropped layers), losses (Q,) fp32)`` of
    a beam search over the first ``active`` layers (call only where :func:`fused_beam_applies`).
    Losses: ``commitment_weight * mean((e_l - r_l)^2)`` of the winning path, in eval too (as
    theirs); in training the EMA averages of every active layer move with the winning path's
    residuals, even with ``freeze`` (as theirs), which only withholds a learnable codebook's
    gradient."""
    weight = model.commitment_weight
    books = [layer.codebook if number < active else layer.codebook.detach()
             for number, layer in enumerate(model.layers)]
    update = model.training and model.ema_update  # even when frozen, as theirs (and forward_layers)
    options = dict(grad_mode="rotation" if model.rotation_trick else "layer_ste", precision=model.precision,
                   backend=model.backend, check_finite=model.check_finite, active_layers=active,
                   beam_size=beam, beam_weights=beam_layer_weights(model, rows.shape[1]))
    if model.training and model.learnable_codebook and not freeze:
        # w * mse(e, r) with gradient to both: beta = 1 gives 2 mse, scaled and value fixed to w mse
        result = residual_quantize(rows, books, 1.0, codebook_loss=True, compute_stats=update, **options)
        losses = weight * (result.layer_losses - 0.5 * result.layer_losses.detach())
    elif model.training:
        result = residual_quantize(rows, [b.detach() for b in books], weight, codebook_loss=False,
                                   compute_stats=update, **options)
        losses = result.layer_losses
    else:
        with torch.no_grad():
            result = residual_quantize(rows.detach(), [b.detach() for b in books], weight,
                                       codebook_loss=False, compute_stats=False, **options)
        losses = result.layer_losses
    quantized = result.quantized
    if model.learnable_codebook and torch.is_grad_enabled() and not (model.training and rows.requires_grad):
        # no straight-through estimator: the output is the sum of the codes (gradient to them)
        quantized = model._sum_codes(result.indices[:, :active], books[:active]).to(rows.dtype)
    if update:
        model._update_codebooks(rows.detach(), result, sync, list(model.layers[:active]))
    return quantized, result.indices, losses
