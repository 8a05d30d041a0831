"""The score matmul of the CPU k-means and encoding passes, on the faster of two BLAS libraries.

torch's CPU wheels compute ``x @ c.T`` with MKL; NumPy's wheels ship OpenBLAS. On AMD CPUs MKL
does not take its fastest code path: measured on this project's 2-core AMD EPYC (one thread,
4096 x 768 by 768 x 256), OpenBLAS takes 17.7 ms and MKL 25.1 ms, which is most of why FAISS (built
on OpenBLAS) ran a k-means iteration faster than we did. :func:`matmul_into` therefore uses
whichever of the two a one-off timing (:func:`backend`: 9 interleaved rounds, about 80 ms, once per process) finds
faster on the machine at hand. NumPy's BLAS is limited to one thread per call while the chunked
passes of :mod:`rqvae_fast.cpu_pool` run (:func:`single_threaded_blas`), like torch's intra-op
threads on the pool's workers, and restored afterwards.

``RQVAE_FAST_CPU_GEMM=torch`` or ``=numpy`` forces a choice.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from typing import Iterator, Optional

import numpy as np
import torch

GEMM_ENV = "RQVAE_FAST_CPU_GEMM"
NUMPY_MIN_DIM = 8  # narrower matmuls stay with torch (interleaved A/B: 4 ms vs 12 ms at D 1)
_lock = threading.Lock()
_choice: Optional[str] = None
_controller = None


def _blas_controller():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Within the block, NumPy's BLAS runs each call on one thread (restored afterwards); a
    no-op when torch's matmul is the one in use."""
    if backend() != "numpy":
        yield
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def _measure(rounds: int = 9) -> str:
    """Interleaved rounds of both matmuls (one thread each) on a k-means-sized block; the one
    with the lower median wins, NumPy only by a clear margin (10 %)."""
    rows = np.random.default_rng(0).random((2048, 384), dtype=np.float32)
    codes_t = np.ascontiguousarray(np.random.default_rng(1).random((256, 384), dtype=np.float32).T)
    out = np.empty((2048, 256), dtype=np.float32)
    rows_t, codes_tt = torch.from_numpy(rows), torch.from_numpy(codes_t)
    times = {"numpy": [], "torch": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_controller().limit(limits=1, user_api="blas"):
            np.matmul(rows, codes_t, out=out)
            torch.mm(rows_t, codes_tt)
            for _ in range(rounds):
                start = time.perf_counter()
                np.matmul(rows, codes_t, out=out)
                middle = time.perf_counter()
                torch.mm(rows_t, codes_tt)
                times["numpy"].append(middle - start)
                times["torch"].append(time.perf_counter() - middle)
    finally:
        torch.set_num_threads(threads)
    numpy_s, torch_s = (statistics.median(times[k]) for k in ("numpy", "torch"))
    return "numpy" if numpy_s < 0.9 * torch_s else "torch"


def backend() -> str:
    """``"numpy"`` or ``"torch"``: which library's single-threaded fp32 matmul is faster here
    (timed once per process; :data:`GEMM_ENV` overrides)."""
    global _choice
    if _choice is None:
        with _lock:
            if _choice is None:
                forced = os.environ.get(GEMM_ENV, "").strip().lower()
                if forced and forced not in ("numpy", "torch"):
                    raise ValueError(f"{GEMM_ENV} must be 'numpy' or 'torch', got {forced!r}")
                _choice = forced or _measure()
    return _choice


def matmul_into(rows: torch.Tensor, codes_t: torch.Tensor) -> torch.Tensor:
    """``rows (n, D) @ codes_t (D, K)`` as a new ``(n, K)`` fp32 CPU tensor; ``codes_t`` must be
    contiguous when NumPy does the work (only from D = :data:`NUMPY_MIN_DIM`: below, OpenBLAS's
    per-call overhead outweighs its faster kernel)."""
    if rows.shape[1] < NUMPY_MIN_DIM or backend() == "torch":
        return torch.mm(rows, codes_t)
    out = torch.empty((rows.shape[0], codes_t.shape[1]), dtype=torch.float32)
    np.matmul(rows.numpy(), codes_t.numpy(), out=out.numpy())
    return out


__all__ = ["GEMM_ENV", "NUMPY_MIN_DIM", "backend", "matmul_into", "single_threaded_blas"]
