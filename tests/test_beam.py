"""Beam-search encoding (rqvae_fast.beam): greedy parity, optimality, ties, chunking, bad input."""
import itertools

import numpy as np
import pytest
import torch

from rqvae_fast.beam import beam_encode, greedy_encode
from rqvae_fast.kmeans import RQKMeans
from rqvae_fast.reference import residual_quantize_reference


def books_for(dim, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(k, dim, generator=gen) * (0.6 ** layer) for layer, k in enumerate(sizes)]


def sq_error(x, codes, books):
    recon = sum(b[codes[:, l]] for l, b in enumerate(books))
    return ((x - recon) ** 2).sum(1)


def test_beam_one_is_bit_identical_to_greedy():
    x = torch.randn(203, 13)
    books = books_for(13, [7, 5, 11])
    greedy, g_err = greedy_encode(x, books)
    codes, err = beam_encode(x, books, 1)
    assert torch.equal(codes, greedy) and torch.equal(err, g_err)


def test_greedy_matches_the_reference_oracle():
    x = torch.randn(150, 10)
    books = books_for(10, [9, 6])
    codes, err = greedy_encode(x, books)
    ref_codes = residual_quantize_reference(x, books, 0.0).indices
    ref_err = sq_error(x, ref_codes, books)
    # fp32 ties aside, the same codes; always the same error within rounding
    assert (codes == ref_codes).float().mean() > 0.98
    assert torch.allclose(err, ref_err, rtol=1e-4, atol=1e-4)


def test_exhaustive_beam_finds_the_optimum():
    x = torch.randn(40, 6)
    books = books_for(6, [4, 3, 5])
    codes, err = beam_encode(x, books, 4 * 3 * 5)
    best = torch.full((40,), float("inf"))
    for path in itertools.product(range(4), range(3), range(5)):
        path_codes = torch.tensor(path).expand(40, 3)
        best = torch.minimum(best, sq_error(x, path_codes, books))
    assert torch.allclose(err, best, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sq_error(x, codes, books), err, rtol=1e-5, atol=1e-5)


def test_beam_four_beats_greedy_on_clustered_data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 24)).astype(np.float32)
    x = torch.from_numpy((centres[rng.integers(0, 20, 1200)] +
                          0.4 * rng.normal(size=(1200, 24))).astype(np.float32))
    model = RQKMeans(24, 3, [16, 16, 16]).fit(x, seed=0)
    books = [b.detach() for b in model.vq.codebooks]
    _, greedy_err = greedy_encode(x, books)
    codes, beam_err = beam_encode(x, books, 4)
    assert float(beam_err.sum()) < float(greedy_err.sum())
    assert int((beam_err < greedy_err - 1e-3).sum()) > 10  # a real gain on many rows
    assert torch.all(beam_err <= greedy_err + 1e-4)  # never worse per row (greedy path kept)
    assert torch.equal(model.get_semantic_ids(x, beam_size=4), codes)
    assert torch.equal(model.get_semantic_ids(x, batch_size=7, beam_size=4), codes)


def test_ties_go_to_the_lowest_beam_and_code():
    book0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 5.0]])  # codes 0 and 1 identical
    book1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.0]])
    x = torch.tensor([[1.0, 0.0]])
    for beam in (1, 2, 3, 9):
        codes, err = beam_encode(x, [book0, book1], beam)
        assert codes.tolist() == [[0, 0]], beam
        assert float(err) == 0.0


def test_chunking_and_shapes():
    x = torch.randn(101, 7)
    books = books_for(7, [6, 10])
    full, err = beam_encode(x, books, 3)
    small, err_small = beam_encode(x, books, 3, chunk_rows=4)
    assert torch.equal(full, small) and torch.allclose(err, err_small)
    assert full.dtype == torch.int64 and err.dtype == torch.float32
    empty, empty_err = beam_encode(x[:0], books, 3)
    assert empty.shape == (0, 2) and empty_err.shape == (0,)
    one, _ = beam_encode(x[:1], books, 3)
    assert torch.equal(one, full[:1])
    before = x.clone()
    beam_encode(x.double(), books, 2)
    assert torch.equal(x, before)


def test_bad_input():
    books = books_for(4, [3])
    with pytest.raises(ValueError, match="beam_size"):
        beam_encode(torch.randn(5, 4), books, 0)
    with pytest.raises(ValueError, match="beam_size"):
        beam_encode(torch.randn(5, 4), books, 2.0)
    with pytest.raises(ValueError, match="3-d but x is 4-d"):
        beam_encode(torch.randn(5, 4), [torch.randn(2, 3)], 2)
    with pytest.raises(ValueError, match="empty"):
        beam_encode(torch.randn(5, 4), [], 2)
    with pytest.raises(ValueError, match="2-D"):
        beam_encode(torch.randn(5), books, 2)
    with pytest.raises(ValueError, match="NaN"):
        beam_encode(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), books, 2)
