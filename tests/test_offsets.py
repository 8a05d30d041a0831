"""Element offsets are computed in int64: N * D beyond 2^31 must not wrap."""
import pytest
import torch

from conftest import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("Triton is not installed on this platform", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rqvae_fast.kernels.tiles import row_tile  # noqa: E402


@triton.jit
def _probe_offsets(out_ptr, pid, N, D, stride, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, dims, row_in, dim_in, offsets, mask = row_tile(pid, N, D, stride, BLOCK_M, BLOCK_D)
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(out_ptr + local, tl.where(mask, offsets, -1))


@pytest.mark.parametrize("groups", [1, 3])  # a group's column slice: rows G * D apart
def test_row_tile_offsets_do_not_wrap_past_2_pow_31(groups):
    n, dim, block_m, block_d = 3_000_037, 1000, 16, 1024  # N * D = 3.0e9 > 2^31
    stride = groups * dim
    pid = (n - 1) // block_m  # the last program: its tile straddles the end of the matrix
    out = torch.empty(block_m * block_d, dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    _probe_offsets[(1,)](out, pid, n, dim, stride, BLOCK_M=block_m, BLOCK_D=block_d)
    got = out.cpu().view(block_m, block_d)
    rows = torch.arange(block_m, dtype=torch.int64) + pid * block_m
    expected = rows[:, None] * stride + torch.arange(block_d)[None, :]
    valid = (rows[:, None] < n) & (torch.arange(block_d)[None, :] < dim)
    assert expected[valid].max() > 2**31 and valid.any() and (~valid).any()
    assert torch.equal(got[valid], expected[valid])
    assert (got[~valid] == -1).all()
