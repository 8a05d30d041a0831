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
from typing import Callable, Iterator, Optional

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


def matmul_into(rows: torch.Tensor, codes_t: torch.Tensor,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rows (n, D) @ codes_t (D, K)`` as an ``(n, K)`` fp32 CPU tensor, new or ``out`` (a
    contiguous one); ``codes_t`` must be contiguous when NumPy does the work (only from D =
    :data:`NUMPY_MIN_DIM`: below, OpenBLAS's per-call overhead outweighs its faster kernel)."""
    if rows.shape[1] < NUMPY_MIN_DIM or backend() == "torch":
        return torch.mm(rows, codes_t, out=out)
    if out is None:
        out = torch.empty((rows.shape[0], codes_t.shape[1]), dtype=torch.float32)
    np.matmul(rows.numpy(), codes_t.numpy(), out=out.numpy())
    return out


ROWS_PER_BLOCK = 4096  # rows of one block of the pool-run products below


def _pooled(*tensors: torch.Tensor) -> bool:
    """Whether a product of these runs as row blocks on the pool: fp32 CPU 2-D tensors without
    grad, the first with more than one block of rows."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad
               and t.dim() == 2 for t in tensors) and tensors[0].shape[0] > ROWS_PER_BLOCK


def _run_blocks(rows: int, block: Callable[[int, slice], None]) -> None:
    """``block(index, row_slice)`` for every :data:`ROWS_PER_BLOCK`-row block of ``rows`` rows,
    on the pool's workers with one BLAS thread each."""
    from .cpu_pool import run_chunks

    def run(index: int) -> None:
        block(index, slice(index * ROWS_PER_BLOCK, (index + 1) * ROWS_PER_BLOCK))

    with single_threaded_blas():
        run_chunks((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, run, device=torch.device("cpu"))


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (n, D) @ b (D, K)`` fp32 for one large product (the k-means' rotations): blocks of
    :data:`ROWS_PER_BLOCK` rows on :mod:`rqvae_fast.cpu_pool`'s workers, each with
    :func:`matmul_into`, so it runs on the faster BLAS one thread per worker as the passes do
    (a multi-threaded OpenBLAS call would leave its threads spinning on the cores while the next
    pass's workers start). Anything else (small, other devices or dtypes): ``torch.mm``."""
    if not _pooled(a, b):
        return torch.mm(a, b)
    rhs = b.contiguous()
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32)
    _run_blocks(a.shape[0], lambda _, rows: matmul_into(a[rows], rhs, out=out[rows]))
    return out


def gram(a: torch.Tensor) -> torch.Tensor:
    """``a.T @ a`` ``(D, D)`` fp32 of ``a (n, D)`` (a scatter matrix), summed over blocks of
    :data:`ROWS_PER_BLOCK` rows computed on the pool's workers and added in block order (the
    result does not depend on the number of workers); ``torch.mm`` for small or non-CPU input."""
    if not _pooled(a):
        return a.t() @ a
    partials = [None] * ((a.shape[0] + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK)

    def block(index: int, rows: slice) -> None:
        part = a[rows]
        partials[index] = matmul_into(part.t(), part.contiguous())

    _run_blocks(a.shape[0], block)
    total = partials[0]
    for partial in partials[1:]:
        total += partial
    return total


__all__ = ["GEMM_ENV", "NUMPY_MIN_DIM", "ROWS_PER_BLOCK", "backend", "gram", "matmul",
           "matmul_into", "single_threaded_blas"]
