"""Nearest-code search over one row tile: the distance math of every kernel lives here.

A row tile's residual is ``(BLOCK_M, NUM_DC * BLOCK_DC)`` fp32, held in registers when it is one
chunk wide (``NUM_DC == 1``) and otherwise in a per-program fp32 scratch that is re-read chunk by
chunk. Codes are scored as ``||c||^2 - 2 r.c`` with the dot accumulated over the D chunks in a
fixed order, tile by tile of ``BLOCK_K`` codes, keeping a running (min, argmin): ties go to the
lowest index (in a tile by ``tl.argmin``, across tiles by a strict ``<``).

Exact indices at tensor-core speed (``EXACT``): a first pass scores with three tf32 tensor-core
dots on a hi/lo split of the operands (``"tf32x3"``) and keeps each row's best and second-best
fast score. The fast score of a code differs from the plain exact (``ieee``)
path's score of the same code by at most ``B`` (see :func:`fast_score_bound`). If
``second - best > 2 B`` the fast winner ``j*`` is provably the exact winner: for any other code j,
``exact(j) >= fast(j) - B >= second - B > best + B >= exact(j*)`` -- strictly, so tie rules
cannot differ. Other rows are rescanned (:func:`rescan`) with the plain exact path's own tile
scores (same helper, tile shapes and chunk order, so bit-identical values), skipping only code
tiles in which no such row has a code whose fast score is within ``best + 2 B``: every exact
score there is ``> best + B >= exact(j*) >= exact minimum``, so they can neither win nor tie.
"""
import triton
import triton.language as tl

# Unit roundoffs of the bound, generous on purpose (see fast_score_bound).
SPLIT_OPERAND_U = tl.constexpr(2.0 ** -20)  # tf32 of the low part of a hi/lo split: < 2^-20 relative
ACCUM_U = tl.constexpr(2.0 ** -22)         # fp32 accumulation, with 4x slack for unspecified tensor-core order
SAFETY = tl.constexpr(1.25)                # covers the fp32 rounding of ||r||, max ||c|| and the bound itself


@triton.jit
def tf32_truncate(v):
    """``v`` fp32 with the low 13 mantissa bits cleared: what tf32 tensor cores read."""
    return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def tf32_dot(r, c, acc, EMULATE: tl.constexpr):
    """``acc + r @ c^T`` on tf32 tensor cores (``EMULATE``: operands truncated, exact products)."""
    if EMULATE:
        acc = tl.dot(tf32_truncate(r), tl.trans(tf32_truncate(c)), acc, input_precision="ieee")
    else:
        acc = tl.dot(r, tl.trans(c), acc, input_precision="tf32")
    return acc


