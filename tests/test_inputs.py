"""Unusual but legal inputs: strided views, aliasing, autograd modes, train/eval, other dtypes and
devices. Each works and matches the reference (or raises a clear error), the caller's tensors are
never modified, and one NaN/Inf policy holds on every path (both backends, functional and modules).
"""
import copy

import pytest
import torch

from conftest import DEVICE, HAS_TRITON
from helpers import Step, check_parity, make_problem, run_step
from rqvae_fast import ResidualVQ, VQEmbedding, VQEmbeddingEMA, residual_quantize
from rqvae_fast.reference import ema_update_reference, residual_quantize_reference

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
N, D, SIZES, BETA = 35, 12, (20, 7, 33), 0.3
WEIGHTS = torch.linspace(0.5, 2.0, len(SIZES))  # run_step's default per-layer loss weights


def problem(n=N, sizes=SIZES, seed=0, **kwargs):
    return make_problem(n, D, sizes, seed=seed, device=DEVICE, **kwargs)


def snapshot(*tensors):
    """Values and version counters of the caller's tensors."""
    return [(t, t.detach().clone(), t._version) for t in tensors]


def assert_untouched(saved):
    for tensor, values, version in saved:
        torch.testing.assert_close(tensor.detach(), values, atol=0, rtol=0, equal_nan=True)
        assert tensor._version == version, "a caller's tensor was modified in place"


def forward_backward(x, books, backend, grad_mode="full", **kwargs):
    """Forward, then backward of run_step's objective ``<g, quantized> + sum_l w_l loss_l``."""
    out = residual_quantize(x, books, BETA, grad_mode=grad_mode, backend=backend,
                            precision="ieee", compute_stats=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(out.quantized.shape, generator=gen).to(DEVICE, out.quantized.dtype)
    weights = torch.linspace(0.5, 2.0, len(books)).to(DEVICE)
    objective = (out.quantized * g).float().sum() + (out.layer_losses * weights).sum()
    return out, objective


def assert_same_result(a, b):
    """Bitwise the same outputs (both paths saw the same contiguous data)."""
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized, b.quantized)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.layer_losses, b.layer_losses)
    for x, y in zip(a.code_counts, b.code_counts):
        assert torch.equal(x, y)
    for x, y in zip(a.code_sums, b.code_sums):  # fp32 atomics may reorder on a GPU
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def view_grad(make_view, base, grad_of_view):
    """Gradient a base tensor should get when ``make_view(base)`` receives ``grad_of_view``."""
    twin = base.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(make_view(twin), twin, grad_outputs=grad_of_view)
    return grad


# --- strided, transposed, expanded -----------------------------------------------------------

X_LAYOUTS = {  # base shape, view of it with shape (N, D) or (5, 7, D)
    "every_other_column": ((N, 2 * D), lambda b: b[:, ::2]),
    "transposed": ((D, N), lambda b: b.t()),
    "every_third_row": ((3 * N, D), lambda b: b[::3]),
    "storage_offset": ((N + 5, D), lambda b: b[5:]),
    "expanded_row": ((1, D), lambda b: b.expand(N, D)),
    "inner_stride": ((N, D, 2), lambda b: b[..., 1]),
    "permuted_lead_dims": ((7, 5, D), lambda b: b.transpose(0, 1)),
    "channels_last": ((5, D, 7), lambda b: b.transpose(1, 2)),
    "broadcast_lead_dim": ((7, D), lambda b: b.expand(5, 7, D)),
}


