"""The PyTorch path (CPU, no Triton) versus the reference oracle; its memory stays bounded."""
import pytest
import torch

from helpers import check_parity, make_problem, run_step
from rqvae_fast import residual_quantize, torch_backend
from test_kernel_parity import CASES


@pytest.mark.parametrize("codebook_loss", [True, False])
@pytest.mark.parametrize("grad_mode", ["seed", "full", "layer_ste"])
@pytest.mark.parametrize("n,dim,sizes", CASES)
def test_matches_reference(poison, n, dim, sizes, grad_mode, codebook_loss):
    x, books = make_problem(n, dim, sizes, seed=n + dim)
    step = run_step(residual_quantize, x, books, commitment_cost=0.3, grad_mode=grad_mode,
                    codebook_loss=codebook_loss, backend="torch", precision="ieee", compute_stats=True)
    check_parity(step, x, books, commitment_cost=0.3, grad_mode=grad_mode, codebook_loss=codebook_loss)


def test_bf16_precision(poison):
    x, books = make_problem(500, 20, (48, 256), seed=2)
    step = run_step(residual_quantize, x, books, commitment_cost=0.25, backend="torch",
                    precision="bf16", compute_stats=True)
    check_parity(step, x, books, commitment_cost=0.25, precision="bf16")


def test_scores_are_computed_in_bounded_chunks(monkeypatch):
    """No (N, K) score matrix: every matmul sees a bounded number of rows, whatever N is."""
    seen = []
    real_addmm = torch.addmm

    def spy(bias, a, b, **kw):
        seen.append(a.shape[0])
        return real_addmm(bias, a, b, **kw)

    monkeypatch.setattr(torch, "addmm", spy)
    monkeypatch.setattr(torch_backend, "SCORES_PER_CHUNK", 64 * 16)
    monkeypatch.setattr(torch_backend, "MIN_CHUNK_ROWS", 1)
    x, books = make_problem(1000, 8, (16, 16), seed=1)
    out = residual_quantize(x, books, backend="torch", precision="ieee")
    assert seen and max(seen) <= 64
    monkeypatch.setattr(torch, "addmm", real_addmm)
    ref = residual_quantize(x, books, backend="torch", precision="ieee")
    assert torch.equal(out.indices, ref.indices)


def test_first_copy_index_maps_exact_duplicates_to_the_lowest_index():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, 7, generator=gen)
    picks = torch.randint(0, 40, (300,), generator=gen)
    codebook = base[picks]  # many exact duplicates, in random order
    codebook[5, 2] = torch.nextafter(codebook[5, 2], torch.tensor(10.0))  # a near copy stays itself
    canonical = torch_backend.first_copy_index(codebook)
    for k in range(codebook.shape[0]):
        equal = (codebook == codebook[k]).all(dim=1).nonzero().flatten()
        assert canonical[k] == equal.min()
