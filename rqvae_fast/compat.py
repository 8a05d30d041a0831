"""``ResidualVQ`` with vector-quantize-pytorch's constructor, forward, state_dict and semantics.

>>> from rqvae_fast.compat import ResidualVQ
>>> rvq = ResidualVQ(dim=256, num_quantizers=3, codebook_size=256, decay=0.99,
...                  kmeans_init=True, threshold_ema_dead_code=2)
>>> quantized, indices, commit_losses = rvq(x)            # x (B, N, 256), optional mask (B, N)

Defaults are theirs, including the rotation trick (``rotation_trick=None``: on when
``codebook_dim > 1``). The defaults, ``rotation_trick=False``, learnable codebooks, masks, quantize
dropout and shared codebooks without dead-code reset run all active layers in one fused pass
(:func:`rqvae_fast.functional.residual_quantize` with ``grad_mode="rotation"`` or ``"layer_ste"``;
quantize dropout passes every codebook and the cutoff as ``active_layers``, a runtime value of the
kernel, so no cutoff compiles a kernel of its own);
``use_cosine_sim`` runs in the fused kernels too on the Triton path (their cosine epilogue; the
PyTorch path: the fused search plus one chunked pass, :mod:`rqvae_fast.cosine`);
``GroupedResidualVQ`` runs all its groups in one grouped fused pass where it can; beam search
runs in the beam-search kernel on CUDA (:mod:`rqvae_fast.compat_beam`, their path ranking);
Gumbel sampling, implicit neural codebooks, ``quant_grad_frac``, shared codebooks with dead-code
reset, and beam search elsewhere go layer by layer (:mod:`rqvae_fast.compat_layers`), as their
code does.

The ``state_dict`` has the same keys and shapes as vector-quantize-pytorch's ``ResidualVQ`` (
``layers.{l}._codebook.{initted, cluster_size, embed_avg, embed}``, ``project_in``/``project_out``), so
either module loads the other's weights with ``strict=True``. See ``docs/COMPAT.md`` for the
mapping, the unsupported options and the distributed behaviour.
"""
from __future__ import annotations

import contextlib
import math
import random
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from .compat_beam import forward_beam_fused, fused_beam_applies
from .compat_layers import ImplicitCodebookMLP, forward_layers
from .compat_reference import l2norm
from .backend import use_triton
from .cosine import CosineQuantizeFunction, FusedCosineQuantizeFunction
from .precision import resolve_precision
from ._validation import check_finite as _check_finite
from .functional import residual_quantize
from .grouped import residual_quantize_grouped

__all__ = ["ResidualVQ", "GroupedResidualVQ", "ema_track_", "ema_codebook_", "kmeans"]

# Options of vector-quantize-pytorch's ResidualVQ / VectorQuantize that this module does not
# implement, with the value that switches them off (accepted, and the only value accepted), and why.
_NEUTRAL: Dict[str, Any] = {
    # ResidualVQ
    "diveq": False, "heads": 1, "accept_image_fmap": False,
    # VectorQuantize
    "separate_codebook_per_head": False, "freeze_codebook": False, "sync_kmeans": True,
    "layernorm_after_project_in": False, "channel_last": True,
    "accept_3d_fmap": False, "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0, "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None, "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0, "straight_through": False,
    "directional_reparam": False, "directional_reparam_variance": 5e-3, "sync_affine_param": False,
    "vq_bridge": None, "manual_ema_update": False, "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False, "affine_param": False,
    "affine_param_batch_decay": 0.99, "affine_param_codebook_decay": 0.9, "sync_update_v": 0.0,
    "route_gradients_to_input": True,
}
_REASONS: Dict[str, str] = {
    "diveq": "DiVeQ's noisy directional reparameterisation is not implemented",
    "directional_reparam": "DiVeQ's noisy directional reparameterisation is not implemented",
    "heads": "their ResidualVQ itself asserts heads == 1",
    "straight_through": "Gumbel straight-through needs the (N, K) softmax, which is not implemented",
}


def _is_neutral(value: Any, neutral: Any) -> bool:
    if value is neutral:
        return True
    if neutral is None or isinstance(value, (torch.Tensor, np.ndarray)) or callable(value):
        return False
    if isinstance(neutral, bool) != isinstance(value, bool):
        return False
    try:
        return bool(value == neutral)
    except Exception:  # noqa: BLE001 - an odd type that cannot compare is not neutral
        return False


def _check_options(options: Dict[str, Any]) -> None:
    unknown = sorted(name for name in options if name not in _NEUTRAL)
    if unknown:
        raise TypeError(
            f"rqvae_fast.compat.ResidualVQ got unexpected keyword argument(s) {unknown} "
            "(not options of vector-quantize-pytorch's ResidualVQ)")
    unsupported = sorted(name for name, value in options.items()
                         if not _is_neutral(value, _NEUTRAL[name]))
    if unsupported:
        detail = ", ".join(f"{name}={options[name]!r} (supported: {_NEUTRAL[name]!r})"
                           for name in unsupported)
        hint = "".join(f" {name}: {_REASONS[name]}." for name in unsupported if name in _REASONS)
        raise ValueError(
            f"rqvae_fast.compat.ResidualVQ does not support {detail}.{hint}")


# ---------------------------------------------------------------------------------------------
# EMA and k-means, with vector-quantize-pytorch's arithmetic


@torch.no_grad()
def ema_track_(cluster_size: torch.Tensor, embed_avg: torch.Tensor, counts: torch.Tensor,
               sums: torch.Tensor, decay: float) -> None:
    """Move the running averages towards one step's statistics, in place.

    ``cluster_size (K,)`` and ``embed_avg (K, D)`` fp32 become ``lerp(old, new, 1 - decay)`` with
    ``counts (K,)`` and ``sums (K, D)`` (rows per code and the sum of those rows). Same values as
    the seed's :func:`rqvae_fast.functional.ema_update_` averages; ``lerp`` rounds as
    vector-quantize-pytorch does.
    """
    cluster_size.lerp_(counts.to(cluster_size), 1.0 - decay)
    embed_avg.lerp_(sums.to(embed_avg), 1.0 - decay)


@torch.no_grad()
def ema_codebook_(embed: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor,
                  eps: float, cosine: bool = False) -> None:
    """Set ``embed (K, D)`` to ``embed_avg / smoothed`` in place, with the Laplace-smoothed sizes
    ``smoothed = (cluster_size + eps) / (n + K eps) * n``, ``n = sum(cluster_size)``.

    An unused code (``cluster_size = embed_avg = 0``) becomes the zero vector. ``cosine``: the
    result is l2-normalised (their ``use_cosine_sim``).
    """
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + cluster_size.shape[0] * eps) * total
    new = embed_avg / smoothed.unsqueeze(1)
    embed.copy_((l2norm(new) if cosine else new).to(embed))