@pytest.mark.parametrize("layout", list(X_LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_match_the_contiguous_case(backend, layout):
    shape, make_view = X_LAYOUTS[layout]
    _, books = problem()
    base = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    base.requires_grad_(True)
    x = make_view(base)
    assert not x.is_contiguous() or x.storage_offset() > 0
    dense = x.detach().contiguous().requires_grad_(True)
    saved = snapshot(base, *books)

    out, objective = forward_backward(x, books, backend)
    (grad_x,) = torch.autograd.grad(objective, x, retain_graph=True)
    objective.backward()
    ref_out, ref_objective = forward_backward(dense, books, backend)
    ref_objective.backward()

    assert out.quantized.shape == x.shape and out.indices.shape == (*x.shape[:-1], len(SIZES))
    assert_same_result(out, ref_out)
    assert torch.equal(grad_x, dense.grad)
    torch.testing.assert_close(base.grad, view_grad(make_view, base, dense.grad), atol=1e-6,
                               rtol=1e-6)
    assert_untouched(saved)


BOOK_LAYOUTS = {  # base shape for a (K, D) codebook, its view
    "transposed": (lambda k: (D, k), lambda b: b.t()),
    "every_other_row": (lambda k: (2 * k, D), lambda b: b[::2]),
    "every_other_column": (lambda k: (k, 2 * D), lambda b: b[:, ::2]),
    "storage_offset": (lambda k: (k + 3, D), lambda b: b[3:]),
}


@pytest.mark.parametrize("layout", list(BOOK_LAYOUTS) + ["one_shared_tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_codebooks_match_the_contiguous_case(backend, layout):
    x, _ = problem()
    gen = torch.Generator().manual_seed(3)
    if layout == "one_shared_tensor":  # all layers are row-slices of one parameter
        bases = [torch.randn(sum(SIZES), D, generator=gen).to(DEVICE).requires_grad_(True)]
        books = list(bases[0].split(list(SIZES)))
        make_views = lambda leaves: list(leaves[0].split(list(SIZES)))  # noqa: E731
    else:
        base_shape, make_view = BOOK_LAYOUTS[layout]
        bases = [torch.randn(*base_shape(k), generator=gen).to(DEVICE).requires_grad_(True)
                 for k in SIZES]
        books = [make_view(b) for b in bases]
        assert all(not b.is_contiguous() or b.storage_offset() > 0 for b in books)
        make_views = lambda leaves: [make_view(b) for b in leaves]  # noqa: E731
    dense = [b.detach().contiguous().requires_grad_(True) for b in books]
    saved = snapshot(x, *bases)

    out, objective = forward_backward(x, books, backend)
    objective.backward()
    ref_out, ref_objective = forward_backward(x, dense, backend)
    ref_objective.backward()

    assert_same_result(out, ref_out)
    twins = [b.detach().clone().requires_grad_(True) for b in bases]
    expected = torch.autograd.grad(make_views(twins), twins, grad_outputs=[d.grad for d in dense])
    for got, want in zip([b.grad for b in bases], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert_untouched(saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_codebook_matches_the_contiguous_case(backend):
    """A stride-0 codebook (every code the same): same result as its dense copy; the gradient of
    the one shared row is the sum over its copies."""
    x, books = problem()
    one = books[1][:1].clone().requires_grad_(True)
    expanded = [books[0], one.expand(9, D), books[2]]
    dense = [books[0], one.detach().expand(9, D).contiguous().requires_grad_(True), books[2]]
    out, objective = forward_backward(x, expanded, backend)
    objective.backward()
    ref_out, ref_objective = forward_backward(x, dense, backend)
    ref_objective.backward()
    assert_same_result(out, ref_out)
    torch.testing.assert_close(one.grad, dense[1].grad.sum(0, keepdim=True), atol=1e-6, rtol=1e-5)


# --- inputs that alias the codebooks ------------------------------------------------------------

ALIASES = {  # leaves -> (x, codebooks): x shares storage with a codebook
    "view_of_codebook": lambda c: (c[0][3:11], c),
    "codebook_itself": lambda c: (c[0], c),
    "strided_view_of_codebook": lambda c: (c[2][1::3], c),
    "same_codebook_every_layer": lambda c: (c[1][2:6], [c[1], c[1], c[1]]),
}


@pytest.mark.parametrize("alias", list(ALIASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_aliasing_the_codebooks(backend, alias):
    """Works, matches the reference (gradients from both uses accumulate) and corrupts nothing."""
    _, books = problem()

    def run(fn, **kwargs):
        leaves = [b.clone().requires_grad_(True) for b in books]
        x, cbs = ALIASES[alias](leaves)
        saved = snapshot(*leaves)
        out = fn(x, cbs, BETA, grad_mode="full", **kwargs)
        gen = torch.Generator().manual_seed(1)
        g = torch.randn(out.quantized.shape, generator=gen).to(DEVICE)
        ((out.quantized * g).sum() + out.loss).backward()
        assert_untouched(saved)
        return x, out, [leaf.grad for leaf in leaves]

    x, out, grads = run(residual_quantize, backend=backend, precision="ieee", compute_stats=True)
    _, ref, ref_grads = run(residual_quantize_reference)
    hits = {"view_of_codebook": torch.arange(3, 11), "codebook_itself": torch.arange(SIZES[0]),
            "same_codebook_every_layer": torch.arange(2, 6)}.get(alias)
    if hits is not None:  # a row that is a code of layer 0 is at distance 0 from it
        assert torch.equal(out.indices[:, 0].cpu(), hits)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_module_in_eval_mode_quantizes_its_own_codebook(backend):
    rvq = ResidualVQ(len(SIZES), list(SIZES), D, BETA, ema=True, backend=backend,
                     precision="ieee").to(DEVICE).eval()
    before = copy.deepcopy(rvq.state_dict())
    x = rvq.vq_layers[1].embeddings
    quantized, indices, loss = rvq(x)
    ref = residual_quantize_reference(x.detach(), rvq.codebooks, BETA, codebook_loss=False)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(quantized, ref.quantized, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(loss, ref.loss, atol=2e-5, rtol=1e-4)
    for key, value in rvq.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- requires_grad, no_grad, inference_mode -------------------------------------------------------

@pytest.mark.parametrize("codebook_loss", [True, False])
@pytest.mark.parametrize("needs", ["neither", "inputs", "codebooks", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_requires_grad_on_either_side(backend, needs, codebook_loss):
    """Gradients exactly where asked (matching the reference), None elsewhere; statistics only
    when a codebook gradient needs them."""
    x0, books0 = problem()
    x = x0.clone().requires_grad_(needs in ("inputs", "both"))
    books = [b.clone().requires_grad_(needs in ("codebooks", "both")) for b in books0]
    saved = snapshot(x, *books)
    out = residual_quantize(x, books, BETA, grad_mode="full", codebook_loss=codebook_loss,
                            backend=backend, precision="ieee")
    wants_codebook_grad = needs in ("codebooks", "both") and codebook_loss
    assert (out.code_counts != ()) == wants_codebook_grad
    assert out.loss.requires_grad == (needs != "neither")
    assert out.quantized.requires_grad == (needs != "neither")
    assert out.indices.requires_grad is False

    ref = run_step(residual_quantize_reference, x0, books0, commitment_cost=BETA, grad_mode="full",
                   codebook_loss=codebook_loss, indices=out.indices)
    assert torch.equal(out.indices, residual_quantize_reference(x0, books0, BETA).indices)
    torch.testing.assert_close(out.quantized, ref.result.quantized.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.loss, ref.result.loss.detach(), atol=2e-5, rtol=1e-4)
    if needs == "neither":
        assert out.loss.grad_fn is None and out.quantized.grad_fn is None
        assert_untouched(saved)
        return
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(out.quantized.shape, generator=gen).to(DEVICE)
    ((out.quantized * g).sum() + (out.layer_losses * WEIGHTS.to(DEVICE)).sum()).backward()
    if x.requires_grad:
        torch.testing.assert_close(x.grad, ref.grad_x, atol=2e-5, rtol=1e-4)
    else:
        assert x.grad is None
    for book, ref_grad in zip(books, ref.grad_books):
        if wants_codebook_grad:
            torch.testing.assert_close(book.grad, ref_grad, atol=1e-5, rtol=1e-4)
        elif book.requires_grad:  # commitment-only loss: nothing reaches the codebooks
            assert book.grad is None or torch.count_nonzero(book.grad) == 0
        else:
            assert book.grad is None
    assert_untouched(saved)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_inference_mode(backend, mode):
    """Same values as with autograd on; no graph, no statistics unless asked for."""
    x, books = problem()
    x.requires_grad_(True)
    books = [b.requires_grad_(True) for b in books]
    saved = snapshot(x, *books)
    kwargs = dict(grad_mode="full", backend=backend, precision="ieee")
    with_grad = residual_quantize(x, books, BETA, **kwargs)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = residual_quantize(x, books, BETA, **kwargs)
        asked = residual_quantize(x, books, BETA, compute_stats=True, **kwargs)
    assert out.code_counts == () and out.code_sums == ()
    assert len(asked.code_counts) == len(SIZES)
    assert with_grad.code_counts != ()  # with autograd on, the codebook gradient needs them
    for a, b in zip(asked.code_counts, with_grad.code_counts):
        assert torch.equal(a, b)
    for tensor in (out.quantized, out.loss, out.layer_losses):
        assert not tensor.requires_grad and tensor.grad_fn is None
        assert tensor.is_inference() == (mode == "inference_mode")
    assert torch.equal(out.indices, with_grad.indices)
    assert torch.equal(out.quantized, with_grad.quantized.detach())
    assert torch.equal(out.loss, with_grad.loss.detach())
    assert_untouched(saved)


# --- modules: train vs eval, EMA ------------------------------------------------------------------

def make_module(kind, backend, *, check_finite=False, warm=True, seed=0):
    """ResidualVQ (EMA or not) or a single-layer module, with codebooks from make_problem and, for
    EMA, positive cluster sizes (a trained state)."""
    torch.manual_seed(seed)
    options = dict(backend=backend, precision="ieee", grad_mode="full", check_finite=check_finite)
    if kind in ("ResidualVQ", "ResidualVQ-ema"):
        module = ResidualVQ(len(SIZES), list(SIZES), D, BETA, ema=kind.endswith("ema"), **options)
        layers = list(module.vq_layers)
    else:
        module = (VQEmbeddingEMA if kind == "VQEmbeddingEMA" else VQEmbedding)(
            SIZES[0], D, BETA, **options)
        layers = [module]
    _, books = problem(seed=seed)
    with torch.no_grad():
        for layer, book in zip(layers, books):
            layer.embeddings.copy_(book)
            if layer.ema and warm:
                layer.ema_cluster_size.uniform_(0.5, 2.0)
                layer.ema_dw.copy_(book * layer.ema_cluster_size[:, None])
    return module.to(DEVICE), layers


def call(module, x):
    """``(quantized, indices (*, L), loss)`` of a module."""
    quantized, indices, loss = module(x)
    if isinstance(module, VQEmbedding):
        indices = indices[..., None]
    return quantized, indices, loss


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_equal(module, before, **tol):
    for key, value in module.state_dict().items():
        if tol:
            torch.testing.assert_close(value, before[key], **tol)
        else:
            assert torch.equal(value, before[key]), f"{key} changed"


def expected_ema_state(module, layers, x, indices):
    """The state after one EMA step from the reference's statistics for ``indices``."""
    books = [layer.embeddings.detach().clone() for layer in layers]
    ref = residual_quantize_reference(x, books, BETA, codebook_loss=False, indices=indices)
    expected = state(module)
    for index, layer in enumerate(layers):
        prefix = f"vq_layers.{index}." if isinstance(module, ResidualVQ) else ""
        ema_update_reference(expected[prefix + "embeddings"], expected[prefix + "ema_cluster_size"],
                             expected[prefix + "ema_dw"], ref.code_counts[index],
                             ref.code_sums[index], layer.decay, layer.eps)
    return expected


@pytest.mark.parametrize("kind", ["ResidualVQ-ema", "VQEmbeddingEMA"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_updates_in_training_only(backend, kind):
    module, layers = make_module(kind, backend)
    x, _ = problem(seed=4)
    saved = snapshot(x)
    module.eval()
    before = state(module)
    first = call(module, x)
    for _ in range(2):
        again = call(module, x)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert_state_equal(module, before)

    module.train()
    expected = expected_ema_state(module, layers, x, first[1])
    trained = call(module, x)
    assert torch.equal(trained[1], first[1])  # assigned with the pre-update codebooks
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before), f"unchanged by a training step: {set(before) - set(changed)}"
    assert_state_equal(module, expected, atol=1e-5, rtol=1e-5)

    module.eval()
    frozen = state(module)
    call(module, x)
    assert_state_equal(module, frozen)
    assert_untouched(saved)


@pytest.mark.parametrize("kind", ["ResidualVQ", "VQEmbedding"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_codebooks_change_only_through_gradients(backend, kind):
    module, _ = make_module(kind, backend)
    x, _ = problem(seed=4)
    for training in (True, False):
        module.train(training)
        before = state(module)
        quantized, _, loss = call(module, x.clone().requires_grad_(True))
        (quantized.sum() + loss).backward()
        assert_state_equal(module, before)
        assert all(p.grad is not None for p in module.parameters())
        module.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_training_step_without_autograd(backend, mode):
    """Under no_grad / inference_mode a training EMA module still updates, by the same step, and
    its state stays usable by a later step with autograd."""
    module, layers = make_module("ResidualVQ-ema", backend)
    twin = copy.deepcopy(module)
    x, _ = problem(seed=5)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        quantized, indices, loss = call(module, x)
    ref_q, ref_i, ref_loss = call(twin, x)
    assert torch.equal(indices, ref_i) and torch.equal(quantized, ref_q.detach())
    assert not loss.requires_grad
    assert_state_equal(module, state(twin))
    for value in module.state_dict().values():
        assert not value.is_inference()
    quantized, _, loss = call(module, x.clone().requires_grad_(True))
    (quantized.sum() + loss).backward()


# --- other dtypes and devices -----------------------------------------------------------------

DTYPE_CASES = {  # name: (input dtype, codebook dtypes per layer)
    "bf16_codebooks": (torch.float32, (torch.bfloat16,) * 3),
    "fp16_codebooks": (torch.float32, (torch.float16,) * 3),
    "mixed_codebooks": (torch.float32, (torch.bfloat16, torch.float32, torch.float16)),
    "fp64_input": (torch.float64, (torch.float32,) * 3),
    "fp64_everything": (torch.float64, (torch.float64,) * 3),
    "bf16_input_fp64_codebooks": (torch.bfloat16, (torch.float64,) * 3),
    "fp16_input_bf16_codebooks": (torch.float16, (torch.bfloat16,) * 3),
}


@pytest.mark.parametrize("case", list(DTYPE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_codebooks_in_another_dtype(backend, case):
    """Works in fp32 arithmetic: output and input gradient in the input's dtype, codebook
    gradients in each codebook's dtype, values as the reference's on fp32 copies."""
    x_dtype, book_dtypes = DTYPE_CASES[case]
    x, books = problem(dtype=x_dtype)
    books = [b.to(dt) for b, dt in zip(books, book_dtypes)]
    saved = snapshot(x, *books)
    step = run_step(residual_quantize, x, books, commitment_cost=BETA, grad_mode="full",
                    backend=backend, precision="ieee", compute_stats=True)
    assert step.result.quantized.dtype == x_dtype and step.grad_x.dtype == x_dtype
    assert [g.dtype for g in step.grad_books] == list(book_dtypes)
    # The reference on fp32 copies of the codebooks (what the kernels compute with); codebook
    # gradients rounded to each codebook's dtype.
    books32 = [b.float() for b in books]
    check_parity(Step(step.result, step.grad_x, []), x, books32, commitment_cost=BETA,
                 grad_mode="full")
    ref = run_step(residual_quantize_reference, x.float(), books32, commitment_cost=BETA,
                   grad_mode="full", indices=step.result.indices)
    for got, want in zip(step.grad_books, ref.grad_books):
        tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(got.dtype, 1e-5)
        torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max(), rtol=tol)
    assert_untouched(saved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_in_another_dtype_takes_fp32_inputs(backend, ema, dtype):
    module, layers = make_module("ResidualVQ-ema" if ema else "ResidualVQ", backend)
    module.to(dtype)
    x, _ = problem(seed=6)
    books = [layer.embeddings.detach().float() for layer in layers]
    expected = expected_ema_state(module, layers, x, residual_quantize_reference(
        x, books, BETA).indices) if ema else state(module)
    quantized, indices, loss = call(module, x)
    ref = residual_quantize_reference(x, books, BETA, codebook_loss=not ema)
    assert quantized.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(quantized, ref.quantized, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(loss, ref.loss, atol=2e-5, rtol=1e-4)
    for key, value in module.state_dict().items():  # EMA statistics stay fp32 by design
        assert value.dtype == (torch.float32 if ".ema_" in key else dtype), key
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
    assert_state_equal(module, expected, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_and_input_on_different_devices_is_a_clear_error(backend):
    module, _ = make_module("ResidualVQ-ema", backend)
    module.train()
    before = state(module)
    with pytest.raises(ValueError, match=f"inputs are on meta but codebook 0 is on {DEVICE}"):
        module(torch.randn(5, D, device="meta"))
    assert_state_equal(module, before)


def test_meta_tensors_give_output_shapes_on_the_torch_path():
    """Shape inference: a module on the meta device returns meta outputs of the right shapes."""
    module = ResidualVQ(len(SIZES), list(SIZES), D, BETA, backend="torch").to("meta")
    quantized, indices, loss = module(torch.empty(5, 7, D, device="meta"))
    assert quantized.shape == (5, 7, D) and indices.shape == (5, 7, len(SIZES))
    assert loss.shape == () and quantized.is_meta and indices.dtype == torch.int64


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_triton_backend_on_meta_tensors_is_a_clear_error():
    books = [torch.empty(4, D, device="meta")]
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on device meta"):
        residual_quantize(torch.empty(3, D, device="meta"), books, backend="triton")


# --- NaN / Inf: one policy on every path --------------------------------------------------------

PATHS = ["functional", "VQEmbedding", "VQEmbeddingEMA", "ResidualVQ", "ResidualVQ-ema"]
BAD_ROWS = [3, 10, 20]


def bad_batch(seed=7):
    x, _ = problem(n=40, seed=seed)
    x[3, 2] = float("nan")
    x[10, 0] = float("inf")
    x[20, 11] = -float("inf")
    good = torch.ones(40, dtype=torch.bool, device=DEVICE)
    good[BAD_ROWS] = False
    return x, good


def run_path(path, backend, x, *, check_finite=False, module=None):
    if path == "functional":
        _, books = problem()
        out = residual_quantize(x, books, BETA, grad_mode="full", backend=backend,
                                precision="ieee", check_finite=check_finite)
        return out.quantized, out.indices, out.loss
    return call(module, x)


@pytest.mark.parametrize("path, training", [("functional", True)] + [
    (path, training) for path in PATHS[1:] for training in (True, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_policy_on_every_path(backend, path, training):
    """NaN/Inf rows: index -1, NaN output, NaN loss; the other rows as without them; EMA steps
    use the finite rows only (the same state as a step on the clean rows alone)."""
    x, good = bad_batch()
    saved = snapshot(x)
    module = clean_module = None
    if path != "functional":
        module, _ = make_module(path, backend)
        module.train(training)
        clean_module = copy.deepcopy(module)
    quantized, indices, loss = run_path(path, backend, x, module=module)
    clean_q, clean_i, clean_loss = run_path(path, backend, x[good], module=clean_module)

    assert (indices[~good] == -1).all() and (indices[good] >= 0).all()
    assert torch.isnan(quantized[~good]).all()
    assert torch.equal(indices[good], clean_i)
    assert torch.equal(quantized[good], clean_q)
    assert torch.isnan(loss) and torch.isfinite(clean_loss)
    if module is not None:
        for value in module.state_dict().values():
            assert torch.isfinite(value).all()
        assert_state_equal(module, clean_module.state_dict(), atol=1e-6, rtol=1e-6)
    assert_untouched(saved)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_raises_on_every_path_before_any_update(backend, path):
    x, _ = bad_batch()
    saved = snapshot(x)
    module = None
    if path != "functional":
        module, _ = make_module(path, backend, check_finite=True)
        module.train()
        before = state(module)
    with pytest.raises(ValueError, match="inputs hold NaN/Inf in 3 row\\(s\\); first bad row: 3"):
        run_path(path, backend, x, check_finite=True, module=module)
    if module is not None:
        assert_state_equal(module, before)
    assert_untouched(saved)


@pytest.mark.parametrize("kind", ["ResidualVQ-ema", "VQEmbeddingEMA"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nan_batch_keeps_trained_ema_codebooks_finite(backend, kind):
    """Documented: bad rows stay out of the statistics, so the EMA step cannot poison codebooks."""
    module, _ = make_module(kind, backend)
    module.train()
    _, indices, loss = call(module, torch.full((16, D), float("nan"), device=DEVICE))
    assert (indices == -1).all() and torch.isnan(loss)
    for key, value in module.state_dict().items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("warm", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_leaves_vq_embedding_ema_alone(backend, warm):
    """README: an empty batch "leaves EMA state unchanged on a single process" (test_bad_input
    checks ResidualVQ); a fresh module would otherwise divide by a zero total."""
    module, _ = make_module("VQEmbeddingEMA", backend, warm=warm)
    module.train()
    before = state(module)
    call(module, torch.zeros(0, D, device=DEVICE))
    assert_state_equal(module, before)


# --- known library bugs (these fail today; see each docstring) ----------------------------------

@pytest.mark.parametrize("kind", ["ResidualVQ-ema", "VQEmbeddingEMA"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nan_batch_cannot_poison_fresh_ema_codebooks(backend, kind):
    """README: bad rows stay out of the statistics "so an EMA step cannot poison the codebooks".
    A freshly built EMA module (ema_cluster_size = 0) fed only NaN rows divides by a zero total."""
    module, _ = make_module(kind, backend, warm=False)
    module.train()
    call(module, torch.full((16, D), float("nan"), device=DEVICE))
    for key, value in module.state_dict().items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_duplicate_codes_go_to_the_lowest_index(backend):
    """Ties go to the lowest index (reference.nearest_code, kernels). With identical codes the
    PyTorch path (and the reference) score the copies through a BLAS GEMM whose edge columns
    round differently, so some rows pick the last copy: IDs then differ between backends."""
    x, books = problem()
    copies = books[1][:1].repeat(9, 1)
    out = residual_quantize(x, [books[0], copies, books[2]], BETA, backend=backend,
                            precision="ieee")
    assert (out.indices[:, 1] == 0).all(), out.indices[:, 1].tolist()


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_codes_are_treated_alike_on_every_backend(bad):
    """One policy on every path: today a NaN/Inf code wins every row on the PyTorch path and in
    the reference (torch.argmin returns the NaN), and is never chosen by the Triton kernels."""
    x, books = problem()
    books[0][5, 3] = float(bad)
    results = {backend: residual_quantize(x, books, BETA, backend=backend, precision="ieee")
               for backend in BACKENDS}
    ref = residual_quantize_reference(x, books, BETA)
    for backend, out in results.items():
        assert torch.equal(out.indices, ref.indices), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_aliasing_an_ema_codebook_gets_pre_update_gradients(backend):
    """x = an EMA layer's own codebook in training: the forward saves x (no copy when
    contiguous), the EMA step rewrites it through ``.data`` (no version bump), and backward then
    rebuilds residuals from the updated codebook: silently wrong input gradients. Either the
    gradient of the pre-update computation or autograd's in-place error is acceptable."""
    module, layers = make_module("ResidualVQ-ema", backend)
    module.train()
    for layer in layers:
        layer.decay = 0.0  # a large step, so a stale x shows
    snapshot_books = [layer.embeddings.detach().clone() for layer in layers]
    x = layers[1].embeddings
    x_before = x.detach().clone()
    quantized, indices, loss = module(x)
    try:
        (quantized.sum() + 100.0 * loss).backward()
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
        return
    ref_x = x_before.clone().requires_grad_(True)
    ref = residual_quantize_reference(ref_x, snapshot_books, BETA, grad_mode="full",
                                      codebook_loss=False, indices=indices)
    (ref.quantized.sum() + 100.0 * ref.loss).backward()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("warm", [True, False])
@pytest.mark.parametrize("kind", ["ResidualVQ-ema", "VQEmbeddingEMA"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nan_batch_leaves_ema_state_unchanged(backend, kind, warm):
    """An EMA step with no finite row (all NaN/Inf) changes nothing, like an empty batch."""
    module, _ = make_module(kind, backend, warm=warm)
    module.train()
    before = state(module)
    call(module, torch.full((16, D), float("nan"), device=DEVICE))
    assert_state_equal(module, before)
