"""k-means on the fused quantizer, residual (layer-wise) codebook initialization, and RQ-KMeans.

One Lloyd iteration is one call of :func:`rqvae_fast.functional.residual_quantize` with
``compute_stats=True``: the nearest-centroid search and the per-centroid counts and sums come out
of the same pass over the data (the Triton kernel on CUDA, the chunked PyTorch path on CPU), so an
iteration reads the data once and never builds an ``(N, K)`` distance matrix.
"""
from __future__ import annotations

import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ._validation import all_finite
from .assign import assign_and_sum, code_sums, nearest, row_sq_norms
from .cpu_gemm import gram, matmul
from .cpu_pool import run_on_one_thread
from .functional import residual_quantize
from .modules import ResidualVQ
from .split_merge import split_merge

METHODS = ("auto", "progressive", "fused", "sklearn")
PROGRESSIVE_STEPS = 10  # k-means in 10 growing numbers of principal dimensions (as FAISS)
PROGRESSIVE_ITERS = 10  # Lloyd iterations per step
MIN_FIRST_WIDTH = 1  # the first step sees at least this many principal dimensions
SEEDING = "auto"  # seeds of the progressive k-means: "auto", "random" (as FAISS) or "kmeans++"
KMEANS_PP_BELOW = 64  # "auto" seeding: k-means++ below this many codes, random rows from it on
KMEANS_PP_FIRST_WIDTH = 4  # with k-means++ seeds the first step sees at least 4 dimensions
KMEANS_PP_ROWS_PER_CODE = 8  # k-means++ seeding of the progressive k-means draws from 8 rows/code
MAX_POINTS_PER_CENTROID = 256  # k-means trains on at most this many rows per code (as FAISS)
BALANCE_STRENGTH = 0.1  # size-penalty step of balanced k-means, in units of the mean distance
COARSE_BIAS_CAP = 0.1  # coarse balance: |penalty| at most this many mean distances (0: no cap)
SPLIT_EPS = 1.0 / 1024  # relative perturbation that splits a centroid in two
FINAL_STEP_ITERS = 0  # Lloyd iterations of the full-width step (0: PROGRESSIVE_ITERS)
# Residual k-means (semantic IDs): how each layer is trained, measured on WordLlama and the
# synthetic catalogue against FAISS (docs/PIPELINE.md, "Beyond FAISS's schedule").
FIRST_COARSE_BALANCE = 0.05  # size penalty in the first layer's partial-width steps (0: none)
PREFIX_FINAL_ITERS = 20  # full-width Lloyd iterations of the middle layers, at most
FIRST_FINAL_ITERS = 12  # ... of the first layer (its inertia gains least from more), at most
PREFIX_STOP_TOL = 1e-5  # both stop at one that lowers the inertia by less than this fraction
SPLIT_MERGE_ROUNDS = 2  # where they stop, they try split-merge moves this often (0: never)
MERGE_SIZE_CAP = 2.0  # a merge may not make a code larger than this many even shares (0: any)
SETTLE_TOL = 1e-4  # after moves, iterations stop at one gaining less than this fraction (or tol)
LAST_FINAL_ITERS = 20  # at most this many full-width Lloyd iterations in the last layer ...
LAST_STOP_UNEVEN = 3  # ... which stop, from this many on, at the first that makes sizes less even
REFINE_ROUNDS = 0  # joint codebook refinement rounds after the layer-wise k-means (opt-in)


class KMeansResult(NamedTuple):
    """``centroids (K, D)`` fp32; ``counts (K,)`` fp32 rows per centroid at the last assignment;
    ``inertia``: mean squared distance of a row to its centroid then; ``iterations`` run."""

    centroids: torch.Tensor
    counts: torch.Tensor
    inertia: float
    iterations: int


def _generator(device: torch.device, seed: Optional[int]) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _check_data(data: torch.Tensor) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"k-means data must be a 2-D tensor (N, D), got {shape}")
    if data.shape[0] == 0:
        raise ValueError("k-means data holds no rows")
    points = data.detach().float().contiguous()
    if not all_finite(points):
        raise ValueError("k-means data holds NaN/Inf values")
    return points


