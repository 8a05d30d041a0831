"""Plain PyTorch oracles for vector-quantize-pytorch's options (rotation trick, cosine codebooks,
Gumbel sampling), written to be read: per layer, full distance matrices, autograd for gradients.

Used by the parity tests, and by :mod:`rqvae_fast.compat` for the options the fused pass does
not cover (see ``docs/COMPAT.md``). Shapes: rows ``(n, D)``, codebooks ``(K, D)``, fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .reference import _mse
from .result import QuantizeResult

NORM_EPS = 1e-6   # their clamp of vector norms (l2norm, safe_div)
DIST_EPS = 1e-8   # their clamp of squared distances before the square root


def l2norm(t: torch.Tensor) -> torch.Tensor:
    """``t / max(|t|, 1e-6)`` along the last dim."""
    return F.normalize(t, p=2, dim=-1, eps=NORM_EPS)


def rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Value ``tgt`` (up to rounding), gradient to ``src`` through the rotation and rescaling that
    map ``src`` onto ``tgt`` (all coefficients detached; ``tgt`` gets no gradient). ``(..., D)``."""
    src_norm = src.norm(dim=-1, keepdim=True)
    tgt_norm = tgt.norm(dim=-1, keepdim=True)
    u = (src / src_norm.clamp(min=NORM_EPS)).detach()
    q = (tgt / tgt_norm.clamp(min=NORM_EPS)).detach()
    w = l2norm(u + q).detach()
    rotated = (src - 2.0 * (src * w).sum(-1, keepdim=True) * w
               + 2.0 * (src * u).sum(-1, keepdim=True) * q)
    return rotated * (tgt_norm / src_norm.clamp(min=NORM_EPS)).detach()


def straight_through(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Value ``tgt``, identity gradient to ``src``."""
    return src + (tgt - src).detach()


def code_logits(rows: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> torch.Tensor:
    """``(n, K)`` scores to maximise: ``rows @ codebook.T`` (cosine, both unit-norm) or the negative
    Euclidean distance ``-sqrt(max(|r - c|^2, 1e-8))`` (their clamp: ties below 1e-4 distance)."""
    if cosine:
        return rows @ codebook.t()
    sq = ((rows * rows).sum(1, keepdim=True) + (codebook * codebook).sum(1)[None]
          - 2.0 * rows @ codebook.t())
    return -sq.clamp(min=DIST_EPS).sqrt()


def gumbel_pick(logits: torch.Tensor, temperature: float, topk: Optional[int] = None,
                row_select: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Argmax (or top-k, descending) over the last dim of ``logits (n, K) / temperature`` plus
    Gumbel noise from torch's global generator; no noise when ``temperature <= 0``. ``row_select
    (N,)`` bool with ``n`` True entries: draw the noise for all ``N`` rows and keep the selected ones
    (the draws of a masked batch then equal theirs, which draw for padding too)."""
    if temperature > 0:
        shape = logits.shape if row_select is None else (row_select.shape[0], logits.shape[1])
        uniform = logits.new_zeros(shape).uniform_(0, 1)
        if row_select is not None:
            uniform = uniform[row_select]
        noise = -torch.log((-torch.log(uniform.clamp(min=1e-20))).clamp(min=1e-20))
        logits = logits / temperature + noise
    if topk is None:
        return logits.argmax(dim=-1)
    return logits.topk(topk, dim=-1).indices


def rotation_residual_quantize_reference(x: torch.Tensor, codebooks: Sequence[torch.Tensor],
                                         commitment_cost: float = 0.25, *,
                                         codebook_loss: bool = True) -> QuantizeResult:
    """``residual_quantize(..., grad_mode="rotation")`` by autograd: nearest code by exact squared
    distance, ``r_{l+1} = r_l - sg(e_l)``, output ``sum_l rotate_to(r_l, e_l)``, loss per layer
    ``beta * mse(r_l, sg(e_l)) (+ mse(e_l, sg(r_l)))``. ``x (N, D)``."""
    residual = x.float()
    total = torch.zeros_like(residual)
    indices, losses = [], []
    for codebook in codebooks:
        codebook = codebook.float()
        sq = (codebook * codebook).sum(1)[None] - 2.0 * residual.detach() @ codebook.t()
        index = sq.argmin(dim=1)
        code = codebook[index]
        loss = commitment_cost * _mse(residual, code.detach())
        if codebook_loss:
            loss = loss + _mse(code, residual.detach())
        losses.append(loss)
        total = total + rotate_to(residual, code.detach())
        residual = residual - code.detach()
        indices.append(index)
    return QuantizeResult(quantized=total.to(x.dtype), indices=torch.stack(indices, 1),
                          loss=sum(losses), layer_losses=torch.stack(losses),
                          code_counts=(), code_sums=())
