"""Shared test helpers: problem generation, one forward+backward step, tie-aware parity checks,
and running the command line."""
from __future__ import annotations

import re

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from rqvae_fast import residual_quantize
from rqvae_fast.reference import residual_quantize_reference

# Tolerances per precision of the distance matmul: (values atol, values rtol, tie tolerance)
TOL = {
    "ieee": (2e-5, 2e-5, 1e-5),
    "tf32": (2e-5, 2e-5, 2e-2),
    "bf16": (2e-5, 2e-5, 5e-2),
}


def make_problem(n: int, dim: int, sizes: Sequence[int], *, seed: int = 0, dtype=torch.float32,
                 device="cpu", lead_shape=None):
    """Inputs ``(n, dim)`` (or ``(*lead_shape, dim)``) and codebooks shrinking by 0.5 per layer."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if lead_shape is None else tuple(lead_shape)
    x = torch.randn(*shape, dim, generator=gen).to(device=device, dtype=dtype)
    books = [(torch.randn(k, dim, generator=gen) * 0.5 ** layer).to(device) for layer, k in enumerate(sizes)]
    return x, books


@dataclass
class Step:
    result: object
    grad_x: Optional[torch.Tensor]
    grad_books: List[Optional[torch.Tensor]]


def run_step(fn, x, books, *, seed=1, loss_weights=None, **kwargs) -> Step:
    """Forward with ``fn`` then backward of ``<g, quantized> + sum_l w_l layer_loss_l``."""
    x = x.detach().clone().requires_grad_(True)
    books = [b.detach().clone().requires_grad_(True) for b in books]
    result = fn(x, books, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(result.quantized.shape, generator=gen).to(x.device, result.quantized.dtype)
    if loss_weights is None:
        loss_weights = torch.linspace(0.5, 2.0, len(books))
    objective = (result.quantized * g).float().sum()
    if result.layer_losses.numel():
        objective = objective + (result.layer_losses * loss_weights.to(x.device)).sum()
    objective.backward()
    return Step(result, x.grad, [b.grad for b in books])


def assert_near_optimal(x, books, indices, grad_mode, tie_tol):
    """Every chosen code is the nearest one up to ``tie_tol`` (relative) given the earlier choices."""
    residual = x.reshape(-1, x.shape[-1]).float()
    idx = indices.reshape(-1, len(books))
    ok = torch.isfinite(residual).all(dim=1)
    for layer, book in enumerate(books):
        book = book.float()
        dist = torch.cdist(residual[ok].double(), book.double()) ** 2
        chosen = dist.gather(1, idx[ok, layer:layer + 1]).squeeze(1)
        best = dist.min(dim=1).values
        scale = 1.0 + (residual[ok].double() ** 2).sum(1)
        assert torch.all(chosen - best <= tie_tol * scale), (
            f"layer {layer}: a chosen code is not nearest (max excess {(chosen - best).max():.3g})")
        residual = residual - book[idx[:, layer].clamp(min=0)]


def check_parity(step: Step, x, books, *, commitment_cost, grad_mode="seed", codebook_loss=True,
                 precision="ieee", stats=True, exact_indices=None):
    """Compare a step's values, indices and gradients with the reference.

    Indices must be optimal up to ties (and equal the reference's where ``exact_indices``, default
    for ieee); values, losses, statistics and gradients are compared with the reference computed
    for the same indices, with explicit per-precision tolerances.
    """
    atol, rtol, tie_tol = TOL[precision]
    res = step.result
    if exact_indices is None:
        exact_indices = precision == "ieee"
    free = residual_quantize_reference(x.float(), books, commitment_cost, grad_mode=grad_mode,
                                       codebook_loss=codebook_loss, precision=precision)
    if exact_indices:
        assert torch.equal(res.indices, free.indices), "indices differ from the reference"
    else:
        assert_near_optimal(x, books, res.indices, grad_mode, tie_tol)

    ref = run_step(residual_quantize_reference, x.float(), books, commitment_cost=commitment_cost,
                   grad_mode=grad_mode, codebook_loss=codebook_loss, indices=res.indices)
    out_atol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(x.dtype, atol)
    torch.testing.assert_close(res.quantized.float(), ref.result.quantized, atol=out_atol, rtol=out_atol,
                               equal_nan=True)
    assert res.quantized.dtype == x.dtype and res.quantized.shape == x.shape
    assert res.indices.dtype == torch.int64 and res.indices.shape == (*x.shape[:-1], len(books))
    torch.testing.assert_close(res.layer_losses.detach(), ref.result.layer_losses.detach().float(),
                               atol=atol, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(res.loss.detach(), ref.result.loss.detach(), atol=atol, rtol=1e-4,
                               equal_nan=True)
    if stats:
        for a, b in zip(res.code_counts, ref.result.code_counts):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        for a, b in zip(res.code_sums, ref.result.code_sums):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if step.grad_x is not None:
        torch.testing.assert_close(step.grad_x.float(), ref.grad_x.float(), atol=out_atol,
                                   rtol=max(out_atol, 1e-4), equal_nan=True)
    for mine, theirs in zip(step.grad_books, ref.grad_books):
        if not codebook_loss:
            assert mine is None or torch.count_nonzero(mine) == 0
            continue
        assert mine is not None
        torch.testing.assert_close(mine.float(), theirs.float(), atol=1e-5, rtol=1e-4)


def assert_compiled_matches_eager(eager, compiled, eager_out, compiled_out, *, atol, rtol):
    """A compiled ``(loss, indices)`` step equals the eager one, after both backwards: indices,
    loss, every parameter's gradient (None where eager has None) and every buffer."""
    (loss_e, idx_e), (loss_c, idx_c) = eager_out, compiled_out
    assert torch.equal(idx_e, idx_c)
    torch.testing.assert_close(loss_c, loss_e, atol=atol, rtol=rtol)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        if p_e.grad is None:
            assert p_c.grad is None, name
        else:
            torch.testing.assert_close(p_c.grad, p_e.grad, atol=atol, rtol=rtol, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled.buffers()):
        torch.testing.assert_close(b_c, b_e, atol=atol, rtol=rtol, msg=name)


def run_cli(capsys, *argv):
    """Run ``rqvae-fast ARGV`` in-process: ``(exit code, stdout, stderr)``."""
    from rqvae_fast.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, pattern):
    """A user mistake: exit 2 and one line ``rqvae-fast: error: ...`` matching ``pattern``."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rqvae-fast: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def write_catalogue_npy(folder, num_items: int, dim: int):
    """``folder/items.npy``: a small synthetic catalogue (branching 4, 2, 2, seed 3) for CLI tests."""
    import numpy as np

    from rqvae_fast.synthetic import make_catalogue

    data = make_catalogue(num_items=num_items, dim=dim, branching=(4, 2, 2), seed=3).embeddings
    path = folder / "items.npy"
    np.save(path, data.numpy())
    return path
