"""Whether Triton can be used here, decided once without importing the kernels."""
from __future__ import annotations

import importlib.util
import os



def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # blocked import hooks, or sys.modules["triton"] = None
        return False


HAS_TRITON = _find_triton()


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
