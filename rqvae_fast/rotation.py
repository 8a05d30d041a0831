"""The rotation trick's input gradient (Fifty et al. 2024, arXiv 2410.06424), rebuilt from indices.

Per layer ``l`` the output ``q_l`` equals the chosen code ``e_l``, but its gradient to the layer's
input ``r_l`` is the one of ``q_l = lam * M r_l`` with the constants (no gradient through them)

    u = r_l / |r_l|,  q = e_l / |e_l|,  w = (u + q) / |u + q|,  lam = |e_l| / |r_l|,
    M = I - 2 w w^T + 2 q u^T          (the rotation taking u onto q; M u = q)

so ``d loss / d r_l = lam * (g - 2 (g.w) w + 2 (g.q) u)`` for an output gradient ``g``. Norms are
clamped at ``NORM_EPS`` as vector-quantize-pytorch clamps them. With ``r_{l+1} = r_l - sg(e_l)``
every ``r_l`` has d r_l / d x = I, so the input gradient is the sum over layers, plus the layers'
commitment terms ``coef_l * (r_l - e_l)``. Nothing ``(N, L, D)``-sized is formed: rows are
processed in chunks and each layer's residual is rebuilt from the saved indices.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

NORM_EPS = 1e-6  # vector-quantize-pytorch's clamp of vector norms (safe_div, l2norm)
CHUNK_ROWS = 8192


def rotate_gradient(grad: torch.Tensor, residual: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``lam * M^T grad`` for rows of ``grad``, ``residual``, ``code`` ``(n, D)`` fp32 -> ``(n, D)``."""
    r_norm = residual.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)
    e_norm = code.norm(dim=1, keepdim=True)
    u = residual / r_norm
    q = code / e_norm.clamp(min=NORM_EPS)
    w = u + q
    w = w / w.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)
    g_w = (grad * w).sum(dim=1, keepdim=True)
    g_q = (grad * q).sum(dim=1, keepdim=True)
    return (e_norm / r_norm) * (grad - 2.0 * g_w * w + 2.0 * g_q * u)


def rotation_input_grad(grad_out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor,
                        layer_sizes: Sequence[int], indices: torch.Tensor, coef: torch.Tensor,
                        chunk_rows: int = CHUNK_ROWS, active: Optional[int] = None) -> torch.Tensor:
    """Input gradient ``(N, D)`` (dtype of ``x``) of the rotation-trick routing.

    ``grad_out (N, D)`` gradient of the output (or None), ``x (N, D)`` the input, ``codes
    (K_total, D)`` the stacked codebooks, ``indices (N, L)`` int64 (``-1`` for non-finite rows),
    ``coef (L,)`` fp32 the commitment coefficients (``g_l * 2 beta / (N D)``). Only the first
    ``active`` layers (``None``: all) ran in the forward and contribute.
    """
    n, dim = x.shape
    out = torch.empty((n, dim), dtype=torch.float32, device=x.device)
    starts = [0]
    for size in layer_sizes[:-1]:
        starts.append(starts[-1] + int(size))
    starts = starts[:len(starts) if active is None else active]
    book = codes.detach().float()
    coef = coef.float()
    for begin in range(0, n, chunk_rows):
        end = min(n, begin + chunk_rows)
        residual = x[begin:end].detach().float()
        grad = None if grad_out is None else grad_out[begin:end].float()
        acc = torch.zeros_like(residual)
        for layer, start in enumerate(starts):
            code = book[start + indices[begin:end, layer].clamp(min=0)]
            if grad is not None:
                acc += rotate_gradient(grad, residual, code)
            acc += coef[layer] * (residual - code)
            residual = residual - code
        out[begin:end] = acc
    return out.to(x.dtype)
