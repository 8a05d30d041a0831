"""The CPU worker pool of the PyTorch path: same outputs whatever the workers, thread settings left
alone, errors reach the caller; and the vectorized first-argmin equals ``argmin``."""
import threading

import pytest
import torch

from helpers import make_problem, run_step
from rqvae_fast import cpu_pool, residual_quantize, torch_backend
from rqvae_fast.backend import search_operands
from rqvae_fast.routing import FULL, LAYER_STE, SEED


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 rows, so small inputs still make many chunks for the pool."""
    monkeypatch.setattr(torch_backend, "SCORES_PER_CHUNK", 64 * 64)
    monkeypatch.setattr(torch_backend, "MIN_CHUNK_ROWS", 1)


def _poisoned_problem():
    x, books = make_problem(1001, 20, (33, 48, 20), seed=5)
    x[7, 3] = float("nan")
    x[500, 0] = float("inf")
    books[1][9] = books[1][2]  # an exact duplicate: ties go to the lowest index
    books[0][4, 1] = float("inf")  # a code that must never be chosen
    return x, books


@pytest.mark.parametrize("routing", [SEED, FULL, LAYER_STE])
def test_forward_and_input_grad_do_not_depend_on_the_workers(small_chunks, routing):
    x, books = _poisoned_problem()
    codes = torch.cat(books)
    sizes = [b.shape[0] for b in books]
    search, norms = search_operands(codes)
    coef = torch.tensor([0.5, 0.25, 0.125])
    grad_out = torch.randn_like(x)
    results = {}
    for workers in (1, 2, 3):
        with cpu_pool.use_workers(workers):
            fwd = torch_backend.residual_quantize_forward(
                x, codes, search, norms, sizes, routing=routing, precision="ieee", with_stats=True)
            grad = torch_backend.residual_quantize_input_grad(
                grad_out, x, codes, sizes, fwd[1], coef, commit_layers=3, grad_out_scale=1.0)
        results[workers] = (*fwd, grad)
    assert results[1][1][7].eq(-1).all() and results[1][1][500].eq(-1).all()
    assert not results[1][1][:, 0].eq(4).any()
    for workers in (2, 3):
        for a, b in zip(results[1], results[workers]):
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))  # bit-identical


def test_training_step_through_the_pool_matches_one_thread(small_chunks):
    x, books = make_problem(700, 24, (40, 40), seed=9)
    steps = {}
    for workers in (1, 2):
        with cpu_pool.use_workers(workers):
            steps[workers] = run_step(residual_quantize, x, books, commitment_cost=0.25,
                                      grad_mode="full", backend="torch", precision="ieee",
                                      compute_stats=True)
    one, two = steps[1], steps[2]
    assert torch.equal(one.result.indices, two.result.indices)
    assert torch.equal(one.result.loss, two.result.loss)
    assert torch.equal(one.grad_x, two.grad_x)
    for a, b in zip(one.grad_books, two.grad_books):
        assert torch.equal(a, b)


def test_pool_runs_under_the_callers_inference_mode(small_chunks):
    """Workers write into outputs the caller created: inference tensors under inference_mode."""
    x, books = make_problem(500, 12, (20, 30), seed=4)
    with cpu_pool.use_workers(1):
        expected = residual_quantize(x, books, backend="torch", precision="ieee")
    with cpu_pool.use_workers(2), torch.inference_mode():
        got = residual_quantize(x, books, backend="torch", precision="ieee")
    assert torch.equal(got.indices, expected.indices)
    assert torch.equal(got.quantized, expected.quantized)


def test_pool_leaves_the_callers_thread_settings_alone():
    before = torch.get_num_threads()
    pool = cpu_pool.get_pool(2)
    seen = []
    lock = threading.Lock()

    def record(_):
        with lock:
            seen.append((torch.get_num_threads(), cpu_pool.worker_count()))

    pool.run(6, record)
    assert torch.get_num_threads() == before
    share = max(1, before // 2)  # each worker gets an equal share of the caller's threads
    assert seen and all(threads == share and nested == 1 for threads, nested in seen)


def test_a_worker_error_reaches_the_caller_and_the_pool_still_works():
    pool = cpu_pool.get_pool(2)

    def fail_at_three(i):
        if i == 3:
            raise ValueError("chunk 3 failed")

    with pytest.raises(ValueError, match="chunk 3 failed"):
        pool.run(8, fail_at_three)
    done = []
    pool.run(5, done.append)
    assert sorted(done) == [0, 1, 2, 3, 4]


def test_worker_setting_is_validated(monkeypatch):
    monkeypatch.setenv(cpu_pool.WORKERS_ENV, "two")
    with pytest.raises(ValueError, match=cpu_pool.WORKERS_ENV):
        cpu_pool.worker_count()
    monkeypatch.setenv(cpu_pool.WORKERS_ENV, "1")
    assert cpu_pool.worker_count() == 1
    with pytest.raises(ValueError, match="count"):
        with cpu_pool.use_workers(0):
            pass


@pytest.mark.parametrize("numpy_argmin", [True, False], ids=["numpy", "torch-passes"])
@pytest.mark.parametrize("nonfinite", [True, False], ids=["nonfinite", "finite"])
@pytest.mark.parametrize("rows,codes", [(0, 5), (1, 1), (1, 7), (37, 33), (64, 256), (5, 1000)])
def test_first_argmin_is_argmin(rows, codes, nonfinite, numpy_argmin, monkeypatch):
    """Both implementations (NumPy's SIMD argmin, the vectorized passes) give min(dim=1)'s
    values and indices: exact ties to the lowest index, -0.0 == 0.0, and rows with NaN or
    infinite scores (the whole call then falls back to min(dim=1))."""
    monkeypatch.setattr(torch_backend, "NUMPY_ARGMIN", numpy_argmin)
    gen = torch.Generator().manual_seed(rows * 1000 + codes)
    scores = torch.randn(rows, codes, generator=gen).round(decimals=1)  # many exact ties
    if rows > 4 and codes > 3:
        scores[1, 2] = scores[1, 3] = scores[1].min() - 1  # tie at the minimum
        scores[0, :] = -0.0
        scores[0, 1] = 0.0
    if rows > 4 and codes > 3 and nonfinite:
        scores[2, 1] = float("nan")
        scores[3, :] = float("inf")
        scores[4, 3] = float("-inf")
    positions = torch.arange(codes, dtype=torch.float32)
    expected = scores.argmin(dim=1)
    assert torch.equal(torch_backend.first_argmin_(scores.clone(), positions), expected)
    values, indices = torch_backend.min_and_first_argmin_(scores.clone(), positions)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(values, scores.min(dim=1).values, rtol=0, atol=0, equal_nan=True)


def test_chunk_rows_shrink_with_the_width_but_stay_efficient():
    assert torch_backend.chunk_rows_for(32, 256) > torch_backend.chunk_rows_for(1024, 256)
    assert torch_backend.chunk_rows_for(4096, 4096) == torch_backend.MIN_CHUNK_ROWS
    assert torch_backend.chunk_rows_for(1, 1) == torch_backend.MAX_CHUNK_ROWS