@torch.no_grad()
def kmeans_plusplus(points: torch.Tensor, num_codes: int, generator: torch.Generator,
                    sample_size: Optional[int] = None) -> torch.Tensor:
    """Greedy k-means++ seeds ``(num_codes, D)`` fp32 from at most ``sample_size`` rows of
    ``points (N, D)`` fp32. Runs on the points' device without host synchronization."""
    n = points.shape[0]
    device = points.device
    if sample_size is not None and n > sample_size:
        pick = torch.randperm(n, generator=generator, device=device)[:sample_size]
        points = points.index_select(0, pick)
        n = sample_size
    candidates_per_step = 2 + int(math.log(max(num_codes, 2)))
    sq_norms = points.pow(2).sum(dim=1)
    centres = torch.empty((num_codes, points.shape[1]), dtype=torch.float32, device=device)
    first = torch.randint(n, (1,), generator=generator, device=device)
    centres[0] = points.index_select(0, first)[0]
    closest = (points - centres[0]).pow(2).sum(dim=1)
    for j in range(1, num_codes):
        # Rows far from every chosen centre are likely picks; all-zero distances -> uniform.
        weights = closest + (closest.sum() == 0).to(closest.dtype)
        picks = torch.multinomial(weights, candidates_per_step, replacement=True, generator=generator)
        cands = points.index_select(0, picks)
        dist = (sq_norms[:, None] - 2.0 * points @ cands.t() + cands.pow(2).sum(dim=1)).clamp_min_(0)
        trial = torch.minimum(dist, closest[:, None])
        best = trial.sum(dim=0).argmin()
        centres[j] = cands.index_select(0, best.view(1))[0]
        closest = trial.index_select(1, best.view(1))[:, 0]
    return centres


@torch.no_grad()
def fused_kmeans(data: torch.Tensor, num_codes: int, *, iters: int = 20, seed: Optional[int] = None,
                 tol: float = 0.0, init_sample: Optional[int] = None,
                 init: Optional[torch.Tensor] = None, backend: str = "auto",
                 precision: Optional[str] = None) -> KMeansResult:
    """Lloyd's k-means of ``data (N, D)`` into ``num_codes`` centroids on the fused kernels.

    Seeds by greedy k-means++ on ``init_sample`` rows (default ``64 * num_codes``), or starts from
    ``init (num_codes, D)``; each iteration is one fused assignment + statistics pass. A centroid
    left empty splits a populated cluster (:func:`split_empty`). Stops early when the relative
    centroid shift falls to ``tol`` (> 0; this check synchronizes the device once per iteration).
    With fewer rows than codes, rows are drawn with replacement as the seed does.
    """
    points = _check_data(data)
    gen = _generator(points.device, seed)
    n = points.shape[0]
    if init is not None:
        if tuple(init.shape) != (num_codes, points.shape[1]):
            raise ValueError(f"init must have shape {(num_codes, points.shape[1])}, "
                             f"got {tuple(init.shape)}")
        centroids = init.detach().to(points.device, torch.float32).clone()
    elif n < num_codes:
        pick = torch.randint(n, (num_codes,), generator=gen, device=points.device)
        centroids = points.index_select(0, pick)
        return KMeansResult(centroids, torch.ones(num_codes, device=points.device), 0.0, 0)
    else:
        sample = init_sample if init_sample is not None else 64 * num_codes
        centroids = kmeans_plusplus(points, num_codes, gen, sample)
    counts = torch.zeros(num_codes, device=points.device)
    inertia = float("nan")
    done = 0
    for done in range(1, iters + 1):
        result = residual_quantize(points, [centroids], 0.0, backend=backend, precision=precision,
                                   compute_stats=True)
        counts, sums = result.code_counts[0], result.code_sums[0]
        inertia_t = result.layer_losses[0] * points.shape[1]
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], centroids)
        if bool((counts == 0).any()):
            updated, _ = split_empty(updated, counts, gen)
        shift = None
        if tol > 0:
            shift = float((updated - centroids).pow(2).sum() / centroids.pow(2).sum().clamp_min(1e-30))
        centroids = updated
        inertia = inertia_t
        if shift is not None and shift <= tol:
            break
    if isinstance(inertia, torch.Tensor):
        inertia = float(inertia)
    return KMeansResult(centroids, counts, inertia, done)


