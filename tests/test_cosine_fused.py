"""The cosine epilogue inside the fused kernels (FusedCosineQuantizeFunction) against the chunked
PyTorch pass it replaces (CosineQuantizeFunction, the oracle): indices, outputs, losses,
statistics of the normalised rows and the input gradient (straight-through and rotation trick,
normalised and raw targets), poisoned outputs, N 0/1/odd, D not a power of two (one chunk and the
scratch path), per-layer sizes, quantize dropout."""
import pytest
import torch

from conftest import requires_triton
from rqvae_fast import residual_quantize
from rqvae_fast.compat_reference import l2norm
from rqvae_fast.cosine import CosineQuantizeFunction, FusedCosineQuantizeFunction

pytestmark = requires_triton
ATOL = RTOL = 2e-5

CASES = [(0, 20, (33, 20), None), (1, 8, (33, 17), 1), (131, 20, (33, 48, 20), 2),
         (70, 100, (48, 33, 17), None), (67, 12, (9, 5), 0)]


def _problem(n, dim, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, dim, generator=gen) * 2
    books = [l2norm(torch.randn(k, dim, generator=gen)) for k in sizes]
    return rows, books, torch.randn(n, dim, generator=gen), torch.rand(len(sizes), generator=gen) + 0.5


@pytest.mark.parametrize("rotation", [False, True])
@pytest.mark.parametrize("raw_target", [False, True])
@pytest.mark.parametrize("n,dim,sizes,active", CASES)
def test_fused_cosine_matches_the_chunked_pass(poison, n, dim, sizes, active, rotation, raw_target):
    rows, books, grad, weights = _problem(n, dim, sizes, seed=n + dim)
    num = len(sizes) if active is None else active
    codes = torch.cat(books)
    x = rows.clone().requires_grad_()
    q, idx, losses, counts, sums = FusedCosineQuantizeFunction.apply(
        x, codes, tuple(sizes), 0.7, rotation, raw_target, "ieee", True, num)
    ((q * grad).sum() + (losses * weights).sum()).backward()
    assert torch.isfinite(q).all() and torch.isfinite(x.grad).all() and torch.isfinite(sums).all()

    ref_idx = residual_quantize(rows, books, backend="torch", precision="ieee", active_layers=num).indices
    assert torch.equal(idx, ref_idx)
    assert (idx[:, num:] == -1).all() and (losses[num:] == 0).all()
    k_active = sum(sizes[:num])
    assert not counts[k_active:].any() and not sums[k_active:].any()
    if num == 0:  # no layer runs: zero output, losses and gradient
        assert not q.any() and not losses.any() and not x.grad.any()
        return
    xr = rows.clone().requires_grad_()
    rq, rlosses, rcounts, rsums = CosineQuantizeFunction.apply(
        xr, torch.cat(books[:num]), tuple(sizes[:num]), ref_idx[:, :num], 0.7,
        rotation, raw_target)
    total = (rq * grad).sum() + (rlosses * weights[:num]).sum()
    if total.requires_grad:
        total.backward()
    torch.testing.assert_close(q, rq, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(losses[:num], rlosses, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(counts[:k_active], rcounts, atol=0, rtol=0)
    torch.testing.assert_close(sums[:k_active], rsums, atol=1e-4, rtol=1e-4)
    ref_grad = torch.zeros_like(rows) if xr.grad is None else xr.grad
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-4, rtol=1e-4)


def test_zero_residual_takes_the_clamped_jacobian(poison):
    """A row equal to its code leaves a zero residual: |r| < eps takes the v / eps branch."""
    books = [l2norm(torch.randn(5, 6, generator=torch.Generator().manual_seed(0))) for _ in range(2)]
    rows = torch.cat([books[0][:1], torch.randn(3, 6)])  # row 0: layer 1's residual is 0
    grad = torch.randn(4, 6)
    x, xr = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    q, idx, losses, _, _ = FusedCosineQuantizeFunction.apply(x, torch.cat(books), (5, 5), 1.0, False, False,
                                                             "ieee", False, 2)
    ((q * grad).sum() + losses.sum()).backward()
    rq, rl, _, _ = CosineQuantizeFunction.apply(xr, torch.cat(books), (5, 5), idx, 1.0, False, False)
    ((rq * grad).sum() + rl.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-3, rtol=1e-4)