@triton.jit
def chunk_dot(r, c, acc, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + r @ c^T`` for ``r (BLOCK_M, BLOCK_DC)``, ``c (BLOCK_K, BLOCK_DC)`` fp32.

    ``EMULATE`` (CPU interpreter): reduced-precision operands are rounded (bf16) or truncated
    (tf32) explicitly, then multiplied exactly, since the interpreter's own tf32 dot is full fp32.
    """
    if PRECISION == "ieee":
        acc = tl.dot(r, tl.trans(c), acc, input_precision="ieee")
    elif PRECISION == "tf32x3":
        # r c ~ r_hi c_hi + r_hi c_lo + r_lo c_hi with r_hi = tf32(r), r_lo = r - r_hi (exact):
        # three tf32 tensor-core dots, error ~3 * 2^-20 relative (see fast_score_bound).
        r_hi = tf32_truncate(r)
        c_hi = tf32_truncate(c)
        acc = tf32_dot(r - r_hi, c_hi, acc, EMULATE)
        acc = tf32_dot(r_hi, c - c_hi, acc, EMULATE)
        acc = tf32_dot(r_hi, c_hi, acc, EMULATE)
    elif PRECISION == "tf32":
        acc = tf32_dot(r, c, acc, EMULATE)
    else:
        if EMULATE:  # products of bf16 values are exact in fp32
            acc = tl.dot(r.to(tl.bfloat16).to(tl.float32),
                         tl.trans(c.to(tl.bfloat16).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(r.to(tl.bfloat16), tl.trans(c.to(tl.bfloat16)), acc)
    return acc


@triton.jit
def tile_scores(r_regs, scratch_ptr, search_ptr, sq_norm_ptr, k0, k_end, D,
                PRECISION: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_DC: tl.constexpr, NUM_DC: tl.constexpr):
    """``(BLOCK_M, BLOCK_K)`` fp32 scores of codes ``k0 .. k0 + BLOCK_K`` (+inf past ``k_end``).

    The residual is ``r_regs`` when ``NUM_DC == 1``, else read from ``scratch_ptr`` (row-major
    ``(BLOCK_M, NUM_DC * BLOCK_DC)``, padded columns zero).
    """
    ks = k0 + tl.arange(0, BLOCK_K)
    k_in = ks < k_end
    code_rows = ks.to(tl.int64)[:, None] * D
    dcs = tl.arange(0, BLOCK_DC)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if NUM_DC == 1:
        codes = tl.load(search_ptr + code_rows + dcs[None, :], mask=k_in[:, None] & (dcs < D)[None, :],
                        other=0.0).to(tl.float32)
        acc = chunk_dot(r_regs, codes, acc, PRECISION, EMULATE)
    else:
        local = tl.arange(0, BLOCK_M)[:, None] * (NUM_DC * BLOCK_DC) + dcs[None, :]
        for c in range(NUM_DC):
            dims = c * BLOCK_DC + dcs
            r = tl.load(scratch_ptr + local + c * BLOCK_DC)
            codes = tl.load(search_ptr + code_rows + dims[None, :],
                            mask=k_in[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
            acc = chunk_dot(r, codes, acc, PRECISION, EMULATE)
    # Codes past the layer's end load as zero vectors with +inf norm: never chosen.
    sq_norm = tl.load(sq_norm_ptr + ks, mask=k_in, other=float("inf"))
    return sq_norm[None, :] - 2.0 * acc, sq_norm


@triton.jit
def merge_tile(dist, k0, best, best_idx, BLOCK_K: tl.constexpr):
    """Fold a tile's scores into the running (min, argmin); ties to the lowest index."""
    tile_best = tl.min(dist, axis=1)
    tile_idx = tl.argmin(dist, axis=1).to(tl.int32) + k0
    better = tile_best < best  # strict: an earlier tile wins ties
    return tl.where(better, tile_best, best), tl.where(better, tile_idx, best_idx), tile_best, tile_idx, better


@triton.jit
def nearest_code(r_regs, scratch_ptr, search_ptr, sq_norm_ptr, k_start, k_end, D,
                 PRECISION: tl.constexpr, EMULATE: tl.constexpr, TRACK_SECOND: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DC: tl.constexpr,
                 NUM_DC: tl.constexpr):
    """Running nearest code over codes ``[k_start, k_end)``.

    Returns ``best (BLOCK_M,)`` fp32, ``best_idx (BLOCK_M,)`` int32 (global code row),
    ``second (BLOCK_M,)`` fp32 (second-best score; +inf unless ``TRACK_SECOND``) and the largest
    finite squared code norm of the range (0 if none).
    """
    best = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    second = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_M,), dtype=tl.int32) + k_start
    max_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        dist, sq_norm = tile_scores(r_regs, scratch_ptr, search_ptr, sq_norm_ptr, k0, k_end, D,
                                    PRECISION, EMULATE, BLOCK_M, BLOCK_K, BLOCK_DC, NUM_DC)
        old_best = best
        best, best_idx, tile_best, tile_idx, better = merge_tile(dist, k0, best, best_idx, BLOCK_K)
        if TRACK_SECOND:
            cols = k0 + tl.arange(0, BLOCK_K)
            tile_second = tl.min(tl.where(cols[None, :] == tile_idx[:, None], float("inf"), dist), axis=1)
            second = tl.where(better, tl.minimum(old_best, tile_second), tl.minimum(second, tile_best))
            max_sq = tl.maximum(max_sq, tl.where(sq_norm < float("inf"), sq_norm, 0.0))
    return best, best_idx, second, tl.max(max_sq, axis=0)


