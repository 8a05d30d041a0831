"""Index arithmetic shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def row_tile(pid, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``pid``'s ``(BLOCK_M, BLOCK_D)`` tile of a row-major ``(N, D)`` matrix.

    Returns ``rows (BLOCK_M,)`` int64, ``dims (BLOCK_D,)``, their in-range masks, the tile's element
    offsets ``(BLOCK_M, BLOCK_D)`` in int64 (``N * D`` may exceed 2^31) and the tile mask.
    """
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_in = rows < N
    dim_in = dims < D
    offsets = rows[:, None] * D + dims[None, :]
    return rows, dims, row_in, dim_in, offsets, row_in[:, None] & dim_in[None, :]
