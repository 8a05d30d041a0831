"""One uniform callable per (provider, mode), for the benchmark suite and the report.

Providers (all built from the same random inputs and codebooks, same sizes, same EMA/learned
setting):

- ``rqvae_fast``: :class:`rqvae_fast.ResidualVQ` with ``backend="auto"``: the fused Triton kernels on
  CUDA, the chunked PyTorch path on CPU (labelled ``torch``; Triton-interpreted code is never timed
  unless ``allow_interpreted=True`` and then it is flagged ``interpreted``).
- ``rqvae_fast[torch]``: the same module forced onto the chunked PyTorch path (useful on CUDA).
- ``reference`` / ``reference+compile``: :func:`rqvae_fast.reference.residual_quantize_reference`
  (+ :func:`~rqvae_fast.reference.ema_update_reference`), eager or under ``torch.compile``.
- ``seed`` / ``seed+compile``: :class:`rqvae_fast.peers.SeedResidualVQ`, eager or compiled.
- ``vector_quantize_pytorch``: its ``ResidualVQ`` in STE mode (``rotation_trick=False``), when
  importable; EMA codebooks for ``ema``, learnable codebooks otherwise.

Modes (``x`` is ``(N, D)`` fp32; a step returns what it computed and is asynchronous -- use
:meth:`Case.step` to synchronize):

- ``inference``: eval mode under ``no_grad``; the indices ``(N, L)`` are what is used.
- ``train``: training-mode forward, then the gradients of ``(quantized, loss)`` -- with a fixed
  random upstream gradient for ``quantized`` -- w.r.t. ``x`` and the codebooks.
- ``ema``: training-mode forward with EMA codebooks (the step updates them), then the gradient
  w.r.t. ``x``.
"""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch

from .roofline import Shape, matmul_precision, synchronize

PROVIDERS = ("rqvae_fast", "reference", "reference+compile", "seed", "seed+compile",
             "vector_quantize_pytorch")
EXTRA_PROVIDERS = ("rqvae_fast[torch]",)
MODES = ("inference", "train", "ema")
COMMITMENT = 0.25
DECAY = 0.99
EPS = 1e-5


class Unavailable(RuntimeError):
    """The provider cannot (or must not) run here; the message says why (used to skip)."""


