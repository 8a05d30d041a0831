"""Tile sizes shared by the forward and backward launchers."""
from __future__ import annotations

from typing import NamedTuple

import triton


class TileConfig(NamedTuple):
    block_m: int  # rows per program
    block_k: int  # codes per distance tile
    block_d: int  # padded embedding dim (power of two, >= 16 for tl.dot)
    num_warps: int


def tile_config(dim: int) -> TileConfig:
    """Pick tiles for an embedding dim: the whole padded row stays in registers, so wide rows get
    fewer rows per program to keep the ``(block_m, block_d)`` residual and the code tile on-chip."""
    block_d = max(16, triton.next_power_of_2(dim))
    if block_d <= 64:
        return TileConfig(block_m=64, block_k=64, block_d=block_d, num_warps=4)
    if block_d <= 128:
        return TileConfig(block_m=64, block_k=32, block_d=block_d, num_warps=4)
    if block_d <= 256:
        return TileConfig(block_m=32, block_k=32, block_d=block_d, num_warps=8)
    return TileConfig(block_m=16, block_k=16, block_d=block_d, num_warps=8)
