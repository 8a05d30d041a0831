"""Beam-search residual quantization in one launch: the ``B`` best partial paths per row, every layer.

A persistent grid of programs walks tiles of ``BLOCK_M`` rows. A tile holds ``P = BLOCK_M x
BEAM_PAD`` *path rows* (``BEAM_PAD``: ``B`` rounded up to a power of two; path row
``m * BEAM_PAD + b`` is rank ``b`` of row ``m``), so ``P = 64`` whatever ``B``: the score dot keeps
the tensor-core shape of the greedy kernel. Per layer ``l`` with ``K_l`` codes:

1. **Score** every (path, code) pair tile by tile of ``BLOCK_K`` codes with :func:`.search.tile_scores`
   (the distance math of every kernel: ``||e_k||^2 - 2 r_b . e_k`` with ``tl.dot`` over chunks of
   ``D``), plus the path's squared residual norm ``||r_b||^2`` once several paths are kept (as
   :func:`rqvae_fast.beam.beam_encode` adds it). No ``N x K`` matrix exists.
2. **Keep the B best** of the ``B x K_l`` candidates per row, ordered by ``(score, key)`` with
   ``key = rank(parent) * K_l + code``: ties go to the lowest (beam, code) pair, the beam order
   being the previous layer's ranking, which is ``beam_encode``'s stable-sort rule. The kept set
   is ``(BLOCK_M, BEAM_PAD)`` registers; each code tile is merged by extraction rounds: the tile's
   next-best candidate per row (by ``(score, key)``, after the one taken in the previous round)
   replaces the row's worst kept entry while it beats it. Rounds stop when no row of the tile
   improves (at most ``B`` per tile; fewer once the layer's earlier tiles have filled the set).
   After the layer's last tile the set is sorted into rank order.
3. **Rebuild** each kept path's residual ``r_parent - e_code`` into the other half of a
   per-program fp32 scratch ``(programs, 2, P, D padded)`` (double-buffered: the parent's row is
   read from one half, the child's written to the other) and record ``key`` per (layer, path) in
   an int32 scratch ``(programs, L, P)``.

After the last layer the row's answer is its kept path with the lowest exact squared residual
(first in rank order on ties, as ``beam_encode``), backtracked through the recorded keys.

``WEIGHTED`` (vector-quantize-pytorch's ranking, ``beam_encode(layer_weights=...)``): each path
also carries its score ``S`` (fp32 register per path row), a candidate's score is
``S_parent + a_l (||e_k||^2 - 2 r.e_k + ||r||^2)`` with ``a_l`` read from ``weight_ptr``, the kept
scores become the children's ``S``, and the answer is rank 0 (least score). Without it the
weights pointer is never read and the code is the unweighted kernel's.

While the product of the layer sizes so far is below ``B`` (``B > K_0``) a row has fewer than
``B`` paths; the others are empty (never chosen), exactly as ``beam_encode`` keeps
``min(B, paths x K_l)`` of them. Rows holding NaN/Inf get index -1 and error NaN.

Roofline, ``B = 4``, on paper (unmeasured: no GPU run yet), shape A of ``benchmarks/RESULTS.md``
(N 2^20, D 32, K 256, L 3) with its H200 ceilings (tf32 360, fp32 51.3 TFLOP/s, copy 4.25 TB/s,
33.4 T simple CUDA-core ops/s):

- dot: ``2 B K D L`` = 196,608 FLOPs per row (4x greedy's; layer 0 scores all ``B`` path rows
  though one is live): 0.57 ms in tf32, 4.0 ms in fp32 FMA (``"ieee"``, what
  ``residual_quantize`` runs);
- DRAM: the row in (``4 D``), codes and error out (``8 L + 4``): 156 B per row, 0.04 ms, about
  1,300 FLOPs per byte;
- L2: every 16-row tile streams the codebooks (``4 K D L`` = 96 KiB, 6 KiB per row, 4x greedy's
  64-row tiles): 6.4 GB, ~0.6 ms at ~10 TB/s;
- L1/L2 scratch: per layer ``B`` path rows write and read ``4 D`` bytes (plus a re-read per code
  tile when D spans several chunks): ~4.6 KiB per row at D 32;
- CUDA cores, the top-B merge: ~7 ops per candidate to form score and key, ~11 per extraction
  pass, ~2 passes per code tile on average (``B + 1`` on a layer's first tile, 1-2 later), so
  ~29 ops x ``B K L`` = 3.2 G candidates: ~2.8 ms, the largest term.

Predicted: tf32 2.8-4.0 ms, ``"ieee"`` 4.0-7.4 ms (perfect overlap .. none), against greedy's
0.14-0.26 / 1.0-1.1 ms: the merge, not the FLOPs or the bytes, bounds it at small D.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from rqvae_fast.beam import check_layer_weights

from .config import BEAM_PRECISIONS, MAX_BEAM, beam_constexprs, beam_tiles, launch_options
from .quantize_forward import device_arch, max_programs
from .search import chunk_dot, tile_scores
from .traceable import traceable

NO_KEY = 2 ** 31 - 1  # key of an empty slot or an impossible candidate: after every real key


@triton.jit
def _before(a_score, a_key, b_score, b_key):
    """``(a_score, a_key) < (b_score, b_key)`` in the beam order (score, then key)."""
    return (a_score < b_score) | ((a_score == b_score) & (a_key < b_key))


@triton.jit
def _next_after(scores, keys, prev_score, prev_key, NO: tl.constexpr):
    """Per row of ``scores``/``keys`` ``(M, C)``: the least ``(score, key)`` strictly after
    ``(prev_score, prev_key)`` ``(M,)``; ``(+inf, NO)`` when there is none."""
    later = _before(prev_score[:, None], prev_key[:, None], scores, keys)
    best = tl.min(tl.where(later, scores, float("inf")), axis=1)
    key = tl.min(tl.where(later & (scores == best[:, None]), keys, NO), axis=1)
    return best, key


@triton.jit
def _worst(kept_score, kept_key, slots, BEAM: tl.constexpr, BEAM_PAD: tl.constexpr):
    """The last kept entry per row in the beam order: ``(score, key, slot)``; padding slots
    (``slot >= BEAM``) are never it."""
    live = slots[None, :] < BEAM
    score = tl.max(tl.where(live, kept_score, -float("inf")), axis=1)
    at_score = live & (kept_score == score[:, None])
    key = tl.max(tl.where(at_score, kept_key, -1), axis=1)
    slot = tl.min(tl.where(at_score & (kept_key == key[:, None]), slots[None, :], BEAM_PAD), axis=1)
    return score, key, slot


@triton.jit
def _merge_tile(kept_score, kept_key, scores, keys, slots, NO: tl.constexpr,
                BEAM: tl.constexpr, BEAM_PAD: tl.constexpr):
    """Fold a tile's candidates ``(BLOCK_M, C)`` into the kept set ``(BLOCK_M, BEAM_PAD)``: take
    the tile's candidates best first while they beat the row's worst kept entry."""
    prev_score = tl.full((kept_score.shape[0],), -float("inf"), tl.float32)
    prev_key = tl.full((kept_score.shape[0],), -1, tl.int32)
    cand_score, cand_key = _next_after(scores, keys, prev_score, prev_key, NO)
    worst_score, worst_key, worst_slot = _worst(kept_score, kept_key, slots, BEAM, BEAM_PAD)
    take = (cand_key < NO) & _before(cand_score, cand_key, worst_score, worst_key)
    while tl.max(take.to(tl.int32), axis=0) > 0:
        put = take[:, None] & (slots[None, :] == worst_slot[:, None])
        kept_score = tl.where(put, cand_score[:, None], kept_score)
        kept_key = tl.where(put, cand_key[:, None], kept_key)
        cand_score, cand_key = _next_after(scores, keys, cand_score, cand_key, NO)
        worst_score, worst_key, worst_slot = _worst(kept_score, kept_key, slots, BEAM, BEAM_PAD)
        take = (cand_key < NO) & _before(cand_score, cand_key, worst_score, worst_key)
    return kept_score, kept_key


@triton.jit
def _rank(kept_score, kept_key, slots, NO: tl.constexpr, BEAM: tl.constexpr):
    """The kept set ``(BLOCK_M, BEAM_PAD)`` sorted best first (slot = rank); empty slots last."""
    live = slots[None, :] < BEAM
    scores = tl.where(live, kept_score, float("inf"))
    keys = tl.where(live, kept_key, NO)
    ranked_score = tl.full(kept_score.shape, float("inf"), tl.float32)
    ranked_key = tl.full(kept_key.shape, NO, tl.int32)
    prev_score = tl.full((kept_score.shape[0],), -float("inf"), tl.float32)
    prev_key = tl.full((kept_score.shape[0],), -1, tl.int32)
    for rank in tl.static_range(BEAM):
        prev_score, prev_key = _next_after(scores, keys, prev_score, prev_key, NO)
        at = slots[None, :] == rank
        ranked_score = tl.where(at, prev_score[:, None], ranked_score)
        ranked_key = tl.where(at, prev_key[:, None], ranked_key)
    return ranked_score, ranked_key


@triton.jit
def _path_scores(r_regs, res_ptr, code_ptr, sq_norm_ptr, k0, k_end, D, num_chunks,
                 SEARCH: tl.constexpr, EMULATE: tl.constexpr, P: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_DC: tl.constexpr, NUM_DC: tl.constexpr):
    """``(P, BLOCK_K)`` fp32 scores ``||e||^2 - 2 r.e`` of codes ``k0 .. k0 + BLOCK_K`` (+inf past
    ``k_end``) for the ``P`` path residuals: :func:`.search.tile_scores` for one chunk; for
    several, the same chunk dots in the same order over a *runtime* chunk count (``num_chunks``
    = ``NUM_DC``): with a constant count LLVM unrolled the loop and hoisted its loads, which took
    sm_80's tf32 tiles to 255 registers and spills at D 256-768."""
    if NUM_DC == 1:
        dist, _norms = tile_scores(r_regs, res_ptr, code_ptr, sq_norm_ptr, k0, k_end, D, SEARCH,
                                   EMULATE, P, BLOCK_K, BLOCK_DC, NUM_DC)
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < k_end
        dcs = tl.arange(0, BLOCK_DC)
        local = tl.arange(0, P)[:, None] * (NUM_DC * BLOCK_DC) + dcs[None, :]
        acc = tl.zeros((P, BLOCK_K), dtype=tl.float32)
        for c in range(num_chunks):
            dims = c * BLOCK_DC + dcs
            r = tl.load(res_ptr + local + c * BLOCK_DC)
            codes = tl.load(code_ptr + ks.to(tl.int64)[:, None] * D + dims[None, :],
                            mask=k_in[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
            acc = chunk_dot(r, codes, acc, SEARCH, EMULATE)
        sq_norm = tl.load(sq_norm_ptr + ks, mask=k_in, other=float("inf"))
        dist = sq_norm[None, :] - 2.0 * acc
    return dist


@triton.jit
def _load_x(x_ptr, path_rows, dims, N, D):
    """``(P, BLOCK_DC)`` fp32 chunk of x for each path row's row, and its non-finite count."""
    mask = (path_rows < N)[:, None] & (dims < D)[None, :]
    x = tl.load(x_ptr + path_rows[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    return x, tl.sum(bad.to(tl.int32), axis=1)


@triton.jit
def _beam_search_kernel(
    x_ptr,            # (N, D) rows, any float dtype
    code_ptr,         # (K_total, D) fp32 codebooks stacked (finite)
    sq_norm_ptr,      # (K_total,) fp32 squared code norms
    layer_start_ptr,  # (L + 1,) int32: codebook l is rows [start[l], start[l+1]) of code_ptr
    idx_ptr,          # (N, L) int64 out: layer-local codes of the best path, -1 on non-finite rows
    err_ptr,          # (N,) fp32 out: its squared error ||x - sum of codes||^2, NaN on non-finite rows
    res_ptr,          # (programs, 2, P, NUM_DC * BLOCK_DC) fp32 scratch: path residuals
    hist_ptr,         # (programs, L, P) int32 scratch: key of each kept path per layer
    weight_ptr,       # (L,) fp32 per-layer score weights a_l (read only when WEIGHTED)
    N,
    D,
    NUM_LAYERS: tl.constexpr,
    BEAM: tl.constexpr,       # paths kept per row (B)
    BEAM_PAD: tl.constexpr,   # B rounded up to a power of two
    WEIGHTED: tl.constexpr,   # rank by sum_l a_l ||r_l - e_l||^2 (else by the final error)
    SEARCH: tl.constexpr,     # "ieee" | "tf32" | "bf16": the scoring dot (see .search.chunk_dot)
    EMULATE: tl.constexpr,    # interpreter: reduced-precision operands emulated exactly
    BLOCK_M: tl.constexpr,    # rows per tile; P = BLOCK_M * BEAM_PAD path rows
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    NUM_DC: tl.constexpr,
):
    NO: tl.constexpr = 2147483647
    P: tl.constexpr = BLOCK_M * BEAM_PAD
    D_PAD: tl.constexpr = NUM_DC * BLOCK_DC
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(N, BLOCK_M)
    dcs = tl.arange(0, BLOCK_DC)
    paths = tl.arange(0, P)
    path_row = paths // BEAM_PAD   # row of the tile
    path_rank = paths % BEAM_PAD   # rank of the path in its row
    slots = tl.arange(0, BEAM_PAD)
    local = paths[:, None] * D_PAD + dcs[None, :]
    res_base = res_ptr + pid.to(tl.int64) * (2 * P * D_PAD)
    hist = hist_ptr + pid.to(tl.int64) * (NUM_LAYERS * P)
    num_chunks = tl.cdiv(D, BLOCK_DC)  # = NUM_DC, as a runtime bound: a constant one gets unrolled

    for tile in range(pid, num_tiles, num_programs):
        rows = (tl.zeros((BLOCK_M,), dtype=tl.int64) + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        path_rows = (tl.zeros((P,), dtype=tl.int64) + tile) * BLOCK_M + path_row

        # --- every path row starts as its row of x (zeros on non-finite rows) ------------------
        bad = tl.zeros((P,), dtype=tl.int32)
        for c in range(num_chunks):
            _x, chunk_bad = _load_x(x_ptr, path_rows, c * BLOCK_DC + dcs, N, D)
            bad += chunk_bad
        path_ok = (path_rows < N) & (bad == 0)
        r_sq = tl.zeros((P,), dtype=tl.float32)
        for c in range(num_chunks):
            x, _bad = _load_x(x_ptr, path_rows, c * BLOCK_DC + dcs, N, D)
            x = tl.where(path_ok[:, None], x, 0.0)
            r_sq += tl.sum(x * x, axis=1)
            tl.store(res_base + local + c * BLOCK_DC, x)
        tl.debug_barrier()
        live = path_rank == 0  # one path (the row itself) before layer 0
        path_score = tl.zeros((P,), dtype=tl.float32)  # WEIGHTED: the path's score S
        kept = tl.full((), 1, tl.int32)  # paths per row so far: min(B, product of the layer sizes)
        cur = tl.full((), 0, tl.int32)   # scratch half holding the current residuals

        for layer in range(NUM_LAYERS):
            k_start = tl.load(layer_start_ptr + layer)
            k_end = tl.load(layer_start_ptr + layer + 1)
            size = k_end - k_start
            cur_res = res_base + cur * (P * D_PAD)
            next_res = res_base + (1 - cur) * (P * D_PAD)
            if NUM_DC == 1:
                r_regs = tl.load(cur_res + local)
            else:
                r_regs = tl.zeros((P, BLOCK_DC), dtype=tl.float32)  # unused: read from scratch
            # beam_encode adds ||r||^2 only once paths differ; a dead path scores +inf
            path_base = tl.where(live, tl.where(kept > 1, r_sq, 0.0), float("inf"))
            path_key = path_rank * size - k_start

            # --- the B best of B x K_l candidates per row -------------------------------------
            kept_score = tl.where(slots[None, :] < BEAM, float("inf"),
                                  -float("inf")) + tl.zeros((BLOCK_M, BEAM_PAD), dtype=tl.float32)
            kept_key = tl.where(slots[None, :] < BEAM, NO, -1) + tl.zeros((BLOCK_M, BEAM_PAD), dtype=tl.int32)
            for k0 in range(k_start, k_end, BLOCK_K):
                dist = _path_scores(r_regs, cur_res, code_ptr, sq_norm_ptr, k0, k_end, D, num_chunks,
                                    SEARCH, EMULATE, P, BLOCK_K, BLOCK_DC, NUM_DC)
                ks = k0 + tl.arange(0, BLOCK_K)
                ok = live[:, None] & (ks < k_end)[None, :]
                if WEIGHTED:
                    alpha = tl.load(weight_ptr + layer)
                    score = tl.where(live, path_score, float("inf"))[:, None] + alpha * (dist + r_sq[:, None])
                else:
                    score = dist + path_base[:, None]
                score = tl.where(ok & (score == score), score, float("inf"))
                key = tl.where(ok, path_key[:, None] + ks[None, :], NO)
                kept_score, kept_key = _merge_tile(
                    kept_score, kept_key, tl.reshape(score, (BLOCK_M, BEAM_PAD * BLOCK_K)),
                    tl.reshape(key, (BLOCK_M, BEAM_PAD * BLOCK_K)), slots, NO, BEAM, BEAM_PAD)
            kept_score, kept_key = _rank(kept_score, kept_key, slots, NO, BEAM)

            # --- children: r_parent - e_code into the other scratch half -----------------------
            child_key = tl.reshape(kept_key, (P,))
            if WEIGHTED:
                path_score = tl.reshape(kept_score, (P,))
            live = child_key < NO
            parent = tl.where(live, child_key // size, 0)
            code = tl.where(live, child_key % size, 0) + k_start
            tl.store(hist + layer * P + paths, child_key)
            src = (path_row * BEAM_PAD + parent)[:, None] * D_PAD + dcs[None, :]
            r_sq = tl.zeros((P,), dtype=tl.float32)
            for c in range(num_chunks):
                dims = c * BLOCK_DC + dcs
                r = tl.load(cur_res + src + c * BLOCK_DC)
                e = tl.load(code_ptr + code.to(tl.int64)[:, None] * D + dims[None, :],
                            mask=live[:, None] & (dims < D)[None, :], other=0.0)
                r = tl.where(live[:, None], r - e, 0.0)
                r_sq += tl.sum(r * r, axis=1)
                tl.store(next_res + local + c * BLOCK_DC, r)
            tl.debug_barrier()  # the next layer reads what every warp wrote
            kept = tl.minimum(kept * size, BEAM)
            cur = 1 - cur

        # --- the kept path of least exact error, backtracked ---------------------------------
        final = tl.reshape(tl.where(live, r_sq, float("inf")), (BLOCK_M, BEAM_PAD))
        err = tl.min(final, axis=1)
        slot = tl.min(tl.where(final == err[:, None], slots[None, :], BEAM_PAD), axis=1)
        slot = tl.where(slot < BEAM_PAD, slot, 0)
        if WEIGHTED:  # the least score: rank 0
            err = tl.sum(tl.where(slots[None, :] == 0, final, 0.0), axis=1)
            slot = tl.zeros((BLOCK_M,), dtype=tl.int32)
        row_ok = tl.max(tl.reshape(path_ok.to(tl.int32), (BLOCK_M, BEAM_PAD)), axis=1) > 0
        row_in = rows < N
        tl.store(err_ptr + rows, tl.where(row_ok, err, float("nan")), mask=row_in)
        for back in range(NUM_LAYERS):
            layer = NUM_LAYERS - 1 - back
            size = tl.load(layer_start_ptr + layer + 1) - tl.load(layer_start_ptr + layer)
            key = tl.load(hist + layer * P + tl.arange(0, BLOCK_M) * BEAM_PAD + slot)
            code = tl.where(row_ok, key % size, -1)
            tl.store(idx_ptr + rows * NUM_LAYERS + layer, code.to(tl.int64), mask=row_in)
            slot = tl.where(row_ok, key // size, 0)
        tl.debug_barrier()  # the next tile overwrites both scratches


def _check(x: torch.Tensor, codebooks: Sequence[torch.Tensor], beam_size: int, precision: str):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() or x.shape[1] == 0:
        what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D float tensor (N, D) with D >= 1, got {what}")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or not 1 <= beam_size <= MAX_BEAM:
        raise ValueError(f"beam_size must be an int in [1, {MAX_BEAM}] for the beam kernel, got {beam_size!r}")
    if precision not in BEAM_PRECISIONS:
        raise ValueError(f"precision must be one of {BEAM_PRECISIONS}, got {precision!r}")
    if len(codebooks) == 0:
        raise ValueError("codebooks is empty: need at least one layer")
    for layer, book in enumerate(codebooks):
        if not isinstance(book, torch.Tensor) or book.dim() != 2 or book.shape[0] == 0:
            shape = tuple(book.shape) if isinstance(book, torch.Tensor) else type(book).__name__
            raise ValueError(f"codebook {layer} must be a non-empty (K, D) tensor, got {shape}")
        if book.shape[1] != x.shape[1]:
            raise ValueError(f"codebook {layer} is {book.shape[1]}-d but x is {x.shape[1]}-d")
        if book.device != x.device:
            raise ValueError(f"codebook {layer} is on {book.device} but x is on {x.device}")
        if beam_size * book.shape[0] >= NO_KEY:
            raise ValueError(f"codebook {layer}: beam_size x {book.shape[0]} codes overflows int32 keys")


@torch.no_grad()
def beam_search(x: torch.Tensor, codebooks: Sequence[torch.Tensor], beam_size: int, *,
                precision: str = "ieee", layer_weights: Optional[Sequence[float]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Beam-search residual codes of ``x (N, D)`` (any float dtype; fp32 math) in one launch.

    ``codebooks``: one ``(K_l, D)`` tensor per layer on x's device (sizes may differ; finite).
    ``beam_size``: ``1 .. MAX_BEAM`` (8). ``precision``: the scoring dot, ``"ieee"`` (fp32 FMA),
    ``"tf32"`` or ``"bf16"`` (tensor cores; ranks by rounded scores, the returned error is exact
    fp32 either way). Returns ``(indices (N, L) int64, sq_error (N,) fp32)`` as
    :func:`rqvae_fast.beam.beam_encode` (same ranking and tie rule); rows holding NaN/Inf get
    index -1 and error NaN. ``layer_weights``: ``None`` or ``L`` positive weights, ranking as
    :func:`rqvae_fast.beam.beam_encode` with them (ignored at ``beam_size=1``: greedy either way).
    Nothing passed in is modified.
    """
    _check(x, codebooks, beam_size, precision)
    weights = check_layer_weights(layer_weights, len(codebooks))
    weighted = weights is not None and beam_size > 1
    book32 = [b.detach().to(torch.float32) for b in codebooks]
    for layer, book in enumerate(book32):
        if not bool(torch.isfinite(book).all()):
            raise ValueError(f"the beam kernel needs finite codebooks: codebook {layer} holds NaN/Inf")
    n, dim = x.shape
    num_layers = len(book32)
    indices = torch.empty((n, num_layers), dtype=torch.int64, device=x.device)
    sq_error = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return indices, sq_error
    codes = torch.cat(book32).contiguous()
    sq_norms = codes.pow(2).sum(dim=1)
    sizes = [b.shape[0] for b in book32]
    starts = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(x.device)
    tiles = beam_tiles(dim, precision, device_arch(x.device), beam_size)
    paths = tiles.block_m * beam_pad(beam_size)
    programs = min(triton.cdiv(n, tiles.block_m), max_programs(x.device))
    scratch = torch.empty((programs, 2, paths, tiles.padded_dim), dtype=torch.float32, device=x.device)
    history = torch.empty((programs, num_layers, paths), dtype=torch.int32, device=x.device)
    consts = beam_constexprs(tiles, num_layers=num_layers, beam_size=beam_size, precision=precision,
                             emulate=x.device.type == "cpu", weighted=weighted)
    weight_arg = weights.to(x.device) if weighted else sq_norms  # unweighted: never read
    traceable(_beam_search_kernel)[(programs,)](
        x.contiguous(), codes, sq_norms, starts, indices, sq_error, scratch, history, weight_arg, n, dim,
        **consts, **launch_options(tiles))
    return indices, sq_error


def beam_pad(beam_size: int) -> int:
    """``beam_size`` rounded up to a power of two (the kernel's ``BEAM_PAD``)."""
    return triton.next_power_of_2(beam_size)


__all__ = ["beam_search", "beam_pad", "NO_KEY"]
