"""Beam search encoding for residual quantization (pure PyTorch, chunked over rows).

Greedy residual quantization picks, layer by layer, the code nearest to the current residual. A
beam keeps the ``B`` best partial paths per row instead: at layer ``l`` every kept path is
extended by every code of that layer (``B x K_l`` candidates, scored by the squared error they
leave, ``||x - sum of chosen codewords||^2``), and the ``B`` lowest survive. Ties go to the lowest
``(beam, code)`` pair, beams being ordered best first. ``beam_size=1`` runs the greedy pass
(:func:`greedy_encode`), so it is bit-identical to greedy encoding.

``layer_weights`` (one positive weight ``a_l`` per layer) switches to vector-quantize-pytorch's
beam ranking: a path's score is ``S = sum_l a_l ||r_l - e_l||^2`` over its layers (the weighted
per-layer commitment errors, ``r_l`` the residual entering layer ``l``), a candidate's
``S_parent + a_l ||r_parent - e_k||^2``, and the answer is the path of least score (not of least
final error). ``None`` is the reconstruction-error ranking above, bit for bit.

The public function is :func:`beam_encode`; its signature is stable (``residual_quantize`` and the
compat layer reuse it).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .assign import CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS, CpuScorer, chunk_rows, nearest
from .cpu_gemm import single_threaded_blas
from .cpu_pool import run_chunks


def _check(x: torch.Tensor, codebooks: Sequence[torch.Tensor], beam_size: int):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D tensor (N, D), got {shape}")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1, got {beam_size!r}")
    if len(codebooks) == 0:
        raise ValueError("codebooks is empty: need at least one layer")
    books = []
    for layer, book in enumerate(codebooks):
        if not isinstance(book, torch.Tensor) or book.dim() != 2 or book.shape[0] == 0:
            shape = tuple(book.shape) if isinstance(book, torch.Tensor) else type(book).__name__
            raise ValueError(f"codebook {layer} must be a non-empty (K, D) tensor, got {shape}")
        if book.shape[1] != x.shape[1]:
            raise ValueError(f"codebook {layer} is {book.shape[1]}-d but x is {x.shape[1]}-d")
        books.append(book.detach().to(x.device, torch.float32).contiguous())
    points = x.detach().to(torch.float32).contiguous()
    if points.numel() and not bool(torch.isfinite(points).all()):
        raise ValueError("x holds NaN/Inf values")
    return points, books


@torch.no_grad()
def greedy_encode(x: torch.Tensor, codebooks: Sequence[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual codes: ``(indices (N, L) int64, sq_error (N,) fp32)`` of ``x (N, D)`` with
    ``codebooks`` (``(K_l, D)`` each): nearest code per layer, ties to the lowest code.

    On CPU all layers run per chunk of rows on the worker pool (:mod:`rqvae_fast.cpu_pool`): the
    chunk's residual stays in cache from layer to layer, as in the fused kernel; scores come from
    :class:`rqvae_fast.assign.CpuScorer`. Elsewhere, :func:`nearest` layer by layer."""
    points, books = _check(x, codebooks, 1)
    if points.device.type != "cpu":
        residual = points.clone()
        codes = []
        for book in books:
            idx, _ = nearest(residual, book)
            residual -= book.index_select(0, idx)
            codes.append(idx)
        return torch.stack(codes, dim=1), residual.pow(2).sum(dim=1)
    n = points.shape[0]
    codes = torch.empty((n, len(books)), dtype=torch.int64)
    sq_error = torch.empty(n, dtype=torch.float32)
    scorers = [CpuScorer.of(book) for book in books]
    step = max(64, chunk_rows(max(book.shape[0] for book in books), CPU_CHUNK_ELEMENTS))

    def encode_chunk(index: int) -> None:
        lo = index * step
        residual = points[lo:lo + step].clone()
        for layer, scorer in enumerate(scorers):
            _, idx = scorer.nearest(residual)
            codes[lo:lo + step, layer] = idx
            residual -= books[layer].index_select(0, idx)
        sq_error[lo:lo + step] = residual.pow(2).sum(dim=1)

    with single_threaded_blas():
        run_chunks((n + step - 1) // step, encode_chunk, device=points.device)
    return codes, sq_error


def check_layer_weights(layer_weights, num_layers: int) -> Optional[torch.Tensor]:
    """``layer_weights`` as an fp32 CPU tensor ``(L,)`` (``None`` stays ``None``); raises unless it
    holds ``num_layers`` finite positive numbers."""
    if layer_weights is None:
        return None
    try:
        weights = torch.as_tensor(layer_weights, dtype=torch.float32).detach().cpu().reshape(-1).clone()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"layer_weights must be a sequence of {num_layers} numbers: {exc}") from None
    if weights.numel() != num_layers:
        raise ValueError(f"layer_weights needs one weight per layer ({num_layers}), got {weights.numel()}")
    if not bool(torch.isfinite(weights).all()) or not bool((weights > 0).all()):
        raise ValueError(f"layer_weights must be finite and > 0, got {weights.tolist()}")
    return weights


