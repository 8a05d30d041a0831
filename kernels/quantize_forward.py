"""Fused residual-quantization forward: every layer in one launch.

A persistent grid of programs walks tiles of ``BLOCK_M`` rows. For each tile and layer it finds
every row's nearest code with :mod:`.search` (codebook streamed in ``BLOCK_K``-code tiles, the dot
accumulated over ``BLOCK_DC``-wide chunks of D with ``tl.dot``, so no ``N x K`` matrix exists and
no register tile grows with D), gathers the chosen code, updates the residual, adds the layer's
squared error to a per-tile partial sum and (optionally) scatters the per-code count and residual
sum that both the codebook gradient and the EMA update need (relaxed atomics: ``red``-style
adds with no memory-ordering fences, 4-wide ``v4.f32`` where the chunk allows).

The tile's residual and running output stay in registers when D fits one chunk; wider rows keep
them in a per-program fp32 scratch ``(programs, 2, BLOCK_M, D padded)`` (L1/L2-resident), re-read
chunk by chunk, with a barrier between the phases that write and read it.

Rows holding NaN/Inf get index -1 and a NaN output, and stay out of the statistics.

Quantize dropout: ``num_active`` is a runtime argument (not specialised, so every cutoff runs the
same compiled kernel). The layer loop stops at ``num_active``: later layers do no search and no
gather, their statistics stay untouched and the output is the sum of the active layers' codes.
Their index columns (-1) and loss partial sums (0) are filled by the launcher with one strided
fill each: writing them in the kernel, even in a loop of its own after the tiles, made sm_80's
tightest configurations (bf16 at D 128, the exact search at D 192) spill.

Statistics cost ``D + 1`` element atomics per row and layer (``D / 4`` ``red.v4.f32`` and one
``red.u32`` instructions). Aggregating per code inside a 64-row tile first (a one-hot dot) would
save little: 64 rows hit ~57 distinct codes of 256 (~62 of 1024), so the atomics drop by ~11 %
(~3 %) for an extra dot as large as the search. Per-program accumulators over many tiles need
``K x D`` fp32 per layer per program (32 KiB at K 256, D 32; 256 KiB at K 1024, D 64) that
Triton can neither keep in registers nor pin in shared memory across tiles, and a global copy
moves the cost to a ``K x D`` read-modify-write per tile. So statistics stay per row; the
deterministic mode (``rqvae_fast.sorted_stats``) avoids float atomics altogether.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .config import arch_family, forward_constexprs, forward_tiles, launch_options
from .search import fast_score_bound, nearest_code, rescan
from .tiles import chunk_tile
from .traceable import traceable

NORM_EPS = tl.constexpr(1e-6)  # cosine epilogue: n = r / max(|r|, NORM_EPS), as rqvae_fast.rotation
RESCAN_FIELDS = 3  # per layer: rows flagged, row tiles rescanned, code tiles scored exactly


@triton.jit
def _load_rows(x_ptr, rows, dims, N, D, x_stride):
    """``(BLOCK_M, BLOCK_DC)`` fp32 chunk of x and its per-row count of non-finite values."""
    _, _, offsets, mask = chunk_tile(rows, dims, N, D, x_stride)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    return x, tl.sum(bad.to(tl.int32), axis=1)


@triton.jit
def _update_chunk(r, t, codes_ptr, sum_ptr, best_idx, row_ok, dims, D, r_norm,
                  ROUTING: tl.constexpr, WITH_STATS: tl.constexpr, COSINE: tl.constexpr):
    """One chunk of the layer step: gather the chosen code, scatter statistics, route.

    Returns the next residual and running output chunks, and the chunk's per-row squared error
    and next-residual squared norm. ``COSINE`` (cosine codebooks): the statistics sum the
    normalised row ``n = r / r_norm`` (``r_norm (BLOCK_M,)`` = ``max(|r|, eps)``) and the error is
    ``e - n`` (``COSINE == 1``) or ``e - r`` (``COSINE == 2``); the residual and output are as
    without it.
    """
    code_mask = row_ok[:, None] & (dims < D)[None, :]
    code_offsets = best_idx.to(tl.int64)[:, None] * D + dims[None, :]
    chosen = tl.load(codes_ptr + code_offsets, mask=code_mask, other=0.0).to(tl.float32)
    err = chosen - r
    loss_err = err
    stat = r
    if COSINE != 0:
        stat = r / r_norm[:, None]
        if COSINE == 1:
            loss_err = chosen - stat
    if WITH_STATS:
        tl.atomic_add(sum_ptr + code_offsets, stat, mask=code_mask, sem="relaxed")
    if ROUTING == 0:    # seed: the next residual subtracts the straight-through output
        straight_through = r + err
        t = t + straight_through
        r_next = r - straight_through
    elif ROUTING == 1:  # full: one straight-through estimator on the total, at the end
        t = t + chosen
        r_next = r - chosen
    else:               # layer_ste: a straight-through output per layer, detached residual
        t = t + (r + err)
        r_next = r - chosen
    return r_next, t, tl.sum(loss_err * loss_err, axis=1), tl.sum(r_next * r_next, axis=1)


@triton.jit
def _final_chunk(x_chunk, t, row_ok, ROUTING: tl.constexpr):
    if ROUTING == 1:
        out = x_chunk + (t - x_chunk)
    else:
        out = t
    return tl.where(row_ok[:, None], out, float("nan"))


@triton.jit(do_not_specialize=["num_active"])
def _residual_quantize_fwd_kernel(
    x_ptr,            # (N, G * D) input rows (row stride x_stride), any float dtype
    codes_ptr,        # (G, K_total, D) every group's codebooks stacked, any float dtype (gathered)
    search_ptr,       # (G, K_total, D) the same with non-finite codes zeroed (scored)
    sq_norm_ptr,      # (G, K_total) fp32 squared code norms, +inf for non-finite codes
    layer_start_ptr,  # (L + 1,) int32: codebook l is rows [start[l], start[l+1]) of a group's codes
    out_ptr,          # (N, G * D) quantized output (row stride x_stride), dtype of x
    idx_ptr,          # (G, N, L) int64 chosen code per layer (layer-local), -1 for non-finite rows
    sse_ptr,          # (G, num_tiles, L) fp32 per-tile sum of squared errors
    count_ptr,        # (G, K_total) int32 rows per code             (written if WITH_STATS)
    sum_ptr,          # (G, K_total, D) fp32 sum of residuals per code (written if WITH_STATS)
    scratch_ptr,      # (G, programs, 2, BLOCK_M, NUM_DC * BLOCK_DC) fp32 (used if NUM_DC > 1)
    rescan_ptr,       # (G, L, 3) int32 rescan counters (written if EXACT)
    N,
    D,                # columns per group
    x_stride,         # row stride of x and out: G * D
    num_active,       # runtime: layers [0, num_active) run, the rest are skipped (0 <= . <= L)
    NUM_LAYERS: tl.constexpr,
    ROUTING: tl.constexpr,        # 0 seed, 1 full, 2 layer_ste (see rqvae_fast.routing)
    WITH_STATS: tl.constexpr,
    SEARCH: tl.constexpr,         # "ieee" | "tf32" | "bf16" | "tf32x3" (exact's): the scoring dot
    EXACT: tl.constexpr,          # rescan rows the tf32 search cannot decide (see .search)
    EMULATE: tl.constexpr,        # interpreter: reduced-precision operands emulated exactly
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    NUM_DC: tl.constexpr,
    GROUPED: tl.constexpr = False,  # G > 1 column groups (grid axis 1); False: G = 1, x_stride = D
    COSINE: tl.constexpr = 0,       # cosine codebooks' epilogue: 0 off, 1 target n = r/|r|, 2 target r
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(N, BLOCK_M)
    D_PAD: tl.constexpr = NUM_DC * BLOCK_DC
    if GROUPED:
        # Group g (grid axis 1): its column slice of x and out, its indices, loss partial sums,
        # rescan counters and scratch. Its codes are rows [g K_total, (g + 1) K_total) of the
        # stacked (G K_total, D) codes, norms and statistics: the layer bounds are shifted by
        # g K_total (code_base) instead of offsetting five more pointers, so chosen indices are
        # rows of the stacked arrays and the layer-local index is still best - k_start.
        group = tl.program_id(1)
        code_base = group * tl.load(layer_start_ptr + NUM_LAYERS)
        x_ptr += group * D
        out_ptr += group * D
        idx_ptr += group.to(tl.int64) * N * NUM_LAYERS
        sse_ptr += group * num_tiles * NUM_LAYERS
        rescan_ptr += group * (NUM_LAYERS * 3)
        program = group * num_programs + pid
    else:  # one group: the stride is D and nothing is offset
        code_base = 0
        x_stride = D
        program = pid
    dcs = tl.arange(0, BLOCK_DC)
    local = tl.arange(0, BLOCK_M)[:, None] * D_PAD + dcs[None, :]
    res_scratch = scratch_ptr + program.to(tl.int64) * (2 * BLOCK_M * D_PAD)
    tot_scratch = res_scratch + BLOCK_M * D_PAD

    for tile in range(pid, num_tiles, num_programs):
        rows = (tl.zeros((BLOCK_M,), dtype=tl.int64) + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < N

        # --- load: finite rows, residual = x (zeros on non-finite rows, so scores stay finite) ----
        r_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        t_regs = tl.zeros((BLOCK_M, BLOCK_DC), dtype=tl.float32)
        if NUM_DC == 1:
            x, bad_count = _load_rows(x_ptr, rows, dcs, N, D, x_stride)
            row_ok = row_in & (bad_count == 0)
            r_regs = tl.where(row_ok[:, None], x, 0.0)
            r_sq = tl.sum(r_regs * r_regs, axis=1)
        else:
            r_regs = tl.zeros((BLOCK_M, BLOCK_DC), dtype=tl.float32)  # unused: rows live in scratch
            bad_count = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for c in range(NUM_DC):
                _x, bad = _load_rows(x_ptr, rows, c * BLOCK_DC + dcs, N, D, x_stride)
                bad_count += bad
            row_ok = row_in & (bad_count == 0)
            for c in range(NUM_DC):
                x, _bad = _load_rows(x_ptr, rows, c * BLOCK_DC + dcs, N, D, x_stride)
                x = tl.where(row_ok[:, None], x, 0.0)
                r_sq += tl.sum(x * x, axis=1)
                tl.store(res_scratch + local + c * BLOCK_DC, x)
                tl.store(tot_scratch + local + c * BLOCK_DC, t_regs)
            tl.debug_barrier()

        for layer in range(num_active):
            k_start = tl.load(layer_start_ptr + layer) + code_base
            k_end = tl.load(layer_start_ptr + layer + 1) + code_base

            # --- nearest code ---------------------------------------------------------------
            best, best_idx, second, max_sq = nearest_code(
                r_regs, res_scratch, search_ptr, sq_norm_ptr, k_start, k_end, D, SEARCH, EMULATE,
                EXACT, BLOCK_M, BLOCK_K, BLOCK_DC, NUM_DC)
            if EXACT:
                bound = fast_score_bound(r_sq, max_sq, D_PAD)
                needs = row_ok & ~(second - best > 2.0 * bound)
                flagged = tl.sum(needs.to(tl.int32), axis=0)
                if flagged > 0:
                    exact_idx, scored = rescan(
                        r_regs, res_scratch, search_ptr, sq_norm_ptr, k_start, k_end, D, needs,
                        best + 2.0 * bound, EMULATE, BLOCK_M, BLOCK_K, BLOCK_DC, NUM_DC)
                    best_idx = tl.where(needs, exact_idx, best_idx)
                    tl.atomic_add(rescan_ptr + layer * 3, flagged, sem="relaxed")
                    tl.atomic_add(rescan_ptr + layer * 3 + 1, 1, sem="relaxed")
                    tl.atomic_add(rescan_ptr + layer * 3 + 2, scored, sem="relaxed")

            local_idx = tl.where(row_ok, best_idx - k_start, -1)
            tl.store(idx_ptr + rows * NUM_LAYERS + layer, local_idx.to(tl.int64), mask=row_in)
            if WITH_STATS:
                tl.atomic_add(count_ptr + best_idx, tl.full((BLOCK_M,), 1, tl.int32), mask=row_ok,
                              sem="relaxed")

            # --- gather, residual update, loss partial, statistics ---------------------------
            r_norm = r_sq
            if COSINE != 0:
                r_norm = tl.maximum(tl.sqrt(r_sq), NORM_EPS)
            if NUM_DC == 1:
                r_regs, t_regs, row_sse, r_sq = _update_chunk(
                    r_regs, t_regs, codes_ptr, sum_ptr, best_idx, row_ok, dcs, D, r_norm, ROUTING,
                    WITH_STATS, COSINE)
            else:
                tl.debug_barrier()  # every warp is done reading this layer's residual
                row_sse = tl.zeros((BLOCK_M,), dtype=tl.float32)
                r_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for c in range(NUM_DC):
                    r = tl.load(res_scratch + local + c * BLOCK_DC)
                    t = tl.load(tot_scratch + local + c * BLOCK_DC)
                    r, t, chunk_sse, chunk_sq = _update_chunk(
                        r, t, codes_ptr, sum_ptr, best_idx, row_ok, c * BLOCK_DC + dcs, D, r_norm,
                        ROUTING, WITH_STATS, COSINE)
                    row_sse += chunk_sse
                    r_sq += chunk_sq
                    tl.store(res_scratch + local + c * BLOCK_DC, r)
                    tl.store(tot_scratch + local + c * BLOCK_DC, t)
                tl.debug_barrier()  # the next layer reads what every warp wrote
            row_sse = tl.where(row_ok, row_sse, float("nan"))
            tl.store(sse_ptr + tile * NUM_LAYERS + layer, tl.sum(tl.where(row_in, row_sse, 0.0), axis=0))

        # --- output ---------------------------------------------------------------------------
        if NUM_DC == 1:
            x, _bad = _load_rows(x_ptr, rows, dcs, N, D, x_stride)  # re-read (L2) rather than held in registers
            out = _final_chunk(tl.where(row_ok[:, None], x, 0.0), t_regs, row_ok, ROUTING)
            tl.store(out_ptr + rows[:, None] * x_stride + dcs[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=row_in[:, None] & (dcs < D)[None, :])
        else:
            for c in range(NUM_DC):
                dims = c * BLOCK_DC + dcs
                x, _bad = _load_rows(x_ptr, rows, dims, N, D, x_stride)
                x_ok = tl.where(row_ok[:, None], x, 0.0)
                out = _final_chunk(x_ok, tl.load(tot_scratch + local + c * BLOCK_DC), row_ok, ROUTING)
                tl.store(out_ptr + rows[:, None] * x_stride + dims[None, :], out.to(out_ptr.dtype.element_ty),
                         mask=row_in[:, None] & (dims < D)[None, :])
            tl.debug_barrier()  # the next tile overwrites the scratch


def check_active(active: Optional[int], num_layers: int) -> int:
    """``active`` as an int in ``[0, num_layers]`` (``None``: ``num_layers``); raises otherwise."""
    if active is None:
        return num_layers
    if isinstance(active, bool) or not isinstance(active, int) or not 0 <= active <= num_layers:
        raise ValueError(f"active layers must be an int in [0, {num_layers}], got {active!r}")
    return active


_sm_counts = {}


def max_programs(device: torch.device) -> int:
    """Size cap of the persistent grid: two programs per SM on CUDA (the fewest the compile report
    shows resident for any forward configuration, so the grid is one wave); 2 under the
    interpreter (so tests walk several tiles per program)."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _sm_counts[index]


