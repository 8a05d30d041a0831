"""Functional API for users who own their codebook tensors.

>>> out = residual_quantize(z, [c0, c1, c2], commitment_cost=0.25)
>>> out.quantized, out.indices, out.loss, out.code_counts
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import backend as _backend
from ._validation import check_finite as _check_finite
from ._validation import check_active_layers, check_inputs
from .autograd import ResidualQuantizeFunction
from .beam import check_layer_weights
from .precision import resolve_precision
from .result import QuantizeResult
from .routing import routing_id


def residual_quantize(
    x: torch.Tensor,
    codebooks: Sequence[torch.Tensor],
    commitment_cost: float = 0.25,
    *,
    grad_mode: str = "seed",
    codebook_loss: bool = True,
    precision: Optional[str] = None,
    backend: str = "auto",
    compute_stats: Optional[bool] = None,
    check_finite: bool = False,
    deterministic: Optional[bool] = None,
    active_layers: Optional[int] = None,
    beam_size: int = 1,
    beam_weights: Optional[Sequence[float]] = None,
) -> QuantizeResult:
    """Quantize ``x (*, D)`` through codebooks ``(K_l, D)`` in one fused pass.

    - ``grad_mode``: ``"seed"`` (the seed document's routing), ``"full"`` (standard RQ-VAE),
      ``"layer_ste"`` (vector-quantize-pytorch's with ``rotation_trick=False``) or ``"rotation"``
      (its default rotation trick); see :mod:`rqvae_fast.routing`.
    - ``codebook_loss``: include ``mse(e_l, sg(r_l))`` in the loss and give codebooks a gradient.
      ``False`` for EMA codebooks (loss = commitment terms only).
    - ``precision``: ``None`` (follow ``torch.get_float32_matmul_precision()``), ``"ieee"``, ``"tf32"``
      or ``"bf16"``: the arithmetic of the distance matmul only.
    - ``backend``: ``"auto"`` (Triton for CUDA tensors when available), ``"triton"`` or ``"torch"``.
    - ``compute_stats``: return per-code counts and residual sums (needed by EMA updates). ``None``:
      only when a codebook gradient will be needed.
    - ``check_finite``: raise naming the first NaN/Inf row (synchronizes the device). Otherwise such
      rows get index -1, a NaN output, a NaN loss, and stay out of the statistics.
    - ``deterministic``: bit-identical statistics and gradients across runs on a GPU (no float
      atomics; costs a sort per layer). ``None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    - ``active_layers``: quantize dropout, run only the first ``active_layers`` codebooks (an int in
      ``[0, L]``; ``None``: all). The others do no work: their indices are -1, their
      ``layer_losses`` 0, their statistics zero (so an EMA step leaves them alone) and their
      codebooks get a zero gradient; the residual passes through them. ``0`` is allowed: every
      index -1 and the output the zero vector (``"full"``: ``x + sg(0 - x)``). A runtime value
      on the Triton path (one compiled kernel for every cutoff).
    - ``beam_size``: ``1`` (default) is the greedy fused pass above. ``B > 1`` keeps the ``B`` paths
      of lowest squared reconstruction error per row across layers
      (:func:`rqvae_fast.beam.beam_encode`, chunked PyTorch, fp32 whatever ``precision``) and
      returns those codes with their output, losses, statistics and gradients (same routing
      semantics). **Not in the fused kernel**: the search and the forward values run in PyTorch
      (the backward is the usual one); codebooks must be finite.
    - ``beam_weights``: ``None`` (rank paths by final squared error, above) or one positive
      weight ``a_l`` per codebook: vector-quantize-pytorch's beam ranking, a path scored by
      ``sum_l a_l ||r_l - e_l||^2`` and the least score returned (see :mod:`rqvae_fast.beam`).
      Needs ``beam_size > 1`` to matter.
    Nothing passed in is modified.
    """
    check_inputs(x, codebooks)
    active = check_active_layers(active_layers, len(codebooks))
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
    weights = check_layer_weights(beam_weights, len(codebooks))
    weights = None if weights is None else tuple(weights.tolist())
    routing = routing_id(grad_mode)
    precision = resolve_precision(precision)
    triton_path = _backend.use_triton(backend, x.device)

    lead_shape, dim = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, dim).contiguous()
    if check_finite:
        _check_finite(x2d, "inputs")
        for layer, codebook in enumerate(codebooks):
            _check_finite(codebook.detach(), f"codebook {layer}")
    layer_sizes = tuple(int(c.shape[0]) for c in codebooks)
    if len({c.dtype for c in codebooks}) > 1:
        codebooks = [c.float() for c in codebooks]
    codes = torch.cat(list(codebooks), dim=0).contiguous()  # always a fresh tensor

    needs_codebook_grad = (codebook_loss and torch.is_grad_enabled()
                           and any(c.requires_grad for c in codebooks))
    with_stats = needs_codebook_grad if compute_stats is None else (compute_stats or needs_codebook_grad)

    quantized, indices, layer_losses, counts, sums = ResidualQuantizeFunction.apply(
        x2d, codes, layer_sizes, float(commitment_cost), routing, codebook_loss,
        precision, triton_path, with_stats, _deterministic_enabled(deterministic), active, beam_size, weights)
    if with_stats:
        code_counts = tuple(counts.split(list(layer_sizes)))
        code_sums = tuple(sums.split(list(layer_sizes)))
    else:
        code_counts = code_sums = ()
    return QuantizeResult(
        quantized=quantized.reshape(x.shape),
        indices=indices.reshape(*lead_shape, len(layer_sizes)),
        loss=layer_losses.sum(),
        layer_losses=layer_losses,
        code_counts=code_counts,
        code_sums=code_sums,
    )


def _deterministic_setting() -> bool:
    return torch.are_deterministic_algorithms_enabled()


_deterministic_setting._dynamo_marked_constant = True  # see rqvae_fast.precision


def _deterministic_enabled(deterministic: Optional[bool]) -> bool:
    return _deterministic_setting() if deterministic is None else bool(deterministic)


@torch.no_grad()
def ema_update_(
    codebook: torch.Tensor,
    ema_cluster_size: torch.Tensor,
    ema_dw: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> None:
    """The seed's EMA codebook update, in place (``codebook``, ``ema_cluster_size``, ``ema_dw``).

    ``ema_cluster_size = decay * ema_cluster_size + (1 - decay) * counts``;
    ``ema_dw = decay * ema_dw + (1 - decay) * sums``; then with ``n = sum(ema_cluster_size)`` the
    Laplace-smoothed sizes ``(size + eps) / (n + K eps) * n`` divide ``ema_dw`` into the codebook.
    counts ``(K,)`` and sums ``(K, D)`` come from :func:`residual_quantize` (``code_counts``/``code_sums``).

    A step whose counts are all zero (an empty or all-NaN batch) leaves all three unchanged, so a
    bad batch cannot decay or poison the codebook; the choice is made on the device (no sync).
    """
    seen = counts.sum() > 0
    new_size = ema_cluster_size * decay + counts.to(ema_cluster_size.dtype) * (1 - decay)
    new_dw = ema_dw * decay + sums.to(ema_dw.dtype) * (1 - decay)
    total = new_size.sum()
    smoothed = (new_size + eps) / (total + codebook.shape[0] * eps) * total
    new_codes = (new_dw / smoothed.unsqueeze(1)).to(codebook.dtype)
    ema_cluster_size.copy_(torch.where(seen, new_size, ema_cluster_size))
    ema_dw.copy_(torch.where(seen, new_dw, ema_dw))
    codebook.copy_(torch.where(seen & (smoothed > 0).unsqueeze(1), new_codes, codebook))
