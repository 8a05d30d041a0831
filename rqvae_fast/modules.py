"""Drop-in modules for the seed's ``VQEmbedding``, ``VQEmbeddingEMA`` and ``ResidualVQ``.

Same constructor arguments, forward signature, parameter and buffer names as the seed (so its
``state_dict`` loads with ``strict=True``), computed by the fused quantizer.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from . import distributed
from .functional import ema_update_, residual_quantize
from .routing import routing_id
from .precision import resolve_precision


class VQEmbedding(nn.Module):
    """One learned codebook ``embeddings (num_embeddings, embedding_dim)``.

    ``forward(inputs (*, D)) -> (quantized (*, D), indices (*,) int64, loss 0-d)``.
    """

    ema = False

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, *,
                 grad_mode: str = "seed", precision: Optional[str] = None, backend: str = "auto",
                 check_finite: bool = False, deterministic: Optional[bool] = None,
                 sync_codebook: Optional[bool] = None):
        super().__init__()
        routing_id(grad_mode)  # validates
        if precision is not None:
            resolve_precision(precision)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.grad_mode = grad_mode
        self.precision = precision
        self.backend = backend
        self.check_finite = check_finite
        self.deterministic = deterministic
        self.sync_codebook = sync_codebook
        self.embeddings = nn.Parameter(torch.randn(num_embeddings, embedding_dim))
        self.initialized_with_data = False

    def initialize_from_data(self, data: torch.Tensor, seed: Optional[int] = None) -> None:
        """Set the codebook to k-means centroids of ``data (N, D)``, once (as the seed).

        Under a multi-rank process group (and ``sync_codebook`` not False) the rows of all ranks
        are used and every rank ends with rank 0's codebook."""
        _synced_initialization([self], data, self.sync_codebook, lambda rows: self._fit(rows, seed))

    @torch.no_grad()
    def _fit(self, data: torch.Tensor, seed: Optional[int]) -> None:
        """k-means as the seed (scikit-learn) for small CPU samples, the fused k-means otherwise."""
        if self.initialized_with_data:
            return
        from .kmeans import kmeans  # kmeans builds on these modules

        fitted = kmeans(data, self.num_embeddings, seed=seed, backend=self.backend,
                        precision=self.precision)
        self.load_centroids(fitted.centroids, fitted.counts)

    def codebook_state(self) -> List[torch.Tensor]:
        """The tensors that define this layer's codebook (what ranks must agree on)."""
        return [self.embeddings.data]

    @torch.no_grad()
    def load_centroids(self, centroids: torch.Tensor, sizes: torch.Tensor) -> None:
        """Use ``centroids (K, D)`` (of clusters of ``sizes (K,)`` rows) as the codebook."""
        if tuple(centroids.shape) != tuple(self.embeddings.shape):
            raise ValueError(f"centroids {tuple(centroids.shape)} do not fit codebook "
                             f"{tuple(self.embeddings.shape)}")
        self.embeddings.data.copy_(centroids.to(self.embeddings))
        self.initialized_with_data = True

    def quantize(self, inputs: torch.Tensor, commitment_cost: float, compute_stats: bool):
        """The full :class:`~rqvae_fast.result.QuantizeResult` of this one layer."""
        return residual_quantize(
            inputs, [self.embeddings], commitment_cost, grad_mode=self.grad_mode,
            codebook_loss=not self.ema, precision=self.precision, backend=self.backend,
            compute_stats=compute_stats, check_finite=self.check_finite,
            deterministic=self.deterministic)

    def forward(self, inputs: torch.Tensor):
        update = self.ema and self.training
        result = self.quantize(inputs, self.commitment_cost, update)
        if update:
            _ema_step([self], result, self.sync_codebook)
        return result.quantized, result.indices[..., 0], result.loss


