"""Grouped residual quantization (``residual_quantize_grouped``): G column groups in one forward and
one input-gradient launch on the Triton path. Checked against G separate ``residual_quantize``
calls on the column slices (same backend) and against the reference oracle (indices, outputs,
losses, statistics, input and codebook gradients), with poisoned outputs, N 0/1/odd, D not a power
of two (one chunk and several), per-layer codebook sizes, G 1/2/3 and quantize dropout."""
import pytest
import torch

from conftest import requires_triton
from rqvae_fast import residual_quantize, residual_quantize_grouped
from rqvae_fast.compat_reference import rotation_residual_quantize_reference
from rqvae_fast.grouped import GroupedQuantizeResult
from rqvae_fast.reference import residual_quantize_reference

ATOL = RTOL = 2e-5  # fp32, ieee search
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]
GRAD_MODES = ["seed", "full", "layer_ste", "rotation"]

# (N, d, G, per-layer sizes, active layers): N 0 and 1, odd N not a multiple of the 64-row tile,
# d 100 (several 16-column chunks: the scratch path), 20 and 8; G 1, 2, 3; quantize dropout.
CASES = [
    (0, 20, 2, (33, 20), None),
    (1, 8, 3, (33, 17), 1),
    (131, 20, 3, (33, 48, 20), 2),
    (70, 100, 2, (48, 33, 17), None),
    (67, 12, 1, (9, 5), 0),
]


def make_grouped(n, dim, groups, sizes, seed=0):
    """``x (n, G dim)`` and ``G`` lists of codebooks shrinking by 0.5 per layer (different per group)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, groups * dim, generator=gen)
    books = [[torch.randn(k, dim, generator=gen) * 0.5 ** layer for layer, k in enumerate(sizes)]
             for _ in range(groups)]
    return x, books


def separate_calls(fn, x, books, commitment_cost, **kwargs):
    """The oracle: ``fn`` (residual_quantize or a reference) on each group's column slice."""
    dim = books[0][0].shape[1]
    parts = [fn(x[..., g * dim:(g + 1) * dim], group, commitment_cost, **kwargs)
             for g, group in enumerate(books)]
    return GroupedQuantizeResult(
        quantized=torch.cat([p.quantized for p in parts], dim=-1),
        indices=torch.stack([p.indices for p in parts]),
        loss=sum(p.loss for p in parts),
        layer_losses=torch.stack([p.layer_losses for p in parts]),
        code_counts=tuple(p.code_counts for p in parts),
        code_sums=tuple(p.code_sums for p in parts))


def grouped_step(fn, x, books, commitment_cost=0.3, **kwargs):
    """Forward, then backward of ``<g, quantized> + sum w_gl loss_gl``; returns result, grads."""
    x = x.detach().clone().requires_grad_(True)
    books = [[b.detach().clone().requires_grad_(True) for b in group] for group in books]
    result = fn(x, books, commitment_cost, **kwargs)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(result.quantized.shape, generator=gen)
    weights = torch.rand(result.layer_losses.shape, generator=gen) + 0.5
    objective = (result.quantized * g).sum() + (result.layer_losses * weights).sum()
    if objective.requires_grad:
        objective.backward()
    grads = [[torch.zeros_like(b) if b.grad is None else b.grad for b in group] for group in books]
    return result, (torch.zeros_like(x) if x.grad is None else x.grad), grads


def assert_same(got, want, *, exact_values=False):
    (res, gx, gb), (ref, rgx, rgb) = got, want
    tol = dict(atol=0, rtol=0) if exact_values else dict(atol=ATOL, rtol=RTOL)
    assert torch.equal(res.indices, ref.indices), "indices differ"
    torch.testing.assert_close(res.quantized, ref.quantized, equal_nan=True, **tol)
    torch.testing.assert_close(res.layer_losses.detach(), ref.layer_losses.detach(), atol=ATOL, rtol=1e-4)
    if res.code_counts:
        for counts, sums, rcounts, rsums in zip(res.code_counts, res.code_sums, ref.code_counts, ref.code_sums):
            for a, b in zip(counts, rcounts):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
            for a, b in zip(sums, rsums):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, rgx, atol=ATOL, rtol=1e-4)
    for group, rgroup in zip(gb, rgb):
        for a, b in zip(group, rgroup):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("n,dim,groups,sizes,active", CASES)
def test_matches_separate_calls_and_the_reference(poison, backend, grad_mode, n, dim, groups, sizes, active):
    x, books = make_grouped(n, dim, groups, sizes, seed=n + dim + groups)
    kwargs = dict(grad_mode=grad_mode, backend=backend, precision="ieee", active_layers=active,
                  compute_stats=True)
    got = grouped_step(residual_quantize_grouped, x, books, **kwargs)
    res = got[0]
    num_active = len(sizes) if active is None else active
    assert res.quantized.shape == (n, groups * dim) and res.indices.shape == (groups, n, len(sizes))
    assert res.layer_losses.shape == (groups, len(sizes))
    assert torch.isfinite(res.quantized).all() and (res.indices[..., :num_active] >= 0).all()
    assert (res.indices[..., num_active:] == -1).all()
    assert torch.count_nonzero(res.layer_losses[:, num_active:].detach()) == 0
    assert torch.isfinite(got[1]).all()  # the poisoned gradient is written everywhere
    # G separate calls of residual_quantize on the column slices, same backend: the same values
    separate = grouped_step(lambda *a, **k: separate_calls(residual_quantize, *a, **k), x, books, **kwargs)
    assert_same(got, separate, exact_values=True)
    # the oracle
    if grad_mode == "rotation":
        if active is not None:
            return  # the rotation oracle has no quantize dropout (covered by the separate calls)
        ref = grouped_step(lambda *a, **k: separate_calls(rotation_residual_quantize_reference, *a, **k),
                           x, books)
        assert_same((res, got[1], got[2]), ref)
        return
    ref = grouped_step(lambda *a, **k: separate_calls(residual_quantize_reference, *a, **k), x, books,
                       grad_mode=grad_mode, active_layers=active)
    assert_same(got, ref)


