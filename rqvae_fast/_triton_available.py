"""Whether Triton can be used here, decided once without importing the kernels."""
from __future__ import annotations

import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