class VQEmbeddingEMA(VQEmbedding):
    """One codebook moved by exponential moving averages (the seed's ``VQEmbeddingEMA``).

    Buffers ``ema_cluster_size (K,)`` and ``ema_dw (K, D)``; updates only in training mode, after
    the batch was assigned with the pre-update codebook. The loss holds the commitment term only.
    """

    ema = True

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5, **kwargs):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **kwargs)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.eps = eps
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_dw", self.embeddings.detach().clone())

    @torch.no_grad()
    def load_centroids(self, centroids: torch.Tensor, sizes: torch.Tensor) -> None:
        # Start the averages from the data that formed the centroids, so the first update is smooth.
        super().load_centroids(centroids, sizes)
        self.ema_cluster_size.copy_(sizes.to(self.ema_cluster_size))
        self.ema_dw.copy_((centroids * sizes[:, None]).to(self.ema_dw))

    def codebook_state(self) -> List[torch.Tensor]:
        return [self.embeddings.data, self.ema_cluster_size, self.ema_dw]

    def _apply(self, fn, recurse=True):
        # The running statistics stay fp32 whatever dtype the module is cast to (bf16/fp16
        # parameters would otherwise lose the small (1 - decay) increments).
        super()._apply(fn, recurse)
        for name in ("ema_cluster_size", "ema_dw"):
            buffer = getattr(self, name)
            if buffer.is_floating_point() and buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        return self

    def apply_ema(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """One EMA step from a batch's per-code ``counts (K,)`` and residual ``sums (K, D)``."""
        # In place on the Parameter itself (not .data): its version counter moves, so a graph that
        # saved the pre-update codebook (e.g. an input aliasing it) raises instead of going stale.
        ema_update_(self.embeddings, self.ema_cluster_size, self.ema_dw, counts, sums,
                    self.decay, self.eps)


class ResidualVQ(nn.Module):
    """Residual vector quantizer: layer ``l`` quantizes what layers ``< l`` left over.

    ``forward(inputs (*, D), commitment_cost=None) -> (quantized (*, D), indices (*, L) int64,
    loss 0-d)``; all layers run in one fused pass. A ``commitment_cost`` given to forward is stored
    on every layer and used from then on, as in the seed.

    Beyond the seed's arguments: ``ema``/``decay``/``eps`` (EMA codebooks, the seed's
    ``VQEmbeddingEMA``), ``grad_mode`` (``"seed"``, ``"full"``, ``"layer_ste"``), ``precision`` and
    ``backend`` (see :func:`rqvae_fast.functional.residual_quantize`), ``check_finite`` (raise on
    NaN/Inf rows) and ``sync_codebook`` (all-reduce EMA statistics across ranks; ``None``: when a
    process group with more than one rank is initialised), ``deterministic`` (bit-identical runs on a
    GPU, no float atomics; ``None`` follows ``torch.are_deterministic_algorithms_enabled()``).
    """

    def __init__(self, num_layers: int, num_embeddings_list: Sequence[int], embedding_dim: int,
                 commitment_cost: float = 0.25, *, ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, grad_mode: str = "seed", precision: Optional[str] = None,
                 backend: str = "auto", check_finite: bool = False,
                 sync_codebook: Optional[bool] = None, deterministic: Optional[bool] = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if len(num_embeddings_list) < num_layers:
            raise ValueError(
                f"num_embeddings_list has {len(num_embeddings_list)} sizes for {num_layers} layers")
        self.num_layers = num_layers
        self.ema = ema
        self.grad_mode = grad_mode
        self.precision = precision
        self.backend = backend
        self.check_finite = check_finite
        self.sync_codebook = sync_codebook
        self.deterministic = deterministic
        options = dict(grad_mode=grad_mode, precision=precision, backend=backend,
                       check_finite=check_finite, deterministic=deterministic,
                       sync_codebook=sync_codebook)
        if ema:
            layers = [VQEmbeddingEMA(num_embeddings_list[i], embedding_dim, commitment_cost, decay,
                                     eps, **options) for i in range(num_layers)]
        else:
            layers = [VQEmbedding(num_embeddings_list[i], embedding_dim, commitment_cost, **options)
                      for i in range(num_layers)]
        self.vq_layers = nn.ModuleList(layers)

    @property
    def codebooks(self) -> List[torch.Tensor]:
        """The ``(K_l, D)`` codebook parameters, layer by layer."""
        return [layer.embeddings for layer in self.vq_layers]

    def _commitment_cost(self) -> float:
        costs = {float(layer.commitment_cost) for layer in self.vq_layers}
        if len(costs) != 1:
            raise ValueError(
                f"the fused ResidualVQ uses one commitment cost for all layers, got {sorted(costs)}")
        return costs.pop()

    def quantize(self, inputs: torch.Tensor, compute_stats: Optional[bool] = None):
        """The full :class:`~rqvae_fast.result.QuantizeResult` (per-layer losses, code counts, ...)."""
        return residual_quantize(
            inputs, self.codebooks, self._commitment_cost(), grad_mode=self.grad_mode,
            codebook_loss=not self.ema, precision=self.precision, backend=self.backend,
            compute_stats=compute_stats, check_finite=self.check_finite,
            deterministic=self.deterministic)

    def forward(self, inputs: torch.Tensor, commitment_cost: Optional[float] = None):
        if commitment_cost is not None:
            for layer in self.vq_layers:
                layer.commitment_cost = commitment_cost
        update = self.ema and self.training
        result = self.quantize(inputs, compute_stats=True if update else None)
        if update:
            _ema_step(self.vq_layers, result, self.sync_codebook)
        return result.quantized, result.indices, result.loss

    def initialize_from_data(self, data: torch.Tensor, seed: Optional[int] = None) -> None:
        """k-means each codebook on the residuals the previous layers leave (the seed's method).

        Under a multi-rank process group (and ``sync_codebook`` not False) the rows of all ranks
        are used and every rank ends with rank 0's codebooks."""
        _synced_initialization(self.vq_layers, data, self.sync_codebook,
                               lambda rows: self._fit_layers(rows, seed))

    @torch.no_grad()
    def _fit_layers(self, data: torch.Tensor, seed: Optional[int]) -> None:
        residual = data
        for layer in self.vq_layers:
            layer._fit(residual, seed)
            result = residual_quantize(residual, [layer.embeddings], 0.0, grad_mode=self.grad_mode,
                                       precision=self.precision, backend=self.backend)
            residual = residual - result.quantized


def _ema_step(layers: Sequence[VQEmbedding], result, sync: Optional[bool]) -> None:
    """Apply one EMA update per layer from a forward's statistics, summed over ranks when syncing."""
    counts, sums = result.code_counts, result.code_sums
    if distributed.should_sync(sync):
        # One collective for all layers, on every rank (an empty batch adds zeros).
        counts, sums = distributed.all_reduce_code_stats(counts, sums)
    for layer, layer_counts, layer_sums in zip(layers, counts, sums):
        layer.apply_ema(layer_counts, layer_sums)


@torch.no_grad()
def _synced_initialization(layers: Sequence[VQEmbedding], data: torch.Tensor, sync: Optional[bool],
                           fit) -> None:
    """Run ``fit(rows (N, D) fp32)``; across ranks, on rank 0 with every rank's rows, then broadcast."""
    rows = data.detach().reshape(-1, data.shape[-1]).float()
    if not distributed.should_sync(sync):
        fit(rows)
        return
    rows = distributed.all_gather_rows(rows)
    if distributed.rank() == 0:
        fit(rows)
    distributed.broadcast_coalesced_([t for layer in layers for t in layer.codebook_state()])
    for layer in layers:
        layer.initialized_with_data = True
