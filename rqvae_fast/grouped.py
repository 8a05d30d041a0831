"""Grouped residual quantization: ``G`` independent residual quantizers over channel groups.

>>> out = residual_quantize_grouped(z, books, commitment_cost=0.25)   # z (B, N, G * d)
>>> out.quantized, out.indices, out.layer_losses                      # (B, N, G * d), (G, B, N, L), (G, L)

Group ``g`` quantizes columns ``[g d, (g + 1) d)`` of ``x`` with its own ``L`` codebooks, exactly as
:func:`rqvae_fast.functional.residual_quantize` would on that column slice. On the Triton path all
groups run in ONE forward launch and ONE input-gradient launch (the group is a grid dimension of
``kernels/quantize_forward.py``, ``kernels/quantize_backward.py`` and ``kernels/rotation_grad.py``);
the PyTorch path runs the groups one after another. Groups whose codebook sizes differ (layer by
layer) fall back to ``G`` calls of ``residual_quantize``.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import backend as _backend
from . import routing as _routing
from ._validation import check_active_layers, check_inputs
from ._validation import check_finite as _check_finite
from .autograd import finish_forward
from .functional import _deterministic_enabled, residual_quantize
from .precision import resolve_precision
from .result import QuantizeResult
from .rotation import rotation_input_grad


class GroupedQuantizeResult(NamedTuple):
    """Output of :func:`residual_quantize_grouped` (``G`` groups, ``L`` layers, group width ``d``).

    - ``quantized``: ``(*, G * d)`` in the input's dtype.
    - ``indices``: ``(G, *, L)`` int64 (``-1``: non-finite row, or a layer dropped by ``active_layers``).
    - ``loss``: 0-d fp32, the sum of ``layer_losses``.
    - ``layer_losses``: ``(G, L)`` fp32, differentiable; as ``QuantizeResult.layer_losses`` per group.
    - ``code_counts`` / ``code_sums``: per group a tuple of per-layer ``(K_l,)`` / ``(K_l, d)`` fp32
      (empty tuples without statistics).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    layer_losses: torch.Tensor
    code_counts: Tuple[Tuple[torch.Tensor, ...], ...]
    code_sums: Tuple[Tuple[torch.Tensor, ...], ...]

    def group(self, g: int) -> QuantizeResult:
        """Group ``g``'s part as a :class:`QuantizeResult` (views; ``quantized`` keeps its gradient)."""
        groups = self.indices.shape[0]
        width = self.quantized.shape[-1] // groups
        return QuantizeResult(
            quantized=self.quantized[..., g * width:(g + 1) * width], indices=self.indices[g],
            loss=self.layer_losses[g].sum(), layer_losses=self.layer_losses[g],
            code_counts=self.code_counts[g] if self.code_counts else (),
            code_sums=self.code_sums[g] if self.code_sums else ())


CodebooksArg = Union[torch.Tensor, Sequence[Sequence[torch.Tensor]]]


def residual_quantize_grouped(
    x: torch.Tensor,
    codebooks: CodebooksArg,
    commitment_cost: float = 0.25,
    *,
    grad_mode: str = "seed",
    codebook_loss: bool = True,
    precision: Optional[str] = None,
    backend: str = "auto",
    compute_stats: Optional[bool] = None,
    check_finite: bool = False,
    deterministic: Optional[bool] = None,
    active_layers: Optional[int] = None,
) -> GroupedQuantizeResult:
    """Quantize ``x (*, G * d)`` with ``G`` independent residual quantizers, one per column group.

    ``codebooks``: a ``(G, L, K, d)`` tensor, or ``G`` sequences of ``L`` codebooks ``(K_l, d)``
    (every group the same number of layers). The keyword arguments mean what they mean in
    :func:`rqvae_fast.functional.residual_quantize` and apply to every group; ``active_layers``
    (quantize dropout) is one cutoff for all groups. When every group has the same ``K_l`` at each
    layer (a ``(G, L, K, d)`` tensor always does), the Triton path runs all groups in one forward
    and one input-gradient launch; otherwise each group is a separate ``residual_quantize`` call.
    Nothing passed in is modified.
    """
    books = _group_codebooks(x, codebooks)
    num_layers = len(books[0])
    active = check_active_layers(active_layers, num_layers)
    groups = len(books)
    dim = books[0][0].shape[1]
    options = dict(grad_mode=grad_mode, codebook_loss=codebook_loss, precision=precision, backend=backend,
                   compute_stats=compute_stats, check_finite=check_finite, deterministic=deterministic,
                   active_layers=active_layers)
    sizes = [tuple(int(c.shape[0]) for c in group) for group in books]
    if len(set(sizes)) > 1:  # the kernel's groups share one layer layout: G calls instead
        return _separate_calls(x, books, commitment_cost, options)

    routing = _routing.routing_id(grad_mode)
    precision = resolve_precision(precision)
    triton_path = _backend.use_triton(backend, x.device)
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, groups * dim).contiguous()
    if check_finite:
        _check_finite(x2d, "inputs")
        for g, group in enumerate(books):
            for layer, codebook in enumerate(group):
                _check_finite(codebook.detach(), f"group {g} codebook {layer}")
    flat = [c for group in books for c in group]
    if len({c.dtype for c in flat}) > 1:
        books = [[c.float() for c in group] for group in books]
        flat = [c for group in books for c in group]
    codes = torch.stack([torch.cat(list(group), dim=0) for group in books]).contiguous()  # fresh

    needs_codebook_grad = codebook_loss and torch.is_grad_enabled() and any(c.requires_grad for c in flat)
    with_stats = needs_codebook_grad if compute_stats is None else (compute_stats or needs_codebook_grad)
    quantized, indices, layer_losses, counts, sums = GroupedResidualQuantizeFunction.apply(
        x2d, codes, sizes[0], float(commitment_cost), routing, codebook_loss, precision, triton_path,
        with_stats, _deterministic_enabled(deterministic), active)
    if with_stats:
        code_counts = tuple(tuple(c.split(list(sizes[0]))) for c in counts)
        code_sums = tuple(tuple(s.split(list(sizes[0]))) for s in sums)
    else:
        code_counts = code_sums = ()
    return GroupedQuantizeResult(
        quantized=quantized.reshape(x.shape),
        indices=indices.reshape(groups, *lead_shape, num_layers),
        loss=layer_losses.sum(),
        layer_losses=layer_losses,
        code_counts=code_counts,
        code_sums=code_sums,
    )


