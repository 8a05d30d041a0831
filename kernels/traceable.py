"""Kernel launches that ``torch.compile`` can trace."""
import torch


def traceable(kernel):
    """``kernel`` wrapped with ``torch.library.wrap_triton`` where torch has it (2.6+).

    Inside a ``triton_op`` being traced, the launch is recorded into the graph; in eager code, or
    for the interpreter's kernels, the wrapper returns ``kernel`` itself, so launching is unchanged.
    """
    wrap = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap is None else wrap(kernel)
