"""A deterministic synthetic item catalogue with a known category hierarchy (the demo's data).

Each item's embedding is the sum of its category centre, its subcategory offset, its leaf
(sub-subcategory) offset, a direction shared by all items (real embedding models are anisotropic)
and a little item noise. Offsets shrink level by level, so a good residual quantizer should put
the category in the first ID position, the subcategory in the second, and so on. Nothing is shipped:
the same ``seed`` regenerates the same catalogue on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch

LEVEL_NAMES = ("category", "subcategory", "leaf")


@dataclass
class Catalogue:
    """``embeddings (N, D)`` float32 and ``labels (N, levels)`` int64 (global ids per level).

    ``labels[:, 0]`` is the category, ``labels[:, 1]`` the subcategory (unique across categories),
    ``labels[:, 2]`` the leaf; ``level_names`` names the columns.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    level_names: Tuple[str, ...]
    seed: int

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def make_catalogue(num_items: int = 50_000, dim: int = 768, branching: Sequence[int] = (16, 8, 4),
                   seed: int = 0, scales: Sequence[float] = (1.0, 0.55, 0.3),
                   noise: float = 0.2, shared: float = 1.0) -> Catalogue:
    """Generate ``num_items`` items of width ``dim`` in a ``branching`` hierarchy.

    ``scales[l]`` is the typical norm of level ``l``'s offsets, ``noise`` that of each item's own
    noise and ``shared`` that of the direction common to all items. Leaf sizes vary (Dirichlet
    popularity). Same arguments, same output (NumPy's PCG64 stream).
    """
    if num_items < 1 or dim < 1:
        raise ValueError(f"num_items and dim must be >= 1, got {num_items}, {dim}")
    if len(branching) != len(scales) or not branching or min(branching) < 1:
        raise ValueError(f"branching {tuple(branching)} and scales {tuple(scales)} must match, >= 1")
    rng = np.random.default_rng(seed)
    per_dim = 1.0 / np.sqrt(dim)

    # Centres of every node, level by level: a child's centre = parent's centre + its own offset.
    centres = np.zeros((1, dim), dtype=np.float32)
    centres += rng.standard_normal((1, dim), dtype=np.float32) * (shared * per_dim)
    for fan_out, scale in zip(branching, scales):
        offsets = rng.standard_normal((centres.shape[0] * fan_out, dim), dtype=np.float32)
        centres = np.repeat(centres, fan_out, axis=0) + offsets * np.float32(scale * per_dim)

    num_leaves = centres.shape[0]
    popularity = rng.dirichlet(np.full(num_leaves, 2.0))
    leaf = rng.choice(num_leaves, size=num_items, p=popularity)
    embeddings = centres[leaf]
    embeddings += rng.standard_normal((num_items, dim), dtype=np.float32) * np.float32(noise * per_dim)

    # Global label of each level: integer division of the leaf id by the fan-out below that level.
    labels = np.empty((num_items, len(branching)), dtype=np.int64)
    below = num_leaves
    for level, fan_out in enumerate(branching):
        below //= fan_out
        labels[:, level] = leaf // below
    names = tuple(LEVEL_NAMES[i] if i < len(LEVEL_NAMES) else f"level{i}"
                  for i in range(len(branching)))
    return Catalogue(torch.from_numpy(np.ascontiguousarray(embeddings)),
                     torch.from_numpy(labels), names, seed)
