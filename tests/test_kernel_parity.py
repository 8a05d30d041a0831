"""Triton kernels (interpreter on CPU, real on GPU) versus the reference oracle."""
import pytest
import torch

from conftest import DEVICE, requires_triton
from helpers import check_parity, make_problem, run_step
from rqvae_fast import residual_quantize

pytestmark = requires_triton

# (N, D, codebook sizes per layer): N not a multiple of the 64-row block, non-power-of-two D,
# K not multiples of the code tile, different sizes per layer, L in {1, 2, 4, 8}.
CASES = [
    (1, 8, (33,)),
    (17, 20, (33, 48)),
    (1001, 32, (48, 33, 1000, 20)),
    (17, 100, (1000, 33)),
    (257, 100, (33, 48, 20, 64, 17, 33, 48, 20)),
    (1001, 8, (256, 256)),
]


@pytest.mark.parametrize("grad_mode", ["seed", "full", "layer_ste"])
@pytest.mark.parametrize("n,dim,sizes", CASES)
def test_matches_reference(poison, n, dim, sizes, grad_mode):
    x, books = make_problem(n, dim, sizes, seed=n + dim, device=DEVICE)
    step = run_step(residual_quantize, x, books, commitment_cost=0.3, grad_mode=grad_mode,
                    backend="triton", precision="ieee", compute_stats=True)
    check_parity(step, x, books, commitment_cost=0.3, grad_mode=grad_mode)


@pytest.mark.parametrize("grad_mode", ["seed", "full"])
@pytest.mark.parametrize("n,dim,sizes", [CASES[1], CASES[2]])
def test_commitment_only_loss_matches_reference(poison, n, dim, sizes, grad_mode):
    """EMA codebooks: the loss holds commitment terms only and codebooks get no gradient."""
    x, books = make_problem(n, dim, sizes, seed=3, device=DEVICE)
    step = run_step(residual_quantize, x, books, commitment_cost=0.25, grad_mode=grad_mode,
                    codebook_loss=False, backend="triton", precision="ieee", compute_stats=True)
    check_parity(step, x, books, commitment_cost=0.25, grad_mode=grad_mode, codebook_loss=False)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_picks_near_optimal_codes(poison, precision):
    x, books = make_problem(1001, 20, (48, 1000, 33), seed=5, device=DEVICE)
    step = run_step(residual_quantize, x, books, commitment_cost=0.25, backend="triton",
                    precision=precision, compute_stats=True)
    check_parity(step, x, books, commitment_cost=0.25, precision=precision)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_input_dtypes(poison, dtype):
    """Half inputs: fp32 accumulation, output in the input's dtype."""
    x, books = make_problem(65, 20, (33, 48), seed=7, device=DEVICE, dtype=dtype)
    step = run_step(residual_quantize, x, books, commitment_cost=0.25, backend="triton",
                    precision="ieee", compute_stats=True)
    assert step.result.quantized.dtype == dtype and step.grad_x.dtype == dtype
    check_parity(step, x, books, commitment_cost=0.25)


def test_leading_dims(poison):
    x, books = make_problem(0, 20, (33, 48), seed=8, device=DEVICE, lead_shape=(3, 5, 7))
    step = run_step(residual_quantize, x, books, commitment_cost=0.25, backend="triton",
                    precision="ieee", compute_stats=True)
    assert step.result.indices.shape == (3, 5, 7, 2)
    check_parity(step, x, books, commitment_cost=0.25)


