"""The layer-by-layer path of :class:`rqvae_fast.compat.ResidualVQ`, for the options the fused pass
does not cover: cosine codebooks, shared codebooks, Gumbel sampling, implicit neural codebooks,
``quant_grad_frac`` and beam search. It follows vector-quantize-pytorch 1.32 step by step (each
layer's k-means init, assignment, EMA step and dead-code reset before the next layer runs), with
plain PyTorch ops, so autograd gives their gradients. Rows are the unmasked rows ``(n, D)``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compat_reference import code_logits, gumbel_pick, l2norm, rotate_to, straight_through


class ImplicitCodebookMLP(nn.Module):
    """QINCo-style codebook transform (Huijben et al. 2024), parameter names as vector-quantize-pytorch's
    ``MLP``: ``codes (K, D)`` and ``condition (n, D)`` -> per-row codes ``(n, K, D)``."""

    def __init__(self, dim: int, dim_hidden: Optional[int] = None, depth: int = 4,
                 l2norm_output: bool = False):
        super().__init__()
        hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList([
            nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
            for _ in range(depth)])
        self.l2norm_output = l2norm_output

    def forward(self, codes: torch.Tensor, *, condition: torch.Tensor) -> torch.Tensor:
        n, (k, d) = condition.shape[0], codes.shape
        h = torch.cat((condition[:, None, :].expand(n, k, d), codes[None].expand(n, k, d)), dim=-1)
        h = self.proj_in(h)
        for block in self.layers:
            h = block(h) + h
        return l2norm(h) if self.l2norm_output else h


def _frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    return t.detach() if frac <= 0 else frac * t + (1.0 - frac) * t.detach()


def forward_layers(model, rows: torch.Tensor, *, active: int, beam: int, temperature: float,
                   freeze: bool, row_select: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(quantized (n, D), indices (n, Q) int64 (-1 for dropped layers), losses (Q,) fp32)``.

    ``active`` layers run (quantize dropout), ``beam`` > 1 keeps that many partial paths per row,
    ``temperature`` > 0 samples codes (Gumbel, torch's global generator), ``row_select (N,)`` bool
    says which of the batch's rows ``rows`` are (a mask was given: their masked commitment target,
    see ``docs/COMPAT.md``, and noise drawn for all rows).
    """
    masked = row_select is not None
    training, cosine = model.training, model.use_cosine_sim
    n, dim = rows.shape
    q_count = model.num_quantizers
    weight = model.commitment_weight
    learn_commit = model.learnable_codebook and not freeze
    residual = rows.unsqueeze(1)                      # (n, beams, D)
    total = torch.zeros_like(residual)
    scores = rows.new_zeros((n, 1))
    chosen = torch.empty((n, 1, 0), dtype=torch.long, device=rows.device)
    losses = rows.new_zeros((n, 1, 0)) if beam > 1 else []
    inputs: List[torch.Tensor] = []                     # per layer: (n, beams, D), beam-aligned
    for layer_id in range(active):
        layer = model.layers[layer_id]
        book_module = layer._codebook
        beams = residual.shape[1]
        flat_in = residual.reshape(-1, dim)
        x_t = l2norm(flat_in) if cosine else flat_in
        if not bool(book_module.initted):
            model._init_layer(book_module, x_t.detach().float(), layer.codebook_size)
        embed = book_module.embed[0] if model.learnable_codebook else book_module.embed[0].detach()
        mlp = model.mlps[layer_id - 1] if model.implicit_neural_codebook and layer_id > 0 else None
        k = min(beam, layer.codebook_size) if beam > 1 else None
        if mlp is not None:
            codes = mlp(embed, condition=total.reshape(-1, dim))
            logits = (-torch.linalg.vector_norm(x_t[:, None] - codes + 1e-6, dim=-1) if not cosine
                      else (x_t[:, None] * codes).sum(-1))
        else:
            logits = code_logits(x_t, embed, cosine)
        pick = gumbel_pick(logits, temperature if training else 0.0, topk=k,
                           row_select=row_select if k is None else None)
        if mlp is not None:
            gather = pick if k is not None else pick[:, None]
            quantize = codes.gather(1, gather[..., None].expand(-1, -1, dim))
            quantize = quantize if k is not None else quantize[:, 0]
        else:
            quantize = embed[pick]
        if training and not freeze and k is None:
            model._layer_codebook_step(book_module, x_t.detach().float(), pick, layer.codebook_size)
        target = x_t if k is None else x_t[:, None].expand(-1, k, -1)
        out_q = quantize
        if training and residual.requires_grad:
            out_q = rotate_to(target, quantize) if model.rotation_trick else straight_through(target, quantize)
        inputs.append(residual)
        if k is None:
            if training and weight > 0:
                commit = quantize if learn_commit else quantize.detach()
                loss = weight * F.mse_loss(commit, flat_in if (masked and cosine) else x_t) \
                    if n > 0 else rows.new_zeros(())
            else:
                loss = rows.new_zeros(())
            losses.append(loss)
            residual = residual - _frac_gradient(out_q, model.quant_grad_frac).reshape(n, 1, dim)
            total = total + out_q.reshape(n, 1, dim)
            chosen = torch.cat((chosen, pick.reshape(n, 1, 1)), dim=-1)
            continue
        # beam search: (n * beams, k) candidates -> keep the best `beam` (1 at the last layer)
        commit = quantize if (training and learn_commit) else quantize.detach()
        per_token = ((commit - target) ** 2).mean(-1) if training else ((quantize - target) ** 2).mean(-1)
        if weight > 0:
            token_loss = per_token * weight
        else:  # theirs: a zero loss in training, the unweighted error in eval
            token_loss = torch.zeros_like(per_token) if training else per_token
        token_loss = token_loss.reshape(n, beams, k)
        scores = (scores[:, :, None] - token_loss.detach() * model.beam_score_weights[layer_id]
                  ).reshape(n, beams * k)
        residual = (residual[:, :, None] - _frac_gradient(out_q, model.quant_grad_frac).reshape(n, beams, k, dim)
                    ).reshape(n, beams * k, dim)
        total = (total[:, :, None] + out_q.reshape(n, beams, k, dim)).reshape(n, beams * k, dim)
        chosen = torch.cat((chosen[:, :, None].expand(-1, -1, k, -1), pick.reshape(n, beams, k, 1)),
                           dim=-1).reshape(n, beams * k, layer_id + 1)  # explicit: n may be 0
        losses = torch.cat((losses[:, :, None].expand(-1, -1, k, -1), token_loss[..., None]),
                           dim=-1).reshape(n, beams * k, layer_id + 1)
        inputs = [t[:, :, None].expand(-1, -1, k, -1).reshape(n, beams * k, dim) for t in inputs]
        keep = 1 if layer_id == active - 1 else beam
        if scores.shape[1] > keep:
            scores, select = scores.topk(keep, dim=1)
            residual, total = _take(residual, select), _take(total, select)
            chosen, losses = _take(chosen, select), _take(losses, select)
            inputs = [_take(t, select) for t in inputs]

    indices = torch.full((n, q_count), -1, dtype=torch.long, device=rows.device)
    layer_losses = rows.new_zeros(q_count)
    indices[:, :active] = chosen[:, 0]
    if beam > 1:
        per_layer = losses[:, 0]
        mean = per_layer.sum(0) / max(n, 1) if n > 0 else per_layer.sum(0)
        layer_losses = torch.cat((mean, layer_losses[active:]))
        if training:
            for layer_id in range(active):
                vectors = inputs[layer_id][:, 0].detach().float()
                vectors = l2norm(vectors) if cosine else vectors
                model._layer_codebook_step(model.layers[layer_id]._codebook, vectors,
                                           indices[:, layer_id], model.layers[layer_id].codebook_size)
    else:
        layer_losses = torch.stack(losses + [rows.new_zeros(())] * (q_count - active)) \
            if q_count > active else torch.stack(losses)
    if training and model.shared_codebook:
        # row-major over (row, layer), the order theirs samples from
        all_inputs = (torch.stack([t[:, 0].detach().float() for t in inputs], dim=1).reshape(-1, dim)
                      if inputs else rows.new_zeros((0, dim)))
        model._shared_codebook_finish(all_inputs)
    return total[:, 0], indices, layer_losses


def _take(t: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Rows' selected beams: ``t (n, b, ...)``, ``select (n, keep)`` -> ``(n, keep, ...)``."""
    index = select.reshape(*select.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, index)
