"""Which arithmetic the distance matmul uses.

Three choices named as Triton names them, and one more:
- ``"ieee"``: exact fp32 products and sums.
- ``"tf32"``: TensorFloat-32 inputs, fp32 accumulation (near-ties can pick another code).
- ``"bf16"``: bfloat16 inputs, fp32 accumulation.
- ``"exact"``: the indices of ``"ieee"`` at tensor-core speed: the Triton path searches with tf32
  and rescans exactly the rows whose margin lies within the proven error bound of the tf32 score
  (see ``rqvae_fast.kernels.search``); the PyTorch path runs ``"ieee"``.

``None`` follows ``torch.get_float32_matmul_precision()``: "highest" -> ieee, "high" -> tf32,
"medium" -> bf16. Only the nearest-code search uses it; losses, residuals and statistics are fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

PRECISIONS = ("ieee", "tf32", "bf16", "exact")
_FROM_TORCH = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


def _torch_matmul_precision() -> str:
    return _FROM_TORCH.get(torch.get_float32_matmul_precision(), "ieee")


# torch.compile reads the global setting once at trace time instead of breaking the graph. This is
# exactly what torch.compiler.assume_constant_result does; the mark is set directly so that
# importing rqvae_fast does not import torch._dynamo (a second of start-up).
_torch_matmul_precision._dynamo_marked_constant = True


def resolve_precision(precision: Optional[str]) -> str:
    """Return one of ``PRECISIONS`` for a user setting (``None`` = follow torch)."""
    if precision is None:
        return _torch_matmul_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
    return precision