def test_inference_without_statistics(poison):
    x, books = make_problem(100, 32, (64, 64), seed=9, device=DEVICE)
    with torch.no_grad():
        fast = residual_quantize(x, books, backend="triton", precision="ieee")
        slow = residual_quantize(x, books, backend="torch", precision="ieee")
    assert fast.code_counts == () and fast.code_sums == ()
    assert torch.equal(fast.indices, slow.indices)
    torch.testing.assert_close(fast.quantized, slow.quantized, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("grad_mode", ["seed", "full"])
def test_deterministic_statistics_match_atomic_ones(poison, grad_mode):
    """deterministic=True sums rows per code without float atomics: same values, same gradients."""
    x, books = make_problem(1001, 20, (48, 33, 100), seed=21, device=DEVICE)
    x[5, 3] = float("nan")  # a non-finite row stays out of the statistics on both paths
    common = dict(commitment_cost=0.25, grad_mode=grad_mode, backend="triton", precision="ieee",
                  compute_stats=True)
    atomic = run_step(residual_quantize, x, books, deterministic=False, **common)
    ordered = run_step(residual_quantize, x, books, deterministic=True, **common)
    assert torch.equal(atomic.result.indices, ordered.result.indices)
    for a, b in zip(atomic.result.code_counts, ordered.result.code_counts):
        assert torch.equal(a, b)
    for a, b in zip(atomic.result.code_sums, ordered.result.code_sums):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(atomic.grad_books, ordered.grad_books):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_deterministic_follows_torch_setting(monkeypatch):
    import rqvae_fast.backend as backend_module

    seen = []
    real = backend_module.sorted_code_statistics
    monkeypatch.setattr(backend_module, "sorted_code_statistics",
                        lambda *a: seen.append(True) or real(*a))
    x, books = make_problem(50, 8, (16,), seed=1, device=DEVICE)
    residual_quantize(x, books, backend="triton", compute_stats=True)
    assert not seen
    torch.use_deterministic_algorithms(True)
    try:
        residual_quantize(x, books, backend="triton", compute_stats=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen


@pytest.mark.parametrize("n,dim,sizes", [(33, 1024, (70, 20)), (20, 24, (65_536,))])
def test_wide_rows_and_huge_codebooks(poison, n, dim, sizes):
    """D up to 1024 and K up to 65,536: tiles that do not fit on-chip still give exact results."""
    x, books = make_problem(n, dim, sizes, seed=4, device=DEVICE)
    step = run_step(residual_quantize, x, books, commitment_cost=0.25, backend="triton",
                    precision="ieee", compute_stats=True)
    check_parity(step, x, books, commitment_cost=0.25)


# D chunks and their tails: one chunk (8, 24), several narrow chunks (48 = 3 x 16, 100 -> 7 x 16,
# 200 -> 13 x 16), several wide ones (96, 192, 768), and 1000 -> 63 x 16 (no power-of-two padding).
# N = 130 walks three row tiles on the interpreter's two persistent programs.
CHUNK_CASES = [
    (130, 8, (33, 70)),
    (130, 24, (70, 33)),
    (130, 48, (33, 65, 20)),
    (40, 96, (70,)),
    (40, 100, (33, 20)),
    (9, 192, (33, 20)),
    (9, 200, (20, 33)),
    (5, 768, (33, 20)),
    (3, 1000, (20, 17)),
]


@pytest.mark.parametrize("n,dim,sizes", CHUNK_CASES)
def test_d_chunks_match_reference(poison, n, dim, sizes):
    x, books = make_problem(n, dim, sizes, seed=dim, device=DEVICE)
    x[n // 2, dim - 1] = float("inf")  # a non-finite row in the last chunk
    grad_mode = ("seed", "full", "layer_ste")[dim % 3]
    step = run_step(residual_quantize, x, books, commitment_cost=0.3, grad_mode=grad_mode,
                    backend="triton", precision="ieee", compute_stats=True)
    assert (step.result.indices[n // 2] == -1).all()
    check_parity(step, x, books, commitment_cost=0.3, grad_mode=grad_mode)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("n,dim,sizes", [CHUNK_CASES[2], CHUNK_CASES[4], CHUNK_CASES[7]])
def test_d_chunks_reduced_precision(poison, n, dim, sizes, precision):
    x, books = make_problem(n, dim, sizes, seed=dim + 1, device=DEVICE)
    step = run_step(residual_quantize, x, books, commitment_cost=0.25, backend="triton",
                    precision=precision, compute_stats=True)
    check_parity(step, x, books, commitment_cost=0.25, precision=precision)