@triton.jit
def fast_score_bound(r_sq, max_code_sq, D_PAD: tl.constexpr):
    """``(BLOCK_M,)`` bound ``B`` on |fast score - plain exact score| of any code of a row, for the
    ``"tf32x3"`` fast search.

    Notation: ``R = ||r||``, ``C`` the layer's largest finite code norm, ``T`` the tf32 operand
    conversion (truncation or rounding: relative error < ``2^-10``), ``v = 2^-22`` (one fp32
    addition or rounding, 4x generous: tensor-core accumulation order and rounding are
    unspecified). With ``r_hi = T(r)``, ``r_lo = r - r_hi`` (exact, ``|r_lo| < 2^-10 |r|``) and
    likewise for c, the fast dot sums ``r_hi c_hi + r_hi T(c_lo) + T(r_lo) c_hi`` per coordinate; it
    misses ``r_hi (c_lo - T(c_lo)) + (r_lo - T(r_lo)) c_hi + r_lo c_lo``, at most ``3 * 2^-20 |r_i c_i|``
    (products of tf32 values are exact in fp32). Summed by Cauchy-Schwarz (``sum |r_i c_i| <= R C``)
    and adding the 3D accumulation roundings of the fast dot and the D of the exact one:
    ``|dot_fast - dot_exact| <= (3 * 2^-20 + 4 D v) R C``. Each score rounds ``||c||^2 - 2 dot``
    once, off by at most ``v (C^2 + 2 R C)``. So
    ``B = SAFETY * (2 (3 * 2^-20 + 4 D v) R C + 2 v (C^2 + 2 R C))``, ``SAFETY`` covering the
    rounding of ``R``, ``C`` and ``B`` themselves.
    """
    r_norm = tl.sqrt(r_sq)
    c_norm = tl.sqrt(max_code_sq)
    rc = r_norm * c_norm
    dot_err = (3.0 * SPLIT_OPERAND_U + 4.0 * D_PAD * ACCUM_U) * rc
    bound = SAFETY * (2.0 * dot_err + 2.0 * ACCUM_U * (max_code_sq + 2.0 * rc))
    return tl.where(bound == bound, bound, float("inf"))  # NaN (inf * 0) -> always rescan


@triton.jit
def rescan(r_regs, scratch_ptr, search_ptr, sq_norm_ptr, k_start, k_end, D, needs, limit,
           EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
           BLOCK_DC: tl.constexpr, NUM_DC: tl.constexpr):
    """The plain exact path's (min, argmin) for rows ``needs``, scoring exactly only code tiles
    where some such row has a fast score ``<= limit`` (its ``best + 2 B``); see the module doc.

    Returns ``best_idx (BLOCK_M,)`` int32 (meaningful where ``needs``) and the tiles scored.
    """
    best = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_M,), dtype=tl.int32) + k_start
    scored = 0
    for k0 in range(k_start, k_end, BLOCK_K):
        fast, fast_norms = tile_scores(r_regs, scratch_ptr, search_ptr, sq_norm_ptr, k0, k_end, D,
                                       "tf32x3", EMULATE, BLOCK_M, BLOCK_K, BLOCK_DC, NUM_DC)
        candidate = needs[:, None] & (fast <= limit[:, None])
        if tl.max(candidate.to(tl.int32)) > 0:
            dist, norms = tile_scores(r_regs, scratch_ptr, search_ptr, sq_norm_ptr, k0, k_end, D,
                                  "ieee", EMULATE, BLOCK_M, BLOCK_K, BLOCK_DC, NUM_DC)
            best, best_idx, tile_best, tile_idx, better = merge_tile(dist, k0, best, best_idx, BLOCK_K)
            scored += 1
    return best_idx, scored
