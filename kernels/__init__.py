"""Triton kernels of rqvae-fast (installed as ``rqvae_fast.kernels``).

Importing this package needs Triton. Set ``TRITON_INTERPRET=1`` before the first import to run the
kernels on CPU tensors through Triton's interpreter (tests do).
"""
from .quantize_forward import residual_quantize_forward
from .quantize_backward import residual_quantize_input_grad

__all__ = ["residual_quantize_forward", "residual_quantize_input_grad"]
