"""The Triton path registered with ``torch.library.triton_op`` (torch 2.6+; imported on first use).

``rqvae_fast::quantize_forward_triton`` and ``rqvae_fast::quantize_input_grad_triton`` run the same
bodies as the custom ops in :mod:`rqvae_fast.backend`, with ``triton_path=True``. The launchers
in ``rqvae_fast.kernels`` call their kernels through ``torch.library.wrap_triton``, so under
``torch.compile`` Inductor traces into each op: it sees the Triton launches (and the small torch ops
around them, which it can fuse) instead of one opaque call. ``torch.export`` keeps them as ops.
"""
from __future__ import annotations

# typing.Tuple, not Tuple, in op signatures: torch 2.6's infer_schema evaluates the string
# annotation in its own module, which imports typing but not Tuple.
import typing
from typing import List, Optional

import torch
from torch import Tensor

from .backend import forward_body, input_grad_body


@torch.library.triton_op("rqvae_fast::quantize_forward_triton", mutates_args=())
def quantize_forward_triton(x: Tensor, codes: Tensor, layer_sizes: List[int], routing: int,
                            precision: str, with_stats: bool, deterministic: bool, active: int = -1
                            ) -> typing.Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`rqvae_fast.backend.forward_body`."""
    return forward_body(x, codes, layer_sizes, routing, precision, True, with_stats, deterministic,
                        active)


@torch.library.triton_op("rqvae_fast::quantize_input_grad_triton", mutates_args=())
def quantize_input_grad_triton(grad_out: Optional[Tensor], x: Tensor, codes: Tensor,
                               layer_sizes: List[int], indices: Tensor, coef: Tensor,
                               commit_layers: int, grad_out_scale: float, active: int = -1) -> Tensor:
    """See :func:`rqvae_fast.backend.input_grad_body`."""
    return input_grad_body(grad_out, x, codes, layer_sizes, indices, coef, True, commit_layers,
                           grad_out_scale, active)
