"""Property-based parity (hypothesis): both backends versus the reference oracle.

Random N (0..300), D (1..70), L (1..5), per-layer K (1..300), leading dims, input dtype, beta,
grad_mode, codebook_loss, precision, NaN/Inf rows, duplicated codes and exact hits; the fused
kernels (Triton's interpreter on CPU) and the PyTorch path are checked against
:mod:`rqvae_fast.reference` for indices (tie-aware), values, losses, statistics and gradients, and
the drop-in modules (EMA on/off, train/eval) for their updates.

Profiles: ``ci`` (default: few derandomized examples, reproducible) and ``slow`` (hundreds of random
examples)::

    RQVAE_HYPOTHESIS_PROFILE=slow python -m pytest tests/test_fuzz.py
"""
import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import DEVICE, HAS_TRITON
from helpers import TOL, assert_near_optimal, check_parity, make_problem, run_step
from rqvae_fast import ResidualVQ, VQEmbedding, VQEmbeddingEMA, residual_quantize
from rqvae_fast.reference import ema_update_reference, residual_quantize_reference

_COMMON = dict(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout; failures print a reproduce blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],  # `poison` is stateless per example
)
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("slow", max_examples=400, **_COMMON)
PROFILE = os.environ.get("RQVAE_HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE))


def fuzz(ci_examples: int):
    """The selected profile, with ``ci_examples`` examples under ``ci``."""
    return settings(FUZZ, max_examples=ci_examples) if PROFILE == "ci" else FUZZ


BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
GRAD_MODES = ["seed", "full", "layer_ste"]
PRECISIONS = ["ieee", "tf32", "bf16"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

betas = st.one_of(st.sampled_from([0.0, 0.25, 1.0]), st.floats(0.01, 2.0))
dims = st.one_of(st.sampled_from([1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 70]), st.integers(1, 70))
code_counts = st.one_of(st.sampled_from([1, 2, 63, 64, 65, 300]), st.integers(1, 300))
_SHAPES = {
    "1d": st.integers(1, 300).map(lambda n: (n,)),
    "2d": st.tuples(st.integers(1, 17), st.integers(1, 17)),
    "3d": st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 8)),
    "empty": st.sampled_from([(0,), (3, 0), (0, 4, 2)]),
}
# Leading dims: mostly non-empty batches, sometimes N = 0.
lead_shapes = st.sampled_from(["1d", "1d", "1d", "2d", "2d", "3d", "3d", "empty"]).flatmap(_SHAPES.get)


