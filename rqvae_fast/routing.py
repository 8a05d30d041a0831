"""Gradient routings (``grad_mode``) and what each means for the fused passes.

With ``r_0 = x``, chosen code ``e_l``, stop-gradient ``sg`` and commitment cost ``beta``:

- ``"seed"``: the seed document's code. ``q_l = r_l + sg(e_l - r_l)``, ``r_{l+1} = r_l - q_l``,
  output ``sum_l q_l``. ``r_{l+1}`` carries no gradient, so d output / dx = I and only layer 0's
  commitment term reaches x.
- ``"full"``: standard RQ-VAE (Lee et al. 2022; TIGER). ``r_{l+1} = r_l - sg(e_l)``, output
  ``x + sg(sum_l e_l - x)``; d output / dx = I and every layer's commitment term reaches x.
- ``"layer_ste"``: vector-quantize-pytorch's ``ResidualVQ`` (``rotation_trick=False``).
  ``r_{l+1} = r_l - sg(e_l)``, output ``sum_l (r_l + sg(e_l - r_l))``; d output / dx = L * I and
  every layer's commitment term reaches x.
- ``"rotation"``: vector-quantize-pytorch's default (``rotation_trick=True``). As ``"layer_ste"``,
  but each layer's output ``q_l`` (value ``e_l``) passes its gradient to ``r_l`` through the rotation
  and rescaling that map ``r_l`` onto ``e_l`` (see :mod:`rqvae_fast.rotation`).
"""
from __future__ import annotations

SEED, FULL, LAYER_STE, ROTATION = 0, 1, 2, 3
GRAD_MODES = {"seed": SEED, "full": FULL, "layer_ste": LAYER_STE, "rotation": ROTATION}


def routing_id(grad_mode: str) -> int:
    """The kernels' integer code for a ``grad_mode`` name."""
    try:
        return GRAD_MODES[grad_mode]
    except KeyError:
        raise ValueError(f"grad_mode must be one of {tuple(GRAD_MODES)}, got {grad_mode!r}") from None


def commit_layers(routing: int, num_layers: int) -> int:
    """How many layers' commitment terms reach the input (at most; quantize dropout runs only the
    first ``active`` layers, so ``min(this, active)`` terms are summed)."""
    return 1 if routing == SEED else num_layers


def grad_out_scale(routing: int, num_active: int) -> float:
    """d output / d input, as a multiple of the identity, with ``num_active`` layers run: one
    straight-through term per active layer for ``layer_ste``; ``seed``'s output is constant when no
    layer runs; ``full``'s is ``x + sg(total - x)`` whatever the number of layers."""
    if routing == LAYER_STE:
        return float(num_active)
    if routing == SEED:
        return 1.0 if num_active > 0 else 0.0
    return 1.0


def forward_routing(routing: int) -> int:
    """The routing the forward kernels run: the rotation trick's values are ``layer_ste``'s."""
    return LAYER_STE if routing == ROTATION else routing