@requires_triton
@pytest.mark.parametrize("precision", ["exact", "tf32", "bf16"])
def test_reduced_precision_searches_match_separate_calls(poison, precision):
    x, books = make_grouped(77, 24, 2, (40, 24), seed=5)
    kwargs = dict(backend="triton", precision=precision, grad_mode="layer_ste", compute_stats=True)
    got = grouped_step(residual_quantize_grouped, x, books, **kwargs)
    separate = grouped_step(lambda *a, **k: separate_calls(residual_quantize, *a, **k), x, books, **kwargs)
    assert_same(got, separate, exact_values=True)
    if precision == "exact":
        ref = residual_quantize_grouped(x, books, backend="torch", precision="ieee")
        assert torch.equal(got[0].indices, ref.indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_stay_in_their_group(poison, backend):
    x, books = make_grouped(70, 10, 3, (7, 5), seed=2)
    x[3, 12] = float("nan")   # group 1 only
    x[40, 29] = float("inf")  # group 2 only
    res = residual_quantize_grouped(x, books, backend=backend, compute_stats=True)
    ref = separate_calls(residual_quantize, x, books, 0.25, backend=backend, compute_stats=True)
    assert torch.equal(res.indices, ref.indices)
    assert (res.indices[1, 3] == -1).all() and (res.indices[2, 40] == -1).all()
    assert (res.indices[0] >= 0).all()
    assert torch.isnan(res.quantized[3, 10:20]).all() and torch.isfinite(res.quantized[3, :10]).all()
    torch.testing.assert_close(res.quantized, ref.quantized, atol=0, rtol=0, equal_nan=True)
    for counts, rcounts in zip(res.code_counts, ref.code_counts):
        for a, b in zip(counts, rcounts):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_codebooks_lead_dims_and_nothing_modified(backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 3 * 6, generator=gen)
    books = torch.randn(3, 2, 5, 6, generator=gen)
    x0, books0 = x.clone(), books.clone()
    res = residual_quantize_grouped(x, books, backend=backend)
    assert torch.equal(x, x0) and torch.equal(books, books0)
    assert res.quantized.shape == x.shape and res.indices.shape == (3, 2, 9, 2)
    lists = [[books[g, l] for l in range(2)] for g in range(3)]
    ref = separate_calls(residual_quantize, x, lists, 0.25, backend=backend)
    assert torch.equal(res.indices, ref.indices)
    part = res.group(1)
    assert torch.equal(part.indices, res.indices[1]) and torch.equal(part.quantized, res.quantized[..., 6:12])


def test_different_sizes_across_groups_fall_back_to_separate_calls():
    x, books = make_grouped(30, 6, 2, (5, 4), seed=4)
    books[1] = [torch.randn(7, 6), torch.randn(3, 6)]  # group 1 has other sizes
    res = residual_quantize_grouped(x, books, backend="torch", compute_stats=True)
    ref = separate_calls(residual_quantize, x, books, 0.25, backend="torch", compute_stats=True)
    assert torch.equal(res.indices, ref.indices) and torch.equal(res.quantized, ref.quantized)
    assert [c.shape[0] for c in res.code_counts[1]] == [7, 3]


@requires_triton
def test_deterministic_statistics_match_the_atomic_ones():
    x, books = make_grouped(90, 20, 2, (16, 8), seed=6)
    a = residual_quantize_grouped(x, books, backend="triton", compute_stats=True, deterministic=True)
    b = residual_quantize_grouped(x, books, backend="triton", compute_stats=True, deterministic=False)
    assert torch.equal(a.indices, b.indices)
    for ga, gb in zip(a.code_sums, b.code_sums):
        for sa, sb in zip(ga, gb):
            torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)


def test_bad_input_is_named():
    x, books = make_grouped(4, 6, 2, (3, 2))
    with pytest.raises(ValueError, match="expected groups"):
        residual_quantize_grouped(x[:, :10], books)
    with pytest.raises(ValueError, match="same number of codebooks"):
        residual_quantize_grouped(x, [books[0], books[1][:1]])
    with pytest.raises(ValueError, match=r"\(G, L, K, d\)"):
        residual_quantize_grouped(x, torch.randn(2, 3, 6))
    with pytest.raises(TypeError, match="sequence of"):
        residual_quantize_grouped(x, [torch.randn(3, 6), torch.randn(3, 6)])
    with pytest.raises(ValueError, match="active_layers"):
        residual_quantize_grouped(x, books, active_layers=3)
    with pytest.raises(ValueError, match="at least one group"):
        residual_quantize_grouped(x, [])
