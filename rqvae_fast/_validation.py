"""Argument checks that turn bad input into a clear Python exception."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch


def check_inputs(x: torch.Tensor, codebooks: Sequence[torch.Tensor]) -> None:
    """Check ``x (*, D)`` against the ``(K_l, D)`` codebooks: types, shapes, dtypes, devices."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"inputs must have shape (N, D) or (*, D) with at least 2 dims, got shape {tuple(x.shape)}"
            " (use x.unsqueeze(0) for a single vector)")
    if not x.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor, got dtype {x.dtype}")
    if len(codebooks) == 0:
        raise ValueError("at least one codebook is needed")
    dim = x.shape[-1]
    for layer, codebook in enumerate(codebooks):
        if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2:
            shape = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
            raise ValueError(f"codebook {layer} must be a 2-D tensor (K, D), got {shape}")
        if codebook.shape[0] < 1:
            raise ValueError(f"codebook {layer} is empty (K = 0)")
        if codebook.shape[1] != dim:
            raise ValueError(
                f"inputs have last dim {dim} but codebook {layer} has dim {codebook.shape[1]}"
                f" (inputs shape {tuple(x.shape)}, codebook shape {tuple(codebook.shape)})")
        if not codebook.is_floating_point():
            raise TypeError(f"codebook {layer} must be floating point, got dtype {codebook.dtype}")
        if codebook.device != x.device:
            raise ValueError(
                f"inputs are on {x.device} but codebook {layer} is on {codebook.device}; "
                "move them to one device")


def check_active_layers(active_layers, num_layers: int) -> int:
    """``active_layers`` (quantize dropout) as an int in ``[0, num_layers]``; ``None`` means all."""
    if active_layers is None:
        return num_layers
    if isinstance(active_layers, bool) or not isinstance(active_layers, int):
        raise TypeError(f"active_layers must be None or an int, got {type(active_layers).__name__}")
    if not 0 <= active_layers <= num_layers:
        raise ValueError(f"active_layers must be in [0, {num_layers}] (the number of codebooks), "
                         f"got {active_layers}")
    return active_layers


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN/Inf (synchronizes the device). A sum first (NaN and Inf carry
    through it; 3 ms for 50,000 x 768 fp32 against 116 ms for ``isfinite(x).all()`` on 2 CPU
    cores); only a sum that overflowed from finite values is checked element by element."""
    if x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def check_finite(x2d: torch.Tensor, what: str = "inputs") -> None:
    """Raise naming the first row of ``x2d (N, D)`` that holds NaN or Inf (synchronizes the device)."""
    if all_finite(x2d):
        return
    bad = ~torch.isfinite(x2d).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise ValueError(
            f"{what} hold NaN/Inf in {rows.numel()} row(s); first bad row: {int(rows[0])}")


def float_matrix(data, what: str = "data") -> torch.Tensor:
    """``data`` as an ``(N, D)`` floating-point tensor: a tensor as is, a C-contiguous NumPy array
    or memmap without a copy (sharing its memory: the caller must not write to the result).

    Raises :class:`TypeError` naming the type, dtype or shape for anything else.
    """
    import numpy as np

    if isinstance(data, np.ndarray):
        if data.ndim != 2 or not np.issubdtype(data.dtype, np.floating):
            raise TypeError(f"{what} must be a 2-D float array (items x dims), got a NumPy "
                            f"{data.dtype} array of shape {data.shape}")
        array = np.ascontiguousarray(data)
        with warnings.catch_warnings():  # a read-only memmap: shared, never written to
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(array)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{what} must be a 2-D float torch.Tensor or NumPy array (items x dims), "
                        f"got {type(data).__module__}.{type(data).__name__}")
    if data.dim() != 2 or not data.is_floating_point():
        raise TypeError(f"{what} must be a 2-D float tensor (items x dims), got a {data.dtype} "
                        f"tensor of shape {tuple(data.shape)}")
    return data
