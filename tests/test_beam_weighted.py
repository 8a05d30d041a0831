"""vector-quantize-pytorch's beam ranking (``layer_weights`` / ``beam_weights``): a path scored by
``sum_l a_l ||r_l - e_l||^2``, the least score returned. The oracle (:func:`beam.beam_encode`)
against a brute force over every path, then the kernel (interpreter) against the oracle: integer
data bit for bit (power-of-two weights keep every score exact, ties included), Gaussian data to
fp32 tolerance; then ``residual_quantize(beam_weights=...)``."""
import itertools

import pytest
import torch

from conftest import requires_triton
from rqvae_fast.beam import beam_encode


def integer_data(n, dim, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, dim), generator=gen).float()
    return x, [torch.randint(-2, 3, (k, dim), generator=gen).float() for k in sizes]


def gaussian_data(n, dim, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    return x, [torch.randn(k, dim, generator=gen) * 0.6 ** layer for layer, k in enumerate(sizes)]


def path_scores(x, books, weights, idx):
    """``(N,)`` score ``sum_l a_l ||r_l - e_l||^2`` of the paths ``idx (N, L)``."""
    residual, score = x.double().clone(), torch.zeros(x.shape[0], dtype=torch.float64)
    for layer, book in enumerate(books):
        residual = residual - book.double()[idx[:, layer]]
        score += weights[layer] * residual.pow(2).sum(dim=1)
    return score


def exact_error(x, idx, books):
    recon = sum(book[idx[:, layer]] for layer, book in enumerate(books))
    return (x - recon).pow(2).sum(dim=1)


LAYOUTS = [(13, [7]), (13, [5, 3, 7, 4]), (40, [33, 6]), (24, [1, 9, 17])]
WEIGHTS = {1: [2.0], 2: [0.5, 4.0], 3: [1.0, 0.25, 2.0], 4: [1.0, 2.0, 0.5, 1.0]}


def test_oracle_beam_covering_every_path_is_the_brute_force_optimum():
    """B >= every layer's paths: nothing is pruned, so the answer is the least score over all paths."""
    x, books = gaussian_data(20, 6, [3, 4, 2], seed=1)
    weights = [1.0, 3.0, 0.5]
    idx, err = beam_encode(x, books, 12, layer_weights=weights)
    every = torch.tensor(list(itertools.product(range(3), range(4), range(2))))
    all_scores = torch.stack([path_scores(x, books, weights, p.expand(20, 3)) for p in every], dim=1)
    assert torch.allclose(path_scores(x, books, weights, idx), all_scores.min(dim=1).values,
                          rtol=1e-6, atol=1e-6)
    assert torch.allclose(err, exact_error(x, idx, books), rtol=1e-5, atol=1e-5)
    plain = beam_encode(x, books, 12)[0]  # unweighted: the least final error, another path in general
    assert not torch.equal(plain, idx)


def test_oracle_none_is_todays_ranking_and_beam_one_is_greedy():
    x, books = gaussian_data(31, 9, [6, 5, 7], seed=2)
    assert all(torch.equal(a, b) for a, b in zip(beam_encode(x, books, 3, layer_weights=None),
                                                 beam_encode(x, books, 3)))
    assert all(torch.equal(a, b) for a, b in zip(beam_encode(x, books, 1, layer_weights=[1, 2, 3]),
                                                 beam_encode(x, books, 1)))


def test_oracle_uniform_weights_scale_free():
    """Scaling every weight by a power of two scales every score exactly: same codes."""
    x, books = integer_data(40, 8, [5, 6, 4], seed=3)
    a = beam_encode(x, books, 3, layer_weights=[1.0, 2.0, 0.5])[0]
    b = beam_encode(x, books, 3, layer_weights=[4.0, 8.0, 2.0])[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, match", [([1.0, 2.0], "one weight per layer"), ([1.0, 0.0, 1.0], "> 0"),
                                        ([1.0, float("nan"), 1.0], "finite"), ("abc", "numbers")])
def test_bad_weights_raise(bad, match):
    x, books = gaussian_data(4, 5, [3, 3, 3])
    with pytest.raises(ValueError, match=match):
        beam_encode(x, books, 2, layer_weights=bad)


@pytest.fixture(scope="module")
def kernel():
    from rqvae_fast.kernels import beam_search

    return beam_search


@requires_triton
@pytest.mark.parametrize("beam", [2, 3])
@pytest.mark.parametrize("dim, sizes", LAYOUTS)
def test_kernel_integer_data_bit_identical_to_the_oracle(kernel, beam, dim, sizes):
    x, books = integer_data(37, dim, sizes, seed=beam + dim)
    weights = WEIGHTS[len(sizes)]
    idx, err = kernel.beam_search(x, books, beam, layer_weights=weights)
    ref_idx, ref_err = beam_encode(x, books, beam, layer_weights=weights)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(err, ref_err)


