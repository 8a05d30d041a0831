"""rqvae-fast: fused residual vector quantization for semantic IDs.

Public API: :class:`ResidualVQ`, :class:`VQEmbedding`, :class:`VQEmbeddingEMA` (drop-ins for the seed
document's modules), :func:`rqvae_fast.functional.residual_quantize`, and the reference oracle in
:mod:`rqvae_fast.reference`. Imports and runs without Triton (PyTorch path).
"""
from ._triton_available import HAS_TRITON
from .functional import ema_update_, residual_quantize
from .modules import ResidualVQ, VQEmbedding, VQEmbeddingEMA
from .result import QuantizeResult

__version__ = "0.1.0"

__all__ = [
    "HAS_TRITON",
    "QuantizeResult",
    "ResidualVQ",
    "VQEmbedding",
    "VQEmbeddingEMA",
    "ema_update_",
    "residual_quantize",
    "__version__",
]
