"""The PyTorch implementation of the fused forward and input gradient (CPU, or no Triton).

Same contract, outputs and arithmetic as ``rqvae_fast.kernels``. Rows are processed in chunks so
the ``(chunk, K_l)`` score matrix and the chunk's ``(chunk, D)`` temporaries stay cache-sized and
memory does not grow with N beyond the outputs. On the CPU the chunks are spread over
:mod:`rqvae_fast.cpu_pool`'s workers, one intra-op thread each (no barrier per op: robust when
other processes share the cores). Results do not depend on the number of workers or on their
timing: each chunk writes its own rows, and the per-chunk sums (loss terms, code statistics) are
added in chunk order.
"""
from __future__ import annotations

import threading
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from . import cpu_pool
from .routing import FULL, SEED

SCORES_PER_CHUNK = 1 << 19  # fp32 entries of one chunk's scores + row temporaries: 2 MiB, cache-sized
MIN_CHUNK_ROWS = 256
MAX_CHUNK_ROWS = 4096
ROW_TEMPORARIES = 4  # (rows, D) fp32 tensors live at once per chunk: residual, total, chosen, error


def chunk_rows_for(dim: int, max_codes: int) -> int:
    """Rows per chunk: ``rows * (K_max + ROW_TEMPORARIES * D) ~ SCORES_PER_CHUNK`` (at least
    ``MIN_CHUNK_ROWS`` so each matmul stays efficient, at most ``MAX_CHUNK_ROWS``), and never
    more than ``SCORES_PER_CHUNK // K_max`` unless that is below ``MIN_CHUNK_ROWS``."""
    rows = SCORES_PER_CHUNK // max(1, max_codes + ROW_TEMPORARIES * dim)
    return max(MIN_CHUNK_ROWS, min(rows, MAX_CHUNK_ROWS))


def first_copy_index(codebook: torch.Tensor) -> torch.Tensor:
    """``(K,)`` int64: for each code, the lowest index holding an identical code.

    A BLAS GEMM may round identical columns differently (edge columns take other micro-kernels),
    so ``argmin`` could pick a later copy of a duplicated code; mapping through this restores
    "ties go to the lowest index". Rows are keyed by a float64 projection, sorted stably, and
    neighbours are merged only when exactly equal.
    """
    num_codes, dim = codebook.shape
    weights = torch.linspace(1.0, 2.0, dim, dtype=torch.float64, device=codebook.device)
    order = torch.argsort(codebook.double() @ weights, stable=True)
    ordered = codebook[order]
    same = (ordered[1:] == ordered[:-1]).all(dim=1)
    starts = torch.cat([same.new_ones(1), ~same])
    leaders = order[starts]
    canonical = torch.empty_like(order)
    canonical[order] = leaders[starts.cumsum(dim=0) - 1]
    return canonical