def _beam_chunk(points: torch.Tensor, books, beam_size: int, weights: Optional[torch.Tensor] = None):
    n, dim = points.shape
    residual = points[:, None, :]  # (n, b, D), b = paths kept so far
    path_score = points.new_zeros((n, 1))  # weighted mode: the kept paths' scores
    codes = torch.empty((n, 1, 0), dtype=torch.int64, device=points.device)
    for layer, book in enumerate(books):
        kept, size = residual.shape[1], book.shape[0]
        flat = residual.reshape(n * kept, dim)
        # ||c||^2 - 2 r.c, plus ||r||^2 only when paths differ (one path: same order, same bits
        # as the greedy pass)
        scores = torch.addmm(book.pow(2).sum(dim=1)[None, :], flat, book.t(), alpha=-2.0)
        if kept > 1 or weights is not None:
            scores += flat.pow(2).sum(dim=1, keepdim=True)
        if weights is not None:  # S_parent + a_l ||r - e||^2
            scores = path_score[:, :, None] + weights[layer] * scores.view(n, kept, size)
        scores = scores.reshape(n, kept * size)
        width = min(beam_size, kept * size)
        if width == 1:
            order = scores.argmin(dim=1, keepdim=True)
        else:
            order = torch.sort(scores, dim=1, stable=True).indices[:, :width]
        if weights is not None:
            path_score = scores.gather(1, order)
        parent, code = order // size, order % size
        rows = torch.arange(n, device=points.device)[:, None]
        residual = residual[rows, parent] - book.index_select(0, code.reshape(-1)).view(n, width, dim)
        codes = torch.cat([codes[rows, parent], code[:, :, None]], dim=2)
    error = residual.pow(2).sum(dim=2)  # (n, width), exact errors of the kept paths
    if weights is None:
        best = error.argmin(dim=1)  # ranks above are exact up to rounding; report the true best
    else:
        best = torch.zeros(n, dtype=torch.int64, device=points.device)  # least score: rank 0
    rows = torch.arange(n, device=points.device)
    return codes[rows, best], error[rows, best]


@torch.no_grad()
def beam_encode(x: torch.Tensor, codebooks: Sequence[torch.Tensor], beam_size: int,
                chunk_rows: Optional[int] = None, *,
                layer_weights: Optional[Sequence[float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Beam-search residual codes of ``x (N, D)`` (any float dtype; fp32 math).

    ``codebooks``: one ``(K_l, D)`` tensor per layer (sizes may differ). Returns
    ``(indices (N, L) int64, sq_error (N,) fp32)``, ``sq_error`` being
    ``||x - sum_l codebooks[l][indices[:, l]]||^2``. ``beam_size=1`` is greedy encoding
    (it runs :func:`greedy_encode`); larger beams return the best of the paths they keep. Rows are processed ``chunk_rows`` at a time (default: a chunk's candidate scores
    stay near 16 MiB), so memory is bounded for any N. ``x`` is not modified.

    ``layer_weights``: ``None`` (rank by final squared error) or ``L`` positive weights ``a_l``:
    rank by ``sum_l a_l ||r_l - e_l||^2`` and return the path of least such score (see the module
    docstring); ``sq_error`` is still that path's squared error. With ``beam_size=1`` the
    weights change nothing (greedy either way).
    """
    points, books = _check(x, codebooks, beam_size)
    weights = check_layer_weights(layer_weights, len(books))
    if beam_size == 1:
        return greedy_encode(points, books)
    n = points.shape[0]
    indices = torch.empty((n, len(books)), dtype=torch.int64, device=points.device)
    error = torch.empty(n, dtype=torch.float32, device=points.device)
    if chunk_rows is None:
        widest = max(beam_size * max(b.shape[0] for b in books), beam_size * points.shape[1])
        chunk_rows = max(1, CHUNK_ELEMENTS // widest)
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        indices[lo:hi], error[lo:hi] = _beam_chunk(
            points[lo:hi], books, beam_size, None if weights is None else weights.to(points.device))
    return indices, error


__all__ = ["beam_encode", "check_layer_weights", "greedy_encode"]