@st.composite
def problems(draw, dtypes=DTYPES, max_layers=5):
    """``(x (*lead, D), codebooks, info)``: ``make_problem`` data plus drawn hazards.

    Hazards: a scale, rows set to NaN/Inf (never all rows), codes duplicated inside a layer (a tie,
    which the lowest index should win) and input rows that equal a layer-0 code (a zero distance).
    """
    dim = draw(dims)
    sizes = tuple(draw(st.lists(code_counts, min_size=1, max_size=max_layers)))
    lead = draw(lead_shapes)
    n = 1
    for size in lead:
        n *= size
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    x, books = make_problem(n, dim, sizes, seed=seed, lead_shape=lead)  # fp32 on the CPU
    scale = draw(st.sampled_from([1.0, 1.0, 0.05, 4.0]))
    x, books = x * scale, [b * scale for b in books]

    rows = x.view(-1, dim)
    gen = torch.Generator().manual_seed(seed + 1)
    duplicated = False
    if draw(st.booleans()) and n > 0:  # exact hits: some rows are layer-0 codes
        hits = torch.randperm(n, generator=gen)[: max(1, n // 4)]
        rows[hits] = books[0][torch.randint(0, sizes[0], (len(hits),), generator=gen)]
    if draw(st.booleans()):  # exact duplicates inside every layer with K > 1
        for book in books:
            if book.shape[0] > 1:
                src = torch.randint(0, book.shape[0], (book.shape[0] // 3 + 1,), generator=gen)
                dst = torch.randint(0, book.shape[0], src.shape, generator=gen)
                book[dst] = book[src].clone()
                duplicated = True
    bad_kind = draw(st.sampled_from([None, None, "nan", "inf", "-inf"]))
    bad_rows = torch.zeros(n, dtype=torch.bool)
    if bad_kind is not None and n > 1:
        picks = torch.randperm(n, generator=gen)[: draw(st.integers(1, n - 1))]
        rows[picks, torch.randint(0, dim, (len(picks),), generator=gen)] = float(bad_kind)
        bad_rows[picks] = True
    info = dict(dim=dim, sizes=sizes, lead=lead, dtype=dtype, scale=scale, bad=bad_kind,
                duplicated=duplicated, seed=seed)
    note(f"problem: {info}")
    return x.to(device=DEVICE, dtype=dtype), [b.to(DEVICE) for b in books], bad_rows.to(DEVICE)


def assert_nan_policy(indices, quantized, bad_rows, sizes):
    """Non-finite rows: index -1 in every layer and a NaN output row; other rows: a valid code."""
    idx = indices.reshape(-1, len(sizes))
    assert (idx[bad_rows] == -1).all(), "a non-finite row got a code"
    for layer, size in enumerate(sizes):
        good = idx[~bad_rows, layer]
        assert ((good >= 0) & (good < size)).all(), f"layer {layer}: index out of range"
    rows = quantized.reshape(-1, quantized.shape[-1])
    assert torch.isnan(rows[bad_rows]).all(), "a non-finite row has a non-NaN output"
    assert torch.isfinite(rows[~bad_rows]).all(), "a finite row has a non-finite output"


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(25)
@given(problem=problems(), beta=betas, grad_mode=st.sampled_from(GRAD_MODES),
       codebook_loss=st.booleans(), precision=st.sampled_from(PRECISIONS),
       deterministic=st.sampled_from([None, False, True]))
def test_functional_matches_reference(poison, backend, problem, beta, grad_mode, codebook_loss,
                                      precision, deterministic):
    """Values, indices (tie-aware), losses, statistics and gradients match the reference."""
    x, books, bad_rows = problem
    step = run_step(residual_quantize, x, books, commitment_cost=beta, grad_mode=grad_mode,
                    codebook_loss=codebook_loss, backend=backend, precision=precision,
                    compute_stats=True, deterministic=deterministic)
    assert_nan_policy(step.result.indices, step.result.quantized, bad_rows,
                      [b.shape[0] for b in books])
    assert torch.isnan(step.result.loss) == bool(bad_rows.any())
    # Tie-aware even under ieee: fuzzing draws exact duplicates and (rarely) near-ties that a
    # different summation order may break the other way; test_kernel_parity checks exact indices.
    check_parity(step, x, books, commitment_cost=beta, grad_mode=grad_mode,
                 codebook_loss=codebook_loss, precision=precision, exact_indices=False)


def module_step(module, x, seed=1):
    """Forward ``module`` on a copy of ``x`` and backward ``<g, quantized> + loss`` (g as run_step)."""
    x = x.detach().clone().requires_grad_(True)
    quantized, indices, loss = module(x)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(quantized.shape, generator=gen).to(x.device, quantized.dtype)
    ((quantized * g).float().sum() + loss).backward()
    return quantized.detach(), indices, loss.detach(), x.grad


@st.composite
def module_configs(draw):
    """A drop-in module (ResidualVQ or a single VQEmbedding[EMA]) with a drawn starting state."""
    kind = draw(st.sampled_from(["rvq", "single"]))
    ema = draw(st.booleans())
    x, books, bad_rows = draw(problems(max_layers=5 if kind == "rvq" else 1))
    options = dict(grad_mode=draw(st.sampled_from(GRAD_MODES)),
                   precision=draw(st.sampled_from(PRECISIONS)),
                   deterministic=draw(st.sampled_from([None, False, True])))
    beta = draw(betas)
    decay, eps = draw(st.floats(0.0, 0.999)), draw(st.sampled_from([1e-5, 1e-3]))
    warm = draw(st.booleans())  # warm: positive cluster sizes; cold: the constructor's zeros
    training = draw(st.booleans())
    return dict(kind=kind, ema=ema, x=x, books=books, bad_rows=bad_rows, options=options,
                beta=beta, decay=decay, eps=eps, warm=warm, training=training,
                steps=draw(st.integers(1, 2)))


def build_module(cfg, backend):
    books, dim, ema = cfg["books"], cfg["x"].shape[-1], cfg["ema"]
    sizes = [b.shape[0] for b in books]
    kwargs = dict(cfg["options"], backend=backend)
    if ema:
        kwargs.update(decay=cfg["decay"], eps=cfg["eps"])
    if cfg["kind"] == "rvq":
        module = ResidualVQ(len(sizes), sizes, dim, cfg["beta"], ema=ema, **kwargs)
    else:
        module = (VQEmbeddingEMA if ema else VQEmbedding)(sizes[0], dim, cfg["beta"], **kwargs)
    layers = module.vq_layers if cfg["kind"] == "rvq" else [module]
    gen = torch.Generator().manual_seed(len(sizes) + dim)
    with torch.no_grad():
        for layer, book in zip(layers, books):
            layer.embeddings.copy_(book)
            if ema and cfg["warm"]:
                layer.ema_cluster_size.copy_(torch.rand(book.shape[0], generator=gen) * 4 + 0.5)
                layer.ema_dw.copy_(book * layer.ema_cluster_size[:, None])
    return module.to(DEVICE).train(cfg["training"]), layers


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(20)
@given(cfg=module_configs())
def test_modules_match_reference_and_ema_update(poison, backend, cfg):
    """Module forward/backward match the reference; EMA state moves only in training, by the
    reference update from the finite rows' statistics, and never when the batch is empty."""
    module, layers = build_module(cfg, backend)
    x, bad_rows, ema = cfg["x"], cfg["bad_rows"], cfg["ema"]
    num_layers = len(layers)
    tie_tol = TOL[cfg["options"]["precision"]][2]
    out_atol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(x.dtype, 2e-5)
    for _ in range(cfg["steps"]):
        before = copy.deepcopy(module.state_dict())
        books = [layer.embeddings.detach().clone() for layer in layers]
        quantized, indices, loss, grad_x = module_step(module, x)
        full_indices = indices if cfg["kind"] == "rvq" else indices[..., None]
        assert full_indices.shape == (*x.shape[:-1], num_layers)
        assert_nan_policy(full_indices, quantized, bad_rows, [b.shape[0] for b in books])
        assert_near_optimal(x, books, full_indices, cfg["options"]["grad_mode"], tie_tol)

        ref = run_step(residual_quantize_reference, x.float(), books, seed=1,
                       loss_weights=torch.ones(num_layers), commitment_cost=cfg["beta"],
                       grad_mode=cfg["options"]["grad_mode"], codebook_loss=not ema,
                       indices=full_indices)
        torch.testing.assert_close(quantized.float(), ref.result.quantized, atol=out_atol,
                                   rtol=out_atol, equal_nan=True)
        torch.testing.assert_close(loss, ref.result.loss.detach(), atol=2e-5, rtol=1e-4,
                                   equal_nan=True)
        torch.testing.assert_close(grad_x.float(), ref.grad_x, atol=out_atol,
                                   rtol=max(out_atol, 1e-4), equal_nan=True)
        for layer, ref_grad in zip(layers, ref.grad_books):
            if ema:
                assert layer.embeddings.grad is None, "EMA codebooks got a gradient"
            else:
                torch.testing.assert_close(layer.embeddings.grad, ref_grad, atol=1e-5, rtol=1e-4)
                layer.embeddings.grad = None

        after = module.state_dict()
        if not (ema and cfg["training"]) or x.numel() == 0:
            for key, value in after.items():
                assert torch.equal(value, before[key]), f"{key} changed"
            continue
        for index, layer in enumerate(layers):
            prefix = f"vq_layers.{index}." if cfg["kind"] == "rvq" else ""
            book = before[prefix + "embeddings"].clone()
            size = before[prefix + "ema_cluster_size"].clone()
            dw = before[prefix + "ema_dw"].clone()
            ema_update_reference(book, size, dw, ref.result.code_counts[index],
                                 ref.result.code_sums[index], cfg["decay"], cfg["eps"])
            torch.testing.assert_close(layer.ema_cluster_size, size, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(layer.ema_dw, dw, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.embeddings.detach(), book, atol=1e-5, rtol=1e-4)


def same(a, b):
    """Bitwise equal, NaN where the other is NaN."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz(20)
@given(problem=problems(dtypes=[torch.float32]), grad_mode=st.sampled_from(GRAD_MODES),
       precision=st.sampled_from(PRECISIONS), deterministic=st.booleans(), data=st.data())
def test_rows_do_not_depend_on_the_batch(backend, problem, grad_mode, precision, deterministic,
                                         data):
    """Determinism and batch invariance: a row's codes and output are bitwise the same whatever
    else is in the batch (permuted, split in two) and on a repeated call; statistics too with
    ``deterministic=True``."""
    x, books, _ = problem
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    kwargs = dict(grad_mode=grad_mode, precision=precision, backend=backend, compute_stats=True,
                  deterministic=deterministic)
    first = residual_quantize(x, books, 0.25, **kwargs)
    again = residual_quantize(x, books, 0.25, **kwargs)
    for name in ("quantized", "indices", "loss", "layer_losses"):
        assert same(getattr(first, name), getattr(again, name)), f"{name} differs on a repeated call"
    for a, b in zip(first.code_counts, again.code_counts):
        assert torch.equal(a, b)
    for a, b in zip(first.code_sums, again.code_sums):
        if deterministic:
            assert torch.equal(a, b), "deterministic=True sums differ on a repeated call"
        else:  # fp32 atomics may add in another order on a GPU
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    idx = first.indices.reshape(n, len(books))
    out = first.quantized.reshape(n, x.shape[-1])
    perm = torch.as_tensor(data.draw(st.permutations(range(n)), label="perm"), dtype=torch.long)
    shuffled = residual_quantize(rows[perm.to(rows.device)], books, 0.25, **kwargs)
    assert torch.equal(shuffled.indices, idx[perm])
    assert same(shuffled.quantized, out[perm])
    cut = data.draw(st.integers(0, n), label="cut")
    head = residual_quantize(rows[:cut], books, 0.25, **kwargs)
    tail = residual_quantize(rows[cut:], books, 0.25, **kwargs)
    assert torch.equal(torch.cat([head.indices, tail.indices]), idx)
    assert same(torch.cat([head.quantized, tail.quantized]), out)
    for whole, a, b in zip(first.code_counts, head.code_counts, tail.code_counts):
        assert torch.equal(a + b, whole)