def device_arch(device: torch.device) -> str:
    """The config table's arch family for ``device`` (the interpreter uses the sm90 column)."""
    if device.type != "cuda":
        return "sm90"
    return arch_family(torch.cuda.get_device_capability(device)[0])


def residual_quantize_forward(
    x: torch.Tensor,
    codes: torch.Tensor,
    search_codes: torch.Tensor,
    sq_norms: torch.Tensor,
    layer_starts: torch.Tensor,
    layer_sizes: Sequence[int],
    *,
    routing: int,
    precision: str,
    with_stats: bool,
    rescan_counts: bool = False,
    active: Optional[int] = None,
    cosine: int = 0,
) -> Tuple[torch.Tensor, ...]:
    """Launch the fused forward.

    x ``(N, D)`` contiguous; codes and search_codes ``(K_total, D)`` contiguous (see
    :func:`rqvae_fast.backend.search_operands`); sq_norms ``(K_total,)`` fp32;
    layer_starts ``(L + 1,)`` int32 on x's device; precision ``"ieee"``, ``"tf32"``, ``"bf16"`` or
    ``"exact"`` (tf32 search + exact rescans, indices identical to ``"ieee"``). Returns
    ``quantized (N, D)`` in x's dtype, ``indices (N, L)`` int64, ``sse (L,)`` fp32,
    ``counts (K_total,)`` fp32, ``sums (K_total, D)`` fp32 (empty, ``(0,)`` and ``(0, D)``, when
    ``with_stats`` is false), and with ``rescan_counts`` a sixth ``(L, 3)`` int32 tensor: per layer
    the rows the exact mode flagged, the row tiles it rescanned and the code tiles it scored exactly.
    ``active``: run only the first ``active`` layers (``0 <= active <= L``; ``None``: all); the
    others get index -1, loss 0 and zero statistics. A runtime value: no recompilation per value.
    ``cosine``: the epilogue of cosine codebooks (unit codes): ``sse`` sums ``|e_l - n_l|^2`` with
    ``n_l = r_l / max(|r_l|, 1e-6)`` (``1``) or ``|e_l - r_l|^2`` (``2``: vector-quantize-pytorch
    1.32's target with a mask), and ``sums`` the ``n_l``; ``0``: off.
    """
    # outputs allocated without the group dim (not views: a traced triton_op may not return views)
    return residual_quantize_forward_grouped(
        x, codes, search_codes, sq_norms, layer_starts, layer_sizes, routing=routing,
        precision=precision, with_stats=with_stats, rescan_counts=rescan_counts, active=active,
        cosine=cosine, _group_dim=False)


