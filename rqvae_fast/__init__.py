"""rqvae-fast: fused residual vector quantization for semantic IDs.

Quantizer: :class:`ResidualVQ`, :class:`VQEmbedding`, :class:`VQEmbeddingEMA` (drop-ins for the
seed document's modules), :func:`residual_quantize` (functional), the reference oracle in
:mod:`rqvae_fast.reference`, vector-quantize-pytorch's API in :mod:`rqvae_fast.compat`.
Pipeline: :class:`RQVAE`, :class:`Trainer`, :class:`RQKMeans`, :class:`SemanticIDIndex`.
Imports and runs without Triton (PyTorch path).
"""
from ._triton_available import HAS_TRITON
from .functional import ema_update_, residual_quantize
from .grouped import GroupedQuantizeResult, residual_quantize_grouped
from .kmeans import RQKMeans, fused_kmeans, residual_kmeans
from .model import RQVAE, RQDecoder, RQEncoder
from .modules import ResidualVQ, VQEmbedding, VQEmbeddingEMA
from .result import QuantizeResult
from .semantic_ids import SemanticIDIndex, add_dedup_position, token_strings
from .trainer import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "GroupedQuantizeResult",
    "HAS_TRITON",
    "QuantizeResult",
    "RQDecoder",
    "RQEncoder",
    "RQKMeans",
    "RQVAE",
    "ResidualVQ",
    "SemanticIDIndex",
    "TrainConfig",
    "Trainer",
    "VQEmbedding",
    "VQEmbeddingEMA",
    "add_dedup_position",
    "ema_update_",
    "fused_kmeans",
    "residual_kmeans",
    "residual_quantize",
    "residual_quantize_grouped",
    "token_strings",
    "__version__",
]
