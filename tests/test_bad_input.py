"""Bad input gets a clear exception or a documented result; nothing passed in is modified."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import DEVICE, HAS_TRITON
from rqvae_fast import ResidualVQ, residual_quantize

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def books(dim=8, sizes=(16, 12)):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(k, dim, generator=gen).to(DEVICE) for k in sizes]


@pytest.mark.parametrize("x, match", [
    (torch.randn(5, 7), "last dim 7 but codebook 0 has dim 8"),
    (torch.randn(8), "at least 2 dims"),
    (torch.randint(0, 5, (5, 8)), "floating-point"),
    ([[0.0] * 8], "must be a torch.Tensor"),
])
def test_bad_inputs_name_the_problem(x, match):
    x = x.to(DEVICE) if isinstance(x, torch.Tensor) else x
    with pytest.raises((ValueError, TypeError), match=match):
        residual_quantize(x, books())


def test_bad_codebooks_name_the_problem():
    x = torch.randn(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="at least one codebook"):
        residual_quantize(x, [])
    with pytest.raises(ValueError, match="codebook 1 must be a 2-D"):
        residual_quantize(x, [books()[0], torch.randn(8, device=DEVICE)])
    with pytest.raises(ValueError, match="codebook 0 is empty"):
        residual_quantize(x, [torch.randn(0, 8, device=DEVICE)])
    with pytest.raises(TypeError, match="codebook 0 must be floating"):
        residual_quantize(x, [torch.ones(4, 8, dtype=torch.int64, device=DEVICE)])


def test_device_mismatch_names_both_devices():
    x = torch.randn(5, 8)
    meta_books = [torch.randn(4, 8, device="meta")]
    with pytest.raises(ValueError, match=r"inputs are on cpu but codebook 0 is on meta"):
        residual_quantize(x, meta_books)


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad_mode="fancy"), "grad_mode must be one of"),
    (dict(precision="fp8"), "precision must be"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        residual_quantize(torch.randn(3, 8, device=DEVICE), books(), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_get_index_minus_one_and_nan(backend):
    cbs = books()
    x = torch.randn(70, 8, device=DEVICE)
    x[3, 2] = float("nan")
    x[65, 0] = float("inf")
    x_before = x.clone()
    out = residual_quantize(x, cbs, backend=backend, precision="ieee", compute_stats=True)
    assert torch.equal(x, x_before, ) or torch.equal(torch.isnan(x), torch.isnan(x_before))
    assert (out.indices[[3, 65]] == -1).all()
    assert (out.indices[[0, 1, 2, 4, 64, 66]] >= 0).all()
    assert torch.isnan(out.quantized[[3, 65]]).all()
    assert torch.isfinite(out.quantized[[0, 1, 2, 4, 64, 66]]).all()
    assert torch.isnan(out.loss)
    # The bad rows stay out of the statistics: they match a run without them.
    good = torch.ones(70, dtype=torch.bool)
    good[[3, 65]] = False
    clean = residual_quantize(x[good], cbs, backend=backend, precision="ieee", compute_stats=True)
    assert torch.equal(out.indices[good], clean.indices)
    for a, b in zip(out.code_counts, clean.code_counts):
        assert torch.equal(a, b)
    for a, b in zip(out.code_sums, clean.code_sums):
        torch.testing.assert_close(a, b)


def test_nan_batch_leaves_ema_codebooks_finite():
    rvq = ResidualVQ(2, [16, 12], 8, ema=True, backend="torch").to(DEVICE)
    rvq(torch.randn(64, 8, device=DEVICE))
    x = torch.randn(64, 8, device=DEVICE)
    x[::2] = float("nan")
    _, indices, loss = rvq(x)
    assert torch.isnan(loss) and (indices[::2] == -1).all()
    for layer in rvq.vq_layers:
        assert torch.isfinite(layer.embeddings).all() and torch.isfinite(layer.ema_dw).all()


def test_check_finite_raises_naming_the_row():
    x = torch.randn(10, 8, device=DEVICE)
    x[7, 1] = float("inf")
    with pytest.raises(ValueError, match="first bad row: 7"):
        residual_quantize(x, books(), check_finite=True)
    cbs = books()
    cbs[1][2, 0] = float("nan")
    with pytest.raises(ValueError, match="codebook 1 hold NaN/Inf"):
        residual_quantize(torch.randn(3, 8, device=DEVICE), cbs, check_finite=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_outputs_zero_loss_and_zero_grads(backend):
    cbs = [c.requires_grad_(True) for c in books()]
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    out = residual_quantize(x, cbs, backend=backend)
    assert out.quantized.shape == (0, 8) and out.indices.shape == (0, 2)
    assert out.loss.item() == 0.0
    (out.quantized.sum() + out.loss).backward()
    assert x.grad.shape == (0, 8)
    assert all(torch.count_nonzero(c.grad) == 0 for c in cbs)


def test_empty_batch_leaves_ema_state_alone():
    rvq = ResidualVQ(2, [16, 12], 8, ema=True, backend="torch")
    before = {k: v.clone() for k, v in rvq.state_dict().items()}
    rvq(torch.randn(0, 8))
    assert all(torch.equal(v, before[k]) for k, v in rvq.state_dict().items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_and_codebooks_are_not_modified(backend):
    cbs = [c.requires_grad_(True) for c in books()]
    saved = [c.detach().clone() for c in cbs]
    x = torch.randn(33, 8, device=DEVICE, requires_grad=True)
    x_saved = x.detach().clone()
    out = residual_quantize(x, cbs, backend=backend, compute_stats=True)
    (out.quantized.sum() + out.loss).backward()
    assert torch.equal(x.detach(), x_saved)
    assert all(torch.equal(c.detach(), s) for c, s in zip(cbs, saved))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = textwrap.dedent("""
        import torch
        from rqvae_fast import residual_quantize
        try:
            residual_quantize(torch.randn(4, 8), [torch.randn(3, 8)], backend="triton")
        except RuntimeError as e:
            print("ERR", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR backend='triton' cannot run on device cpu" in out.stdout, out.stderr
