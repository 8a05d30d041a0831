"""The fused passes as ``torch.library`` custom ops, dispatching to Triton or to PyTorch.

``rqvae_fast::quantize_forward`` and ``rqvae_fast::quantize_input_grad`` have fake (meta)
implementations, so ``torch.compile`` (``fullgraph=True``) and ``torch.export`` trace through them
without graph breaks; autograd is defined around them in :mod:`rqvae_fast.autograd`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import torch_backend
from .sorted_stats import sorted_code_statistics
from ._triton_available import HAS_TRITON, interpreter_enabled

BACKENDS = ("auto", "triton", "torch")
_layer_starts: Dict[Tuple[Tuple[int, ...], torch.device], Tensor] = {}


def use_triton(backend: str, device: torch.device) -> bool:
    """Resolve ``backend`` for tensors on ``device``; raises if ``"triton"`` cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and device.type == "cuda"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the 'triton' package, which is not installed")
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return True
    raise RuntimeError(
        f"backend='triton' cannot run on device {device}: use CUDA tensors, or set "
        "TRITON_INTERPRET=1 before importing rqvae_fast to run the kernels on CPU (slow)"
    )


def layer_starts(layer_sizes: Sequence[int], device: torch.device) -> Tensor:
    """``(L + 1,)`` int32 offsets of each codebook in the stacked ``codes``, built once per device
    (no host-to-device copy per step, so steps stay CUDA-graph capturable)."""
    key = (tuple(int(s) for s in layer_sizes), device)
    starts = _layer_starts.get(key)
    if starts is None:
        prefix = [0]
        for size in key[0]:
            prefix.append(prefix[-1] + size)
        starts = _layer_starts[key] = torch.tensor(prefix, dtype=torch.int32, device=device)
    return starts


@torch.library.custom_op("rqvae_fast::quantize_forward", mutates_args=())
def quantize_forward(x: Tensor, codes: Tensor, layer_sizes: List[int], routing: int, precision: str,
                     triton_path: bool, with_stats: bool, deterministic: bool
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward over all layers.

    x ``(N, D)`` contiguous, codes ``(K_total, D)`` contiguous. Returns ``quantized (N, D)`` (x's
    dtype), ``indices (N, L)`` int64, ``sse (L,)`` fp32 (sum of squared code errors per layer),
    ``counts (K_total,)`` and ``sums (K_total, D)`` fp32 (``(0,)``/``(0, D)`` without stats).
    ``deterministic``: per-code sums without float atomics (bit-identical across runs; slower,
    see :mod:`rqvae_fast.sorted_stats`). Only the Triton path needs it: the PyTorch path's
    scatter-adds run sequentially on the CPU.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        search_codes, sq_norms = search_operands(codes)
        if triton_path:
            from .kernels import residual_quantize_forward

            sorted_stats = with_stats and deterministic
            out = residual_quantize_forward(
                x, codes, search_codes, sq_norms, layer_starts(layer_sizes, x.device), layer_sizes,
                routing=routing, precision=precision, with_stats=with_stats and not sorted_stats)
            if sorted_stats:
                counts, sums = sorted_code_statistics(x, codes, layer_sizes, out[1], routing)
                out = (out[0], out[1], out[2], counts, sums)
            return out
        return torch_backend.residual_quantize_forward(
            x, codes, search_codes, sq_norms, layer_sizes, routing=routing, precision=precision,
            with_stats=with_stats)


def search_operands(codes: Tensor) -> Tuple[Tensor, Tensor]:
    """What the nearest-code search scores: ``codes (K, D)`` with non-finite codes zeroed, and
    ``(K,)`` fp32 squared norms that are +inf for them, so a NaN/Inf code is never chosen (unless
    a whole codebook is non-finite: then code 0, and the NaN output shows it)."""
    sq_norms = codes.float().pow(2).sum(dim=1)
    usable = torch.isfinite(sq_norms)
    return (torch.where(usable[:, None], codes, torch.zeros((), dtype=codes.dtype, device=codes.device)),
            torch.where(usable, sq_norms, float("inf")))


@quantize_forward.register_fake
def _quantize_forward_fake(x, codes, layer_sizes, routing, precision, triton_path, with_stats,
                           deterministic):
    n, dim = x.shape
    k_total = codes.shape[0] if with_stats else 0
    return (
        torch.empty_like(x),
        x.new_empty((n, len(layer_sizes)), dtype=torch.int64),
        x.new_empty((len(layer_sizes),), dtype=torch.float32),
        x.new_empty((k_total,), dtype=torch.float32),
        x.new_empty((k_total, dim), dtype=torch.float32),
    )


@torch.library.custom_op("rqvae_fast::quantize_input_grad", mutates_args=())
def quantize_input_grad(grad_out: Optional[Tensor], x: Tensor, codes: Tensor, layer_sizes: List[int],
                        indices: Tensor, coef: Tensor, triton_path: bool, commit_layers: int,
                        grad_out_scale: float) -> Tensor:
    """``(N, D)`` input gradient rebuilt from the saved indices in one elementwise pass.

    ``grad_out_scale * grad_out + sum_{l < commit_layers} coef[l] * (r_l - e_l)``; coef ``(L,)`` fp32.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        if triton_path:
            from .kernels import residual_quantize_input_grad

            return residual_quantize_input_grad(
                grad_out, x, codes, layer_starts(layer_sizes, x.device), indices, coef,
                commit_layers=commit_layers, grad_out_scale=grad_out_scale)
        return torch_backend.residual_quantize_input_grad(
            grad_out, x, codes, layer_sizes, indices, coef, commit_layers=commit_layers,
            grad_out_scale=grad_out_scale)


@quantize_input_grad.register_fake
def _quantize_input_grad_fake(grad_out, x, codes, layer_sizes, indices, coef, triton_path,
                              commit_layers, grad_out_scale):
    return torch.empty_like(x)
