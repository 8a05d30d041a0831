"""The fused passes as registered PyTorch ops, dispatching to Triton or to PyTorch.

Two ops carry the work: ``rqvae_fast::quantize_forward`` and ``rqvae_fast::quantize_input_grad``,
``torch.library`` custom ops with fake (meta) implementations, so ``torch.compile``
(``fullgraph=True``) and ``torch.export`` trace through them without graph breaks. Where torch has
``torch.library.triton_op`` (2.6+), the Triton path is registered a second time with it
(:mod:`rqvae_fast.triton_ops`): Inductor then sees the Triton kernels themselves, not an opaque
call. :func:`fused_forward` and :func:`fused_input_grad` pick the op; autograd is defined around
them in :mod:`rqvae_fast.autograd`. Both registrations run the same bodies below.
"""
from __future__ import annotations

import os
# typing.Tuple, not Tuple, in op signatures: torch 2.6's infer_schema evaluates the string
# annotation in its own module, which imports typing but not Tuple.
import typing
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake  # both loaded by ``import torch`` already
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import torch_backend
from .sorted_stats import sorted_code_statistics
from ._triton_available import HAS_TRITON, interpreter_enabled

BACKENDS = ("auto", "triton", "torch")
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
_layer_starts: Dict[Tuple[Tuple[int, ...], torch.device], Tensor] = {}
_triton_ops_registered = False


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


def _tracing(t: Tensor) -> bool:
    """True while ``t`` is a fake/functional tensor or a dispatch mode (tracing) is active."""
    return is_fake(t) or _get_current_dispatch_mode() is not None


