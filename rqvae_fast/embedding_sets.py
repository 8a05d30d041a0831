"""Real embedding sets that install from pip with their data inside (nothing downloaded at run time).

- :func:`read_safetensors` reads one tensor of a ``.safetensors`` file with NumPy alone.
- :func:`wordllama_embeddings` returns WordLlama's 32,000 x 256 token embeddings (``pip install
  wordllama``; only its weight file is read, WordLlama itself is never imported), L2-normalised.
"""
from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np

_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": None,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8}
WORDLLAMA_FILE = "weights/l2_supercat_256.safetensors"


def read_safetensors(path, name: Optional[str] = None) -> np.ndarray:
    """Tensor ``name`` (the only one if ``None``) of the ``.safetensors`` file at ``path``.

    The format: an 8-byte little-endian header length, a JSON header mapping names to ``dtype``,
    ``shape`` and ``data_offsets`` (relative to the end of the header), then the raw bytes.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header of {length} bytes)")
        header = json.loads(handle.read(length).decode("utf-8"))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        if name is None:
            if len(tensors) != 1:
                raise ValueError(f"{path} holds {len(tensors)} tensors ({', '.join(tensors)}); "
                                 "name one")
            name = next(iter(tensors))
        if name not in tensors:
            raise KeyError(f"{path} holds no tensor {name!r} (has {', '.join(tensors)})")
        info = tensors[name]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        handle.seek(8 + length + start)
        raw = handle.read(stop - start)
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    return array.reshape(info["shape"])


def wordllama_path() -> Path:
    """Path of WordLlama's 256-d weight file; ``ImportError`` if the package is not installed."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the WordLlama embedding set needs: pip install wordllama "
                          "(or pip install 'rqvae-fast[bench]')")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / WORDLLAMA_FILE
        if candidate.exists():
            return candidate
    raise ImportError(f"wordllama is installed but holds no {WORDLLAMA_FILE}")


def wordllama_embeddings(normalize: bool = True) -> np.ndarray:
    """WordLlama's token embeddings ``(32000, 256)`` float32, rows L2-normalised if ``normalize``
    (rows of norm 0 are kept as zeros)."""
    weights = read_safetensors(wordllama_path()).astype(np.float32)
    if normalize:
        norms = np.linalg.norm(weights, axis=1, keepdims=True)
        weights = weights / np.where(norms > 0, norms, 1.0)
    return np.ascontiguousarray(weights, dtype=np.float32)


__all__ = ["read_safetensors", "wordllama_embeddings", "wordllama_path"]
