"""k-means on the fused quantizer, residual (layer-wise) codebook initialization, and RQ-KMeans.

One Lloyd iteration is one call of :func:`rqvae_fast.functional.residual_quantize` with
``compute_stats=True``: the nearest-centroid search and the per-centroid counts and sums come out
of the same pass over the data (the Triton kernel on CUDA, the chunked PyTorch path on CPU), so an
iteration reads the data once and never builds an ``(N, K)`` distance matrix.
"""
from __future__ import annotations

import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .functional import residual_quantize
from .modules import ResidualVQ

METHODS = ("auto", "fused", "sklearn")
SKLEARN_MAX_ROWS = 10_000  # "auto" uses scikit-learn up to this many rows on CPU


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
    if not bool(torch.isfinite(points).all()):
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
    left empty is moved onto the row farthest from its own centroid. Stops early when the relative
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
        empty = counts == 0
        if bool(empty.any()):
            updated = _reseed_empty(points, result.quantized, updated, empty)
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


def _reseed_empty(points, assigned, centroids, empty):
    """Move empty centroids onto the rows farthest from their own centroid (distinct rows)."""
    far = (points - assigned).pow(2).sum(dim=1)
    slots = torch.nonzero(empty).flatten()
    take = min(int(slots.numel()), points.shape[0])
    rows = far.topk(take).indices
    centroids = centroids.clone()
    centroids[slots[:take]] = points.index_select(0, rows)
    return centroids


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


def kmeans(data: torch.Tensor, num_codes: int, *, method: str = "auto", iters: int = 20,
           seed: Optional[int] = None, backend: str = "auto",
           precision: Optional[str] = None) -> KMeansResult:
    """k-means of ``data (N, D)``: ``"sklearn"``, ``"fused"``, or ``"auto"`` (scikit-learn for up to
    :data:`SKLEARN_MAX_ROWS` rows on CPU, the fused k-means otherwise)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "sklearn" if (data.device.type == "cpu" and data.shape[0] <= SKLEARN_MAX_ROWS) \
            else "fused"
    if method == "sklearn":
        return sklearn_kmeans(data, num_codes, seed=seed)
    return fused_kmeans(data, num_codes, iters=iters, seed=seed, backend=backend,
                        precision=precision)


@torch.no_grad()
def residual_kmeans(data: torch.Tensor, codebook_sizes: Sequence[int], *, method: str = "auto",
                    iters: int = 20, seed: Optional[int] = None, backend: str = "auto",
                    precision: Optional[str] = None) -> List[KMeansResult]:
    """Layer-wise k-means: layer ``l`` clusters the residuals layers ``< l`` leave of ``data (N, D)``.

    Returns one :class:`KMeansResult` per layer. ``data`` is not modified.
    """
    residual = _check_data(data)
    results = []
    for layer, size in enumerate(codebook_sizes):
        layer_seed = None if seed is None else int(seed) + 1009 * layer
        fitted = kmeans(residual, int(size), method=method, iters=iters, seed=layer_seed,
                        backend=backend, precision=precision)
        results.append(fitted)
        assigned = residual_quantize(residual, [fitted.centroids], 0.0, backend=backend,
                                     precision=precision)
        residual = residual - assigned.quantized
    return results


@torch.no_grad()
def load_codebooks(vq: ResidualVQ, results: Sequence[KMeansResult]) -> None:
    """Copy k-means ``results`` into ``vq``'s codebooks (and EMA statistics, for EMA layers)."""
    if len(results) != len(vq.vq_layers):
        raise ValueError(f"{len(results)} k-means results for {len(vq.vq_layers)} layers")
    for layer, fitted in zip(vq.vq_layers, results):
        layer.load_centroids(fitted.centroids, fitted.counts)


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
    def fit(self, data: torch.Tensor, *, iters: int = 20, method: str = "auto",
            seed: Optional[int] = None, max_samples: Optional[int] = None) -> "RQKMeans":
        """Learn the codebooks from ``data (N, D)`` (a random ``max_samples`` rows if given)."""
        data = data.to(self.vq.codebooks[0].device)
        if max_samples is not None and data.shape[0] > max_samples:
            gen = _generator(torch.device("cpu"), seed)
            pick = torch.randperm(data.shape[0], generator=gen)[:max_samples].to(data.device)
            data = data.index_select(0, pick)
        results = residual_kmeans(data, self.num_embeddings_list, method=method, iters=iters,
                                  seed=seed, backend=self.backend, precision=self.precision)
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
    def get_semantic_ids(self, x: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """``(N, L)`` int64 codes of ``x (N, D)``, ``batch_size`` rows at a time if given."""
        device = self.vq.codebooks[0].device
        step = batch_size or max(1, x.shape[0])
        parts = [self.vq.quantize(x[i:i + step].to(device, torch.float32), compute_stats=False).indices
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
    "residual_kmeans",
    "KMeansWarning",
    "sklearn_kmeans",
]
