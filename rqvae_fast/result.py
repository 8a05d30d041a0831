"""The named result every quantization path returns."""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch


class QuantizeResult(NamedTuple):
    """Output of :func:`rqvae_fast.functional.residual_quantize` and of the reference.

    - ``quantized``: ``(*, D)`` in the input's dtype, the sum of the chosen codes (with the STE).
    - ``indices``: ``(*, L)`` int64; ``-1`` in every layer for a row holding NaN/Inf.
    - ``loss``: 0-d fp32, differentiable; the sum of ``layer_losses``.
    - ``layer_losses``: ``(L,)`` fp32, differentiable (weight layers as you like); layer l adds ``w * mean((r_l - e_l)^2)`` with
      ``w = 1 + beta`` (codebook + commitment) or ``w = beta`` (commitment only, EMA codebooks).
    - ``code_counts``: per layer, ``(K_l,)`` fp32: how many finite rows chose each code.
    - ``code_sums``: per layer, ``(K_l, D)`` fp32: the sum of the residuals ``r_l`` that chose each code.
      Empty tuples when statistics were not asked for.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    layer_losses: torch.Tensor
    code_counts: Tuple[torch.Tensor, ...]
    code_sums: Tuple[torch.Tensor, ...]
