"""Index arithmetic shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def chunk_tile(rows, dims, N, D, stride):
    """The ``(len(rows), len(dims))`` tile at ``rows x dims`` of an ``(N, D)`` matrix whose rows are
    ``stride`` elements apart (``D`` when it is contiguous; ``G * D`` for one group's column slice
    of a grouped ``(N, G * D)`` matrix whose pointer is already offset to the group's columns).

    Returns the rows' and dims' in-range masks, the tile's element offsets in int64 (``N * stride``
    may exceed 2^31) and the tile mask.
    """
    row_in = rows < N
    dim_in = dims < D
    offsets = rows.to(tl.int64)[:, None] * stride + dims[None, :]
    return row_in, dim_in, offsets, row_in[:, None] & dim_in[None, :]


@triton.jit
def row_tile(pid, N, D, stride, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``pid``'s ``(BLOCK_M, BLOCK_D)`` tile: ``rows (BLOCK_M,)`` int64, ``dims (BLOCK_D,)``,
    then :func:`chunk_tile`'s masks and offsets."""
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_in, dim_in, offsets, mask = chunk_tile(rows, dims, N, D, stride)
    return rows, dims, row_in, dim_in, offsets, mask


@triton.jit
def group_codebook_size(layer_start_ptr, NUM_LAYERS: tl.constexpr):
    """Codes per group (every group has the same layer sizes): ``layer_start[NUM_LAYERS]``, int64."""
    return tl.load(layer_start_ptr + NUM_LAYERS).to(tl.int64)


@triton.jit
def chosen_codes(codes_ptr, layer_start_ptr, idx_ptr, layer, rows, dims, row_in, dim_in, D,
                 NUM_LAYERS: tl.constexpr):
    """``(len(rows), len(dims))`` fp32: columns ``dims`` of the code each row chose at ``layer``,
    read through the saved layer-local indices ``idx (N, NUM_LAYERS)``; NaN for rows marked -1."""
    k_start = tl.load(layer_start_ptr + layer)
    local = tl.load(idx_ptr + rows * NUM_LAYERS + layer, mask=row_in, other=0)
    ok = local >= 0
    code = tl.load(codes_ptr + (local + k_start)[:, None] * D + dims[None, :],
                   mask=ok[:, None] & dim_in[None, :], other=0.0).to(tl.float32)
    return tl.where(ok[:, None], code, float("nan"))
