"""``residual_quantize(..., beam_size=B)``: B = 1 is the greedy fused pass bit for bit; B > 1 takes
rqvae_fast.beam.beam_encode's codes (not fused) and returns their values, losses, statistics and
gradients, checked against the reference oracle given the same indices."""
import pytest
import torch

from conftest import DEVICE, requires_triton
from helpers import make_problem
from rqvae_fast import residual_quantize
from rqvae_fast.beam import beam_encode
from rqvae_fast.reference import residual_quantize_reference
from test_active_layers import run_step, _grad_or_zero

BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]
ATOL = RTOL = 2e-5


def clustered(n=600, dim=12, seed=0):
    """Rows around 12 centres and per-layer codebooks drawn from the rows' greedy residuals."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=gen) * 2
    x = centres[torch.randint(0, 12, (n,), generator=gen)] + 0.5 * torch.randn(n, dim, generator=gen)
    books, residual = [], x.clone()
    for size in (8, 8, 8):
        book = residual[torch.randperm(n, generator=gen)[:size]].clone()
        books.append(book)
        idx = torch.cdist(residual, book).argmin(dim=1)
        residual = residual - book[idx]
    return x.to(DEVICE), [b.to(DEVICE) for b in books]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["seed", "layer_ste", "rotation"])
def test_beam_one_is_the_greedy_pass_bit_for_bit(backend, grad_mode):
    x, books = make_problem(130, 20, (33, 48, 20), seed=2, device=DEVICE)
    common = dict(commitment_cost=0.3, grad_mode=grad_mode, backend=backend, precision="ieee",
                  compute_stats=True)
    greedy = run_step(residual_quantize, x, books, **common)
    beam = run_step(residual_quantize, x, books, beam_size=1, **common)
    for a, b in zip(greedy.result, beam.result):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, v)
    assert torch.equal(greedy.grad_x, beam.grad_x)
    assert all(torch.equal(u, v) for u, v in zip(greedy.grad_books, beam.grad_books))


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_four_lowers_the_reconstruction_error(backend):
    x, books = clustered()
    with torch.no_grad():
        greedy = residual_quantize(x, books, backend=backend, precision="ieee")
        beam = residual_quantize(x, books, backend=backend, precision="ieee", beam_size=4)
    greedy_err = (x - greedy.quantized).pow(2).sum(dim=1)
    beam_err = (x - beam.quantized).pow(2).sum(dim=1)
    assert float(beam_err.mean()) < float(greedy_err.mean())
    assert int((beam_err < greedy_err - 1e-3).sum()) > 10  # a real gain on many rows
    codes, err = beam_encode(x, books, 4)
    assert torch.equal(beam.indices, codes)
    torch.testing.assert_close(beam_err, err, atol=1e-4, rtol=1e-4)
    assert not torch.equal(beam.indices, greedy.indices)


# N 0 and 1, tails of the row tiles, odd D, different sizes per layer
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["seed", "full", "layer_ste"])
@pytest.mark.parametrize("n,dim,sizes,active", [(0, 8, (9, 7), None), (1, 8, (9, 7), None),
                                                 (130, 20, (33, 48, 20), None),
                                                 (70, 100, (17, 20, 9), 2)])
def test_beam_values_match_the_reference_for_its_codes(poison, backend, grad_mode, n, dim, sizes, active):
    x, books = make_problem(n, dim, sizes, seed=n + dim, device=DEVICE)
    if n > 2:
        x[n // 2, 0] = float("inf")  # a non-finite row: -1 everywhere and a NaN output
    step = run_step(residual_quantize, x, books, commitment_cost=0.3, grad_mode=grad_mode,
                    backend=backend, precision="ieee", compute_stats=True, beam_size=3,
                    active_layers=active)
    res = step.result
    num_active = len(sizes) if active is None else active
    finite = torch.isfinite(x).all(dim=1)
    codes, _ = beam_encode(torch.where(finite[:, None], x, 0.0), books[:num_active], 3)
    assert torch.equal(res.indices[finite, :num_active], codes[finite])
    assert (res.indices[~finite] == -1).all() and (res.indices[:, num_active:] == -1).all()
    ref = run_step(residual_quantize_reference, x, books, commitment_cost=0.3, grad_mode=grad_mode,
                   indices=res.indices.clamp(min=0), active_layers=active)
    assert torch.equal(res.indices, ref.result.indices)
    torch.testing.assert_close(res.quantized, ref.result.quantized, atol=ATOL, rtol=RTOL, equal_nan=True)
    torch.testing.assert_close(res.layer_losses.detach(), ref.result.layer_losses.detach(), atol=ATOL,
                               rtol=1e-4, equal_nan=True)
    for a, b in zip(res.code_counts, ref.result.code_counts):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(res.code_sums, ref.result.code_sums):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.grad_x, _grad_or_zero(ref.grad_x, x), atol=ATOL, rtol=1e-4,
                               equal_nan=True)
    for mine, theirs, book in zip(step.grad_books, ref.grad_books, books):
        torch.testing.assert_close(mine, _grad_or_zero(theirs, book), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_bad_beam_size(bad):
    x, books = make_problem(10, 8, (5, 5), seed=0)
    with pytest.raises(ValueError, match="beam_size"):
        residual_quantize(x, books, beam_size=bad)


def test_beam_needs_finite_codebooks():
    x, books = make_problem(10, 8, (5, 5), seed=0)
    books[1][2, 3] = float("nan")
    with pytest.raises(ValueError, match="codebook 1 holds NaN"):
        residual_quantize(x, books, beam_size=2)
