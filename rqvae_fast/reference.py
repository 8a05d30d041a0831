"""Plain PyTorch residual quantization: the oracle for parity tests.

Written to be read, not to be fast: every layer builds its full ``(N, K_l)`` distance matrix and
autograd derives all gradients from ``.detach()`` placements, exactly as the seed document does.

Notation (per layer ``l``): ``r_l`` is the layer's input residual (``r_0 = x``), ``e_l`` the chosen
code, ``sg`` stop-gradient, ``beta`` the commitment cost.

- ``grad_mode="seed"``: ``q_l = r_l + sg(e_l - r_l)`` (STE), ``r_{l+1} = r_l - q_l``,
  output ``sum_l q_l``. Because ``r_{l+1}`` subtracts the STE output it carries no gradient.
- ``grad_mode="full"``: ``r_{l+1} = r_l - sg(e_l)``, output ``x + sg(sum_l e_l - x)``.
- ``grad_mode="layer_ste"``: ``r_{l+1} = r_l - sg(e_l)``, output ``sum_l (r_l + sg(e_l - r_l))``.

Quantize dropout (``active_layers=a``): layers ``l >= a`` are skipped: index -1, loss 0, zero
statistics, and the residual and output pass through them unchanged.

Loss per layer: ``mse(e_l, sg(r_l))`` (codebook term, dropped when ``codebook_loss=False``) plus
``beta * mse(r_l, sg(e_l))`` (commitment term). Rows holding NaN/Inf get index -1, a NaN output
and NaN loss; they never enter the per-code statistics.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from .precision import resolve_precision
from .result import QuantizeResult


def nearest_code(residual: torch.Tensor, codebook: torch.Tensor, precision: str) -> torch.Tensor:
    """Index of the nearest code for each row: ``argmin_k ||c_k||^2 - 2 r.c_k``.

    residual ``(N, D)`` fp32, codebook ``(K, D)``; returns ``(N,)`` int64. ``||r||^2`` is the same for
    every code of a row, so it is left out. Ties go to the lowest index (``torch.argmin``). A code
    holding NaN/Inf is never chosen (unless all are: then code 0).
    """
    codebook = codebook.float()
    usable = torch.isfinite(codebook).all(dim=1)
    codebook = torch.where(usable[:, None], codebook, 0.0)
    sq_norms = (codebook * codebook).sum(dim=1)
    if precision == "bf16":  # bf16 operands, fp32 products and sums
        dots = residual.bfloat16().float() @ codebook.bfloat16().float().t()
    else:
        dots = residual @ codebook.t()
    scores = torch.where(usable, sq_norms - 2.0 * dots, float("inf"))
    best = torch.argmin(scores, dim=1)
    # A matmul may round identical codes differently: the lowest index among exact copies wins.
    _, copy_group = torch.unique(codebook, dim=0, return_inverse=True)
    first_of_group = torch.full((codebook.shape[0],), codebook.shape[0], device=codebook.device)
    first_of_group.scatter_reduce_(0, copy_group, torch.arange(codebook.shape[0], device=codebook.device),
                                   reduce="amin")
    return first_of_group[copy_group][best]


def residual_quantize_reference(
    x: torch.Tensor,
    codebooks: Sequence[torch.Tensor],
    commitment_cost: float = 0.25,
    *,
    grad_mode: str = "seed",
    codebook_loss: bool = True,
    precision: str | None = "ieee",
    indices: torch.Tensor | None = None,
    active_layers: int | None = None,
) -> QuantizeResult:
    """Quantize ``x`` ``(*, D)`` through ``L`` codebooks ``(K_l, D)``; see the module docstring.

    ``indices (*, L)``, if given, replaces the nearest-code search (everything else is computed
    from that assignment): tests use it to check another path's values for the codes it chose.
    ``active_layers``: only the first ``active_layers`` codebooks run (``None``: all).
    """
    if grad_mode not in ("seed", "full", "layer_ste"):
        raise ValueError(f"grad_mode must be 'seed', 'full' or 'layer_ste', got {grad_mode!r}")
    precision = resolve_precision(precision)
    lead_shape, dim = x.shape[:-1], x.shape[-1]
    inputs = x.reshape(-1, dim).float()
    finite_row = torch.isfinite(inputs).all(dim=1)

    residual = inputs
    code_total = torch.zeros_like(inputs)
    forced = None if indices is None else indices.reshape(-1, len(codebooks))
    chosen_indices: List[torch.Tensor] = []
    layer_losses, counts, sums = [], [], []
    loss = inputs.new_zeros(())
    active = len(codebooks) if active_layers is None else active_layers
    for layer, codebook in enumerate(codebooks):
        codebook = codebook.float()
        if layer >= active:  # dropped: no search, no loss, no statistics, residual unchanged
            chosen_indices.append(torch.full((inputs.shape[0],), -1, dtype=torch.long, device=x.device))
            layer_losses.append(inputs.new_zeros(()))
            counts.append(inputs.new_zeros(codebook.shape[0]))
            sums.append(inputs.new_zeros(codebook.shape))
            continue
        if forced is None:
            index = nearest_code(residual.detach(), codebook, precision)
        else:
            index = forced[:, layer].to(torch.long)
        index = torch.where(finite_row, index, torch.full_like(index, -1))
        code = codebook[index.clamp(min=0)]
        code = torch.where(finite_row[:, None], code, torch.full_like(code, float("nan")))

        commitment = commitment_cost * _mse(residual, code.detach())
        layer_loss = commitment + (_mse(code, residual.detach()) if codebook_loss else 0.0)
        loss = loss + layer_loss
        layer_losses.append(layer_loss)

        one_hot = F.one_hot(index.clamp(min=0), codebook.shape[0]).float() * finite_row[:, None]
        counts.append(one_hot.sum(dim=0))
        sums.append(one_hot.t() @ torch.where(finite_row[:, None], residual.detach(), 0.0))

        if grad_mode == "seed":
            quantized = residual + (code - residual).detach()
            residual = residual - quantized
            code_total = code_total + quantized
        elif grad_mode == "full":
            residual = residual - code.detach()
            code_total = code_total + code.detach()
        else:
            code_total = code_total + (residual + (code - residual).detach())
            residual = residual - code.detach()
        chosen_indices.append(index)

    if grad_mode == "full":
        code_total = inputs + (code_total - inputs).detach()
    if active == 0:  # no code was added: non-finite rows still get a NaN output (gradient unchanged)
        code_total = code_total + torch.where(finite_row[:, None], 0.0, float("nan")).detach()
    return QuantizeResult(
        quantized=code_total.to(x.dtype).reshape(x.shape),
        indices=torch.stack(chosen_indices, dim=1).reshape(*lead_shape, len(chosen_indices)),
        loss=loss,
        layer_losses=torch.stack(layer_losses) if layer_losses else inputs.new_zeros(0),
        code_counts=tuple(counts),
        code_sums=tuple(sums),
    )


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error that is 0 (not NaN) for empty inputs."""
    if a.numel() == 0:
        return a.sum() * 0.0
    return F.mse_loss(a, b)


@torch.no_grad()
def ema_update_reference(
    codebook: torch.Tensor,
    ema_cluster_size: torch.Tensor,
    ema_dw: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """The seed's ``VQEmbeddingEMA`` update, in place, from one batch's ``counts (K,)`` and ``sums (K, D)``."""
    ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    ema_dw.mul_(decay).add_(sums, alpha=1 - decay)
    total = ema_cluster_size.sum()
    smoothed = (ema_cluster_size + eps) / (total + codebook.shape[0] * eps) * total
    codebook.copy_(ema_dw / smoothed.unsqueeze(1))
