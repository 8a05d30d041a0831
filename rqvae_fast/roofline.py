"""Work counting and measured ceilings for the benchmark report.

Work model (one call of a residual quantizer on ``N`` rows of dimension ``D``, ``L`` layers of
``K_l`` codes, fp32 tensors, int64 indices as the API returns them):

- FLOPs: ``2 * N * K_l * D`` per layer, summed over layers -- the distance products that any exact
  nearest-code search must do. The same count is used for every mode: the backward pass of a
  straight-through quantizer is elementwise (``O(N * D * L)``) and is left out, as are the
  ``O(N * K)`` norm additions and comparisons.
- Minimal bytes: every input read once, every output written once, nothing else:

  ========== ==================================================================================
  mode       bytes
  ========== ==================================================================================
  inference  read ``x (N, D)`` and the codebooks ``(K_tot, D)``; write ``indices (N, L)`` int64
  train      + write ``quantized (N, D)``; read the upstream gradient ``(N, D)``; write
             ``grad_x (N, D)`` and the codebook gradient ``(K_tot, D)``
  ema        inference + write ``quantized``; read the upstream gradient; write ``grad_x``; read
             and write the EMA state ``ema_cluster_size (K_tot,)``, ``ema_dw (K_tot, D)``; write
             the codebooks ``(K_tot, D)``
  ========== ==================================================================================

  ("forward" is also accepted: inference + write ``quantized``, the model of ``../shared/anchors``,
  293 MB for N=2^20, D=32, K=256, L=3.)

The floor of a mode is ``max(FLOPs / matmul rate of the precision, bytes / copy bandwidth)``; a
measured time's roofline fraction is ``floor / time``. Ceilings are measured in-process: a large
device-to-device copy (bytes read + bytes written) and a large square matmul in each precision.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

MODES = ("inference", "train", "ema", "forward")
PRECISIONS = ("ieee", "tf32", "bf16")
FLOAT_BYTES = 4
INDEX_BYTES = 8


@dataclass(frozen=True)
class Shape:
    """A benchmark problem: ``n`` rows of dim ``d``; ``layers`` codebooks of ``k`` codes each."""

    n: int
    d: int
    k: int
    layers: int
    name: str = ""

    @property
    def k_total(self) -> int:
        return self.k * self.layers

    @property
    def label(self) -> str:
        core = f"N={self.n} D={self.d} K={self.k} L={self.layers}"
        return f"{self.name} ({core})" if self.name else core

    @classmethod
    def parse(cls, text: str, name: str = "") -> "Shape":
        """``"N,D,K,L"`` (e.g. ``"65536,32,256,3"``) -> Shape."""
        parts = [int(p) for p in text.replace("x", ",").split(",")]
        if len(parts) != 4 or min(parts) < 1:
            raise ValueError(f"shape must be 'N,D,K,L' with positive ints, got {text!r}")
        return cls(*parts, name=name)


def flops(shape: Shape, mode: str = "inference") -> float:
    """Distance-search FLOPs: ``sum_l 2 N K_l D`` (same for every mode; see module docstring)."""
    _check_mode(mode)
    return 2.0 * shape.n * shape.d * shape.k_total


def min_bytes(shape: Shape, mode: str = "inference") -> float:
    """Minimal device-memory traffic of one call in ``mode`` (see the table in the module docstring)."""
    _check_mode(mode)
    rows = shape.n * shape.d * FLOAT_BYTES          # one (N, D) fp32 tensor
    codes = shape.k_total * shape.d * FLOAT_BYTES   # all codebooks, (K_tot, D) fp32
    indices = shape.n * shape.layers * INDEX_BYTES  # (N, L) int64
    total = rows + codes + indices                  # inference: x, codebooks in; indices out
    if mode == "inference":
        return float(total)
    total += rows                                   # quantized out
    if mode == "forward":
        return float(total)
    total += 2 * rows                               # upstream gradient in, grad_x out
    if mode == "train":
        total += codes                              # codebook gradient out
    else:                                           # ema: state read + written, codebooks written
        total += 2 * (shape.k_total * FLOAT_BYTES + codes) + codes
    return float(total)


def output_bytes(shape: Shape, mode: str = "inference") -> float:
    """Bytes of what one call returns (the reference for "peak extra memory / outputs")."""
    _check_mode(mode)
    rows = shape.n * shape.d * FLOAT_BYTES
    indices = shape.n * shape.layers * INDEX_BYTES
    if mode == "inference":
        return float(indices)
    out = rows + indices                             # quantized, indices
    if mode in ("train", "ema"):
        out += rows                                  # grad_x
    if mode == "train":
        out += shape.k_total * shape.d * FLOAT_BYTES  # codebook gradient
    return float(out)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass
class Ceilings:
    """Measured peaks: ``copy_gbps`` (read + write, GB/s) and matmul ``tflops`` per precision."""

    device: str
    copy_gbps: float
    tflops: Dict[str, float] = field(default_factory=dict)
    source: str = "measured"

    def matmul_tflops(self, precision: str) -> float:
        """The rate for ``precision``; falls back to the fp32 rate when one was not measured
        (on CPU, ``tf32`` is not a separate unit and runs as fp32)."""
        if precision in self.tflops and self.tflops[precision] > 0:
            return self.tflops[precision]
        return self.tflops.get("ieee", float("nan"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_anchor(cls, path: str) -> "Ceilings":
        """Ceilings from an anchors JSON (``copy_GBps``, ``fp32_TFLOPs``, ...), e.g. ../shared/anchors."""
        with open(path) as fh:
            data = json.load(fh)
        return cls(
            device=data.get("device", "?"),
            copy_gbps=float(data["copy_GBps"]),
            tflops={"ieee": float(data["fp32_TFLOPs"]), "tf32": float(data["tf32_TFLOPs"]),
                    "bf16": float(data["bf16_TFLOPs"])},
            source=f"anchor:{path}",
        )


@dataclass
class Roofline:
    """One measurement placed against the ceilings."""

    gflop: float
    mbytes: float
    tflops: float        # achieved, FLOPs / time
    gbps: float          # achieved, minimal bytes / time
    floor_ms: float      # max(compute time, memory time) at the ceilings
    fraction: float      # floor_ms / ms
    bound: str           # "compute" or "memory"

    def to_dict(self) -> dict:
        return asdict(self)


def roofline(shape: Shape, mode: str, precision: str, ms: float, ceilings: Ceilings) -> Roofline:
    """Achieved rates and roofline fraction of a ``ms``-millisecond call."""
    work = flops(shape, mode)
    traffic = min_bytes(shape, mode)
    seconds = ms * 1e-3
    compute_ms = work / (ceilings.matmul_tflops(precision) * 1e12) * 1e3
    memory_ms = traffic / (ceilings.copy_gbps * 1e9) * 1e3
    floor = max(compute_ms, memory_ms)
    return Roofline(
        gflop=work / 1e9,
        mbytes=traffic / 1e6,
        tflops=work / seconds / 1e12 if seconds > 0 else float("nan"),
        gbps=traffic / seconds / 1e9 if seconds > 0 else float("nan"),
        floor_ms=floor,
        fraction=floor / ms if ms > 0 else float("nan"),
        bound="compute" if compute_ms >= memory_ms else "memory",
    )


# --------------------------------------------------------------------------- timing + ceilings


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, reps: int = 5,
              max_seconds: float = 5.0) -> Tuple[float, list]:
    """Median milliseconds of ``fn()`` (each repetition synchronized), after ``warmup`` calls.

    On CUDA the time of each call is taken with CUDA events; on CPU with ``perf_counter``. Stops
    early once ``max_seconds`` of timed calls have run (at least one repetition). Returns
    ``(median, all times)``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    budget_start = time.perf_counter()
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - budget_start > max_seconds:
            break
    ordered = sorted(times)
    mid = len(ordered) // 2
    med = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return med, times


