"""Quantize dropout inside the fused pass: ``residual_quantize(..., active_layers=a)`` runs only the
first ``a`` codebooks (a runtime kernel argument). Checked against the reference oracle (indices
including -1, outputs, losses, statistics, gradients), against the same call on the first ``a``
codebooks, and through ``compat.ResidualVQ``'s quantize dropout."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE, requires_triton
from helpers import Step, make_problem
from rqvae_fast import residual_quantize
from rqvae_fast.reference import residual_quantize_reference

ATOL = RTOL = 2e-5  # fp32, ieee search
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]

# N 0 and 1, N not a multiple of the 64-row tile, odd D (one chunk and several: 100 -> 7 x 16),
# different codebook sizes per layer.
CASES = [
    (0, 20, (33, 48, 20)),
    (1, 8, (33, 17)),
    (130, 20, (33, 48, 20)),
    (70, 100, (48, 33, 20, 17)),
]


def run_step(fn, x, books, *, loss_weights=None, **kwargs) -> Step:
    """helpers.run_step's forward + backward of ``<g, quantized> + sum_l w_l loss_l``, tolerating an
    objective without gradient (the reference's with no active layer)."""
    x = x.detach().clone().requires_grad_(True)
    books = [b.detach().clone().requires_grad_(True) for b in books]
    result = fn(x, books, **kwargs)
    g = torch.randn(result.quantized.shape, generator=torch.Generator().manual_seed(1))
    weights = torch.linspace(0.5, 2.0, len(books)) if loss_weights is None else loss_weights
    objective = ((result.quantized * g.to(x.device)).float().sum()
                 + (result.layer_losses * weights.to(x.device)).sum())
    if objective.requires_grad:
        objective.backward()
    return Step(result, x.grad, [b.grad for b in books])


def _grad_or_zero(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _check_against_reference(step, x, books, active, grad_mode, commitment_cost, codebook_loss=True):
    num_layers = len(books)
    res = step.result
    ref = run_step(residual_quantize_reference, x, books, commitment_cost=commitment_cost,
                   grad_mode=grad_mode, codebook_loss=codebook_loss, active_layers=active)
    assert torch.equal(res.indices, ref.result.indices), "indices differ from the reference"
    assert (res.indices[..., active:] == -1).all()
    torch.testing.assert_close(res.quantized, ref.result.quantized, atol=ATOL, rtol=RTOL, equal_nan=True)
    torch.testing.assert_close(res.layer_losses.detach(), ref.result.layer_losses.detach(), atol=ATOL,
                               rtol=1e-4, equal_nan=True)
    assert torch.count_nonzero(res.layer_losses[active:].detach()) == 0
    for layer in range(num_layers):
        torch.testing.assert_close(res.code_counts[layer], ref.result.code_counts[layer], atol=0, rtol=0)
        torch.testing.assert_close(res.code_sums[layer], ref.result.code_sums[layer], atol=1e-4, rtol=1e-4)
        if layer >= active:
            assert torch.count_nonzero(res.code_counts[layer]) == 0
            assert torch.count_nonzero(res.code_sums[layer]) == 0
    torch.testing.assert_close(step.grad_x, _grad_or_zero(ref.grad_x, x), atol=ATOL, rtol=1e-4,
                               equal_nan=True)
    for layer, (mine, theirs) in enumerate(zip(step.grad_books, ref.grad_books)):
        if not codebook_loss:
            assert mine is None or torch.count_nonzero(mine) == 0
            continue
        torch.testing.assert_close(mine, _grad_or_zero(theirs, books[layer]), atol=1e-5, rtol=1e-4)
        if layer >= active:
            assert torch.count_nonzero(mine) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["seed", "full", "layer_ste"])
@pytest.mark.parametrize("n,dim,sizes", CASES)
def test_matches_reference(poison, backend, n, dim, sizes, grad_mode):
    x, books = make_problem(n, dim, sizes, seed=n + dim, device=DEVICE)
    if n > 1:
        x[n // 2, dim - 1] = float("nan")  # a non-finite row: -1 in every layer, NaN output
    for active in (0, 1, len(sizes) - 1, len(sizes)):
        step = run_step(residual_quantize, x, books, commitment_cost=0.3, grad_mode=grad_mode,
                        backend=backend, precision="ieee", compute_stats=True, active_layers=active)
        _check_against_reference(step, x, books, active, grad_mode, 0.3)
        if n > 1:
            assert (step.result.indices[n // 2] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_commitment_only_loss(poison, backend):
    """EMA codebooks (codebook_loss=False) with dropped layers: no codebook gradient at all."""
    x, books = make_problem(130, 24, (33, 20, 48), seed=3, device=DEVICE)
    step = run_step(residual_quantize, x, books, commitment_cost=0.25, grad_mode="layer_ste",
                    codebook_loss=False, backend=backend, precision="ieee", compute_stats=True,
                    active_layers=2)
    _check_against_reference(step, x, books, 2, "layer_ste", 0.25, codebook_loss=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["rotation", "layer_ste", "full", "seed"])
def test_equals_the_call_on_the_first_codebooks(poison, backend, grad_mode):
    """Every routing (the rotation trick's too): the same values and gradients as passing only the
    first ``active`` codebooks, with -1 / 0 / zero gradients for the others."""
    x, books = make_problem(130, 100, (33, 48, 20), seed=11, device=DEVICE)
    for active in (1, 2):
        full = run_step(residual_quantize, x, books, commitment_cost=0.3, grad_mode=grad_mode,
                        backend=backend, precision="ieee", active_layers=active,
                        loss_weights=torch.tensor([0.5, 1.5, 2.0]))
        part = run_step(residual_quantize, x, books[:active], commitment_cost=0.3,
                        grad_mode=grad_mode, backend=backend, precision="ieee",
                        loss_weights=torch.tensor([0.5, 1.5, 2.0])[:active])
        assert torch.equal(full.result.indices[:, :active], part.result.indices)
        assert (full.result.indices[:, active:] == -1).all()
        torch.testing.assert_close(full.result.quantized, part.result.quantized, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(full.result.layer_losses[:active], part.result.layer_losses)
        assert torch.count_nonzero(full.result.layer_losses[active:].detach()) == 0
        torch.testing.assert_close(full.grad_x, part.grad_x, atol=1e-6, rtol=1e-5)
        for mine, theirs in zip(full.grad_books, part.grad_books):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
        for mine in full.grad_books[active:]:
            assert torch.count_nonzero(mine) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_statistics(poison, backend):
    x, books = make_problem(130, 20, (33, 48, 20), seed=21, device=DEVICE)
    common = dict(commitment_cost=0.25, backend=backend, precision="ieee", compute_stats=True,
                  active_layers=2)
    atomic = residual_quantize(x, books, deterministic=False, **common)
    ordered = residual_quantize(x, books, deterministic=True, **common)
    assert torch.equal(atomic.indices, ordered.indices)
    for a, b in zip(atomic.code_counts, ordered.code_counts):
        assert torch.equal(a, b)
    for a, b in zip(atomic.code_sums, ordered.code_sums):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(ordered.code_counts[2]) == 0


@pytest.mark.parametrize("bad", [-1, 4, 1.0, True, "2"])
def test_bad_active_layers(bad):
    x, books = make_problem(10, 8, (5, 5, 5), seed=0)
    with pytest.raises((ValueError, TypeError), match="active_layers"):
        residual_quantize(x, books, active_layers=bad)


def test_inputs_not_modified():
    x, books = make_problem(40, 8, (5, 6, 7), seed=0)
    x_copy, book_copies = x.clone(), [b.clone() for b in books]
    residual_quantize(x, books, active_layers=1, compute_stats=True)
    assert torch.equal(x, x_copy) and all(torch.equal(a, b) for a, b in zip(books, book_copies))


@requires_triton
def test_active_layers_is_not_specialised():
    """The cutoff is a runtime argument Triton does not specialise on (1 and multiples of 16 would
    otherwise compile variants): checked on the compiled kernels, outside the interpreter."""
    code = ("from rqvae_fast.kernels.quantize_forward import _residual_quantize_fwd_kernel as f\n"
            "from rqvae_fast.kernels.quantize_backward import _residual_quantize_input_grad_kernel as g\n"
            "from rqvae_fast.kernels.rotation_grad import _rotation_input_grad_kernel as r\n"
            "for k in (f, g, r):\n"
            "    p = {q.name: q for q in k.params}['num_active']\n"
            "    assert p.do_not_specialize and not p.is_constexpr, k\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_compat_dropout_passes_every_codebook(monkeypatch):
    """compat.ResidualVQ's quantize dropout runs the fused pass with the same Q codebooks for every
    cutoff and the cutoff as ``active``; dropped layers give -1, loss 0 and no codebook update."""
    from rqvae_fast import backend as backend_module
    from rqvae_fast.compat import ResidualVQ

    seen = []
    real = backend_module.fused_forward

    def spy(x, codes, layer_sizes, *args):
        seen.append((tuple(layer_sizes), args[-1]))
        return real(x, codes, layer_sizes, *args)

    monkeypatch.setattr(backend_module, "fused_forward", spy)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=4, codebook_size=(12, 10, 9, 8), quantize_dropout=True,
                     rotation_trick=False).train()
    x = torch.randn(2, 30, 16)
    for seed in range(12):
        embeds = [layer._codebook.embed.detach().clone() for layer in rvq.layers]
        _, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed)
        active = seen[-1][1]
        assert seen[-1][0] == (12, 10, 9, 8)
        assert (indices[..., active:] == -1).all() and (indices[..., :active] >= 0).all()
        assert torch.count_nonzero(losses[active:]) == 0
        for layer, before in list(enumerate(embeds))[active:]:
            assert torch.equal(rvq.layers[layer]._codebook.embed, before)
    assert len({a for _, a in seen}) > 1  # several cutoffs, one codebook list


@requires_triton
@pytest.mark.parametrize("precision", ["exact", "tf32"])
def test_reduced_precision_searches(poison, precision):
    """The exact search (tf32 + rescans) gives the ieee indices with dropped layers too; tf32 picks
    codes whose distance is within its tie tolerance of the nearest one."""
    x, books = make_problem(130, 48, (33, 65, 20), seed=5, device=DEVICE)
    got = residual_quantize(x, books, backend="triton", precision=precision, compute_stats=True,
                            active_layers=2)
    ieee = residual_quantize(x, books, backend="triton", precision="ieee", compute_stats=True,
                             active_layers=2)
    assert (got.indices[:, 2] == -1).all() and torch.count_nonzero(got.code_counts[2]) == 0
    if precision == "exact":
        assert torch.equal(got.indices, ieee.indices)
        return
    residual = x.double()
    for layer in range(2):
        dist = torch.cdist(residual, books[layer].double()) ** 2
        chosen = dist.gather(1, got.indices[:, layer:layer + 1]).squeeze(1)
        scale = 1.0 + (residual ** 2).sum(1)
        assert torch.all(chosen - dist.min(dim=1).values <= 2e-2 * scale)
        residual = residual - books[layer].double()[got.indices[:, layer]]