@torch.no_grad()
def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10, *,
           precision: Optional[str] = None, backend: str = "auto", use_cosine_sim: bool = False
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means as vector-quantize-pytorch runs it: ``(means (K, D), bins (K,))`` fp32.

    Starts from ``K`` rows of ``samples (N, D)`` drawn without replacement (with replacement when
    ``N < K``) by torch's global generator; each iteration assigns rows to their nearest mean and
    moves every mean with rows to their average (an empty cluster keeps its mean). ``bins`` counts
    the rows of the last assignment. One fused pass per iteration, no ``(N, K)`` matrix.
    ``use_cosine_sim``: rows are unit vectors and the new means are l2-normalised, so the nearest
    mean (smallest ``|m|^2 - 2 s.m`` with ``|m| = 1``) is the one of largest dot product, as theirs.
    """
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty (N, D) tensor, got shape {tuple(samples.shape)}")
    if num_iters < 1:
        raise ValueError(f"kmeans_iters must be >= 1, got {num_iters}")
    samples = samples.float()
    n = samples.shape[0]
    if n >= num_clusters:
        pick = torch.randperm(n, device=samples.device)[:num_clusters]
    else:
        pick = torch.randint(0, n, (num_clusters,), device=samples.device)
    means = samples[pick]
    bins = samples.new_zeros(num_clusters)
    for _ in range(num_iters):
        step = residual_quantize(samples, [means], 0.0, grad_mode="layer_ste", codebook_loss=False,
                                 precision=precision, backend=backend, compute_stats=True)
        bins, sums = step.code_counts[0], step.code_sums[0]
        new_means = sums / bins.clamp(min=1.0).unsqueeze(1)
        if use_cosine_sim:
            new_means = l2norm(new_means)
        means = torch.where((bins == 0).unsqueeze(1), means, new_means)
    return means, bins


# ---------------------------------------------------------------------------------------------
# modules


class _Codebook(nn.Module):
    """One layer's state, laid out as vector-quantize-pytorch's ``Codebook`` (heads = 1):
    ``initted`` 0-d bool, ``cluster_size (1, K)``, ``embed_avg (1, K, D)``, ``embed (1, K, D)``
    (a Parameter when learnable, else a buffer), all fp32."""

    def __init__(self, codebook_size: int, dim: int, kmeans_init: bool, learnable: bool,
                 cosine: bool = False):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(1, codebook_size, dim)
        else:  # kaiming-uniform over a (1, K, D) tensor, as vector-quantize-pytorch
            bound = math.sqrt(6.0 / (codebook_size * dim))
            embed = torch.empty(1, codebook_size, dim).uniform_(-bound, bound)
            if cosine:
                embed = l2norm(embed)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(1, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)


class _Layer(nn.Module):
    """Holder of one ``_codebook`` (the place of vector-quantize-pytorch's ``VectorQuantize``)."""

    def __init__(self, codebook_size: int, dim: int, kmeans_init: bool, learnable: bool,
                 cosine: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.use_cosine_sim = cosine
        self._codebook = _Codebook(codebook_size, dim, kmeans_init, learnable, cosine)

    @property
    def codebook(self) -> torch.Tensor:
        """``(K, D)`` view of the codebook."""
        return self._codebook.embed[0]


class ResidualVQ(nn.Module):
    """vector-quantize-pytorch's ``ResidualVQ`` on the fused quantizer (see the module docstring).

    Constructor (their names and defaults): ``dim``, ``num_quantizers``, ``codebook_size`` (int, or a
    per-layer tuple), ``codebook_dim`` (``Linear`` projections in/out when != ``dim``), ``decay``
    (0.8), ``eps``, ``commitment_weight`` (1.0), ``kmeans_init``, ``kmeans_iters`` (10),
    ``threshold_ema_dead_code`` (0: off), ``learnable_codebook`` (False), ``ema_update`` (default:
    ``not learnable_codebook``), ``sync_codebook`` (None: sync when a process group with more than
    one rank is initialised), ``return_zeros_for_masked_padding`` (True), ``rotation_trick`` (None:
    ``codebook_dim > 1``), ``use_cosine_sim``, ``quantize_dropout`` (+ ``_cutoff_index``,
    ``_multiple_of``), ``shared_codebook``, ``stochastic_sample_codes``, ``sample_codebook_temp``,
    ``implicit_neural_codebook``, ``mlp_kwargs``, ``beam_size``, ``eval_beam_size``,
    ``beam_score_quantizer_weights``, ``quant_grad_frac``. Their other options are accepted only at
    the value that switches them off; any other value raises ``ValueError`` naming it, an unknown
    name raises ``TypeError``. Ours (keyword-only): ``precision``, ``backend``, ``check_finite``
    as in :func:`rqvae_fast.functional.residual_quantize`.

    ``forward(x (B, N, dim) or (B, dim), mask=None (B, N) bool)`` returns ``(quantized`` like ``x``,
    ``indices (B, N, Q)`` int64 (``-1`` where masked out or where a row holds NaN/Inf),
    ``commit_losses (Q,)`` fp32``)``; ``return_all_codes=True`` adds ``codes (Q, B, N, codebook_dim)``.
    Layers dropped by quantize dropout get index -1 and loss 0. In training mode each layer's loss
    is ``commitment_weight * mean((r_l - e_l)^2)`` over the unmasked rows, and the codebooks update after the batch was assigned (EMA, then dead-code
    re-seeding); in eval mode the losses are zeros and the output carries no input gradient.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: Optional[int] = None,
        codebook_size: Union[int, Sequence[int]],
        codebook_dim: Optional[int] = None,
        decay: float = 0.8,
        eps: float = 1e-5,
        commitment_weight: float = 1.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0,
        learnable_codebook: Optional[bool] = None,
        ema_update: Optional[bool] = None,
        sync_codebook: Optional[bool] = None,
        return_zeros_for_masked_padding: bool = True,
        rotation_trick: Optional[bool] = None,
        use_cosine_sim: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        shared_codebook: bool = False,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: Optional[Dict[str, Any]] = None,
        beam_size: Optional[int] = None,
        eval_beam_size: Optional[int] = None,
        beam_score_quantizer_weights: Optional[Sequence[float]] = None,
        quant_grad_frac: float = 0.0,
        precision: Optional[str] = None,
        backend: str = "auto",
        check_finite: bool = False,
        **options: Any,
    ):
        super().__init__()
        _check_options(options)
        sizes = self._layer_sizes(codebook_size, num_quantizers)
        if implicit_neural_codebook:  # as theirs: the transformed codebooks are learned
            if ema_update or (learnable_codebook is not None and not learnable_codebook):
                raise ValueError("implicit_neural_codebook=True learns the codebooks: it needs "
                                 "learnable_codebook=True and ema_update=False (the defaults then)")
            learnable_codebook, ema_update = True, False
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim=True does not work with a learnable codebook (nor with "
                             "implicit_neural_codebook), as in vector-quantize-pytorch")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError(f"shared_codebook=True needs one codebook size for all layers, got {sizes}")
        if not isinstance(quantize_dropout_cutoff_index, int) or quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be an int >= 0, got "
                             f"{quantize_dropout_cutoff_index!r}")
        if quantize_dropout and quantize_dropout_cutoff_index >= len(sizes) > 1:
            raise ValueError(f"quantize_dropout_cutoff_index ({quantize_dropout_cutoff_index}) must be "
                             f"below num_quantizers ({len(sizes)})")
        if not isinstance(quantize_dropout_multiple_of, int) or quantize_dropout_multiple_of < 1:
            raise ValueError("quantize_dropout_multiple_of must be an int >= 1, got "
                             f"{quantize_dropout_multiple_of!r}")
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size (as in vector-quantize-pytorch)")
        for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        weights = [1.0] * len(sizes) if beam_score_quantizer_weights is None else \
            [float(w) for w in beam_score_quantizer_weights]
        if len(weights) != len(sizes):
            raise ValueError(f"beam_score_quantizer_weights needs {len(sizes)} weights, got {len(weights)}")
        if not 0.0 <= float(quant_grad_frac) <= 1.0:
            raise ValueError(f"quant_grad_frac must be in [0, 1], got {quant_grad_frac}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        if not isinstance(codebook_dim, int) or codebook_dim < 1:
            raise ValueError(f"codebook_dim must be a positive int, got {codebook_dim!r}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if float(commitment_weight) < 0.0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight}")
        if not isinstance(kmeans_iters, int) or kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be an int >= 1, got {kmeans_iters!r}")
        if float(threshold_ema_dead_code) < 0.0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        learnable_codebook = bool(learnable_codebook) if learnable_codebook is not None else False
        ema_update = (not learnable_codebook) if ema_update is None else bool(ema_update)
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook=True needs ema_update=False "
                             "(a codebook is either learned by gradients or moved by EMA)")

        self.dim = dim
        self.codebook_dim = codebook_dim
        self.num_quantizers = len(sizes)
        self.codebook_sizes = sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.learnable_codebook = learnable_codebook
        self.ema_update = ema_update
        self.sync_codebook = sync_codebook
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.precision = precision
        self.backend = backend
        self.check_finite = check_finite

        # their default: the rotation trick whenever the quantized vectors have more than one dim
        self.rotation_trick = (codebook_dim > 1) if rotation_trick is None else bool(rotation_trick)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.quantize_dropout = bool(quantize_dropout) and len(sizes) > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.shared_codebook = bool(shared_codebook)
        self.stochastic_sample_codes = bool(stochastic_sample_codes)
        self.sample_codebook_temp = float(sample_codebook_temp)
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        self.register_buffer("beam_score_weights", torch.tensor(weights), persistent=False)
        self.quant_grad_frac = float(quant_grad_frac)

        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.layers = nn.ModuleList(
            [_Layer(size, codebook_dim, self.kmeans_init, learnable_codebook, self.use_cosine_sim)
             for size in sizes])
        if self.shared_codebook:  # one _Codebook module under every layer's name, as theirs
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook
        self.mlps = nn.ModuleList(
            [ImplicitCodebookMLP(codebook_dim, **(mlp_kwargs or {})) for _ in sizes[1:]]
        ) if self.implicit_neural_codebook else None
        self._needs_init = self.kmeans_init  # mirrors "some layer's initted is False"
        self.register_load_state_dict_post_hook(ResidualVQ._after_load)

    @staticmethod
    def _after_load(module: "ResidualVQ", incompatible_keys) -> None:
        module._needs_init = not all(bool(layer._codebook.initted) for layer in module.layers)

    @staticmethod
    def _layer_sizes(codebook_size, num_quantizers) -> Tuple[int, ...]:
        if isinstance(codebook_size, (tuple, list)):
            sizes = tuple(codebook_size)
            if num_quantizers is not None and num_quantizers != len(sizes):
                raise ValueError(f"codebook_size has {len(sizes)} sizes but num_quantizers is "
                                 f"{num_quantizers}")
        else:
            if num_quantizers is None:
                raise ValueError("num_quantizers is required when codebook_size is an int")
            if not isinstance(num_quantizers, int) or num_quantizers < 1:
                raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
            sizes = (codebook_size,) * num_quantizers
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                for s in sizes):
            raise ValueError(f"codebook_size must be a positive int or a non-empty tuple of them, "
                             f"got {codebook_size!r}")
        return sizes

    # --- their read-only API -----------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        """The first layer's codebook size."""
        return self.codebook_sizes[0]

    @property
    def codebooks(self) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """``(Q, K, codebook_dim)`` when all layers have K codes, else a tuple of ``(K_l, codebook_dim)``."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices (B, ..., Q')`` int -> codes ``(Q, B, ..., codebook_dim)``; index -1 gives zeros.

        ``Q' < Q`` (coarse indices, the rest taken as -1) only with ``quantize_dropout``. With an
        implicit neural codebook, layer ``l``'s codes are its MLP's transform conditioned on the sum
        of the previous layers' codes (index -1 fetching code 0 there, as theirs).
        """
        if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point:
            raise TypeError("indices must be an integer tensor (B, ..., Q)")
        given = indices.shape[-1] if indices.dim() >= 2 else -1
        if given < self.num_quantizers and given >= 1 and self.quantize_dropout:
            indices = torch.cat((indices, indices.new_full(
                (*indices.shape[:-1], self.num_quantizers - given), -1)), dim=-1)
        elif indices.dim() < 2 or given != self.num_quantizers:
            raise ValueError(
                f"indices must have shape (B, ..., {self.num_quantizers}), got {tuple(indices.shape)}"
                " (fewer quantizers only with quantize_dropout=True)")
        codes = []
        condition = None
        for layer, (module, index) in enumerate(zip(self.layers, indices.unbind(-1))):
            size = module.codebook_size
            if bool(((index < -1) | (index >= size)).any()):
                raise ValueError(f"indices of layer {layer} must be in [-1, {size}), got values "
                                 f"in [{int(index.min())}, {int(index.max())}]")
            safe = index.clamp(min=0)
            if self.implicit_neural_codebook and layer > 0:
                lead = safe.shape
                per_row = self.mlps[layer - 1](module.codebook, condition=condition.reshape(-1, self.codebook_dim))
                code = per_row.gather(1, safe.reshape(-1, 1, 1).expand(-1, 1, self.codebook_dim))
                code = code.reshape(*lead, self.codebook_dim)
            else:
                code = module.codebook[safe]
            condition = code if condition is None else condition + code
            codes.append(code.masked_fill((index < 0).unsqueeze(-1), 0.0))
        return torch.stack(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices (B, ..., Q)`` -> ``project_out(sum of the codes)`` ``(B, ..., dim)``."""
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    # --- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, indices=None,
                return_all_codes: bool = False, sample_codebook_temp: Optional[float] = None,
                freeze_codebook: bool = False, beam_size: Optional[int] = None,
                rand_quantize_dropout_fixed_seed: Optional[int] = None):
        """See the class docstring. ``freeze_codebook=True`` skips the codebook updates and gives a
        learnable codebook no gradient for this call."""
        if indices is not None:
            raise ValueError("forward argument indices (their cross-entropy loss to given codes) is "
                             "not supported by rqvae_fast.compat.ResidualVQ (leave it None)")
        if beam_size is not None and (not isinstance(beam_size, int) or beam_size < 1):
            raise ValueError(f"beam_size must be None or an int >= 1, got {beam_size!r}")
        rows, select, lead_shape = self._rows(x, mask)
        if self.check_finite:
            _check_finite(rows.detach(), "inputs (after project_in)")
        sync = distributed.should_sync(self.sync_codebook)
        active = self._active_layers(rows.device, rand_quantize_dropout_fixed_seed)
        path, beam, temperature = self._path(beam_size, sample_codebook_temp)
        if path == "layered" and fused_beam_applies(self, rows, beam, temperature > 0):
            path = "beam"  # the beam-search kernel, vector-quantize-pytorch's ranking
        if path == "beam":
            quantized, all_indices, losses = forward_beam_fused(
                self, rows, active=active, beam=beam, freeze=freeze_codebook, sync=sync)
        elif path == "cosine":
            quantized, all_indices, losses = self._forward_cosine(
                rows, active, freeze_codebook, sync, raw_target=mask is not None)
        elif path == "layered":
            quantized, all_indices, losses = forward_layers(
                self, rows, active=active, beam=beam, temperature=temperature,
                freeze=freeze_codebook, row_select=select)
            quantized = quantized.to(rows.dtype)
        else:
            plan = self._fused_plan(rows, active, freeze_codebook, sync)
            quantized, all_indices, losses = self._fused_finish(plan, _run_plans([plan]))
        return self._output(x, mask, quantized, all_indices, losses, select, lead_shape, return_all_codes)

    def _path(self, beam_size: Optional[int], sample_codebook_temp: Optional[float]):
        """Which path a forward takes: ``("fused" | "cosine" | "layered", beam, temperature)`` (the
        forward sends a layered beam search to the beam kernel where :func:`fused_beam_applies`)."""
        beam = beam_size if beam_size is not None else (
            self.beam_size if self.training else self.eval_beam_size)
        beam = 1 if beam is None else beam
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else float(sample_codebook_temp)
        sampling = self.stochastic_sample_codes and self.training and temperature > 0
        shared_layered = self.shared_codebook and (
            self.threshold_ema_dead_code > 0 or self.use_cosine_sim or self._needs_init)
        layered = (beam > 1 or sampling or self.implicit_neural_codebook or shared_layered
                   or self.quant_grad_frac > 0 or (self.use_cosine_sim and self._needs_init))
        path = "layered" if layered else ("cosine" if self.use_cosine_sim else "fused")
        return path, beam, temperature if sampling else 0.0

    def _output(self, x, mask, quantized, all_indices, losses, select, lead_shape, return_all_codes):
        """The rows' results as the forward returns them: masked rows back in place (index -1),
        ``project_out``, the masked-padding fill, the optional codes."""
        if select is not None:
            positions = select.nonzero().squeeze(1)
            full = quantized.new_zeros((select.shape[0], self.codebook_dim))
            quantized = full.index_copy(0, positions, quantized)
            all_indices = torch.full((select.shape[0], self.num_quantizers), -1, dtype=torch.int64,
                                     device=all_indices.device).index_copy(0, positions, all_indices)
        quantized = self.project_out(quantized.reshape(*lead_shape, self.codebook_dim))
        all_indices = all_indices.reshape(*lead_shape, self.num_quantizers)
        if mask is not None:
            fill = torch.zeros_like(quantized) if self.return_zeros_for_masked_padding else x
            quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
        if return_all_codes:
            return quantized, all_indices, losses, self.get_codes_from_indices(all_indices)
        return quantized, all_indices, losses

    def _active_layers(self, device: torch.device, seed: Optional[int]) -> int:
        """How many layers run: all, or in training with quantize dropout ``cutoff + 1`` for a cutoff
        drawn as theirs (``random.Random(seed).randrange(cutoff_index, Q)``, rounded up to a multiple;
        without a seed, one is drawn from torch's global generator, summed over ranks)."""
        if not (self.training and self.quantize_dropout):
            return self.num_quantizers
        if seed is None:
            draw = torch.randint(0, 10_000, (), device=device)
            if distributed.should_sync(None):
                torch.distributed.all_reduce(draw)
            seed = int(draw.item())
        cutoff = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:
            cutoff = math.ceil((cutoff + 1) / multiple) * multiple - 1
        return min(cutoff + 1, self.num_quantizers)

    def _forward_cosine(self, rows: torch.Tensor, active: int, freeze_codebook: bool, sync: bool,
                        raw_target: bool):
        """``use_cosine_sim``: on the Triton path one fused pass with the kernels' cosine epilogue
        (:class:`rqvae_fast.cosine.FusedCosineQuantizeFunction`); otherwise indices from the fused
        search (unit codes), then losses, statistics and the input gradient from
        :class:`rqvae_fast.cosine.CosineQuantizeFunction`. Then the EMA step."""
        layers = list(self.layers[:active])
        every_book = [layer.codebook.detach() for layer in self.layers]
        books = every_book[:active]
        sizes = tuple(layer.codebook_size for layer in layers)
        if use_triton(self.backend, rows.device):
            return self._forward_cosine_fused(rows, active, freeze_codebook, sync, raw_target, every_book)
        with torch.no_grad():  # every codebook, the cutoff a runtime value (one kernel per Q)
            indices = residual_quantize(rows.detach(), every_book, 0.0, grad_mode="layer_ste",
                                        codebook_loss=False, precision=self.precision,
                                        backend=self.backend, check_finite=self.check_finite,
                                        compute_stats=False, active_layers=active).indices[:, :active]
        codes = torch.cat(books)
        weight = self.commitment_weight
        if self.training:
            quantized, losses, counts, sums = CosineQuantizeFunction.apply(
                rows, codes, sizes, indices, weight, self.rotation_trick, raw_target)
            if weight <= 0:
                losses = torch.zeros_like(losses)
        else:
            with torch.no_grad():
                quantized, losses, counts, sums = CosineQuantizeFunction.apply(
                    rows, codes, sizes, indices, weight, False, raw_target)
            losses = torch.zeros_like(losses)
        if self.training and not freeze_codebook and (self.ema_update or self.threshold_ema_dead_code > 0):
            self._cosine_codebook_step(rows.detach(), layers, indices, counts, sums, sync)
        dropped = self.num_quantizers - active
        if dropped:
            indices = torch.cat((indices, indices.new_full((indices.shape[0], dropped), -1)), dim=1)
            losses = torch.cat((losses, losses.new_zeros(dropped)))
        return quantized, indices, losses

    def _forward_cosine_fused(self, rows, active, freeze_codebook, sync, raw_target, every_book):
        """:meth:`_forward_cosine` in one fused launch each way (every codebook in, the cutoff a
        runtime value; dropped layers: index -1, loss 0, no statistics)."""
        sizes = tuple(layer.codebook_size for layer in self.layers)
        update = self.training and not freeze_codebook and (self.ema_update or self.threshold_ema_dead_code > 0)
        if self.check_finite:
            for number, book in enumerate(every_book):
                _check_finite(book, f"codebook {number}")
        rotation = self.training and self.rotation_trick
        with contextlib.nullcontext() if self.training else torch.no_grad():
            quantized, indices, losses, counts, sums = FusedCosineQuantizeFunction.apply(
                rows, torch.cat(every_book), sizes, self.commitment_weight, rotation, raw_target,
                resolve_precision(self.precision), update, active)
        if not self.training or self.commitment_weight <= 0:
            losses = torch.zeros_like(losses)
        if update:
            k_active = sum(sizes[:active])
            self._cosine_codebook_step(rows.detach(), list(self.layers[:active]), indices[:, :active],
                                       counts[:k_active], sums[:k_active], sync)
        return quantized.to(rows.dtype), indices, losses

    @torch.no_grad()
    def _cosine_codebook_step(self, rows, layers, indices, counts, sums, sync: bool) -> None:
        """EMA step of every active layer from the normalised inputs' statistics (one all-reduce when
        synced), then dead codes re-seeded from each layer's normalised inputs (rebuilt)."""
        sizes = [layer.codebook_size for layer in layers]
        counts, sums = counts.split(sizes), sums.split(sizes)
        if sync:
            counts, sums = distributed.all_reduce_code_stats(counts, sums)
        if float(counts[0].sum()) == 0.0:
            return
        before = [layer.codebook.detach().clone() for layer in layers]
        for layer, layer_counts, layer_sums in zip(layers, counts, sums):
            book = layer._codebook
            ema_track_(book.cluster_size[0], book.embed_avg[0], layer_counts, layer_sums, self.decay)
            if self.ema_update:
                ema_codebook_(book.embed.data[0], book.cluster_size[0], book.embed_avg[0], self.eps,
                              cosine=True)
        if self.threshold_ema_dead_code <= 0:
            return
        finite = indices[:, 0] >= 0
        residual, chosen = rows[finite].float(), indices[finite]
        for layer_id, layer in enumerate(layers):
            self._reseed_dead(layer._codebook, residual)  # normalises the rows itself
            residual = residual - before[layer_id][chosen[:, layer_id]].float()

    def _fused_plan(self, rows: torch.Tensor, active: int, freeze_codebook: bool, sync: bool) -> "_FusedPlan":
        """What the fused pass of this call quantizes (k-means init first, on the first call)."""
        if self._needs_init:
            self._init_codebooks(rows, sync)
        # Every codebook goes in whatever the cutoff (the kernel takes the number of active layers
        # as a runtime value); the dropped ones detached, so they get no gradient (None, as theirs).
        books = [layer.codebook if number < active else layer.codebook.detach()
                 for number, layer in enumerate(self.layers)]
        update = self.training and not freeze_codebook and (
            self.ema_update or self.threshold_ema_dead_code > 0)
        options = dict(grad_mode="rotation" if self.rotation_trick else "layer_ste",
                       precision=self.precision, backend=self.backend, check_finite=self.check_finite,
                       active_layers=active)
        learnable = self.training and self.learnable_codebook and not freeze_codebook and self.commitment_weight > 0
        if learnable:
            # loss w * mse(e, r) with gradient to both: run with beta = 1 (codebook and commitment
            # terms, value 2 mse), scale by w and fix the value to w * mse (in _fused_finish).
            call = dict(commitment_cost=1.0, codebook_loss=True, compute_stats=update)
            quantize_books = books
        elif self.training:
            call = dict(commitment_cost=self.commitment_weight, codebook_loss=False, compute_stats=update)
            quantize_books = [b.detach() for b in books]
        else:
            call = dict(commitment_cost=0.0, codebook_loss=False, compute_stats=False)
            rows, quantize_books = rows.detach(), [b.detach() for b in books]
        return _FusedPlan(rows, books, quantize_books, dict(options, **call), learnable, update, sync,
                          active, no_grad=not self.training)

    def _fused_finish(self, plan: "_FusedPlan", result) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Losses, output and codebook updates of a fused pass; returns ``(quantized (n, d),
        indices (n, Q), losses (Q,))`` (dropped layers: index -1, loss 0, from the kernel)."""
        rows, books, active = plan.rows, plan.books, plan.active
        if plan.learnable:
            losses = self.commitment_weight * (result.layer_losses - 0.5 * result.layer_losses.detach())
        elif self.training:
            losses = result.layer_losses
        else:
            losses = torch.zeros(self.num_quantizers, dtype=torch.float32, device=rows.device)
        quantized = result.quantized
        if (self.learnable_codebook and torch.is_grad_enabled()
                and not (self.training and rows.requires_grad)):
            # no straight-through estimator (eval mode, or inputs without gradient): as theirs,
            # the output is the sum of the codes and passes its gradient to the codebooks
            quantized = self._sum_codes(result.indices[:, :active], books[:active]).to(rows.dtype)
        layers = list(self.layers[:active])
        if plan.update:
            self._update_codebooks(rows.detach(), result, plan.sync, layers)
        if self.training and self.shared_codebook and self.ema_update:
            # one codebook under every layer: the layers added their statistics in turn (above);
            # the codes move once, at the end of the call (even when frozen, as theirs)
            book = self.layers[0]._codebook
            with torch.no_grad():
                ema_codebook_(book.embed.data[0], book.cluster_size[0], book.embed_avg[0], self.eps)
        return quantized, result.indices, losses

    def _rows(self, x: torch.Tensor, mask: Optional[torch.Tensor]):
        """Projected rows ``(n, codebook_dim)`` to quantize, the flat row mask, the lead shape."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor of shape (B, N, dim) or (B, dim)")
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}) or (B, {self.dim}), "
                             f"got {tuple(x.shape)}")
        lead_shape = tuple(x.shape[:-1])
        rows = self.project_in(x).reshape(-1, self.codebook_dim)
        if mask is None:
            return rows, None, lead_shape
        if x.dim() != 3:
            raise ValueError("mask needs x of shape (B, N, dim)")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of shape {lead_shape}")
        if tuple(mask.shape) != lead_shape:
            raise ValueError(f"mask must have shape {lead_shape} (x's), got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        select = mask.reshape(-1)
        return rows[select], select, lead_shape

    @staticmethod
    def _sum_codes(indices: torch.Tensor, books: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum_l books[l][indices[:, l]]`` (differentiable in the codebooks); NaN rows stay NaN."""
        total = 0
        for layer, book in enumerate(books):
            index = indices[:, layer]
            code = book[index.clamp(min=0)]
            total = total + torch.where((index >= 0).unsqueeze(1), code, float("nan"))
        return total

    # --- codebook updates --------------------------------------------------------------------

    @torch.no_grad()
    def _init_codebooks(self, rows: torch.Tensor, sync: bool) -> None:
        """k-means every layer not yet initialised on the residuals the previous layers leave.

        Synced: the rows of all ranks are gathered, rank 0 computes, and the result is broadcast,
        so every rank holds the same codebooks as one process given the concatenated rows.
        """
        data = rows.float()
        data = data[torch.isfinite(data).all(dim=1)]
        if sync:
            data = distributed.all_gather_rows(data)
        if data.shape[0] == 0:
            return  # nothing to learn from on any rank: stay uninitialised (checked again next call)
        if not sync or distributed.rank() == 0:
            residual = data
            for layer_id, layer in enumerate(self.layers):
                cb = layer._codebook
                if not bool(cb.initted):
                    size = layer.codebook_size
                    if residual.shape[0] < size:
                        warnings.warn(f"k-means init of layer {layer_id} got {residual.shape[0]} "
                                      f"vectors for {size} codes: duplicates are sampled")
                    means, bins = kmeans(residual, size, self.kmeans_iters,
                                         precision=self.precision, backend=self.backend)
                    cb.embed_avg[0].copy_(means * bins.unsqueeze(1))
                    cb.cluster_size[0].copy_(bins)
                    ema_codebook_(cb.embed.data[0], cb.cluster_size[0], cb.embed_avg[0], self.eps)
                if layer_id + 1 < len(self.layers):
                    book = layer.codebook.detach()
                    index = residual_quantize(
                        residual, [book], 0.0, grad_mode="layer_ste", codebook_loss=False,
                        precision=self.precision, backend=self.backend).indices[:, 0]
                    residual = residual - book[index].float()
        if sync:
            state = []
            for layer in self.layers:
                cb = layer._codebook
                state += [cb.embed.data, cb.cluster_size, cb.embed_avg]
            distributed.broadcast_coalesced_(state, src=0)
        for layer in self.layers:
            layer._codebook.initted.fill_(True)
        self._needs_init = False

    @torch.no_grad()
    def _update_codebooks(self, rows: torch.Tensor, result, sync: bool, layers: Sequence[_Layer]) -> None:
        """EMA step of ``layers`` (the active ones) from the batch's statistics (ONE all-reduce when
        synced), then dead codes."""
        before = ([layer.codebook.detach().clone() for layer in layers]
                  if self.threshold_ema_dead_code > 0 else None)
        counts, sums = result.code_counts[:len(layers)], result.code_sums[:len(layers)]
        if sync:
            counts, sums = distributed.all_reduce_code_stats(counts, sums)
        if float(counts[0].sum()) == 0.0:
            return  # no unmasked finite row on any rank: leave the averages alone
        for layer, layer_counts, layer_sums in zip(layers, counts, sums):
            cb = layer._codebook
            ema_track_(cb.cluster_size[0], cb.embed_avg[0], layer_counts, layer_sums, self.decay)
            if self.ema_update and not self.shared_codebook:
                ema_codebook_(cb.embed.data[0], cb.cluster_size[0], cb.embed_avg[0], self.eps)
        if before is not None:
            self._expire_codes(rows, result.indices, before, sync, layers)

    @torch.no_grad()
    def _expire_codes(self, rows: torch.Tensor, indices: torch.Tensor,
                      before: List[torch.Tensor], sync: bool, layers: Sequence[_Layer]) -> None:
        """Re-seed codes whose ``cluster_size`` fell below ``threshold_ema_dead_code`` with rows of
        that layer's input residuals, drawn uniformly without replacement from the rows of all ranks
        (one ``all_gather`` when synced; identical on every rank). With fewer rows than dead codes, a
        random subset of the dead codes is re-seeded. Re-seeded codes get ``cluster_size =
        threshold`` and ``embed_avg = code * threshold`` (vector-quantize-pytorch's reset)."""
        threshold = self.threshold_ema_dead_code
        dead = [layer._codebook.cluster_size[0] < threshold for layer in layers]
        num_dead = [int(d.sum()) for d in dead]  # the same on every rank (synced averages)
        if sum(num_dead) == 0:
            return
        finite = indices[:, 0] >= 0
        residual = rows[finite].float()
        chosen = indices[finite]
        local = residual.shape[0]
        dim = residual.shape[1]
        last = max(l for l, n in enumerate(num_dead) if n)
        parts = []
        for layer_id in range(last + 1):
            wanted = num_dead[layer_id]
            if wanted:
                take = torch.randperm(local, device=residual.device)[:wanted]
                candidates = residual.new_zeros((wanted, dim))
                candidates[: take.numel()] = residual[take]
                parts.append(candidates.reshape(-1))
            if layer_id < last:
                residual = residual - before[layer_id][chosen[:, layer_id]].float()
        seed = int(torch.randint(0, 2**62, ()))
        header = torch.tensor([local, seed], dtype=torch.float64, device=residual.device)
        payload = torch.cat([header] + [p.double() for p in parts])
        gathered = distributed.all_gather_equal(payload) if sync else payload.unsqueeze(0)
        head = gathered[:, :2].cpu()
        rank_rows = [int(n) for n in head[:, 0].tolist()]
        rng = np.random.default_rng(int(head[0, 1]))
        offset = 2
        for layer_id, layer in enumerate(layers):
            wanted = num_dead[layer_id]
            if not wanted:
                continue
            block = gathered[:, offset: offset + wanted * dim].reshape(-1, wanted, dim)
            offset += wanted * dim
            total = sum(rank_rows)
            if total == 0:
                continue
            take = min(wanted, total)
            per_rank = rng.multivariate_hypergeometric(np.array(rank_rows, dtype=np.int64), take)
            vectors = torch.cat([block[r, : int(c)] for r, c in enumerate(per_rank)])
            slots = dead[layer_id].nonzero().squeeze(1)
            if take < wanted:
                keep = torch.from_numpy(np.sort(rng.permutation(wanted)[:take])).to(slots.device)
                slots = slots[keep]
            cb = layer._codebook
            vectors = vectors.to(cb.embed.dtype)
            cb.embed.data[0, slots] = vectors
            cb.cluster_size[0, slots] = threshold
            cb.embed_avg[0, slots] = vectors * threshold


    # --- codebook steps of the layer-by-layer path (compat_layers) ----------------------------

    @torch.no_grad()
    def _init_layer(self, book: _Codebook, vectors: torch.Tensor, size: int) -> None:
        """k-means init of one layer's codebook from its (transformed) input rows ``(m, d)``."""
        vectors = vectors[torch.isfinite(vectors).all(dim=1)]
        if vectors.shape[0] == 0:
            return
        if vectors.shape[0] < size:
            warnings.warn(f"k-means init got {vectors.shape[0]} vectors for {size} codes: "
                          "duplicates are sampled")
        means, bins = kmeans(vectors, size, self.kmeans_iters, precision=self.precision,
                             backend=self.backend, use_cosine_sim=self.use_cosine_sim)
        book.embed_avg[0].copy_(means * bins.unsqueeze(1))
        book.cluster_size[0].copy_(bins)
        ema_codebook_(book.embed.data[0], book.cluster_size[0], book.embed_avg[0], self.eps,
                      self.use_cosine_sim)
        book.initted.fill_(True)
        self._needs_init = not all(bool(layer._codebook.initted) for layer in self.layers)

    @torch.no_grad()
    def _layer_codebook_step(self, book: _Codebook, vectors: torch.Tensor, index: torch.Tensor,
                             size: int) -> None:
        """One layer's EMA step and dead-code reset from its (transformed) input rows ``(m, d)`` and
        their codes ``(m,)``; with a shared codebook the codes move once, at the end of the call."""
        if not (self.ema_update or self.threshold_ema_dead_code > 0):
            return
        counts = torch.bincount(index, minlength=size).float()
        sums = vectors.new_zeros((size, vectors.shape[1])).index_add_(0, index, vectors)
        if distributed.should_sync(self.sync_codebook):
            (counts,), (sums,) = distributed.all_reduce_code_stats([counts], [sums])
        ema_track_(book.cluster_size[0], book.embed_avg[0], counts, sums, self.decay)
        if self.ema_update and not self.shared_codebook:
            ema_codebook_(book.embed.data[0], book.cluster_size[0], book.embed_avg[0], self.eps,
                          self.use_cosine_sim)
        self._reseed_dead(book, vectors)

    @torch.no_grad()
    def _shared_codebook_finish(self, vectors: torch.Tensor) -> None:
        """Shared codebook, end of a training call: codes from the averages, then dead codes
        re-seeded from the inputs of all layers ``(m, d)``."""
        book = self.layers[0]._codebook
        if self.ema_update:
            ema_codebook_(book.embed.data[0], book.cluster_size[0], book.embed_avg[0], self.eps,
                          self.use_cosine_sim)
        self._reseed_dead(book, l2norm(vectors) if self.use_cosine_sim else vectors)

    @torch.no_grad()
    def _reseed_dead(self, book: _Codebook, vectors: torch.Tensor) -> None:
        """Codes with ``cluster_size < threshold`` become rows of ``vectors`` drawn without
        replacement (a random subset of the dead codes when rows are fewer); local to this rank."""
        threshold = self.threshold_ema_dead_code
        if threshold <= 0 or not self.training or vectors.shape[0] == 0:
            return
        dead = book.cluster_size[0] < threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        if self.use_cosine_sim:
            vectors = l2norm(vectors)
        slots = dead.nonzero().squeeze(1)
        rows = vectors.shape[0]
        if num_dead > rows:
            slots = slots[torch.randperm(num_dead, device=slots.device)[:rows]].sort().values
        picked = vectors[torch.randperm(rows, device=vectors.device)[:slots.numel()]].to(book.embed.dtype)
        book.embed.data[0, slots] = picked
        book.cluster_size[0, slots] = threshold
        book.embed_avg[0, slots] = picked * threshold

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_dim={self.codebook_dim}, codebook_sizes={self.codebook_sizes}, "
                f"decay={self.decay}, commitment_weight={self.commitment_weight}, "
                f"ema_update={self.ema_update}, learnable_codebook={self.learnable_codebook}, "
                f"kmeans_init={self.kmeans_init}, threshold_ema_dead_code={self.threshold_ema_dead_code}")


class _FusedPlan(NamedTuple):
    """One :class:`ResidualVQ`'s share of a fused call (see ``ResidualVQ._fused_plan``)."""
    rows: torch.Tensor                   # (n, d) quantizer inputs
    books: List[torch.Tensor]            # every layer's codebook (dropped layers detached)
    quantize_books: List[torch.Tensor]   # what the fused pass gets (detached unless learnable)
    options: Dict[str, Any]              # residual_quantize keyword arguments
    learnable: bool
    update: bool                         # EMA / dead-code step after the pass
    sync: bool
    active: int
    no_grad: bool                        # eval mode: the pass runs under torch.no_grad()


def _run_plans(plans: Sequence[_FusedPlan]):
    """Run the fused pass of one plan (``residual_quantize``) or of G groups' plans in one launch
    (``residual_quantize_grouped``; the plans of one ``GroupedResidualVQ`` share every option);
    returns one result per plan (``QuantizeResult``), or the single result for one plan."""
    options = dict(plans[0].options)
    cost = options.pop("commitment_cost")
    with torch.no_grad() if plans[0].no_grad else contextlib.nullcontext():
        if len(plans) == 1:
            return residual_quantize(plans[0].rows, plans[0].quantize_books, cost, **options)
        rows = torch.cat([p.rows for p in plans], dim=1)
        result = residual_quantize_grouped(rows, [p.quantize_books for p in plans], cost, **options)
    return [result.group(g) for g in range(len(plans))]


class GroupedResidualVQ(nn.Module):
    """vector-quantize-pytorch's ``GroupedResidualVQ``: ``groups`` independent :class:`ResidualVQ`
    (``rvqs.{g}``, same ``state_dict`` keys as theirs) over equal channel groups of ``dim``.

    ``forward(x (B, N, dim) or (B, dim), ...)`` returns ``(quantized`` like ``x``, ``indices (G, B,
    N, Q)``, ``commit_losses (G, Q)``)``; ``return_all_codes=True`` adds a tuple of the groups'
    ``(Q, B, N, d)`` codes. In training one seed is drawn (torch's global generator, as theirs) and
    every group uses it for its quantize-dropout cutoff.

    When every group takes the fused path (see ``docs/COMPAT.md``) and no group still needs its
    k-means init, all groups run in ONE fused pass (:func:`rqvae_fast.grouped.residual_quantize_grouped`:
    one forward and one input-gradient launch, the group a grid dimension); each group's EMA step
    and dead-code re-seeding follow, group by group. Otherwise (cosine codebooks, the layer-by-layer
    options, a first ``kmeans_init`` call) the groups run one after another, as theirs.
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs: Any):
        super().__init__()
        if accept_image_fmap:
            raise ValueError("accept_image_fmap=True is not supported by rqvae_fast.compat "
                             "(pass (B, N, dim) inputs)")
        if not isinstance(groups, int) or groups < 1 or not isinstance(dim, int) or dim % groups:
            raise ValueError(f"dim ({dim!r}) must be a positive int divisible by groups ({groups!r})")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = False
        self.rvqs = nn.ModuleList([ResidualVQ(dim=dim // groups, **kwargs) for _ in range(groups)])

    @property
    def codebooks(self) -> torch.Tensor:
        """``(G, Q, K, d)``."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return -1

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        """``indices (G, B, ..., Q)`` -> ``(G, Q, B, ..., d)``."""
        return torch.stack([rvq.get_codes_from_indices(part) for rvq, part in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices) -> torch.Tensor:
        """``indices (G, B, ..., Q)`` -> ``(B, ..., dim)``."""
        return torch.cat([rvq.get_output_from_indices(part) for rvq, part in zip(self.rvqs, indices)],
                         dim=-1)

    def forward(self, x: torch.Tensor, indices=None, return_all_codes: bool = False,
                sample_codebook_temp: Optional[float] = None, freeze_codebook: bool = False,
                mask: Optional[torch.Tensor] = None):
        if indices is not None and len(indices) > 0:
            raise ValueError("forward argument indices (their cross-entropy loss to given codes) is "
                             "not supported by rqvae_fast.compat.GroupedResidualVQ (leave it None)")
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.dim:
            raise ValueError(f"x must be a tensor whose last dim is {self.dim}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        seed = None
        if self.training:  # their get_maybe_sync_seed: drawn whether or not dropout is on
            draw = torch.randint(0, 10_000, (), device=x.device)
            if distributed.should_sync(None):
                torch.distributed.all_reduce(draw)
            seed = int(draw.item())
        chunks = x.chunk(self.groups, dim=-1)
        if self._one_pass(sample_codebook_temp):
            outs = self._forward_one_pass(chunks, mask, return_all_codes, freeze_codebook, seed)
        else:  # group by group, each with its own fused (or cosine, or layer-by-layer) pass
            outs = [rvq(chunk, mask=mask, return_all_codes=return_all_codes,
                        sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
                        rand_quantize_dropout_fixed_seed=seed)
                    for rvq, chunk in zip(self.rvqs, chunks)]
        quantized = torch.cat([o[0] for o in outs], dim=-1)
        all_indices = torch.stack([o[1] for o in outs])
        losses = torch.stack([o[2] for o in outs])
        if return_all_codes:
            return quantized, all_indices, losses, tuple(o[3] for o in outs)
        return quantized, all_indices, losses

    def _one_pass(self, sample_codebook_temp: Optional[float]) -> bool:
        """True when every group takes the plain fused path and none needs its k-means init (the
        init draws from torch's generator group by group, interleaved with the groups' dead-code
        re-seeds, so a first call runs in turn to draw as theirs)."""
        return all(rvq._path(None, sample_codebook_temp)[0] == "fused" and not rvq._needs_init
                   for rvq in self.rvqs)

    def _forward_one_pass(self, chunks, mask, return_all_codes: bool, freeze_codebook: bool,
                          seed: Optional[int]):
        """Every group's :meth:`ResidualVQ.forward` with the fused passes merged into one grouped
        call; returns each group's ``forward`` output."""
        prepared = []
        for rvq, chunk in zip(self.rvqs, chunks):
            rows, select, lead_shape = rvq._rows(chunk, mask)
            if rvq.check_finite:
                _check_finite(rows.detach(), "inputs (after project_in)")
            active = rvq._active_layers(rows.device, seed)
            plan = rvq._fused_plan(rows, active, freeze_codebook, distributed.should_sync(rvq.sync_codebook))
            prepared.append((select, lead_shape, plan))
        results = _run_plans([plan for _, _, plan in prepared])
        outs = []
        for rvq, chunk, (select, lead_shape, plan), result in zip(self.rvqs, chunks, prepared, results):
            quantized, all_indices, losses = rvq._fused_finish(plan, result)
            outs.append(rvq._output(chunk, mask, quantized, all_indices, losses, select, lead_shape,
                                    return_all_codes))
        return outs
