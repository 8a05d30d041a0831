"""grad_mode="rotation": the rotation trick's input gradient rebuilt from indices (rqvae_fast.rotation)
against autograd through the oracle (rqvae_fast.compat_reference), and vector-quantize-pytorch's own
rotate_to when it is installed."""
import warnings

import pytest
import torch

from rqvae_fast import ResidualVQ as SeedResidualVQ
from rqvae_fast.compat_reference import rotate_to, rotation_residual_quantize_reference
from rqvae_fast.functional import residual_quantize
from rqvae_fast.rotation import rotate_gradient, rotation_input_grad
from rqvae_fast._triton_available import HAS_TRITON
from tests.helpers import make_problem

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to as their_rotate_to
except Exception:  # noqa: BLE001 - not installed, or a dependency fails to import
    their_rotate_to = None

ATOL = RTOL = 2e-5  # fp32


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dim", [1, 3, 7, 64])
def test_rotated_gradient_equals_autograd_through_rotate_to(dim):
    gen = torch.Generator().manual_seed(dim)
    src = torch.randn(33, dim, generator=gen) * 3
    tgt = torch.randn(33, dim, generator=gen)
    grad = torch.randn(33, dim, generator=gen)
    leaf = src.clone().requires_grad_()
    out = rotate_to(leaf, tgt)
    close(out.detach(), tgt, atol=1e-5, rtol=1e-4)  # the value is the target (rounding only)
    (auto,) = torch.autograd.grad(out, leaf, grad)
    close(rotate_gradient(grad, src, tgt), auto)
    assert not torch.allclose(auto, grad)  # not the straight-through gradient


@pytest.mark.skipif(their_rotate_to is None, reason="vector-quantize-pytorch is not installed")
def test_oracle_rotate_to_is_theirs():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(2, 9, 6, generator=gen)
    tgt = torch.randn(2, 9, 6, generator=gen)
    grad = torch.randn(2, 9, 6, generator=gen)
    a, b = src.clone().requires_grad_(), src.clone().requires_grad_()
    out_ours, out_theirs = rotate_to(a, tgt), their_rotate_to(b, tgt)
    close(out_ours, out_theirs, atol=1e-6, rtol=1e-6)
    close(torch.autograd.grad(out_ours, a, grad)[0], torch.autograd.grad(out_theirs, b, grad)[0],
          atol=1e-6, rtol=1e-6)


def _step(fn, x, books, weights, grad, **kwargs):
    x = x.clone().requires_grad_()
    books = [b.clone().requires_grad_() for b in books]
    out = fn(x, books, 0.3, **kwargs)
    total = (out.quantized * grad).sum() + (out.layer_losses * weights).sum()
    grads = torch.autograd.grad(total, [x] + books, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("backend", ["torch", pytest.param(
    "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs triton"))])
@pytest.mark.parametrize("n", [0, 1, 37])
@pytest.mark.parametrize("codebook_loss", [True, False])
def test_residual_quantize_rotation_matches_oracle(backend, n, codebook_loss):
    x, books = make_problem(n, 7, [5, 9, 3], seed=n)
    gen = torch.Generator().manual_seed(11)
    grad, weights = torch.randn(n, 7, generator=gen), torch.rand(3, generator=gen)
    ours, g_ours = _step(residual_quantize, x, books, weights, grad, grad_mode="rotation",
                         codebook_loss=codebook_loss, backend=backend)
    ref, g_ref = _step(rotation_residual_quantize_reference, x, books, weights, grad,
                       codebook_loss=codebook_loss)
    assert torch.equal(ours.indices, ref.indices)
    close(ours.quantized, ref.quantized)
    close(ours.layer_losses, ref.layer_losses)
    for a, b in zip(g_ours, g_ref):
        if b is None:
            assert a is None or not a.any()
        else:
            close(a, b)


def test_input_gradient_does_not_depend_on_the_chunking():
    x, books = make_problem(50, 5, [4, 6], seed=2)
    codes = torch.cat(books)
    indices = residual_quantize(x, books, grad_mode="rotation", backend="torch").indices
    grad, coef = torch.randn(50, 5), torch.tensor([0.3, -0.2])
    whole = rotation_input_grad(grad, x, codes, [4, 6], indices, coef)
    pieces = rotation_input_grad(grad, x, codes, [4, 6], indices, coef, chunk_rows=7)
    close(whole, pieces, atol=0, rtol=0)


def test_seed_residual_vq_takes_grad_mode_rotation():
    torch.manual_seed(0)
    model = SeedResidualVQ(num_layers=2, num_embeddings_list=[8, 6], embedding_dim=5,
                           commitment_cost=0.25, grad_mode="rotation", backend="torch")
    x = torch.randn(20, 5, requires_grad=True)
    quantized, indices, loss = model(x)
    (quantized.square().sum() + loss).backward()
    books = [b.detach().clone().requires_grad_() for b in model.codebooks]
    xr = x.detach().clone().requires_grad_()
    ref = rotation_residual_quantize_reference(xr, books, 0.25)
    (ref.quantized.square().sum() + ref.loss).backward()
    assert torch.equal(indices, ref.indices)
    close(x.grad, xr.grad)


def test_unknown_grad_mode_names_the_choices():
    x, books = make_problem(4, 3, [2])
    with pytest.raises(ValueError, match="rotation"):
        residual_quantize(x, books, grad_mode="rotate")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("n, dim, sizes", [(0, 5, [3]), (1, 5, [3, 4]), (45, 7, [5, 9, 3]),
                                           (33, 130, [6, 2])])
@pytest.mark.parametrize("with_grad_out", [True, False])
def test_triton_kernel_matches_the_pytorch_pass(n, dim, sizes, with_grad_out, poison):
    from rqvae_fast.backend import layer_starts
    from rqvae_fast.kernels.rotation_grad import rotation_input_grad_triton

    x, books = make_problem(n, dim, sizes, seed=n + dim)
    codes = torch.cat(books).contiguous()
    indices = residual_quantize(x, books, grad_mode="rotation", backend="torch").indices.contiguous()
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(n, dim, generator=gen) if with_grad_out else None
    coef = torch.randn(len(sizes), generator=gen)
    expected = rotation_input_grad(grad, x, codes, sizes, indices, coef)
    got = rotation_input_grad_triton(grad, x, codes, layer_starts(sizes, x), indices, coef)
    assert got.shape == (n, dim) and torch.isfinite(got).all()  # poisoned outputs all written
    close(got, expected)