@dataclass
class Problem:
    """Inputs shared by every provider: ``x (N, D)``, codebooks ``[(K, D)] * L`` (layer ``l``
    scaled by ``0.5 ** l``), and an upstream gradient ``grad_q (N, D)`` for the training modes."""

    x: torch.Tensor
    codebooks: List[torch.Tensor]
    grad_q: Optional[torch.Tensor]

    @property
    def nbytes(self) -> int:
        tensors = [self.x, *self.codebooks] + ([self.grad_q] if self.grad_q is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def make_problem(shape: Shape, device: torch.device, mode: str, seed: int = 0) -> Problem:
    """Random (never zero) inputs for ``shape``, drawn on ``device`` (fast for 2^24-row sweeps)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.n, shape.d, generator=gen, device=device)
    codebooks = [torch.randn(shape.k, shape.d, generator=gen, device=device) * 0.5 ** layer
                 for layer in range(shape.layers)]
    grad_q = (torch.randn(shape.n, shape.d, generator=gen, device=device)
              if mode != "inference" else None)
    return Problem(x, codebooks, grad_q)


@dataclass
class Case:
    """A prepared benchmark: ``run()`` does one step (asynchronous), ``step()`` also synchronizes.

    ``backend`` names what runs: ``triton``, ``torch`` (our chunked PyTorch path), ``eager``,
    ``inductor`` (torch.compile) or ``vqp``. ``interpreted`` marks Triton-interpreted CPU code,
    whose timings are not speeds. ``resident_bytes`` is the memory held before a step (inputs,
    parameters, state): peak memory is reported above it.
    """

    provider: str
    mode: str
    shape: Shape
    precision: str
    device: torch.device
    backend: str
    run: Callable[[], Any]
    resident_bytes: int = 0
    interpreted: bool = False
    first_call_s: float = float("nan")
    notes: List[str] = field(default_factory=list)

    def step(self) -> Any:
        """One synchronized step (the function to time)."""
        out = self.run()
        synchronize(self.device)
        return out

    def warm(self, calls: int = 2) -> None:
        """Run ``calls`` steps outside timing (compiles, autotunes, caches); records the first's time."""
        for i in range(calls):
            t0 = time.perf_counter()
            self.step()
            if i == 0:
                self.first_call_s = time.perf_counter() - t0


def vqp_available() -> bool:
    """Whether ``vector_quantize_pytorch`` is importable (without importing it)."""
    return importlib.util.find_spec("vector_quantize_pytorch") is not None


def available_providers(device: torch.device, *, include_extra: bool = False) -> List[str]:
    """Providers that can run on ``device`` here (vector-quantize-pytorch only when installed)."""
    names = [p for p in PROVIDERS if p != "vector_quantize_pytorch" or vqp_available()]
    if include_extra:
        names += list(EXTRA_PROVIDERS)
    return names


def build_case(provider: str, mode: str, shape: Shape, device: torch.device | str,
               precision: str = "ieee", *, backend: str = "auto", allow_interpreted: bool = False,
               seed: int = 0) -> Case:
    """Build the callable of ``provider`` in ``mode`` for ``shape`` on ``device``.

    ``backend`` applies to ``rqvae_fast`` only. Raises :class:`Unavailable` when the provider
    cannot run here (package missing, Triton without CUDA unless ``allow_interpreted``).
    """
    device = torch.device(device)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if provider not in PROVIDERS + EXTRA_PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS + EXTRA_PROVIDERS}, got {provider!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available")
    if provider == "vector_quantize_pytorch" and not vqp_available():
        raise Unavailable("vector-quantize-pytorch is not installed (pip install vector-quantize-pytorch)")

    problem = make_problem(shape, device, mode, seed)
    interpreted = False
    if provider in ("rqvae_fast", "rqvae_fast[torch]"):
        if provider == "rqvae_fast[torch]":
            backend = "torch"
        module, used = _ours(shape, problem, mode, precision, backend, device)
        if used == "triton" and device.type != "cuda":
            if not allow_interpreted:
                raise Unavailable("refusing to time Triton-interpreted code on CPU "
                                  "(pass allow_interpreted / --allow-interpreted to run it anyway)")
            interpreted = True
        forward, params, label = module, _learned(module, mode), used
    elif provider.startswith("reference"):
        forward, params = _reference(problem, mode, precision, provider.endswith("+compile"))
        label = "inductor" if provider.endswith("+compile") else "eager"
    elif provider.startswith("seed"):
        from .peers import SeedResidualVQ

        module = SeedResidualVQ(shape.layers, [shape.k] * shape.layers, shape.d, COMMITMENT,
                                ema=(mode == "ema"), decay=DECAY).to(device)
        _load_codebooks(module, problem, mode)
        forward, params, label = module, _learned(module, mode), "eager"
    else:
        module = _vqp(shape, problem, mode, device)
        forward, params, label = module, _learned(module, mode), "vqp"

    resident = problem.nbytes + _state_bytes(forward)
    if provider == "seed+compile":
        _raise_recompile_limit()
        forward = torch.compile(forward, dynamic=False)
        label = "inductor"

    run = _make_step(forward, params, problem, mode, precision, provider == "vector_quantize_pytorch",
                     getattr(forward, "finish", None))
    return Case(provider=provider, mode=mode, shape=shape, precision=precision, device=device,
                backend=label, run=run, resident_bytes=resident, interpreted=interpreted)


# ----------------------------------------------------------------------------- providers


def reset_compiled() -> None:
    """Forget every torch.compile'd frame. Cases of one class share code objects, so call this
    between groups of cases (never while a compiled case is still to be timed: it would
    recompile inside the timing)."""
    torch._dynamo.reset()


def _raise_recompile_limit(limit: int = 64) -> None:
    """Compiled cases of one provider share a code object; keep dynamo from silently falling
    back to eager once the default limit (8) of recompilations is reached."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)
            break


@torch.no_grad()
def _load_codebooks(module, problem, mode) -> None:
    """Give a seed-layout module (``vq_layers[i].embeddings``, EMA buffers) the problem's codebooks,
    EMA statistics of one row per code, and the mode's train/eval setting."""
    for layer, cb in zip(module.vq_layers, problem.codebooks):
        layer.embeddings.copy_(cb)
        if mode == "ema":
            layer.ema_dw.copy_(cb)
            layer.ema_cluster_size.fill_(1.0)
    module.train(mode != "inference")


def _ours(shape, problem, mode, precision, backend, device):
    from . import backend as backend_mod
    from .modules import ResidualVQ

    module = ResidualVQ(shape.layers, [shape.k] * shape.layers, shape.d, COMMITMENT,
                        ema=(mode == "ema"), decay=DECAY, eps=EPS, precision=precision,
                        backend=backend).to(device)
    _load_codebooks(module, problem, mode)
    try:
        used = "triton" if backend_mod.use_triton(backend, device) else "torch"
    except RuntimeError as err:
        raise Unavailable(str(err)) from err
    return module, used


def _reference(problem: Problem, mode: str, precision: str, compiled: bool):
    """A forward ``f(x) -> (quantized, indices, loss)`` over the reference, and its parameters.

    With ``compiled``, the quantizer (forward and, through AOTAutograd, backward) runs under
    ``torch.compile``; the ``O(K D)`` EMA update stays eager in both cases (on torch 2.13 CPU, an
    in-place EMA update inside the compiled region gave wrong codebooks).
    """
    from .reference import ema_update_reference, residual_quantize_reference

    ema = mode == "ema"
    codebooks = [cb.clone().requires_grad_(mode == "train") for cb in problem.codebooks]
    sizes = [torch.ones(cb.shape[0], device=cb.device) for cb in codebooks] if ema else []
    dws = [cb.detach().clone() for cb in codebooks] if ema else []

    def quantize(x, books):
        out = residual_quantize_reference(x, books, COMMITMENT, grad_mode="seed",
                                          codebook_loss=not ema, precision=precision)
        return out.quantized, out.indices, out.loss, out.code_counts, out.code_sums

    if compiled:
        _raise_recompile_limit()
        quantize = torch.compile(quantize, dynamic=False)

    pending = []

    def forward(x):
        quantized, indices, loss, counts, sums = quantize(x, codebooks)
        if ema:
            pending[:] = [counts, sums]
        return quantized, indices, loss

    def finish():
        """The EMA update, run by the step after the backward (the compiled backward saved the
        codebooks, so they may only change once it ran)."""
        if pending:
            counts, sums = pending
            for cb, size, dw, count, total in zip(codebooks, sizes, dws, counts, sums):
                ema_update_reference(cb, size, dw, count, total, DECAY, EPS)
            pending.clear()

    forward.finish = finish  # type: ignore[attr-defined]
    forward.state = codebooks + sizes + dws  # type: ignore[attr-defined]
    return forward, (codebooks if mode == "train" else [])


def _vqp(shape: Shape, problem: Problem, mode: str, device: torch.device):
    from vector_quantize_pytorch import ResidualVQ as VQPResidualVQ

    ema = mode == "ema"
    module = VQPResidualVQ(
        dim=shape.d, num_quantizers=shape.layers, codebook_size=shape.k,
        commitment_weight=COMMITMENT, decay=DECAY, eps=EPS, rotation_trick=False,
        ema_update=ema, learnable_codebook=not ema, kmeans_init=False, threshold_ema_dead_code=0,
    ).to(device)
    with torch.no_grad():
        for layer, cb in zip(module.layers, problem.codebooks):
            book = layer._codebook
            book.embed.copy_(cb.reshape(book.embed.shape))
            book.embed_avg.copy_(cb.reshape(book.embed_avg.shape))
            book.cluster_size.fill_(1.0)
    module.train(mode != "inference")
    return module


def _learned(module: torch.nn.Module, mode: str) -> List[torch.Tensor]:
    """Parameters that receive a gradient in ``train`` mode (none otherwise)."""
    if mode != "train":
        return []
    return [p for p in module.parameters() if p.requires_grad]


def _make_step(forward, params, problem: Problem, mode: str, precision: str, batched_input: bool,
               finish: Optional[Callable[[], None]] = None):
    """The uniform step closure for ``mode`` (see the module docstring)."""
    x = problem.x.unsqueeze(0) if batched_input else problem.x   # vqp wants (batch, seq, dim)
    grad_q = problem.grad_q
    if grad_q is not None and batched_input:
        grad_q = grad_q.unsqueeze(0)

    if mode == "inference":
        def run():
            with matmul_precision(precision), torch.no_grad():
                return forward(x)[1]
        return run

    x_leaf = x.detach().clone().requires_grad_(True)
    wrt = [x_leaf, *params]

    def run():
        with matmul_precision(precision):
            quantized, indices, loss = forward(x_leaf)[:3]
            loss = loss.sum() if loss.dim() else loss   # vqp returns per-layer losses
            grads = torch.autograd.grad((quantized, loss), wrt, (grad_q, None))
            if finish is not None:
                finish()
        return indices, grads
    return run


def _state_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (or a reference closure's state)."""
    if module is None:
        return 0
    if isinstance(module, torch.nn.Module):
        tensors = list(module.parameters()) + list(module.buffers())
    else:
        tensors = list(getattr(module, "state", []))
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- peak memory


def peak_extra_bytes(case: Case) -> float:
    """Peak memory above what was allocated before one step (inputs, parameters, state).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated``
    before the step. CPU: the rise of the process's peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs`` after returning freed heap pages with ``malloc_trim``); ``nan`` where
    that is not possible. The step's outputs are alive at the peak, so they are included.
    """
    gc.collect()
    if case.device.type == "cuda":
        synchronize(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        base = torch.cuda.memory_allocated(case.device)
        out = case.step()
        peak = torch.cuda.max_memory_allocated(case.device)
        del out
        return float(peak - base)
    return _cpu_peak_extra(case.step)


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_peak_extra(fn: Callable[[], Any]) -> float:
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")   # resets VmHWM to the current VmRSS
    except OSError:
        return float("nan")
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    if base is None or peak is None:
        return float("nan")
    return float(max(0, peak - base) * 1024)


def describe(case: Case) -> str:
    """``provider[backend]``, flagged when interpreted."""
    tag = f"{case.provider}[{case.backend}]" if case.provider != "rqvae_fast[torch]" else case.provider
    return tag + (" (INTERPRETED, not a speed)" if case.interpreted else "")


def is_finite(value: float) -> bool:
    return value is not None and math.isfinite(value)