def runqueue_wait_ns() -> Optional[int]:
    """Total time this process's threads spent runnable but waiting for a CPU (Linux schedstat),
    in ns; None where unavailable. A step during which it did not grow had the cores to itself."""
    total, seen = 0, False
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
                seen = True
        except (OSError, ValueError, IndexError):
            continue
    return total if seen else None


def clean_times(step, *, reps: int, max_seconds: float, max_wait: float = 0.02) -> tuple:
    """Time ``step`` until ``reps`` *clean* repetitions -- ones whose threads waited for a CPU
    less than ``max_wait`` of the wall time, i.e. no other job took the cores -- or until
    ``max_seconds`` ran out. Returns ``(clean ms list, all ms list)``."""
    clean, every = [], []
    start = time.perf_counter()
    while len(clean) < reps and (not every or time.perf_counter() - start < max_seconds):
        wait0 = runqueue_wait_ns()
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
        wait1 = runqueue_wait_ns()
        every.append(wall * 1e3)
        if wait0 is not None and wait1 is not None and (wait1 - wait0) * 1e-9 < max_wait * wall:
            clean.append(wall * 1e3)
    return clean, every


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def device_name(device: torch.device) -> str:
    """Human name of ``device``: the GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _best_ms(fn: Callable[[], object], device: torch.device, reps: int,
             clean_seconds: float = 20.0) -> float:
    """Fastest repetition (a ceiling). On CPU only undisturbed repetitions count, when any came
    within ``clean_seconds``: a matmul sharing its cores with another job understates the ceiling."""
    if device.type == "cpu":
        for _ in range(2):
            fn()
        clean, every = clean_times(fn, reps=reps, max_seconds=clean_seconds)
        return min(clean or every)
    _, times = median_ms(fn, device, warmup=2, reps=reps)
    return min(times)


def measure_copy_gbps(device: torch.device, mbytes: int = 1024, reps: int = 10,
                      clean_seconds: float = 20.0) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (GB/s), from the
    fastest of ``reps`` copies (a ceiling, robust to other load on a shared CPU)."""
    numel = mbytes * (1 << 20) // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    best = _best_ms(lambda: dst.copy_(src), device, reps, clean_seconds)
    del src, dst
    return 2.0 * numel * 4 / (best * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, precision: str, size: int = 8192,
                          reps: int = 10, clean_seconds: float = 20.0) -> float:
    """Rate of a ``size``-cubed matmul on random data in ``precision`` (TFLOP/s).

    ``ieee``: fp32 with TF32 disabled; ``tf32``: fp32 with TF32 allowed (CUDA only; on CPU this
    is the fp32 rate); ``bf16``: bfloat16 operands.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with matmul_precision(precision):
        best = _best_ms(lambda: a @ b, device, reps, clean_seconds)
    return 2.0 * size ** 3 / (best * 1e-3) / 1e12


class matmul_precision:
    """Context: ``torch.set_float32_matmul_precision`` for ``"ieee"`` / ``"tf32"`` / ``"bf16"``.

    Peers that have no precision argument (the seed's code, torch.compile, vector-quantize-pytorch)
    follow this global setting; "bf16" maps to torch's "medium".
    """

    _TORCH = {"ieee": "highest", "tf32": "high", "bf16": "medium"}

    def __init__(self, precision: str):
        self.target = self._TORCH[precision]
        self.saved: Optional[str] = None

    def __enter__(self):
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.target)
        return self

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.saved)
        return False


def measure_ceilings(device: torch.device, precisions: Sequence[str] = PRECISIONS, *,
                     quick: bool = False) -> Ceilings:
    """Measure copy bandwidth and matmul rates on ``device``.

    CUDA: a 1 GiB copy and 8192^3 matmuls (quick: 256 MiB, 4096^3). CPU: a 256 MiB copy and
    2048^3 matmuls (quick: 32 MiB, 512^3); ``tf32`` is not measured on CPU (no such unit).
    """
    if device.type == "cuda":
        mbytes, size = (256, 4096) if quick else (1024, 8192)
    else:
        mbytes, size = (32, 512) if quick else (256, 2048)
    reps = 3 if quick else 10
    clean_seconds = 1.0 if quick else 20.0
    copy = measure_copy_gbps(device, mbytes, reps, clean_seconds)
    rates = {}
    for precision in precisions:
        if precision == "tf32" and device.type != "cuda":
            continue
        rates[precision] = measure_matmul_tflops(device, precision, size, reps, clean_seconds)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(device=device_name(device), copy_gbps=copy, tflops=rates)


def fmt_si(value: float, digits: int = 3) -> str:
    """Short number for tables (``nan`` -> ``-``)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"
