"""What the columns of a codes file mean: which are layers, their codebook sizes, and whether the
last column is the disambiguation (dedup) position.

``fit``, ``encode`` and ``merge`` write ``summary.json`` beside ``codes.npy`` / ``ids.*`` with
``codebook_sizes`` and ``dedup_position``; :func:`find_layout` reads it, else the checkpoint that
summary names, else infers the layout from the codes and says what it assumed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np


@dataclass
class CodesLayout:
    """``codebook_sizes`` (one per layer column), ``dedup_position`` (the last column is the
    disambiguation position, not a layer) and ``source``: where this came from, in words."""

    codebook_sizes: List[int]
    dedup_position: bool
    source: str
    assumed: bool = False  # True when inferred from the codes, not read from metadata


def find_layout(codes_path, codes: np.ndarray) -> CodesLayout:
    """Layout of ``codes (N, P)`` int, read from ``summary.json`` beside ``codes_path`` (or the
    checkpoint it names), else inferred by :func:`infer_layout`."""
    codes_path = Path(codes_path)
    summary_path = codes_path.parent / "summary.json"
    summary = _read_json(summary_path)
    if summary is not None:
        dedup = summary.get("dedup_position")
        sizes = summary.get("codebook_sizes")
        if sizes is None and isinstance(summary.get("config"), dict):
            sizes = summary["config"].get("num_embeddings_list")
        if sizes is None and summary.get("checkpoint"):
            sizes = _checkpoint_sizes(Path(summary["checkpoint"]))
        if sizes is not None:
            sizes = [int(k) for k in sizes]
            if dedup is None:  # summaries written before the flag: dedup iff one column more
                dedup = codes.shape[1] == len(sizes) + 1
            if codes.shape[1] == len(sizes) + int(bool(dedup)):
                return CodesLayout(sizes, bool(dedup), str(summary_path))
    return infer_layout(codes)


def infer_layout(codes: np.ndarray) -> CodesLayout:
    """Guess without metadata: the last column is a dedup position when it equals the
    0, 1, 2, ... numbering of the other columns' rows; each layer's size is its largest code + 1."""
    from .semantic_ids import add_dedup_position

    dedup = False
    if codes.shape[1] >= 2 and codes.shape[0] > 0:
        renumbered = add_dedup_position(np.asarray(codes[:, :-1]))[:, -1]
        dedup = bool(np.array_equal(renumbered, np.asarray(codes[:, -1])))
    layers = codes[:, :-1] if dedup else codes
    sizes = [int(max(int(layers[:, i].max()), 0)) + 1 if layers.shape[0] else 0
             for i in range(layers.shape[1])]
    what = ("the last column is a dedup position (it numbers repeats of the other columns 0, 1, "
            "...)" if dedup else "every column is a layer")
    return CodesLayout(sizes, dedup, f"no summary.json beside the file: assumed {what}, and each "
                       "layer's codebook size = its largest code + 1", assumed=True)


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _checkpoint_sizes(path: Path) -> Optional[List[int]]:
    if not path.is_file():
        return None
    try:
        from .checkpoint import load_checkpoint

        return list(load_checkpoint(path)["config"]["num_embeddings_list"])
    except Exception:  # an unreadable checkpoint: fall back to inferring
        return None


__all__ = ["CodesLayout", "find_layout", "infer_layout"]