def _group_codebooks(x: torch.Tensor, codebooks: CodebooksArg) -> List[List[torch.Tensor]]:
    """``codebooks`` as ``G`` lists of ``L`` ``(K_l, d)`` tensors, checked against ``x (*, G * d)``."""
    if isinstance(codebooks, torch.Tensor):
        if codebooks.dim() != 4:
            raise ValueError(f"codebooks must be a (G, L, K, d) tensor or G sequences of (K_l, d) "
                             f"codebooks, got a tensor of shape {tuple(codebooks.shape)}")
        books = [list(group.unbind(0)) for group in codebooks.unbind(0)]
    else:
        if isinstance(codebooks, (str, bytes)) or not hasattr(codebooks, "__len__"):
            raise TypeError("codebooks must be a (G, L, K, d) tensor or G sequences of (K_l, d) codebooks")
        books = []
        for g, group in enumerate(codebooks):
            if isinstance(group, torch.Tensor) or not hasattr(group, "__len__"):
                raise TypeError(f"codebooks[{g}] must be a sequence of (K_l, d) codebooks "
                                f"(pass a (G, L, K, d) tensor for equal sizes)")
            books.append(list(group))
    if len(books) == 0:
        raise ValueError("at least one group is needed")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    layers = {len(group) for group in books}
    if len(layers) > 1:
        raise ValueError(f"every group needs the same number of codebooks, got {sorted(layers)}")
    first = books[0][0] if books[0] else None
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise ValueError("codebook 0 of group 0 must be a 2-D tensor (K, d)")
    dim = first.shape[1]
    if x.dim() >= 1 and x.shape[-1] != len(books) * dim:
        raise ValueError(f"inputs have last dim {x.shape[-1]}, expected groups ({len(books)}) x "
                         f"codebook dim ({dim}) = {len(books) * dim}")
    for group in books:
        check_inputs(x[..., :dim] if x.dim() >= 1 else x, group)
    return books


def _separate_calls(x: torch.Tensor, books: List[List[torch.Tensor]], commitment_cost: float,
                    options) -> GroupedQuantizeResult:
    """Fallback for groups with different codebook sizes: one ``residual_quantize`` per group."""
    dim = books[0][0].shape[1]
    results = [residual_quantize(x[..., g * dim:(g + 1) * dim], group, commitment_cost, **options)
               for g, group in enumerate(books)]
    return GroupedQuantizeResult(
        quantized=torch.cat([r.quantized for r in results], dim=-1),
        indices=torch.stack([r.indices for r in results]),
        loss=sum(r.loss for r in results),
        layer_losses=torch.stack([r.layer_losses for r in results]),
        code_counts=tuple(r.code_counts for r in results) if results[0].code_counts else (),
        code_sums=tuple(r.code_sums for r in results) if results[0].code_sums else ())


def _column(t: torch.Tensor, g: int, dim: int) -> torch.Tensor:
    return t[:, g * dim:(g + 1) * dim].contiguous()


