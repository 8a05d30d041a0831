"""precision="exact": tf32 search + proven-bound rescans give the plain ieee kernel's indices, bit for bit.

Under the interpreter tf32 operands are truncated explicitly (``EMULATE``), so the fast scores
really differ from the exact ones and the bound is exercised.
"""
import pytest
import torch

from conftest import DEVICE, requires_triton
from helpers import run_step
from rqvae_fast import residual_quantize

pytestmark = requires_triton


def launch(x, books, precision, routing=1, with_stats=True):
    from rqvae_fast.backend import layer_starts, search_operands
    from rqvae_fast.kernels.quantize_forward import residual_quantize_forward

    codes = torch.cat(books).contiguous()
    sizes = [b.shape[0] for b in books]
    search, sq = search_operands(codes)
    return residual_quantize_forward(x.contiguous(), codes, search, sq, layer_starts(sizes, x), sizes,
                                     routing=routing, precision=precision, with_stats=with_stats,
                                     rescan_counts=True)


def assert_exact_matches_ieee(x, books, routing=1, with_stats=True):
    """Indices identical (100 %), and every other output bit-identical; returns the rescan counts."""
    exact = launch(x, books, "exact", routing, with_stats)
    plain = launch(x, books, "ieee", routing, with_stats)
    assert torch.equal(exact[1], plain[1]), (exact[1] != plain[1]).nonzero()[:5]
    for got, want in zip(exact[:5], plain[:5]):
        assert torch.equal(got, want) or torch.equal(got.isnan(), want.isnan()) and torch.equal(
            got.nan_to_num(), want.nan_to_num())
    assert (plain[5] == 0).all()  # the plain path never counts rescans
    return exact[5]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def near_tie_problem(n, dim, k, seed, scale=1.0, offset=0.0):
    """Codes in pairs one ulp apart in one coordinate; rows on the pairs' midpoints and on copies
    of codes, so many rows are (near-)equidistant from two codes."""
    g = gen(seed)
    base = torch.randn(k // 2, dim, generator=g)
    twin = base.clone()
    twin[:, 0] = torch.nextafter(twin[:, 0], torch.full_like(twin[:, 0], float("inf")))
    codes = torch.stack([base, twin], dim=1).reshape(-1, dim)
    far = base + 1e-3 * torch.randn(base.shape, generator=g)  # a second near code per pair
    codes = torch.cat([codes, far])[:k]
    pick = torch.randint(0, codes.shape[0], (n,), generator=g)
    mid = 0.5 * (codes[pick] + codes[(pick + 1) % codes.shape[0]])
    rows = torch.where(torch.rand(n, 1, generator=g) < 0.5, mid, codes[pick])
    return (rows * scale + offset).to(DEVICE), (codes * scale + offset).to(DEVICE)


@pytest.mark.parametrize("n,dim,sizes", [(130, 8, (33, 70)), (70, 32, (64, 17, 40)), (65, 48, (100,)),
                                         (40, 100, (33, 20))])
def test_random_data(n, dim, sizes):
    g = gen(n + dim)
    x = torch.randn(n, dim, generator=g).to(DEVICE)
    books = [(torch.randn(k, dim, generator=g) * 0.5 ** i).to(DEVICE) for i, k in enumerate(sizes)]
    assert_exact_matches_ieee(x, books)


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1e3, 0.0), (1.0, 100.0)])
@pytest.mark.parametrize("dim", [16, 40])
def test_adversarial_near_ties(dim, scale, offset):
    x, codes = near_tie_problem(150, dim, 96, seed=dim, scale=scale, offset=offset)
    counts = assert_exact_matches_ieee(x, [codes, codes[:50].flip(0).contiguous()])
    assert counts[0, 0] > 0  # the near ties were flagged and rescanned


def test_tf32_alone_differs_so_the_rescan_matters():
    """Without the rescan the (emulated) tf32 search picks other codes on this data."""
    x, codes = near_tie_problem(150, 40, 96, seed=3)
    fast = launch(x, [codes], "tf32")
    plain = launch(x, [codes], "ieee")
    assert not torch.equal(fast[1], plain[1])
    assert_exact_matches_ieee(x, [codes])


def test_duplicated_codes_take_the_lowest_index():
    g = gen(5)
    base = torch.randn(20, 24, generator=g)
    codes = torch.cat([base, base, base[:7]]).to(DEVICE)  # K = 47, every code repeated
    x = torch.cat([base[:10], torch.randn(60, 24, generator=g)]).to(DEVICE)
    counts = assert_exact_matches_ieee(x, [codes, codes.flip(0).contiguous()])
    assert counts[0, 0] >= 10  # exact duplicates tie: always rescanned
    assert (launch(x, [codes], "exact")[1][:10, 0] == torch.arange(10, device=DEVICE)).all()


@pytest.mark.parametrize("scale,offset", [(1e3, 0.0), (1.0, 100.0), (1e3, 100.0)])
def test_large_norms_and_offsets(scale, offset):
    g = gen(7)
    x = (torch.randn(70, 32, generator=g) * scale + offset).to(DEVICE)
    books = [(torch.randn(k, 32, generator=g) * scale + offset).to(DEVICE) for k in (48, 33)]
    assert_exact_matches_ieee(x, books)


@pytest.mark.parametrize("dim", [200, 768, 1000, 1024])
def test_wide_rows(dim):
    x, codes = near_tie_problem(5, dim, 40, seed=dim)
    g = gen(dim)
    x = torch.cat([x, torch.randn(3, dim, generator=g).to(DEVICE)])
    assert_exact_matches_ieee(x, [codes, torch.randn(20, dim, generator=g).to(DEVICE)])


@pytest.mark.parametrize("routing", [0, 2])
def test_routings_and_no_stats(routing):
    x, codes = near_tie_problem(70, 24, 40, seed=11)
    assert_exact_matches_ieee(x, [codes, codes[:30].contiguous()], routing=routing, with_stats=False)


def test_non_finite_rows_and_codes():
    x, codes = near_tie_problem(70, 24, 40, seed=12)
    x[3, 1] = float("nan")
    x[9, 0] = float("inf")
    codes[5, 2] = float("inf")
    codes[6] = codes[7]
    exact = launch(x, [codes], "exact")
    assert (exact[1][[3, 9], 0] == -1).all() and not (exact[1][:, 0] == 5).any()
    assert_exact_matches_ieee(x, [codes])


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_row(n):
    x, codes = near_tie_problem(max(n, 1), 24, 40, seed=13)
    assert_exact_matches_ieee(x[:n], [codes])


def test_public_api_exact_equals_ieee(poison):
    """Through ``residual_quantize``: indices, outputs, losses, statistics and gradients equal."""
    x, codes = near_tie_problem(70, 24, 40, seed=14)
    books = [codes, codes[:20].contiguous() * 0.5]
    steps = [run_step(residual_quantize, x, books, commitment_cost=0.25, backend="triton",
                      precision=p, compute_stats=True) for p in ("exact", "ieee")]
    a, b = steps[0].result, steps[1].result
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.layer_losses, b.layer_losses)
    for ca, cb in zip(a.code_counts + a.code_sums, b.code_counts + b.code_sums):
        assert torch.equal(ca, cb)
    assert torch.equal(steps[0].grad_x, steps[1].grad_x)
    for ga, gb in zip(steps[0].grad_books, steps[1].grad_books):
        assert torch.equal(ga, gb)
    torch_path = residual_quantize(x, books, backend="torch", precision="exact")
    assert torch.equal(torch_path.indices, residual_quantize(x, books, backend="torch", precision="ieee").indices)
