"""cpu_gemm: the score matmul on torch's or NumPy's BLAS gives the same products; the choice
can be forced; NumPy's BLAS thread count is restored after a pass."""
import numpy as np
import pytest
import torch

from rqvae_fast import cpu_gemm
from rqvae_fast.assign import assign_and_sum, nearest


@pytest.fixture
def restore_choice():
    saved = cpu_gemm._choice
    yield
    cpu_gemm._choice = saved


@pytest.mark.parametrize("choice", ["torch", "numpy"])
@pytest.mark.parametrize("dim", [3, 8, 37])
def test_matmul_into_matches_torch_mm(choice, dim, restore_choice):
    cpu_gemm._choice = choice
    gen = torch.Generator().manual_seed(dim)
    rows = torch.randn(301, 2 * dim, generator=gen)[:, :dim]  # a strided view, as k-means passes
    codes_t = torch.randn(dim, 19, generator=gen).contiguous()
    out = cpu_gemm.matmul_into(rows, codes_t)
    assert out.shape == (301, 19) and out.dtype == torch.float32
    torch.testing.assert_close(out, rows @ codes_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("choice", ["torch", "numpy"])
def test_assignment_is_the_same_with_either_blas(choice, restore_choice):
    cpu_gemm._choice = choice
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(5000, 24, generator=gen), torch.randn(40, 24, generator=gen)
    brute = torch.cdist(x.double(), c.double()).argmin(dim=1)
    codes, dist = nearest(x, c)
    codes2, dist2, counts, sums = assign_and_sum(x, c)
    assert (codes == brute).float().mean() > 0.999 and torch.equal(codes, codes2)
    torch.testing.assert_close(sums, torch.zeros(40, 24).index_add_(0, codes, x), rtol=1e-5,
                               atol=1e-4)
    assert counts.sum() == 5000


def test_forced_choice_and_bad_value(monkeypatch, restore_choice):
    monkeypatch.setenv(cpu_gemm.GEMM_ENV, "torch")
    cpu_gemm._choice = None
    assert cpu_gemm.backend() == "torch"
    monkeypatch.setenv(cpu_gemm.GEMM_ENV, "mkl")
    cpu_gemm._choice = None
    with pytest.raises(ValueError, match=cpu_gemm.GEMM_ENV):
        cpu_gemm.backend()


def test_numpy_blas_threads_restored(restore_choice):
    # The libraries limited are those loaded when cpu_gemm first needed them: NumPy's own BLAS
    # (cpu_gemm imports NumPy first); a BLAS loaded later (SciPy's, say) is not ours to limit.
    cpu_gemm._choice = "numpy"
    controller = cpu_gemm._blas_controller()
    blas = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
    assert blas, "NumPy's BLAS is not visible to threadpoolctl"
    before = [lib.get_num_threads() for lib in blas]
    with cpu_gemm.single_threaded_blas():
        assert [lib.get_num_threads() for lib in blas] == [1] * len(blas)
        assert np.ones(3) @ np.ones(3) == 3.0
    assert [lib.get_num_threads() for lib in blas] == before


@pytest.mark.parametrize("choice", ["torch", "numpy"])
@pytest.mark.parametrize("rows", [5, cpu_gemm.ROWS_PER_BLOCK, 2 * cpu_gemm.ROWS_PER_BLOCK + 37])
def test_pooled_matmul_and_gram_match_torch(choice, rows, restore_choice):
    """The k-means' rotation and scatter matrix, run as row blocks on the pool's workers, give
    torch's products: row counts below, at and off a multiple of the block; a transposed
    (strided) right-hand side; the gram summed in block order is the same on every call."""
    cpu_gemm._choice = choice
    gen = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 2 * 21, generator=gen)[:, :21]  # strided, as the centred rows' views
    b = torch.randn(13, 21, generator=gen).t()
    product = cpu_gemm.matmul(a, b)
    assert product.shape == (rows, 13) and product.dtype == torch.float32
    torch.testing.assert_close(product, a @ b, rtol=1e-5, atol=1e-4)
    scatter = cpu_gemm.gram(a)
    assert scatter.shape == (21, 21)
    torch.testing.assert_close(scatter, a.t() @ a, rtol=1e-5, atol=1e-3 * rows ** 0.5)
    from rqvae_fast.cpu_pool import use_workers

    with use_workers(1):  # the blocks on this thread, in order: the very same sums
        assert torch.equal(scatter, cpu_gemm.gram(a))
        assert torch.equal(product, cpu_gemm.matmul(a, b))