def layer_starts(layer_sizes: Sequence[int], like: Tensor) -> Tensor:
    """``(L + 1,)`` int32 offsets of each codebook in the stacked ``codes``, on ``like``'s device.

    Eager calls get one tensor per device, built once (no host-to-device copy per step, so steps
    stay CUDA-graph capturable). While tracing, a fresh tensor becomes a graph constant instead,
    so no fake tensor ever lands in the cache.
    """
    sizes = tuple(int(s) for s in layer_sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    if _tracing(like):
        return torch.tensor(prefix, dtype=torch.int32, device=like.device)
    key = (sizes, like.device)
    starts = _layer_starts.get(key)
    if starts is None:
        starts = _layer_starts[key] = torch.tensor(prefix, dtype=torch.int32, device=like.device)
    return starts


def _use_triton_op(triton_path: bool) -> bool:
    """The ``triton_op`` registration serves the Triton path where torch has it; the custom op
    serves the rest. Triton's interpreter cannot be traced (its kernels would run on fake
    tensors), so ``torch.compile`` under ``TRITON_INTERPRET=1`` keeps the opaque custom op.
    ``RQVAE_FAST_TRITON_OP=0`` keeps it too (an escape hatch should a torch release's Inductor
    mishandle user-defined Triton kernels)."""
    if not (triton_path and HAS_TRITON_OP) or os.environ.get("RQVAE_FAST_TRITON_OP", "1") == "0":
        return False
    if interpreter_enabled() and torch.compiler.is_compiling():
        return False
    global _triton_ops_registered
    if not _triton_ops_registered:
        from . import triton_ops  # noqa: F401  (registers rqvae_fast::*_triton)

        _triton_ops_registered = True
    return True


def fused_forward(x: Tensor, codes: Tensor, layer_sizes: List[int], routing: int, precision: str,
                  triton_path: bool, with_stats: bool, deterministic: bool, active: int = -1
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the fused forward through the right registered op; see :func:`forward_body`."""
    if _use_triton_op(triton_path):
        return torch.ops.rqvae_fast.quantize_forward_triton(
            x, codes, layer_sizes, routing, precision, with_stats, deterministic, active)
    return quantize_forward(x, codes, layer_sizes, routing, precision, triton_path, with_stats,
                            deterministic, active)


def fused_input_grad(grad_out: Optional[Tensor], x: Tensor, codes: Tensor, layer_sizes: List[int],
                     indices: Tensor, coef: Tensor, triton_path: bool, commit_layers: int,
                     grad_out_scale: float, active: int = -1) -> Tensor:
    """Run the input-gradient pass through the right registered op; see :func:`input_grad_body`."""
    if _use_triton_op(triton_path):
        return torch.ops.rqvae_fast.quantize_input_grad_triton(
            grad_out, x, codes, layer_sizes, indices, coef, commit_layers, grad_out_scale, active)
    return quantize_input_grad(grad_out, x, codes, layer_sizes, indices, coef, triton_path,
                               commit_layers, grad_out_scale, active)


def active_count(active: int, num_layers: int) -> int:
    """The ops' ``active`` argument as a layer count: ``-1`` means all ``num_layers``."""
    return num_layers if active < 0 else active


def forward_body(x: Tensor, codes: Tensor, layer_sizes: List[int], routing: int, precision: str,
                 triton_path: bool, with_stats: bool, deterministic: bool, active: int = -1
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward over all layers (the body of both registrations).

    x ``(N, D)`` contiguous, codes ``(K_total, D)`` contiguous. Returns ``quantized (N, D)`` (x's
    dtype), ``indices (N, L)`` int64, ``sse (L,)`` fp32 (sum of squared code errors per layer),
    ``counts (K_total,)`` and ``sums (K_total, D)`` fp32 (``(0,)``/``(0, D)`` without stats).
    ``active``: only the first ``active`` layers run (quantize dropout; ``-1``: all); the others
    get index -1, sse 0 and zero statistics, and the residual passes through them.
    ``deterministic``: per-code sums without float atomics (bit-identical across runs; slower,
    see :mod:`rqvae_fast.sorted_stats`). Only the Triton path needs it: the PyTorch path's
    scatter-adds run sequentially on the CPU.
    """
    active = active_count(active, len(layer_sizes))
    with torch.autocast(device_type=x.device.type, enabled=False):
        search_codes, sq_norms = search_operands(codes)
        if triton_path:
            from .kernels import residual_quantize_forward

            sorted_stats = with_stats and deterministic
            out = residual_quantize_forward(
                x, codes, search_codes, sq_norms, layer_starts(layer_sizes, x), layer_sizes,
                routing=routing, precision=precision, with_stats=with_stats and not sorted_stats,
                active=active)
            if sorted_stats:
                counts, sums = sorted_code_statistics(x, codes, layer_sizes, out[1], routing, active)
                out = (out[0], out[1], out[2], counts, sums)
            return out
        return torch_backend.residual_quantize_forward(
            x, codes, search_codes, sq_norms, layer_sizes, routing=routing,
            precision="ieee" if precision == "exact" else precision, with_stats=with_stats,
            active=active)


def search_operands(codes: Tensor) -> Tuple[Tensor, Tensor]:
    """What the nearest-code search scores: ``codes (K, D)`` with non-finite codes zeroed, and
    ``(K,)`` fp32 squared norms that are +inf for them, so a NaN/Inf code is never chosen (unless
    a whole codebook is non-finite: then code 0, and the NaN output shows it)."""
    sq_norms = codes.float().pow(2).sum(dim=1)
    usable = torch.isfinite(sq_norms)
    return (torch.where(usable[:, None], codes, torch.zeros((), dtype=codes.dtype, device=codes.device)),
            torch.where(usable, sq_norms, float("inf")))


@torch.library.custom_op("rqvae_fast::quantize_forward", mutates_args=())
def quantize_forward(x: Tensor, codes: Tensor, layer_sizes: List[int], routing: int, precision: str,
                     triton_path: bool, with_stats: bool, deterministic: bool, active: int = -1
                     ) -> typing.Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused forward as an opaque custom op; see :func:`forward_body`."""
    return forward_body(x, codes, layer_sizes, routing, precision, triton_path, with_stats,
                        deterministic, active)


@quantize_forward.register_fake
def _quantize_forward_fake(x, codes, layer_sizes, routing, precision, triton_path, with_stats,
                           deterministic, active=-1):
    n, dim = x.shape
    k_total = codes.shape[0] if with_stats else 0
    return (
        torch.empty_like(x),
        x.new_empty((n, len(layer_sizes)), dtype=torch.int64),
        x.new_empty((len(layer_sizes),), dtype=torch.float32),
        x.new_empty((k_total,), dtype=torch.float32),
        x.new_empty((k_total, dim), dtype=torch.float32),
    )


def input_grad_body(grad_out: Optional[Tensor], x: Tensor, codes: Tensor, layer_sizes: List[int],
                    indices: Tensor, coef: Tensor, triton_path: bool, commit_layers: int,
                    grad_out_scale: float, active: int = -1) -> Tensor:
    """``(N, D)`` input gradient rebuilt from the saved indices in one elementwise pass (the body
    of both registrations).

    ``grad_out_scale * grad_out + sum_{l < min(commit_layers, active)} coef[l] * (r_l - e_l)``;
    coef ``(L,)`` fp32; ``active`` the forward's (``-1``: all layers).
    """
    active = active_count(active, len(layer_sizes))
    with torch.autocast(device_type=x.device.type, enabled=False):
        if triton_path:
            from .kernels import residual_quantize_input_grad

            return residual_quantize_input_grad(
                grad_out, x, codes, layer_starts(layer_sizes, x), indices, coef,
                commit_layers=commit_layers, grad_out_scale=grad_out_scale, active=active)
        return torch_backend.residual_quantize_input_grad(
            grad_out, x, codes, layer_sizes, indices, coef, commit_layers=min(commit_layers, active),
            grad_out_scale=grad_out_scale)


@torch.library.custom_op("rqvae_fast::quantize_input_grad", mutates_args=())
def quantize_input_grad(grad_out: Optional[Tensor], x: Tensor, codes: Tensor, layer_sizes: List[int],
                        indices: Tensor, coef: Tensor, triton_path: bool, commit_layers: int,
                        grad_out_scale: float, active: int = -1) -> Tensor:
    """The input-gradient pass as an opaque custom op; see :func:`input_grad_body`."""
    return input_grad_body(grad_out, x, codes, layer_sizes, indices, coef, triton_path,
                           commit_layers, grad_out_scale, active)


@quantize_input_grad.register_fake
def _quantize_input_grad_fake(grad_out, x, codes, layer_sizes, indices, coef, triton_path,
                              commit_layers, grad_out_scale, active=-1):
    return torch.empty_like(x)