def residual_quantize_forward_grouped(
    x: torch.Tensor,
    codes: torch.Tensor,
    search_codes: torch.Tensor,
    sq_norms: torch.Tensor,
    layer_starts: torch.Tensor,
    layer_sizes: Sequence[int],
    *,
    routing: int,
    precision: str,
    with_stats: bool,
    rescan_counts: bool = False,
    active: Optional[int] = None,
    cosine: int = 0,
    _group_dim: bool = True,
) -> Tuple[torch.Tensor, ...]:
    """Launch the fused forward for ``G`` independent residual quantizers over column groups, in
    one launch (grid ``(programs, G)``).

    x ``(N, G * D)`` contiguous (group g is columns ``[g D, (g + 1) D)``); codes and search_codes
    ``(G, K_total, D)`` contiguous, every group with the same ``layer_sizes``; sq_norms
    ``(G, K_total)`` fp32; the rest as :func:`residual_quantize_forward`, the same ``active`` for
    every group. Returns ``quantized (N, G * D)``, ``indices (G, N, L)``, ``sse (G, L)``,
    ``counts (G, K_total)``, ``sums (G, K_total, D)`` (``(G, 0)`` and ``(G, 0, D)`` without
    statistics) and with ``rescan_counts`` a ``(G, L, 3)`` int32 tensor.
    """
    # 2-D codes: one group, passed as is (no view of an argument reaches a traced kernel launch)
    groups, k_total, dim = codes.shape if codes.dim() == 3 else (1,) + tuple(codes.shape)
    n = x.shape[0]
    if x.shape[1] != groups * dim:
        raise ValueError(f"x has {x.shape[1]} columns, expected groups ({groups}) x dim ({dim})")
    num_layers = len(layer_sizes)
    num_active = check_active(active, num_layers)
    tiles = forward_tiles(dim, precision, device_arch(x.device), grouped=groups > 1, cosine=cosine != 0)
    num_tiles = triton.cdiv(n, tiles.block_m)
    # the persistent grid's size cap is shared by the groups (at least one program per group)
    programs = torch.sym_min(num_tiles, max(1, max_programs(x.device) // groups))
    lead = (groups,) if _group_dim else ()  # without: G = 1 outputs shaped as the plain launcher's
    quantized = torch.empty_like(x)
    indices = torch.empty(lead + (n, num_layers), dtype=torch.int64, device=x.device)
    sse_partial = torch.empty(lead + (num_tiles, num_layers), dtype=torch.float32, device=x.device)
    counts = torch.zeros(lead + (k_total,) if with_stats else (1,), dtype=torch.int32, device=x.device)
    sums = torch.zeros(lead + (k_total, dim) if with_stats else (1, 1), dtype=torch.float32,
                       device=x.device)
    scratch_shape = ((groups, programs, 2, tiles.block_m, tiles.padded_dim) if tiles.num_chunks > 1
                     else (1,))
    scratch = torch.empty(scratch_shape, dtype=torch.float32, device=x.device)
    rescans = torch.zeros(lead + (num_layers, 3), dtype=torch.int32, device=x.device)
    if n > 0 and groups > 0:
        consts = forward_constexprs(tiles, num_layers=num_layers, routing=routing, precision=precision,
                                    with_stats=with_stats, emulate=x.device.type == "cpu",
                                    grouped=groups > 1, cosine=cosine)
        traceable(_residual_quantize_fwd_kernel)[(programs, groups)](
            x, codes, search_codes, sq_norms, layer_starts, quantized, indices, sse_partial, counts,
            sums, scratch, rescans, n, dim, groups * dim, num_active, **consts, **launch_options(tiles),
        )
    if num_active < num_layers:  # dropped layers: the kernel never touches their columns
        indices[..., num_active:] = -1
        sse_partial[..., num_active:] = 0.0
    if not with_stats:
        counts, sums = counts.new_zeros(lead + (0,)), sums.new_empty(lead + (0, dim))
    out = (quantized, indices, sse_partial.sum(dim=-2), counts.float(), sums)
    return out + (rescans,) if rescan_counts else out