class GroupedResidualQuantizeFunction(torch.autograd.Function):
    """``torch.autograd.Function`` of the grouped quantizer (see :mod:`rqvae_fast.autograd` for the
    per-group semantics). Forward returns ``quantized (N, G d)``, ``indices (G, N, L)``,
    ``layer_losses (G, L)``, ``counts (G, K_total)``, ``sums (G, K_total, d)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, layer_sizes: Tuple[int, ...],
                commitment_cost: float, routing_mode: int, codebook_loss: bool, precision: str,
                triton_path: bool, with_stats: bool, deterministic: bool, active: int):
        """x ``(N, G d)`` contiguous, codes ``(G, K_total, d)`` contiguous; ``0 <= active <= L``."""
        groups, _, dim = codes.shape
        fwd_routing = _routing.forward_routing(routing_mode)
        if triton_path:
            quantized, indices, sse, counts, sums = _triton_forward(
                x, codes, list(layer_sizes), fwd_routing, precision, with_stats, deterministic, active)
        else:  # the PyTorch path: one group after another
            parts = [_backend.fused_forward(_column(x, g, dim), codes[g], list(layer_sizes), fwd_routing,
                                            precision, False, with_stats, deterministic, active)
                     for g in range(groups)]
            quantized = torch.cat([p[0] for p in parts], dim=1)
            indices, sse, counts, sums = (torch.stack([p[i] for p in parts]) for i in range(1, 5))
        n = x.shape[0]
        layer_losses = finish_forward(ctx, (x, codes, indices, counts, sums), sse, n * dim,
                                      layer_sizes=layer_sizes, commitment_cost=commitment_cost,
                                      routing_mode=routing_mode, codebook_loss=codebook_loss,
                                      triton_path=triton_path, active=active)
        return quantized, indices, layer_losses, counts, sums

    @staticmethod
    def backward(ctx, grad_quantized, _grad_indices, grad_layer_losses, _grad_counts, _grad_sums):
        x, codes, indices, counts, sums = ctx.saved_tensors
        sizes = list(ctx.layer_sizes)
        groups, _, dim = codes.shape
        grad_losses = grad_layer_losses.float()
        grad_x = grad_codes = None
        if ctx.needs_input_grad[0]:
            coef = (grad_losses * (2.0 * ctx.commitment_cost * ctx.inv_count)).contiguous()
            grad_x = _input_grad(grad_quantized.contiguous(), x, codes, sizes, indices, coef, ctx)
        if ctx.needs_input_grad[1] and ctx.codebook_loss:
            if counts.shape[1] != codes.shape[1]:
                raise RuntimeError("codebook gradient needs the forward's statistics (with_stats=True)")
            per_layer = grad_losses * (2.0 * ctx.inv_count)  # (G, L)
            per_code = torch.cat([per_layer[:, l:l + 1].expand(groups, size) for l, size in enumerate(sizes)],
                                 dim=1)
            grad_codes = (per_code[..., None] * (counts[..., None] * codes.float() - sums)).to(codes.dtype)
        return grad_x, grad_codes, None, None, None, None, None, None, None, None, None


def _triton_forward(x, codes, sizes, fwd_routing, precision, with_stats, deterministic, active):
    """All groups in one launch of the fused forward kernel."""
    from .kernels.quantize_forward import residual_quantize_forward_grouped
    from .sorted_stats import sorted_code_statistics

    groups, k_total, dim = codes.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        search_codes, sq_norms = _backend.search_operands(codes.reshape(groups * k_total, dim))
        sorted_stats = with_stats and deterministic
        quantized, indices, sse, counts, sums = residual_quantize_forward_grouped(
            x, codes, search_codes.reshape(groups, k_total, dim), sq_norms.reshape(groups, k_total),
            _backend.layer_starts(sizes, x), sizes, routing=fwd_routing, precision=precision,
            with_stats=with_stats and not sorted_stats, active=active)
        if sorted_stats:  # deterministic statistics: the sort-based pass, group by group
            stats = [sorted_code_statistics(_column(x, g, dim), codes[g], sizes, indices[g], fwd_routing,
                                            active) for g in range(groups)]
            counts = torch.stack([s[0] for s in stats])
            sums = torch.stack([s[1] for s in stats])
    return quantized, indices, sse, counts, sums


def _input_grad(grad_out, x, codes, sizes, indices, coef, ctx) -> torch.Tensor:
    """``(N, G d)`` input gradient: one launch for all groups on the Triton path."""
    groups, _, dim = codes.shape
    mode, active = ctx.routing_mode, ctx.active
    with torch.autocast(device_type=x.device.type, enabled=False):
        if ctx.triton_path:
            starts = _backend.layer_starts(sizes, x)
            if mode == _routing.ROTATION:
                from .kernels.rotation_grad import rotation_input_grad_triton_grouped

                return rotation_input_grad_triton_grouped(grad_out, x, codes, starts, indices, coef,
                                                          active=active)
            from .kernels.quantize_backward import residual_quantize_input_grad_grouped

            return residual_quantize_input_grad_grouped(
                grad_out, x, codes, starts, indices, coef,
                commit_layers=_routing.commit_layers(mode, len(sizes)),
                grad_out_scale=_routing.grad_out_scale(mode, active), active=active)
        parts = []
        for g in range(groups):
            if mode == _routing.ROTATION:
                parts.append(rotation_input_grad(_column(grad_out, g, dim), _column(x, g, dim), codes[g],
                                                 sizes, indices[g], coef[g], active=active))
            else:
                parts.append(_backend.fused_input_grad(
                    _column(grad_out, g, dim), _column(x, g, dim), codes[g], sizes, indices[g].contiguous(),
                    coef[g].contiguous(), False, _routing.commit_layers(mode, len(sizes)),
                    _routing.grad_out_scale(mode, active), active))
        return torch.cat(parts, dim=1)