def _duplicate_remap(codebook: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`first_copy_index`, or None when the codebook holds no exact duplicate (no remap).
    Off the CPU the map is always kept: deciding would synchronize with the device."""
    canonical = first_copy_index(codebook)
    if codebook.device.type != "cpu":
        return canonical
    identity = torch.arange(canonical.shape[0], device=canonical.device)
    return None if torch.equal(canonical, identity) else canonical


def first_argmin_(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``scores.argmin(dim=1)`` (``(rows,)`` int64, ties to the lowest index) of ``scores
    (rows, K)`` fp32, which it may overwrite; ``positions`` is ``arange(K)`` in fp32. See
    :func:`min_and_first_argmin_`."""
    return min_and_first_argmin_(scores, positions)[1]


def _numpy_argmin_is_vectorized() -> bool:
    """NumPy's ``argmin`` along a row is SIMD from 1.22 on (before, one element at a time)."""
    major, minor = (int(part) for part in np.__version__.split(".")[:2])
    return (major, minor) >= (1, 22)


NUMPY_ARGMIN = _numpy_argmin_is_vectorized()


def min_and_first_argmin_(scores: torch.Tensor, positions: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scores.min(dim=1)`` as ``(values (rows,) fp32, indices (rows,) int64)``, ties to the
    lowest index, for ``scores (rows, K)`` fp32, which it may overwrite.

    ATen's arg-reductions walk a row one element at a time (``min(dim=1)``: 1.9 ms for a
    ``(4096, 256)`` block on one thread). On CPU, NumPy's SIMD ``argmin`` (0.19 ms; it releases
    the GIL, so the pool's workers run it in parallel) and a gather of the values; without it
    (NumPy < 1.22), four vectorized passes (0.43 ms): the row minimum, ``[score > minimum]``,
    ``k + K * that`` (exact in fp32 for K < 2^23, with ``positions`` = ``arange(K)`` fp32) and
    its minimum, the lowest k holding the minimum. Rows with a non-finite minimum (NaN or
    infinite scores) make the call fall back to ``min(dim=1)`` itself, so the result is always
    its result."""
    num_codes = scores.shape[1]
    if scores.device.type != "cpu":  # the finiteness test below would synchronize with the device
        return scores.min(dim=1)
    if NUMPY_ARGMIN and scores.dtype == torch.float32 and scores.is_contiguous() \
            and scores.numel() > 0:
        indices = torch.from_numpy(np.argmin(scores.detach().numpy(), axis=1)).long()
        minimum = scores.gather(1, indices[:, None])
        if bool(torch.isfinite(minimum).all()):
            return minimum[:, 0], indices
        return scores.min(dim=1)
    minimum = scores.amin(dim=1, keepdim=True)
    if num_codes >= 1 << 22 or not bool(torch.isfinite(minimum).all()):
        return scores.min(dim=1)
    torch.gt(scores, minimum, out=scores)
    torch.add(positions, scores, alpha=num_codes, out=scores)
    return minimum[:, 0], scores.amin(dim=1).long()


class _Layer(NamedTuple):
    codebook: torch.Tensor           # (K_l, D) fp32, what the outputs use
    search_t: torch.Tensor           # (D, K_l) fp32 view, what the scores use (bf16-rounded for bf16)
    sq_norms: torch.Tensor           # (K_l,) fp32, +inf for non-finite codes
    remap: Optional[torch.Tensor]    # (K_l,) int64 first-copy map, None without duplicates
    start: int                       # offset of the layer's codes in the stacked statistics
    positions: torch.Tensor          # (K_l,) fp32 arange, for first_argmin_


class _ChunkSums(NamedTuple):
    """What one chunk adds to the call's sums: ``sse (L,)`` and per layer the statistics'
    ``(slot (rows,) int64, weight (rows,) fp32, residual (rows, D) fp32)``."""
    sse: torch.Tensor
    stats: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _InOrderSums:
    """Adds the chunks' sums into the outputs in chunk order whatever order the chunks finish in,
    so every float sum is accumulated exactly as by one thread walking the rows in order."""

    def __init__(self, sse: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor):
        self.sse, self.counts, self.sums = sse, counts, sums
        self.next = 0
        self.waiting: Dict[int, _ChunkSums] = {}
        self.lock = threading.Lock()

    def add(self, chunk: int, part: _ChunkSums) -> None:
        with self.lock:
            self.waiting[chunk] = part
            while self.next in self.waiting:
                part = self.waiting.pop(self.next)
                self.sse += part.sse
                for slot, weight, residual in part.stats:
                    self.counts.index_add_(0, slot, weight)
                    self.sums.index_add_(0, slot, residual)
                self.next += 1


def _forward_chunk(x_chunk: torch.Tensor, layers: Sequence[_Layer], *, routing: int, bf16: bool,
                   with_stats: bool, num_layers: int, given: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, _ChunkSums]:
    """One chunk through the active ``layers`` (the first of ``num_layers``): ``(output (rows, D)
    fp32, indices (rows, num_layers) int64, sums)``; dropped layers get index -1 and sse 0.
    ``given (rows, >= len(layers))`` int64: use these codes instead of searching (finite rows)."""
    rows = x_chunk.shape[0]
    # A finite sum proves every entry finite (one pass); otherwise find the bad rows exactly.
    # (On the CPU only: elsewhere that test would synchronize with the device.)
    all_ok = x_chunk.device.type == "cpu" and bool(torch.isfinite(x_chunk.sum()))
    row_ok = None if all_ok else torch.isfinite(x_chunk).all(dim=1)
    ones = x_chunk.new_ones(rows) if with_stats and all_ok else None
    residual = x_chunk
    total = torch.zeros_like(x_chunk)
    indices = torch.full((rows, num_layers), -1, dtype=torch.int64, device=x_chunk.device)
    sse = x_chunk.new_zeros(num_layers)
    stats = []
    for number, layer in enumerate(layers):
        if given is not None:
            best = given[:, number].clamp(min=0)
        else:
            lhs = residual.bfloat16().float() if bf16 else residual
            scores = torch.addmm(layer.sq_norms, lhs, layer.search_t, alpha=-2.0)
            best = first_argmin_(scores, layer.positions)
            del scores
            if layer.remap is not None:
                best = layer.remap.index_select(0, best)
        chosen = layer.codebook.index_select(0, best)
        if row_ok is not None:
            chosen = torch.where(row_ok[:, None], chosen, float("nan"))
        err = chosen - residual
        sse[number] = (err * err).sum()
        indices[:, number] = best if row_ok is None else torch.where(row_ok, best, -1)
        if with_stats:
            slot = best + layer.start
            if row_ok is None:
                stats.append((slot, ones, residual))
            else:
                stats.append((slot, row_ok.float(), torch.where(row_ok[:, None], residual, 0.0)))
        if routing == SEED:
            straight_through = residual + err
            total += straight_through
            residual = residual - straight_through
        elif routing == FULL:
            total += chosen
            residual = residual - chosen
        else:
            total += residual + err
            residual = residual - chosen
    out = x_chunk + (total - x_chunk) if routing == FULL else total
    if not layers and row_ok is not None:  # no layer ran: non-finite rows still get a NaN output
        out = torch.where(row_ok[:, None], out, float("nan"))
    return out, indices, _ChunkSums(sse, stats)


def residual_quantize_forward(
    x: torch.Tensor,
    codes: torch.Tensor,
    search_codes: torch.Tensor,
    sq_norms: torch.Tensor,
    layer_sizes: Sequence[int],
    *,
    routing: int,
    precision: str,
    with_stats: bool,
    chunk_rows: Optional[int] = None,
    active: Optional[int] = None,
    given_indices: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`rqvae_fast.kernels.residual_quantize_forward` (same inputs and outputs, including
    ``active``: only the first ``active`` layers run). ``given_indices (N, >= active)`` int64
    layer-local: take these codes instead of the nearest ones (e.g. a beam search's; non-finite
    rows still get -1); the gather, loss sums, statistics and routing are unchanged."""
    n, dim = x.shape
    sizes = [int(s) for s in layer_sizes]
    num_active = len(sizes) if active is None else int(active)
    if not 0 <= num_active <= len(sizes):
        raise ValueError(f"active layers must be an int in [0, {len(sizes)}], got {active!r}")
    rows = chunk_rows or chunk_rows_for(dim, max(sizes))
    # bf16: operands rounded to bf16, products and sums in fp32 (as bf16 tensor cores do).
    bf16 = precision == "bf16"
    codebooks = codes.float().split(sizes)
    searched = [(c.bfloat16().float() if bf16 else c.float()) for c in search_codes.split(sizes)]
    starts = [sum(sizes[:layer]) for layer in range(len(sizes))]
    norms = sq_norms.split(sizes)
    remaps: List[Optional[torch.Tensor]] = [None] * len(sizes)

    def find_duplicates(layer: int) -> None:  # on the workers too: no small parallel op here
        remaps[layer] = _duplicate_remap(codebooks[layer])

    if given_indices is None:  # (given codes need no duplicate remap)
        cpu_pool.run_chunks(num_active, find_duplicates, device=x.device)
    layers = [_Layer(codebooks[i], searched[i].t(), norms[i], remaps[i], starts[i],
                     torch.arange(sizes[i], dtype=torch.float32, device=x.device))
              for i in range(num_active)]

    quantized = torch.empty_like(x)
    indices = torch.empty((n, len(sizes)), dtype=torch.int64, device=x.device)
    k_total = codes.shape[0]
    sums = _InOrderSums(
        torch.zeros(len(sizes), dtype=torch.float32, device=x.device),
        torch.zeros(k_total if with_stats else 0, dtype=torch.float32, device=x.device),
        torch.zeros((k_total if with_stats else 0, dim), dtype=torch.float32, device=x.device))
    source = x.detach()

    def run(chunk: int) -> None:
        lo = chunk * rows
        hi = min(n, lo + rows)
        out, chunk_indices, part = _forward_chunk(
            source[lo:hi].float(), layers, routing=routing, bf16=bf16, with_stats=with_stats,
            num_layers=len(sizes), given=None if given_indices is None else given_indices[lo:hi])
        quantized[lo:hi] = out
        indices[lo:hi] = chunk_indices
        sums.add(chunk, part)

    cpu_pool.run_chunks(-(-n // rows), run, device=x.device)
    return quantized, indices, sums.sse, sums.counts, sums.sums


def residual_quantize_input_grad(
    grad_out: Optional[torch.Tensor],
    x: torch.Tensor,
    codes: torch.Tensor,
    layer_sizes: Sequence[int],
    indices: torch.Tensor,
    coef: torch.Tensor,
    *,
    commit_layers: int,
    grad_out_scale: float = 1.0,
) -> torch.Tensor:
    """See :func:`rqvae_fast.kernels.residual_quantize_input_grad`. Elementwise per row, run in
    row chunks like the forward (the same values whatever the chunking)."""
    n, dim = x.shape
    codebooks = codes.float().split([int(s) for s in layer_sizes])
    coefs = [coef[layer] for layer in range(commit_layers)]
    grad = torch.empty_like(x)
    rows = chunk_rows_for(dim, 0)
    source = x.detach()
    upstream = None if grad_out is None else grad_out.detach()

    def run(chunk: int) -> None:
        lo = chunk * rows
        hi = min(n, lo + rows)
        residual = source[lo:hi].float()
        direction = torch.zeros_like(residual)
        for layer in range(commit_layers):
            local = indices[lo:hi, layer]
            ok = local >= 0
            code = codebooks[layer].index_select(0, local.clamp(min=0))
            residual = residual - torch.where(ok[:, None], code, float("nan"))
            direction += coefs[layer] * residual
        if upstream is not None:
            direction = direction + upstream[lo:hi].float() * grad_out_scale
        grad[lo:hi] = direction

    cpu_pool.run_chunks(-(-n // rows), run, device=x.device)
    return grad
