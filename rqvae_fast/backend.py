"""Choose between the Triton kernels and the PyTorch path, and call either with one contract."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from . import torch_backend
from ._triton_available import HAS_TRITON, interpreter_enabled

BACKENDS = ("auto", "triton", "torch")
_layer_start_cache: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}


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


def layer_starts(layer_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(L + 1,)`` int32 prefix sums of the codebook sizes on ``device``, cached (no copy per step)."""
    key = (tuple(layer_sizes), device)
    starts = _layer_start_cache.get(key)
    if starts is None:
        prefix = [0]
        for size in layer_sizes:
            prefix.append(prefix[-1] + int(size))
        starts = torch.tensor(prefix, dtype=torch.int32, device=device)
        _layer_start_cache[key] = starts
    return starts


def forward(x, codes, layer_sizes, *, triton_path: bool, seed_residual: bool, precision: str,
            with_stats: bool):
    """Fused forward: ``(quantized, indices, sse (L,), counts (K_total,), sums (K_total, D))``."""
    sq_norms = codes.float().pow(2).sum(dim=1)
    if triton_path:
        from .kernels import residual_quantize_forward

        return residual_quantize_forward(
            x, codes, sq_norms, layer_starts(layer_sizes, x.device), layer_sizes,
            seed_residual=seed_residual, precision=precision, with_stats=with_stats)
    return torch_backend.residual_quantize_forward(
        x, codes, sq_norms, layer_sizes, seed_residual=seed_residual, precision=precision,
        with_stats=with_stats)


def input_grad(grad_out: Optional[torch.Tensor], x, codes, layer_sizes, indices, coef, *,
               triton_path: bool, commit_layers: int) -> torch.Tensor:
    """``(N, D)`` input gradient from the saved indices (elementwise, one pass)."""
    if triton_path:
        from .kernels import residual_quantize_input_grad

        return residual_quantize_input_grad(
            grad_out, x, codes, layer_starts(layer_sizes, x.device), indices, coef,
            commit_layers=commit_layers)
    return torch_backend.residual_quantize_input_grad(
        grad_out, x, codes, layer_sizes, indices, coef, commit_layers=commit_layers)
