"""Kernel launches that ``torch.compile`` can trace."""
import torch


def traceable(kernel):
    """``kernel`` wrapped with ``torch.library.wrap_triton`` where torch has it (2.6+).

    Inside a ``triton_op`` being traced, the launch is recorded into the graph; in eager code, or
    for the interpreter's kernels, the wrapper returns ``kernel`` itself, so launching is unchanged.
    """
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None or not _is_compiled_kernel(kernel):
        return kernel
    return wrap(kernel)


def _is_compiled_kernel(kernel) -> bool:
    """False for the interpreter's kernels (``TRITON_INTERPRET=1``): torch 2.6's ``wrap_triton``
    refuses anything that is not a ``triton.jit`` / ``triton.autotune`` object; later torch
    releases pass them through."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return isinstance(kernel, (JITFunction, Autotuner))