def split_empty(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give every empty code half of a populated cluster (FAISS's rule, our code).

    For each empty code, a donor cluster is drawn with probability proportional to ``count - 1``
    (big clusters split most often; singletons never); the donor's centroid is copied and the two
    copies are pushed apart by a symmetric relative perturbation of :data:`SPLIT_EPS` (``+`` on
    even dimensions for one copy, ``-`` for the other), so the next assignment cuts the donor's
    cluster in two. ``centroids (K, D)`` and ``counts (K,)`` fp32 are returned updated (copies).
    Unlike moving empty codes onto outlying rows, this never makes singleton codes.
    """
    centroids, counts = centroids.clone(), counts.clone().float()
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty or float(counts.sum()) <= len(counts):
        return centroids, counts
    sign = torch.ones(centroids.shape[1], device=centroids.device)
    sign[1::2] = -1.0
    for code in empty:
        weights = (counts - 1.0).clamp_min(0.0)
        if float(weights.sum()) <= 0:
            break
        donor = int(torch.multinomial(weights.cpu(), 1, generator=_cpu(generator)))
        base = centroids[donor].clone()
        centroids[code] = base * (1.0 + SPLIT_EPS * sign)
        centroids[donor] = base * (1.0 - SPLIT_EPS * sign)
        half = counts[donor] / 2
        counts[code] = half
        counts[donor] -= half
    return centroids, counts


def _cpu(generator: torch.Generator) -> torch.Generator:
    """A CPU generator derived from ``generator`` (multinomial on host weights needs one)."""
    if generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def _lloyd(points: torch.Tensor, centroids: torch.Tensor, iters: int, generator: torch.Generator,
           balance: float, backend: str, precision: Optional[str], stop_uneven: int = 0,
           tol: float = 0.0, bias_cap: float = 0.0, split_merge_rounds: int = 0):
    """At most ``iters`` Lloyd iterations of ``points (n, d)`` from ``centroids (K, d)``.

    Returns ``(centroids, counts (K,), inertia, iterations run)`` with counts and inertia (mean
    squared distance) of the last assignment. On CUDA without balancing, an iteration is one
    fused quantizer pass (kernel assignment + statistics); elsewhere, chunked ``addmm`` +
    ``min`` and ``index_add_`` (on CPU as fast as the fused path or faster, and it takes the size
    penalty). With ``balance`` > 0 a per-code penalty added to the squared distances grows by
    ``balance`` x the mean distance x the code's relative excess over the even share (clipped to
    [-1, 1]) each iteration, so crowded codes shed their boundary rows and small ones gain rows;
    ``bias_cap`` > 0 keeps every penalty within that many mean distances (too small to move the
    boundary between real clusters). ``stop_uneven`` > 0: see :func:`progressive_kmeans`.

    Stops early at a fixed point: an assignment equal to the previous one, with no empty code
    and no penalty, gives the centroids it was made with, so every later iteration would repeat
    it (the result is the one all ``iters`` give). ``tol`` > 0 also stops after the first
    iteration that lowers the inertia by less than ``tol`` times the previous inertia.
    ``split_merge_rounds`` > 0: at such a stop with iterations left, up to that many times, try
    :func:`rqvae_fast.split_merge.split_merge` moves (merge two codes, split another), each
    gaining more than ``max(tol, 1e-6)`` of the inertia, and go on iterating if one was made;
    from then on the iterations stop at one gaining less than ``max(tol, SETTLE_TOL)``.
    """
    num_codes = centroids.shape[0]
    n = points.shape[0]
    balanced = balance > 0
    bias = torch.zeros(num_codes, device=points.device) if balanced else None
    counts = torch.zeros(num_codes, device=points.device)
    inertia = float("nan")
    fused = points.device.type == "cuda" and not balanced
    row_sq = None if fused else row_sq_norms(points)
    previous_spread = None
    previous_codes = None
    previous_inertia = None
    rounds_left = split_merge_rounds if not balanced else 0
    stop_tol = tol
    for done in range(iters):
        if fused:
            result = residual_quantize(points, [centroids], 0.0, backend=backend,
                                       precision=precision, compute_stats=True)
            codes, counts, sums = result.indices[:, 0], result.code_counts[0], result.code_sums[0]
            inertia_t = result.layer_losses[0] * points.shape[1]
        else:
            codes, dist, counts, sums = assign_and_sum(points, centroids, bias, row_sq)
            inertia_t = dist.mean()
            if bias is not None:
                excess = (counts * (num_codes / n) - 1.0).clamp(-1.0, 1.0)
                bias = bias + balance * inertia_t * excess
                if bias_cap > 0:
                    bias = bias.clamp(-bias_cap * inertia_t, bias_cap * inertia_t)
        if stop_uneven:
            spread = float(counts.pow(2).sum())
            if done >= stop_uneven and previous_spread is not None and spread > previous_spread:
                return centroids, counts, float(inertia_t), done + 1
            previous_spread = spread
        empty = bool((counts == 0).any())
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], centroids)
        if empty:
            updated, _ = split_empty(updated, counts, generator)
            if bias is not None:  # a code split off a crowded one starts without a penalty
                bias = torch.where(counts == 0, torch.zeros_like(bias), bias)
        centroids = updated
        inertia = float(inertia_t)
        converged = not balanced and not empty and previous_codes is not None \
            and torch.equal(codes, previous_codes)  # a fixed point
        converged = converged or (stop_tol > 0 and previous_inertia is not None
                                  and previous_inertia - inertia <= stop_tol * previous_inertia)
        if converged:
            if rounds_left == 0 or empty or done + 1 >= iters:
                return centroids, counts, inertia, done + 1
            rounds_left -= 1
            min_gain = max(tol, 1e-6) * inertia * n
            max_merged = MERGE_SIZE_CAP * n / num_codes if MERGE_SIZE_CAP > 0 else float("inf")
            centroids, moves = split_merge(points, codes, centroids, counts, min_gain, row_sq,
                                           max_merged)
            if moves == 0:
                return centroids, counts, inertia, done + 1
            previous_codes, previous_inertia = None, None
            stop_tol = max(tol, SETTLE_TOL)
            continue
        previous_codes, previous_inertia = codes, inertia
    return centroids, counts, inertia, iters


def _principal_axes(centred: torch.Tensor) -> torch.Tensor:
    """``(D, D)`` fp32 orthonormal axes of ``centred (n, D)``, by decreasing variance (fp32
    scatter matrix and eigendecomposition; the axes only order the coarse steps).

    On CPU the eigendecomposition runs on one worker thread of :mod:`rqvae_fast.cpu_pool`:
    LAPACK's multi-threaded solver stalled on this 2-core machine when another process was busy
    (0.2-6 s for a 768-d fp64 matrix, against 0.05-0.09 s in fp32 on one thread)."""
    cov = gram(centred)

    def solve() -> torch.Tensor:
        return torch.linalg.eigh(cov)[1]

    vectors = solve() if cov.device.type != "cpu" else run_on_one_thread(solve)
    return vectors.flip(1).contiguous()


def progressive_dims(dim: int, steps: int, first: int = MIN_FIRST_WIDTH) -> List[int]:
    """Growing widths ``int(dim ** (s / steps))`` for ``s = 1..steps``, at least
    ``min(dim, first)``, deduplicated, ending at ``dim`` (FAISS's widths: 256, 10 steps -> 1, 3,
    5, 9, 16, 27, 48, 84, 147, 256)."""
    first = min(dim, first)
    widths = [max(first, int(dim ** ((s + 1) / max(1, steps)))) for s in range(max(1, steps))]
    widths[-1] = dim
    return sorted(set(widths))


@torch.no_grad()
def progressive_kmeans(data: torch.Tensor, num_codes: int, *, iters: int = PROGRESSIVE_ITERS,
                       steps: int = PROGRESSIVE_STEPS, seed: Optional[int] = None,
                       max_points_per_centroid: Optional[int] = MAX_POINTS_PER_CENTROID,
                       balanced: bool = False, seeding: str = SEEDING, backend: str = "auto",
                       precision: Optional[str] = None, coarse_balance: float = 0.0,
                       final_iters: Optional[int] = None, stop_uneven: int = 0,
                       final_tol: float = 0.0, split_merge_rounds: int = 0) -> KMeansResult:
    """k-means of ``data (N, D)`` in progressively more principal dimensions (the default).

    As FAISS's residual quantizer trains each layer: at most ``max_points_per_centroid *
    num_codes`` random rows; centred and rotated onto their principal axes; seeded
    (``seeding="auto"``) by random distinct rows as FAISS from :data:`KMEANS_PP_BELOW` codes on
    (seeds follow the density, so codes share the rows evenly: the semantic-ID case) and by
    k-means++ in the first step's principal dimensions below it (few codes must not miss a
    well-separated cluster); ``"random"`` / ``"kmeans++"`` force one; ``iters`` Lloyd
    iterations on the first :func:`progressive_dims` dimensions, each step warm-started from the
    previous centroids padded with zeros; empty codes split a populated cluster
    (:func:`split_empty`). The coarse steps fix a partition along the directions of largest
    variance; the full-width steps only refine it, so the rich-get-richer drift of k-means on
    near-isotropic residuals (see docs/PIPELINE.md) never starts. ``balanced`` adds the size
    penalty of :func:`_lloyd` (:data:`BALANCE_STRENGTH`) in every step; ``coarse_balance`` > 0
    adds a penalty of that strength, capped at :data:`COARSE_BIAS_CAP` mean distances, in the
    partial-width steps only, so the partition starts even where Lloyd's drift alone made it
    uneven and the full-width step is plain Lloyd (the codes a greedy encoder gives).
    ``final_iters``: Lloyd iterations of the full-width step (default :data:`FINAL_STEP_ITERS`,
    or ``iters`` when 0); ``stop_uneven`` > 0 stops them, from that many on, at the first
    iteration whose assignment is less even (larger sum of squared code sizes) than the one
    before, and returns the centroids that made it; ``final_tol`` > 0 stops them at the first
    that lowers the inertia by less than that fraction (every step stops at a fixed point: see
    :func:`_lloyd`); ``split_merge_rounds`` > 0: where the full-width step stops so, it tries
    split-merge moves (:mod:`rqvae_fast.split_merge`) up to that many times and goes on.
    Returns centroids in the input space; ``counts`` of the training rows scaled to ``N``. Fewer
    rows than codes: rows drawn with replacement.
    """
    points = _check_data(data)
    gen = _generator(points.device, seed)
    n, dim = points.shape
    if n < num_codes:
        pick = torch.randint(n, (num_codes,), generator=gen, device=points.device)
        return KMeansResult(points.index_select(0, pick), torch.ones(num_codes, device=points.device),
                            0.0, 0)
    if max_points_per_centroid is not None and n > max_points_per_centroid * num_codes:
        pick = torch.randperm(n, generator=gen, device=points.device)
        points = points.index_select(0, pick[: max_points_per_centroid * num_codes])
    mean = points.mean(dim=0)
    centred = points - mean
    axes = _principal_axes(centred)  # from every training row, as FAISS
    if seeding not in ("auto", "kmeans++", "random"):
        raise ValueError(f"seeding must be 'auto', 'kmeans++' or 'random', got {seeding!r}")
    if seeding == "auto":
        seeding = "kmeans++" if num_codes < KMEANS_PP_BELOW else "random"
    # k-means++ seeds in fewer than 4 dimensions would land between clusters that overlap there
    widths = progressive_dims(dim, steps, KMEANS_PP_FIRST_WIDTH if seeding == "kmeans++" else
                              MIN_FIRST_WIDTH)
    # Only the partial-width steps need rotated rows; the full-width step runs on the centred
    # rows themselves (distances do not change under a rotation) with the centroids rotated back.
    partial = widths[-2] if len(widths) > 1 else widths[0]
    rotated = matmul(centred, axes[:, :partial])
    if seeding == "kmeans++":  # in the first step's few principal dimensions
        centroids = kmeans_plusplus(rotated[:, : widths[0]].contiguous(), num_codes, gen,
                                    KMEANS_PP_ROWS_PER_CODE * num_codes)
    else:
        seeds = torch.randperm(points.shape[0], generator=gen, device=points.device)[:num_codes]
        centroids = rotated.index_select(0, seeds)[:, : widths[0]]
    counts, inertia, done = torch.zeros(num_codes, device=points.device), 0.0, 0
    for step, width in enumerate(widths):
        if centroids.shape[1] < width:
            pad = centroids.new_zeros(num_codes, width - centroids.shape[1])
            centroids = torch.cat([centroids, pad], dim=1)
        final = step == len(widths) - 1
        if final:  # back to the input axes
            centroids = (centroids @ axes.t()).contiguous()
        # a contiguous copy of the step's columns: the same codes as the strided view, 15-28 %
        # faster per iteration at widths 9-84 (interleaved A/B on WordLlama), once per step
        rows = centred if final else rotated[:, :width].contiguous()
        step_iters = iters
        if final:
            step_iters = final_iters if final_iters is not None else (FINAL_STEP_ITERS or iters)
        balance = BALANCE_STRENGTH if balanced else (0.0 if final else float(coarse_balance))
        centroids, counts, inertia, ran = _lloyd(rows, centroids, step_iters, gen, balance,
                                                 backend, precision,
                                                 stop_uneven=stop_uneven if final else 0,
                                                 tol=final_tol if final else 0.0,
                                                 bias_cap=0.0 if balanced else COARSE_BIAS_CAP,
                                                 split_merge_rounds=split_merge_rounds if final
                                                 else 0)
        done += ran
    centroids = (centroids + mean).contiguous()
    counts = counts * (n / points.shape[0])
    return KMeansResult(centroids, counts, inertia, done)


class KMeansWarning(UserWarning):
    """k-means could not give every code its own cluster (too few distinct rows)."""


def sklearn_kmeans(data: torch.Tensor, num_codes: int, *, seed: Optional[int] = None,
                   max_iter: int = 100) -> KMeansResult:
    """scikit-learn ``KMeans`` (k-means++, ``n_init="auto"``) as the seed uses; on CPU, returns
    tensors on ``data``'s device. Fewer distinct rows than codes: every distinct row becomes a
    centroid and the other codes repeat rows drawn at random (scikit-learn is not called)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    points = _check_data(data)
    array = points.cpu().numpy()
    distinct = np.unique(array, axis=0) if array.shape[0] >= num_codes else array
    if distinct.shape[0] < num_codes:
        rng = np.random.default_rng(seed)
        extra = rng.choice(distinct.shape[0], num_codes - distinct.shape[0], replace=True)
        chosen = np.concatenate([distinct, distinct[extra]]).astype(np.float32)
        counts = np.bincount(_nearest(array, chosen), minlength=num_codes).astype(np.float32)
        return KMeansResult(torch.from_numpy(chosen).to(points.device),
                            torch.from_numpy(counts).to(points.device), 0.0, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = KMeans(n_clusters=num_codes, n_init="auto", max_iter=max_iter,
                       random_state=None if seed is None else int(seed) % (2 ** 32)).fit(array)
    for item in caught:
        if not issubclass(item.category, ConvergenceWarning):
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    counts = np.bincount(model.labels_, minlength=num_codes).astype(np.float32)
    if any(issubclass(item.category, ConvergenceWarning) for item in caught):
        warnings.warn(f"k-means of {array.shape[0]} rows into {num_codes} codes left "
                      f"{int((counts == 0).sum())} codes without rows (near-duplicate rows); "
                      "they stay as placed (dead-code reset re-seeds them in training)",
                      KMeansWarning, stacklevel=2)
    centroids = torch.from_numpy(model.cluster_centers_.astype(np.float32)).to(points.device)
    return KMeansResult(centroids, torch.from_numpy(counts).to(points.device),
                        float(model.inertia_) / array.shape[0], int(model.n_iter_))


def _nearest(array: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index ``(N,)`` of the nearest of ``centroids (K, D)`` for each row of ``array (N, D)``."""
    scores = (centroids * centroids).sum(axis=1)[None, :] - 2.0 * array @ centroids.T
    return scores.argmin(axis=1)


def kmeans(data: torch.Tensor, num_codes: int, *, method: str = "auto", iters: Optional[int] = None,
           seed: Optional[int] = None, backend: str = "auto", precision: Optional[str] = None,
           balanced: bool = False, coarse_balance: float = 0.0,
           final_iters: Optional[int] = None, stop_uneven: int = 0,
           final_tol: float = 0.0, split_merge_rounds: int = 0) -> KMeansResult:
    """k-means of ``data (N, D)`` by ``method``:

    - ``"auto"`` / ``"progressive"``: :func:`progressive_kmeans` (``iters`` per step, default
      :data:`PROGRESSIVE_ITERS`), balanced clusters on real and near-isotropic data;
    - ``"fused"``: k-means++ and Lloyd on the fused kernels (:func:`fused_kmeans`, ``iters``
      default 20);
    - ``"sklearn"``: scikit-learn's k-means++ (the seed's choice; skews deep residual layers).

    ``balanced``, ``coarse_balance``, ``final_iters``, ``stop_uneven``, ``final_tol`` and
    ``split_merge_rounds`` (progressive only): see :func:`progressive_kmeans`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if balanced and method not in ("auto", "progressive"):
        raise ValueError(f"balanced k-means needs method 'auto' or 'progressive', got {method!r}")
    if method == "sklearn":
        return sklearn_kmeans(data, num_codes, seed=seed)
    if method == "fused":
        return fused_kmeans(data, num_codes, iters=20 if iters is None else iters, seed=seed,
                            backend=backend, precision=precision)
    return progressive_kmeans(data, num_codes, iters=PROGRESSIVE_ITERS if iters is None else iters,
                              seed=seed, balanced=balanced, backend=backend, precision=precision,
                              coarse_balance=coarse_balance, final_iters=final_iters,
                              stop_uneven=stop_uneven, final_tol=final_tol,
                              split_merge_rounds=split_merge_rounds)


def _assign(points: torch.Tensor, centroids: torch.Tensor, backend: str,
            precision: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(codes (N,) int64, quantized (N, D))``: nearest centroid per row (fused pass on CUDA)."""
    if points.device.type == "cuda":
        result = residual_quantize(points, [centroids], 0.0, backend=backend, precision=precision)
        return result.indices[:, 0], result.quantized
    codes, _ = nearest(points, centroids)
    return codes, centroids.index_select(0, codes)


@torch.no_grad()
def residual_kmeans(data: torch.Tensor, codebook_sizes: Sequence[int], *, method: str = "auto",
                    iters: Optional[int] = None, seed: Optional[int] = None, backend: str = "auto",
                    precision: Optional[str] = None, balanced: bool = False) -> List[KMeansResult]:
    """Layer-wise k-means: layer ``l`` clusters the residuals layers ``< l`` leave of ``data (N, D)``.

    Every layer starts from the same ``seed`` (as FAISS's residual quantizer: a deep layer is
    seeded by the residuals of the rows that seeded the first). With the progressive k-means
    (the default) each layer is trained for its part in a semantic ID: the first layer with a
    size penalty, capped at :data:`COARSE_BIAS_CAP`, in its partial-width steps
    (:data:`FIRST_COARSE_BALANCE`: even first-code groups); every layer but the last with up to
    :data:`PREFIX_FINAL_ITERS` full-width iterations (a lower error; :data:`FIRST_FINAL_ITERS`
    in the first layer, which gains least from them), stopped once one gains less than
    :data:`PREFIX_STOP_TOL` of the inertia (converged: no lower error to buy), where they try
    split-merge moves (:data:`SPLIT_MERGE_ROUNDS` rounds, no merge above :data:`MERGE_SIZE_CAP`
    even shares) and go on (to a gain under :data:`SETTLE_TOL`) if one was made: a converged
    k-means that keeps one code on two real clusters escapes there; the last layer,
    which splits the prefix groups into IDs, stops its full-width iterations (from
    :data:`LAST_STOP_UNEVEN` on) at the first that makes its code sizes less even (on WordLlama
    and the synthetic catalogue: early, where Lloyd's drift toward uneven codes begins, and
    fewer items share an ID), at most :data:`LAST_FINAL_ITERS`.
    docs/PIPELINE.md has the measurements. An explicit ``iters`` sets every step's count.
    Returns one :class:`KMeansResult` per layer. ``data`` is not modified.
    """
    residual = _check_data(data)
    results = []
    progressive = method in ("auto", "progressive")
    for layer, size in enumerate(codebook_sizes):
        last = layer == len(codebook_sizes) - 1
        schedule = {}
        if progressive:
            schedule = {"coarse_balance": FIRST_COARSE_BALANCE if layer == 0 and not last else 0.0,
                        "final_iters": LAST_FINAL_ITERS if last else
                        (FIRST_FINAL_ITERS if layer == 0 else PREFIX_FINAL_ITERS),
                        "stop_uneven": LAST_STOP_UNEVEN if last else 0,
                        "final_tol": 0.0 if last else PREFIX_STOP_TOL,
                        "split_merge_rounds": 0 if last else SPLIT_MERGE_ROUNDS}
            if iters is not None:  # an explicit count applies to every step
                schedule["final_iters"] = iters
        fitted = kmeans(residual, int(size), method=method, iters=iters, seed=seed,
                        backend=backend, precision=precision, balanced=balanced, **schedule)
        results.append(fitted)
        if not last:  # the last layer's residuals are not needed
            _, quantized = _assign(residual, fitted.centroids, backend, precision)
            residual = residual - quantized
    return results


@torch.no_grad()
def refine_codebooks(data: torch.Tensor, codebooks: Sequence[torch.Tensor], rounds: int = 1
                     ) -> List[torch.Tensor]:
    """Refit residual codebooks jointly: ``rounds`` x (greedy-encode ``data (N, D)``, then for
    each layer in turn set every used codeword to the mean of what the other layers leave of its
    rows, ``x - sum_{j != l} c_j``). Layer-wise k-means fits layer ``l`` before the later layers
    exist; this lets it account for them. Returns new ``(K_l, D)`` fp32 codebooks."""
    from .beam import greedy_encode

    books = [b.detach().float().clone() for b in codebooks]
    points = _check_data(data)
    for _ in range(rounds):
        codes, _ = greedy_encode(points, books)
        parts = [book.index_select(0, codes[:, layer]) for layer, book in enumerate(books)]
        recon = torch.stack(parts).sum(dim=0)
        for layer, book in enumerate(books):
            target = points - (recon - parts[layer])
            counts, sums = code_sums(target, codes[:, layer], book.shape[0])
            books[layer] = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None],
                                       book)
            parts[layer] = books[layer].index_select(0, codes[:, layer])
            recon = points - target + parts[layer]
    return books


@torch.no_grad()
def load_codebooks(vq: ResidualVQ, results: Sequence[KMeansResult]) -> None:
    """Copy k-means ``results`` into ``vq``'s codebooks (and EMA statistics, for EMA layers)."""
    if len(results) != len(vq.vq_layers):
        raise ValueError(f"{len(results)} k-means results for {len(vq.vq_layers)} layers")
    for layer, fitted in zip(vq.vq_layers, results):
        layer.load_centroids(fitted.centroids, fitted.counts)


def _codes_or_minus_one(x: torch.Tensor, books: Sequence[torch.Tensor], beam_size: int = 1
                        ) -> torch.Tensor:
    """Greedy (or beam) codes ``(N, L)`` of ``x (N, D)``; rows holding NaN/Inf get ``-1`` codes
    (as the fused pass marks rows it could not quantize). The beam-search kernel on CUDA, else
    :func:`rqvae_fast.beam.beam_encode` (:func:`rqvae_fast.beam_path.encode_paths`)."""
    from .beam_path import encode_paths

    if all_finite(x):
        return encode_paths(x, books, beam_size)
    finite = torch.isfinite(x).all(dim=1)
    codes = torch.full((x.shape[0], len(books)), -1, dtype=torch.int64, device=x.device)
    codes[finite] = encode_paths(x[finite], books, beam_size)
    return codes


class RQKMeans(nn.Module):
    """Residual k-means without an encoder (the common industrial alternative to RQ-VAE).

    ``fit(x (N, D))`` learns one codebook per layer on the residuals; ``get_semantic_ids(x (N, D))``
    returns ``(N, L)`` int64 codes from the same fused quantizer as :class:`~rqvae_fast.RQVAE`.
    """

    kind = "rqkmeans"

    def __init__(self, input_dim: int, num_layers: int = 3,
                 num_embeddings_list: Union[int, Sequence[int]] = 256, *, backend: str = "auto",
                 precision: Optional[str] = None):
        super().__init__()
        if isinstance(num_embeddings_list, int):
            num_embeddings_list = [num_embeddings_list] * num_layers
        self.input_dim = int(input_dim)
        self.num_embeddings_list = [int(k) for k in num_embeddings_list][:num_layers]
        self.vq = ResidualVQ(num_layers, self.num_embeddings_list, input_dim, 0.0,
                             backend=backend, precision=precision)
        self.backend = backend
        self.precision = precision

    @property
    def config(self) -> dict:
        """Constructor arguments (what a checkpoint stores to rebuild the model)."""
        return {"kind": self.kind, "input_dim": self.input_dim,
                "num_layers": len(self.num_embeddings_list),
                "num_embeddings_list": list(self.num_embeddings_list)}

    @classmethod
    def from_config(cls, config: dict, **options) -> "RQKMeans":
        return cls(config["input_dim"], config["num_layers"], config["num_embeddings_list"],
                   **options)

    @property
    def codebook_sizes(self) -> List[int]:
        return list(self.num_embeddings_list)

    @torch.no_grad()
    def fit(self, data: torch.Tensor, *, iters: Optional[int] = None, method: str = "auto",
            seed: Optional[int] = None, max_samples: Optional[int] = None,
            balanced: bool = False, refine: int = REFINE_ROUNDS) -> "RQKMeans":
        """Learn the codebooks from ``data (N, D)`` (a random ``max_samples`` rows if given).

        ``method`` and ``iters``: see :func:`kmeans` (default: progressive-dimension k-means
        with :func:`residual_kmeans`'s per-layer schedule). ``balanced``: size-penalised k-means
        in every step of every layer (more even layer-wise sizes; on WordLlama it did not cut
        shared IDs, the balanced *assignment* ``get_semantic_ids(..., balanced=True)`` does).
        ``refine``: rounds of :func:`refine_codebooks` after the layer-wise k-means (lower
        error)."""
        data = data.to(self.vq.codebooks[0].device)
        if max_samples is not None and data.shape[0] > max_samples:
            gen = _generator(torch.device("cpu"), seed)
            pick = torch.randperm(data.shape[0], generator=gen)[:max_samples].to(data.device)
            data = data.index_select(0, pick)
        results = residual_kmeans(data, self.num_embeddings_list, method=method, iters=iters,
                                  seed=seed, backend=self.backend, precision=self.precision,
                                  balanced=balanced)
        if refine > 0:
            books = refine_codebooks(data, [r.centroids for r in results], refine)
            results = [r._replace(centroids=book) for r, book in zip(results, books)]
        load_codebooks(self.vq, results)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The identity: RQ-KMeans quantizes the input space itself."""
        return x

    def forward(self, x: torch.Tensor):
        """``(quantized (N, D), indices (N, L) int64)``."""
        quantized, indices, _ = self.vq(x)
        return quantized, indices

    @torch.no_grad()
    def get_semantic_ids(self, x: torch.Tensor, batch_size: Optional[int] = None, *,
                         beam_size: int = 1, balanced: bool = False) -> torch.Tensor:
        """``(N, L)`` int64 codes of ``x (N, D)``, ``batch_size`` rows at a time if given.

        Greedy: the fused quantizer pass on CUDA, :func:`rqvae_fast.beam.greedy_encode` on CPU.
        ``beam_size > 1``: beam search (:func:`rqvae_fast.beam.beam_encode`). ``balanced``: size-balanced codes for the whole set ``x`` at once
        (:func:`rqvae_fast.balanced.balanced_encode`; ``batch_size`` and ``beam_size`` do not
        apply)."""
        device = self.vq.codebooks[0].device
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be an integer >= 1, got {beam_size!r}")
        books = [book.detach() for book in self.vq.codebooks]
        if balanced:
            from .balanced import balanced_encode

            return balanced_encode(x.to(device, torch.float32), books)[0]
        step = batch_size or max(1, x.shape[0])
        if beam_size > 1 or device.type == "cpu":  # on CPU plain addmm + min beats the fused pass
            parts = [_codes_or_minus_one(x[i:i + step].to(device, torch.float32), books, beam_size)
                     for i in range(0, x.shape[0], step)]
        else:
            parts = [self.vq.quantize(x[i:i + step].to(device, torch.float32),
                                      compute_stats=False).indices
                     for i in range(0, x.shape[0], step)]
        if not parts:
            return torch.empty((0, len(self.num_embeddings_list)), dtype=torch.int64, device=device)
        return torch.cat(parts)


__all__ = [
    "KMeansResult",
    "METHODS",
    "RQKMeans",
    "fused_kmeans",
    "kmeans",
    "kmeans_plusplus",
    "load_codebooks",
    "progressive_dims",
    "progressive_kmeans",
    "refine_codebooks",
    "residual_kmeans",
    "KMeansWarning",
    "sklearn_kmeans",
    "split_empty",
]
