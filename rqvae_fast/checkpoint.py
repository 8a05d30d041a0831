"""Checkpoints: written atomically, versioned, storing the model configuration next to its weights.

A checkpoint is a ``torch.save`` dict readable with ``weights_only=True``::

    {"format": "rqvae-fast", "format_version": 1, "config": {...model config...},
     "model_state": {...}, "best_model_state": {...} or None, "trainer": {...} or None,
     "metrics": {...}}

``model_state`` is the latest weights (what a resumed run continues from); ``best_model_state``
the weights of the best validation epoch (what :func:`load_model` returns by default).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .data import UserError, atomic_output

FORMAT = "rqvae-fast"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, from a newer version, or for another configuration."""


def cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A detached CPU copy of ``module.state_dict()``."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(path, model: nn.Module, *, best_model_state: Optional[dict] = None,
                    trainer: Optional[dict] = None, metrics: Optional[dict] = None) -> Path:
    """Write ``model`` (its ``config`` and weights) and the optional parts to ``path`` atomically:
    a temporary file in the same folder is fsynced, then renamed over ``path``."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": dict(model.config),
        "model_state": cpu_state(model),
        "best_model_state": best_model_state,
        "trainer": trainer,
        "metrics": metrics or {},
    }
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` (one line) if
    it is missing, truncated, not ours, or from a newer format version."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or not an rqvae-fast checkpoint "
                              f"({reason[:120]})") from None
    except Exception as exc:  # unpickling errors of foreign files come in many types
        raise CheckpointError(f"{path}: truncated or not an rqvae-fast checkpoint "
                              f"({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rqvae-fast checkpoint")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this "
                              f"rqvae-fast understands ({FORMAT_VERSION}); upgrade rqvae-fast")
    if not isinstance(payload.get("config"), dict) or "kind" not in payload["config"]:
        raise CheckpointError(f"{path}: checkpoint has no model configuration")
    return payload


def config_differences(stored: dict, wanted: dict) -> Dict[str, tuple]:
    """``{key: (stored, wanted)}`` for the keys whose values differ (missing counts as ``None``)."""
    keys = sorted(set(stored) | set(wanted))
    return {k: (stored.get(k), wanted.get(k)) for k in keys if stored.get(k) != wanted.get(k)}


def check_config(stored: dict, wanted: dict, path="checkpoint") -> None:
    """Raise :class:`CheckpointError` naming what differs between two model configurations."""
    diffs = config_differences(stored, wanted)
    if diffs:
        parts = ", ".join(f"{k}={a!r} (requested {b!r})" for k, (a, b) in list(diffs.items())[:4])
        raise CheckpointError(f"{path}: checkpoint is for another configuration: {parts}")


def build_model(config: dict, **options) -> nn.Module:
    """An untrained model of the kind and shape ``config`` describes.

    ``options`` are runtime choices passed to the constructor (``backend``, ``precision``)."""
    from .kmeans import RQKMeans
    from .model import RQVAE

    kinds = {"rqvae": RQVAE, "rqkmeans": RQKMeans}
    cls = kinds.get(config.get("kind"))
    if cls is None:
        raise CheckpointError(f"unknown model kind {config.get('kind')!r} in checkpoint")
    try:
        return cls.from_config(config, **options)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint configuration is incomplete ({exc})") from None


def load_model(path, *, which: str = "best", device=None, **options) -> nn.Module:
    """The model stored in checkpoint ``path`` in eval mode: ``which="best"`` (best validation
    weights when stored, else the latest) or ``"latest"``."""
    payload = load_checkpoint(path)
    model = build_model(payload["config"], **options)
    state = payload["model_state"]
    if which == "best" and payload.get("best_model_state") is not None:
        state = payload["best_model_state"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: weights do not match the stored configuration "
                              f"({first[:160]})") from None
    for layer in model.vq.vq_layers:
        layer.initialized_with_data = True
    if device is not None:
        model.to(device)
    return model.eval()


__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "build_model",
    "check_config",
    "config_differences",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]
