"""The beam-search kernel (kernels/beam_search.py) against rqvae_fast.beam.beam_encode, the oracle.

Interpreter runs (conftest sets TRITON_INTERPRET=1), small sizes. Two kinds of data:

- small integers (rows and codes in -2..2): every score is an exact integer in fp32 whatever the
  summation order or the dot's precision (tf32/bf16 hold them exactly), so the kernel must return
  the oracle's indices and errors bit for bit -- with many exact ties, this checks the tie rule;
- Gaussian data: scores differ from the oracle's in the last bits (another summation order), so
  the errors must agree to fp32 tolerance and the indices on (nearly) every row.
"""
import pytest
import torch

from conftest import requires_triton
from rqvae_fast.beam import beam_encode, greedy_encode

pytestmark = requires_triton


@pytest.fixture(scope="module")
def kernel():
    from rqvae_fast.kernels import beam_search

    return beam_search


def integer_data(n, dim, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, dim), generator=gen).float()
    books = [torch.randint(-2, 3, (k, dim), generator=gen).float() for k in sizes]
    return x, books


def gaussian_data(n, dim, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    books = [torch.randn(k, dim, generator=gen) * 0.6 ** layer for layer, k in enumerate(sizes)]
    return x, books


def exact_error(x, idx, books):
    recon = sum(book[idx[:, layer]] for layer, book in enumerate(books))
    return (x - recon).pow(2).sum(dim=1)


# sizes differ per layer, include non-powers of two, K > BLOCK_K (16 / 32) and K = 1
LAYOUTS = [(13, [7]), (13, [5, 3, 7, 4]), (40, [33, 6]), (24, [1, 9, 17])]


@pytest.mark.parametrize("beam", [2, 4])
@pytest.mark.parametrize("dim, sizes", LAYOUTS)
def test_integer_data_bit_identical_to_the_oracle(kernel, beam, dim, sizes):
    x, books = integer_data(37, dim, sizes, seed=beam + dim)
    idx, err = kernel.beam_search(x, books, beam)
    ref_idx, ref_err = beam_encode(x, books, beam)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(err, ref_err)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_integer_data_reduced_precision_bit_identical(kernel, precision):
    x, books = integer_data(29, 40, [6, 11, 5], seed=3)  # 40 columns: several chunks on both paths
    idx, err = kernel.beam_search(x, books, 3, precision=precision)
    ref_idx, ref_err = beam_encode(x, books, 3)
    assert torch.equal(idx, ref_idx) and torch.equal(err, ref_err)


@pytest.mark.parametrize("beam, dim, sizes", [(2, 13, [7, 5, 11]), (3, 40, [20, 9, 6]),
                                              (4, 72, [33, 17, 5, 9]), (8, 24, [12, 10])])
def test_gaussian_data_matches_the_oracle(kernel, beam, dim, sizes):
    x, books = gaussian_data(45, dim, sizes, seed=beam)
    idx, err = kernel.beam_search(x, books, beam)
    ref_idx, ref_err = beam_encode(x, books, beam)
    assert torch.allclose(err, ref_err, rtol=1e-5, atol=1e-5)
    assert torch.allclose(err, exact_error(x, idx, books), rtol=1e-5, atol=1e-5)
    same = (idx == ref_idx).all(dim=1)
    assert same.float().mean() >= 0.95  # rows that differ can only be fp32 near-ties (same error)
    assert err.sum() < greedy_encode(x, books)[1].sum()  # per row a beam may lose (greedy's path pruned)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_returns_exact_errors_close_to_the_oracle(kernel, precision):
    x, books = gaussian_data(40, 24, [16, 16, 8], seed=5)
    idx, err = kernel.beam_search(x, books, 4, precision=precision)
    _, ref_err = beam_encode(x, books, 4)
    assert torch.allclose(err, exact_error(x, idx, books), rtol=1e-5, atol=1e-5)  # fp32, not rounded
    assert abs(err.mean() / ref_err.mean() - 1) < 0.02


def test_beam_larger_than_the_first_codebook(kernel):
    """B > K_0: fewer than B paths until the product of the sizes reaches B (as beam_encode);
    a beam wider than every path (8 > 2 x 3) searches them all: the exhaustive optimum."""
    x, books = gaussian_data(21, 10, [2, 3], seed=7)
    idx, err = kernel.beam_search(x, books, 8)
    ref_idx, ref_err = beam_encode(x, books, 8)
    assert torch.equal(idx, ref_idx) and torch.allclose(err, ref_err, rtol=1e-6)
    every = torch.stack([exact_error(x, torch.tensor([[a, b]]).expand(21, 2), books)
                         for a in range(2) for b in range(3)], dim=1)
    assert torch.allclose(err, every.min(dim=1).values, rtol=1e-6)
    x, books = integer_data(19, 13, [3, 5, 2], seed=8)
    idx, err = kernel.beam_search(x, books, 4)
    assert torch.equal(idx, beam_encode(x, books, 4)[0])


def test_beam_one_equals_greedy(kernel):
    x, books = integer_data(33, 13, [7, 5, 11], seed=9)
    assert torch.equal(kernel.beam_search(x, books, 1)[0], greedy_encode(x, books)[0])
    x, books = gaussian_data(33, 13, [7, 5, 11], seed=9)
    idx, err = kernel.beam_search(x, books, 1)
    g_idx, g_err = greedy_encode(x, books)
    assert torch.equal(idx, g_idx) and torch.allclose(err, g_err, rtol=1e-6)


@pytest.mark.parametrize("n", [0, 1])
def test_zero_and_one_rows(kernel, n):
    x, books = gaussian_data(n, 13, [5, 4], seed=n)
    idx, err = kernel.beam_search(x, books, 2)
    assert idx.shape == (n, 2) and idx.dtype == torch.int64 and err.shape == (n,) and err.dtype == torch.float32
    ref_idx, ref_err = beam_encode(x, books, 2)
    assert torch.equal(idx, ref_idx) and torch.allclose(err, ref_err)


def test_poisoned_outputs_and_scratch_are_overwritten(kernel, poison):
    """torch.empty returns NaN / -7777 here: outputs and both scratches start as garbage."""
    x, books = integer_data(23, 40, [6, 9], seed=11)
    idx, err = kernel.beam_search(x, books, 4)
    ref_idx, ref_err = beam_encode(x, books, 4)
    assert torch.equal(idx, ref_idx) and torch.equal(err, ref_err)


def test_non_finite_rows_get_minus_one_and_inputs_stay(kernel):
    x, books = gaussian_data(17, 13, [5, 6], seed=12)
    x[3, 2] = float("nan")
    x[8, 0] = float("inf")
    x_before, books_before = x.clone(), [b.clone() for b in books]
    idx, err = kernel.beam_search(x, books, 2)
    bad = torch.zeros(17, dtype=torch.bool)
    bad[[3, 8]] = True
    assert (idx[bad] == -1).all() and err[bad].isnan().all()
    ref_idx, ref_err = beam_encode(x[~bad], books, 2)
    assert torch.equal(idx[~bad], ref_idx) and torch.allclose(err[~bad], ref_err, rtol=1e-6)
    assert torch.allclose(x, x_before, rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(b, c) for b, c in zip(books, books_before))


def test_half_precision_input(kernel):
    x, books = integer_data(19, 13, [5, 7], seed=13)
    idx, err = kernel.beam_search(x.half(), books, 2)
    ref_idx, ref_err = beam_encode(x, books, 2)
    assert torch.equal(idx, ref_idx) and torch.equal(err, ref_err)


def test_bad_input_raises_naming_the_problem(kernel):
    x, books = gaussian_data(4, 6, [3, 3])
    for beam in (0, 9, True, 2.0):
        with pytest.raises(ValueError, match="beam_size"):
            kernel.beam_search(x, books, beam)
    with pytest.raises(ValueError, match="precision"):
        kernel.beam_search(x, books, 2, precision="fp16")
    with pytest.raises(ValueError, match="codebook 1 is 5-d"):
        kernel.beam_search(x, [books[0], torch.randn(3, 5)], 2)
    with pytest.raises(ValueError, match="empty"):
        kernel.beam_search(x, [], 2)
    with pytest.raises(ValueError, match="non-empty"):
        kernel.beam_search(x, [books[0], torch.randn(0, 6)], 2)
    with pytest.raises(ValueError, match="2-D float"):
        kernel.beam_search(x[0], books, 2)
    with pytest.raises(ValueError, match="2-D float"):
        kernel.beam_search(x.long(), books, 2)
    poisoned = [books[0], books[1].clone()]
    poisoned[1][0, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook 1 holds NaN/Inf"):
        kernel.beam_search(x, poisoned, 2)


def test_residual_quantize_takes_the_kernels_codes_when_told(monkeypatch):
    """The wiring: beam_path sends rows to the kernel where use_beam_kernel says so (CUDA in
    practice; forced here on CPU, under the interpreter), with dropped layers and NaN rows."""
    from rqvae_fast import beam_path
    from rqvae_fast.functional import residual_quantize
    from rqvae_fast.kernels import beam_search as kernel

    x, books = gaussian_data(26, 13, [7, 5, 6], seed=14)
    x[5, 0] = float("nan")
    calls = []
    real = kernel.beam_search

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    expected = residual_quantize(x, books, beam_size=4, active_layers=2).indices
    monkeypatch.setattr(beam_path, "use_beam_kernel", lambda *a, **k: True)
    monkeypatch.setattr(kernel, "beam_search", spy)
    got = residual_quantize(x, books, beam_size=4, active_layers=2).indices
    assert calls == [4]
    assert torch.equal(got, expected) and (got[:, 2] == -1).all() and (got[5] == -1).all()


def test_rqkmeans_beam_ids_take_the_kernels_codes_when_told(monkeypatch):
    """RQKMeans.get_semantic_ids(beam_size=) (and so `encode --beam-size`) goes through
    beam_path.encode_paths: the kernel where use_beam_kernel says so, NaN rows still -1."""
    from rqvae_fast import beam_path
    from rqvae_fast.kmeans import RQKMeans
    from rqvae_fast.kernels import beam_search as kernel

    x, books = gaussian_data(30, 12, [6, 5, 7], seed=21)
    model = RQKMeans(12, 3, [6, 5, 7])
    with torch.no_grad():
        for book, param in zip(books, model.vq.codebooks):
            param.copy_(book)
    x[3, 1] = float("nan")
    expected = model.get_semantic_ids(x, beam_size=4)
    calls = []
    real = kernel.beam_search

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(beam_path, "use_beam_kernel", lambda *a, **k: True)
    monkeypatch.setattr(kernel, "beam_search", spy)
    got = model.get_semantic_ids(x, beam_size=4)
    assert calls == [4]
    assert torch.equal(got, expected) and (got[3] == -1).all()


def test_dispatch_rule():
    from rqvae_fast import beam_path
    from rqvae_fast.kernels.config import MAX_BEAM

    assert beam_path.KERNEL_MAX_BEAM == MAX_BEAM
    cpu = torch.zeros(2, 3)
    assert not beam_path.use_beam_kernel(cpu, 4)  # the CPU path stays beam_encode
    assert beam_path.use_beam_kernel(cpu, 4, triton_path=True)
    assert not beam_path.use_beam_kernel(cpu, MAX_BEAM + 1, triton_path=True)
    assert not beam_path.use_beam_kernel(cpu, 4, triton_path=False)


def test_tiles_and_compile_rows():
    from rqvae_fast.kernels import config, report

    for beam in range(1, config.MAX_BEAM + 1):
        for precision in config.BEAM_PRECISIONS:
            for arch in config.ARCHS:
                for dim in (8, 40, 768, 1000):
                    tiles = config.beam_tiles(dim, precision, arch, beam)
                    pad = config.beam_constexprs(tiles, num_layers=2, beam_size=beam, precision=precision,
                                                 emulate=False)["BEAM_PAD"]
                    assert pad >= beam and pad & (pad - 1) == 0 and tiles.block_m * pad == 64
                    assert tiles.padded_dim >= dim and tiles.padded_dim % 16 == 0
    rows = report.beam_ci_rows(report.TARGETS)
    seen = {(r.arch, r.precision, r.constexprs["BEAM"]) for r in rows}
    assert {(a, p, b) for a in report.TARGETS for p in config.BEAM_PRECISIONS for b in (2, 3, 4, 8)} <= seen
    weighted = {(r.arch, r.precision, r.constexprs["BEAM"], r.dim) for r in rows if r.constexprs["WEIGHTED"]}
    assert {(a, p, 4, d) for a in report.TARGETS for p in config.BEAM_PRECISIONS for d in (32, 768)} <= weighted
    assert len(rows) == 60 and all(r.variant.endswith(",weighted") == r.constexprs["WEIGHTED"] for r in rows)
    assert all(r.reduced_precision == (r.precision != "ieee") for r in rows)
    with pytest.raises(ValueError, match="precision"):
        config.beam_tiles(32, "exact", "sm90", 4)


def test_torch_backend_keeps_the_beam_search_in_pytorch(monkeypatch):
    """backend="torch" tells beam_path not to use the kernel (on CUDA too); the Triton path lets
    the device decide (here the CPU: beam_encode)."""
    from rqvae_fast import beam_path
    from rqvae_fast.functional import residual_quantize

    x, books = gaussian_data(9, 6, [4, 3], seed=3)
    seen = []
    real = beam_path.use_beam_kernel
    monkeypatch.setattr(beam_path, "use_beam_kernel",
                        lambda rows, beam, triton_path=None: seen.append(triton_path) or real(rows, beam, triton_path))
    residual_quantize(x, books, beam_size=2, backend="torch")
    residual_quantize(x, books, beam_size=2, backend="triton")
    assert seen == [False, None]