@requires_triton
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_kernel_integer_data_reduced_precision_bit_identical(kernel, precision):
    x, books = integer_data(29, 40, [6, 11, 5], seed=3)
    idx, err = kernel.beam_search(x, books, 3, precision=precision, layer_weights=[1.0, 0.5, 2.0])
    ref_idx, ref_err = beam_encode(x, books, 3, layer_weights=[1.0, 0.5, 2.0])
    assert torch.equal(idx, ref_idx) and torch.equal(err, ref_err)


@requires_triton
@pytest.mark.parametrize("beam, dim, sizes", [(2, 13, [7, 5, 11]), (3, 40, [20, 9, 6]),
                                              (4, 72, [33, 17, 5, 9]), (8, 24, [12, 10])])
def test_kernel_gaussian_data_matches_the_oracle(kernel, beam, dim, sizes):
    x, books = gaussian_data(45, dim, sizes, seed=beam)
    weights = [0.3 + 0.7 * layer for layer in range(len(sizes))]  # not powers of two
    idx, err = kernel.beam_search(x, books, beam, layer_weights=weights)
    ref_idx, ref_err = beam_encode(x, books, beam, layer_weights=weights)
    assert torch.allclose(err, exact_error(x, idx, books), rtol=1e-5, atol=1e-5)
    got, ref = path_scores(x, books, weights, idx), path_scores(x, books, weights, ref_idx)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)  # rows that differ: fp32 near-ties
    assert (idx == ref_idx).all(dim=1).float().mean() >= 0.95


@requires_triton
@pytest.mark.parametrize("n", [0, 1])
def test_kernel_zero_and_one_rows(kernel, n):
    x, books = gaussian_data(n, 7, [5, 3])
    idx, err = kernel.beam_search(x, books, 2, layer_weights=[1.0, 2.0])
    ref_idx, ref_err = beam_encode(x, books, 2, layer_weights=[1.0, 2.0])
    assert idx.shape == (n, 2) and torch.equal(idx, ref_idx)
    assert torch.allclose(err, ref_err, rtol=1e-6, atol=1e-6)


@requires_triton
def test_kernel_poisoned_outputs_and_non_finite_rows(kernel, monkeypatch):
    x, books = integer_data(19, 11, [4, 6], seed=5)
    x[3, 2] = float("inf")
    before = x.clone()
    real_empty = torch.empty

    def poisoned(*args, **kwargs):  # outputs and scratch start as garbage
        out = real_empty(*args, **kwargs)
        return out.fill_(-7 if not out.is_floating_point() else float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned)
    idx, err = kernel.beam_search(x, books, 3, layer_weights=[2.0, 1.0])
    monkeypatch.undo()
    ok = torch.ones(19, dtype=torch.bool)
    ok[3] = False
    ref_idx, ref_err = beam_encode(x[ok], books, 3, layer_weights=[2.0, 1.0])
    assert torch.equal(idx[ok], ref_idx) and torch.equal(err[ok], ref_err)
    assert (idx[3] == -1).all() and torch.isnan(err[3]) and torch.equal(x, before)


@requires_triton
def test_kernel_bad_weights_raise(kernel):
    x, books = gaussian_data(4, 5, [3, 3])
    with pytest.raises(ValueError, match="one weight per layer"):
        kernel.beam_search(x, books, 2, layer_weights=[1.0])


@requires_triton
def test_residual_quantize_beam_weights_take_the_kernels_codes_when_told(monkeypatch):
    """``residual_quantize(beam_weights=...)`` reaches the oracle (CPU) and the kernel (forced),
    with the weights of the active layers only, and the values follow the chosen codes."""
    from rqvae_fast import beam_path
    from rqvae_fast.functional import residual_quantize
    from rqvae_fast.kernels import beam_search as kernel_module

    x, books = gaussian_data(26, 13, [7, 5, 6], seed=14)
    x[5, 0] = float("nan")
    weights = [1.0, 3.0, 0.5]
    cpu = residual_quantize(x, books, beam_size=4, beam_weights=weights, active_layers=2)
    ok = torch.isfinite(x).all(dim=1)
    ref = beam_encode(x[ok], books[:2], 4, layer_weights=weights[:2])[0]
    assert torch.equal(cpu.indices[ok, :2], ref) and (cpu.indices[:, 2] == -1).all()
    assert (cpu.indices[5] == -1).all()
    assert not torch.equal(cpu.indices, residual_quantize(x, books, beam_size=4, active_layers=2).indices)
    recon = books[0][ref[:, 0]] + books[1][ref[:, 1]]
    assert torch.allclose(cpu.quantized[ok], recon, atol=1e-6)
    calls = []
    real = kernel_module.beam_search

    def spy(*args, **kwargs):
        calls.append(kwargs.get("layer_weights"))
        return real(*args, **kwargs)

    monkeypatch.setattr(beam_path, "use_beam_kernel", lambda *a, **k: True)
    monkeypatch.setattr(kernel_module, "beam_search", spy)
    got = residual_quantize(x, books, beam_size=4, beam_weights=weights, active_layers=2)
    assert calls == [(1.0, 3.0)]
    assert torch.equal(got.indices, cpu.indices)
    with pytest.raises(ValueError, match="one weight per layer"):
        residual_quantize(x, books, beam_size=2, beam_weights=[1.0, 2.0])
