"""rqvae_fast.compat.ResidualVQ: options, documented semantics (against rqvae_fast.reference), and
parity with vector-quantize-pytorch itself (``rotation_trick=False``) when it is installed."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from rqvae_fast.compat import ResidualVQ, kmeans
from rqvae_fast.reference import residual_quantize_reference

ATOL = RTOL = 1e-5  # fp32 values, losses and gradients (same arithmetic up to summation order)

try:  # the comparison against vector-quantize-pytorch is skipped (only it) when it is missing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vector_quantize_pytorch import ResidualVQ as TheirRVQ
        from vector_quantize_pytorch.vector_quantize_pytorch import kmeans as their_kmeans
except Exception:  # noqa: BLE001 - ImportError, or a dependency that fails to import
    TheirRVQ = None
needs_vqp = pytest.mark.skipif(TheirRVQ is None, reason="vector-quantize-pytorch is not installed")


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def data(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def layer_books(model):
    return [layer.codebook.detach().clone() for layer in model.layers]


# ------------------------------------------------------------------------------------------
# construction and bad input


@pytest.mark.parametrize("option", [
    dict(orthogonal_reg_weight=0.1), dict(heads=2), dict(diveq=True), dict(directional_reparam=True),
    dict(affine_param=True), dict(straight_through=True), dict(accept_image_fmap=True),
])
def test_unsupported_options_raise_naming_them(option):
    (name, value), = option.items()
    with pytest.raises(ValueError, match=name):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **option)


def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="not_an_option"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, not_an_option=3)


def test_switched_off_options_are_accepted():
    model = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, rotation_trick=False, heads=1,
                       use_cosine_sim=False, orthogonal_reg_weight=0.0, shared_codebook=False,
                       quantize_dropout=False, stochastic_sample_codes=False, sync_kmeans=True)
    assert model.num_quantizers == 2 and model.codebook_sizes == (16, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(codebook_size=16), "num_quantizers"),
    (dict(codebook_size=(16, 8), num_quantizers=3), "num_quantizers"),
    (dict(codebook_size=(16, 0)), "codebook_size"),
    (dict(codebook_size=16, num_quantizers=2, decay=1.5), "decay"),
    (dict(codebook_size=16, num_quantizers=2, learnable_codebook=True, ema_update=True), "ema_update"),
    (dict(codebook_size=16, num_quantizers=2, kmeans_iters=0), "kmeans_iters"),
    (dict(codebook_size=16, num_quantizers=2, codebook_dim=0), "codebook_dim"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResidualVQ(dim=8, **kwargs)


def test_bad_forward_input():
    model = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)
    x = data((2, 5, 8), 0)
    with pytest.raises(ValueError, match="shape"):
        model(data((2, 5, 7), 0))
    with pytest.raises(ValueError, match="shape"):
        model(x[0, 0])
    with pytest.raises(TypeError, match="floating"):
        model(torch.ones(2, 5, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="bool"):
        model(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="mask"):
        model(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices"):
        model(x, indices=torch.zeros(2, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="quantize_dropout"):
        model.get_codes_from_indices(torch.zeros(2, 5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="layer 1"):
        model.get_codes_from_indices(torch.tensor([[[0, 16]]]))


def test_state_dict_layout():
    model = ResidualVQ(dim=8, codebook_size=(16, 4), codebook_dim=6)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layers.1._codebook.embed"] == (1, 4, 6)
    assert shapes["layers.1._codebook.embed_avg"] == (1, 4, 6)
    assert shapes["layers.1._codebook.cluster_size"] == (1, 4)
    assert shapes["layers.0._codebook.initted"] == ()
    assert shapes["project_in.weight"] == (6, 8) and shapes["project_out.weight"] == (8, 6)
    assert model.state_dict()["layers.0._codebook.cluster_size"].eq(1).all()  # their start value


# ------------------------------------------------------------------------------------------
# documented semantics, against rqvae_fast.reference


def forward_backward(model, x, grad, weights, mask=None):
    x = x.clone().requires_grad_()
    quantized, indices, losses = model(x, mask=mask)
    total = (quantized * grad).sum() + (losses * weights).sum()
    if total.requires_grad:
        total.backward()
    return quantized.detach(), indices, losses.detach(), x.grad


@pytest.mark.parametrize("codebook_dim", [None, 6])
def test_training_step_matches_reference_and_ema_formula(codebook_dim):
    torch.manual_seed(0)
    w, decay, eps = 0.4, 0.9, 1e-5
    model = ResidualVQ(dim=8, rotation_trick=False, codebook_size=(16, 8, 4), codebook_dim=codebook_dim, decay=decay,
                       eps=eps, commitment_weight=w)
    x, grad = data((3, 10, 8), 1), data((3, 10, 8), 2)
    weights = torch.tensor([1.0, 2.0, 3.0])
    books = layer_books(model)
    sizes = [layer._codebook.cluster_size[0].clone() for layer in model.layers]
    avgs = [layer._codebook.embed_avg[0].clone() for layer in model.layers]
    x_before = x.clone()

    # the oracle: project in, layer_ste routing, commitment-only loss, project out
    xr = x.clone().requires_grad_()
    rows = model.project_in(xr).reshape(-1, model.codebook_dim)
    ref = residual_quantize_reference(rows, books, w, grad_mode="layer_ste", codebook_loss=False)
    ref_out = model.project_out(ref.quantized).reshape(3, 10, 8)
    ((ref_out * grad).sum() + (ref.layer_losses * weights).sum()).backward()

    quantized, indices, losses, grad_x = forward_backward(model, x, grad, weights)
    assert torch.equal(x, x_before)
    assert indices.shape == (3, 10, 3) and indices.dtype == torch.int64
    assert torch.equal(indices.reshape(-1, 3), ref.indices)
    close(quantized, ref_out.detach())
    close(losses, ref.layer_losses.detach())
    close(grad_x, xr.grad)
    for layer, book, size, avg, counts, sums in zip(model.layers, books, sizes, avgs,
                                                    ref.code_counts, ref.code_sums):
        new_size = decay * size + (1 - decay) * counts
        new_avg = decay * avg + (1 - decay) * sums
        smoothed = (new_size + eps) / (new_size.sum() + new_size.numel() * eps) * new_size.sum()
        close(layer._codebook.cluster_size[0], new_size)
        close(layer._codebook.embed_avg[0], new_avg)
        close(layer.codebook, new_avg / smoothed[:, None])


def test_output_gradient_is_q_times_straight_through():
    model = ResidualVQ(dim=8, rotation_trick=False, num_quantizers=3, codebook_size=16, commitment_weight=0.0)
    x, grad = data((2, 7, 8), 3), data((2, 7, 8), 4)
    _, _, losses, grad_x = forward_backward(model, x, grad, torch.ones(3))
    assert torch.count_nonzero(losses) == 0
    close(grad_x, 3 * grad)


def test_every_layers_commitment_reaches_the_input():
    model = ResidualVQ(dim=8, rotation_trick=False, num_quantizers=3, codebook_size=16, commitment_weight=0.5)
    x = data((4, 8), 5)
    books = layer_books(model)
    ref = residual_quantize_reference(x, books, 0.5, grad_mode="layer_ste", codebook_loss=False)
    residual, expected = x.clone(), torch.zeros_like(x)
    for layer in range(3):
        code = books[layer][ref.indices[:, layer]]
        expected += (layer + 1.0) * 2 * 0.5 / x.numel() * (residual - code)
        residual = residual - code
    _, _, _, grad_x = forward_backward(model, x, torch.zeros_like(x), torch.tensor([1.0, 2.0, 3.0]))
    close(grad_x, expected)


def test_eval_mode_losses_are_zero_and_output_has_no_input_gradient():
    model = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16).eval()
    x = data((2, 6, 8), 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, indices, losses = model(x.clone().requires_grad_())
    assert not quantized.requires_grad
    assert torch.equal(losses, torch.zeros(3))
    ref = residual_quantize_reference(x.reshape(-1, 8), layer_books(model), 0.0, grad_mode="layer_ste")
    assert torch.equal(indices.reshape(-1, 3), ref.indices)
    close(quantized, ref.quantized.reshape(2, 6, 8))
    close(model.get_output_from_indices(indices), quantized)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"eval mode changed {key}"


def test_mask_semantics():
    torch.manual_seed(1)
    model = ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, decay=0.5, commitment_weight=0.3)
    x, grad = data((3, 9, 8), 7), data((3, 9, 8), 8)
    mask = data((3, 9), 9) > 0
    mask_before = mask.clone()
    books = layer_books(model)
    keep = mask.reshape(-1)
    ref = residual_quantize_reference(x.reshape(-1, 8)[keep], books, 0.3, grad_mode="layer_ste",
                                      codebook_loss=False)
    quantized, indices, losses, grad_x = forward_backward(model, x, grad, torch.ones(2), mask=mask)
    assert torch.equal(mask, mask_before)
    assert torch.equal(quantized[~mask], torch.zeros_like(quantized[~mask]))
    assert torch.equal(indices[~mask], torch.full_like(indices[~mask], -1))
    assert torch.equal(indices[mask], ref.indices)
    close(quantized[mask], ref.quantized)
    close(losses, ref.layer_losses)  # mean over the unmasked rows only
    assert torch.equal(grad_x[~mask], torch.zeros_like(grad_x[~mask]))
    for layer, counts in zip(model.layers, ref.code_counts):  # statistics of unmasked rows only
        close(layer._codebook.cluster_size[0], 0.5 * torch.ones(8) + 0.5 * counts)
    model.return_zeros_for_masked_padding = False
    quantized, _, _ = model(x, mask=mask)
    assert torch.equal(quantized[~mask], x[~mask])


def test_learnable_codebook_gradients():
    torch.manual_seed(2)
    w = 0.7
    model = ResidualVQ(dim=8, rotation_trick=False, num_quantizers=2, codebook_size=16, commitment_weight=w,
                       learnable_codebook=True, ema_update=False)
    assert isinstance(model.layers[0]._codebook.embed, torch.nn.Parameter)
    x, grad = data((2, 8, 8), 10), data((2, 8, 8), 11)
    books = [layer.codebook.detach().clone().requires_grad_() for layer in model.layers]
    xr = x.clone().requires_grad_()
    # their loss w * mse(e_l, r_l) trains both sides: the reference with beta = 1 holds
    # mse(e, sg r) + mse(r, sg e), i.e. the same gradients at twice the value
    ref = residual_quantize_reference(xr.reshape(-1, 8), books, 1.0, grad_mode="layer_ste")
    ((ref.quantized.reshape(2, 8, 8) * grad).sum() + w * ref.layer_losses.sum()).backward()
    quantized, _, losses, grad_x = forward_backward(model, x, grad, torch.ones(2))
    close(losses, w * ref.layer_losses.detach() / 2)
    close(grad_x, xr.grad)
    for layer, book in zip(model.layers, books):
        close(layer._codebook.embed.grad[0], book.grad)
        assert torch.equal(layer.codebook.detach(), book.detach())  # no EMA
    model.zero_grad()
    x2 = x.clone().requires_grad_()
    out = model(x2, freeze_codebook=True)
    (out[2].sum() + out[0].sum()).backward()
    assert all(layer._codebook.embed.grad is None for layer in model.layers)


def test_dead_codes_are_reseeded_from_the_layer_inputs():
    torch.manual_seed(3)
    threshold = 1.3  # EMA sizes here are 0.5 + 0.5 * count: never 1.3
    model = ResidualVQ(dim=4, num_quantizers=2, codebook_size=32, decay=0.5,
                       threshold_ema_dead_code=threshold)
    x = data((1, 20, 4), 12)
    books = layer_books(model)
    ref = residual_quantize_reference(x.reshape(-1, 4), books, 1.0, grad_mode="layer_ste",
                                      codebook_loss=False)
    inputs = [x.reshape(-1, 4), x.reshape(-1, 4) - books[0][ref.indices[:, 0]]]
    model(x)
    for layer, counts, rows in zip(model.layers, ref.code_counts, inputs):
        size = 0.5 + 0.5 * counts
        dead = size < threshold
        assert dead.any() and (~dead).any()
        cb = layer._codebook
        reseeded = cb.cluster_size[0] == threshold
        assert not reseeded[~dead].any()
        # 20 rows: min(#dead, 20) dead codes are re-seeded, the others keep their averages
        assert int(reseeded.sum()) == min(int(dead.sum()), rows.shape[0])
        close(cb.cluster_size[0][~reseeded], size[~reseeded])
        replaced = cb.embed[0][reseeded]
        # each re-seeded code is one of this layer's input rows, no row used twice
        match = (replaced[:, None, :] - rows[None]).abs().amax(dim=2) < 1e-6
        assert match.any(dim=1).all()
        assert int(match.any(dim=0).sum()) == int(reseeded.sum())
        close(cb.embed_avg[0][reseeded], replaced * threshold)


def test_alive_codes_follow_ema_when_others_expire():
    torch.manual_seed(4)
    eps, decay = 1e-5, 0.5
    model = ResidualVQ(dim=4, num_quantizers=1, codebook_size=32, decay=decay,
                       threshold_ema_dead_code=1.2)
    x = data((1, 12, 4), 13)  # fewer rows than dead codes: only 12 are re-seeded
    book = layer_books(model)[0]
    avg = model.layers[0]._codebook.embed_avg[0].clone()
    ref = residual_quantize_reference(x.reshape(-1, 4), [book], 1.0, grad_mode="layer_ste",
                                      codebook_loss=False)
    model(x)
    size = decay + (1 - decay) * ref.code_counts[0]
    new_avg = decay * avg + (1 - decay) * ref.code_sums[0]
    smoothed = (size + eps) / (size.sum() + 32 * eps) * size.sum()
    cb = model.layers[0]._codebook
    dead = size < 1.2
    reseeded = cb.cluster_size[0] == 1.2
    assert int(dead.sum()) > 12 and int(reseeded.sum()) == 12 and not reseeded[~dead].any()
    kept = ~reseeded
    close(cb.embed[0][kept], (new_avg / smoothed[:, None])[kept])
    close(cb.cluster_size[0][kept], size[kept])


def test_empty_and_fully_masked_batches_leave_codebooks_alone():
    model = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, threshold_ema_dead_code=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, indices, losses = model(torch.zeros(0, 3, 4))
    assert quantized.shape == (0, 3, 4) and indices.shape == (0, 3, 2)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    quantized, indices, losses = model(data((2, 3, 4), 14), mask=mask)
    assert torch.equal(indices, torch.full((2, 3, 2), -1)) and not quantized.any()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_kmeans_init_semantics():
    torch.manual_seed(5)
    eps = 1e-5
    model = ResidualVQ(dim=4, codebook_size=(8, 4), kmeans_init=True, kmeans_iters=5, eps=eps).eval()
    assert not bool(model.layers[0]._codebook.initted)
    assert torch.equal(model.layers[0].codebook, torch.zeros(8, 4))
    x = data((3, 20, 4), 15)
    model(x)
    rows = x.reshape(-1, 4)
    for layer in model.layers:
        cb = layer._codebook
        assert bool(cb.initted)
        assert cb.cluster_size.sum() == rows.shape[0]
        total = cb.cluster_size[0].sum()
        smoothed = (cb.cluster_size[0] + eps) / (total + layer.codebook_size * eps) * total
        close(cb.embed[0], cb.embed_avg[0] / smoothed[:, None])
        ref = residual_quantize_reference(rows, [layer.codebook], 0.0)
        rows = rows - layer.codebook[ref.indices[:, 0]]
    first = layer_books(model)
    model(data((3, 20, 4), 16))  # initialised once only
    for a, b in zip(first, layer_books(model)):
        assert torch.equal(a, b)


def test_kmeans_is_lloyd():
    torch.manual_seed(6)
    points = data((200, 3), 17)
    torch.manual_seed(7)
    means, bins = kmeans(points, 6, 4)
    torch.manual_seed(7)
    expected = points[torch.randperm(200)[:6]]
    for _ in range(4):
        assign = torch.cdist(points, expected).argmin(dim=1)
        counts = torch.bincount(assign, minlength=6).float()
        sums = torch.zeros(6, 3).index_add_(0, assign, points)
        expected = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], expected)
    close(means, expected)
    assert torch.equal(bins, counts)
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.zeros(0, 3), 4)


def test_codes_from_indices_and_codebooks():
    model = ResidualVQ(dim=8, codebook_size=(16, 8), codebook_dim=4).eval()
    x = data((2, 5, 8), 18)
    quantized, indices, _, codes = model(x, return_all_codes=True)
    assert codes.shape == (2, 2, 5, 4)
    close(model.get_codes_from_indices(indices), codes)
    close(model.get_output_from_indices(indices), quantized)
    dropped = indices.clone()
    dropped[..., 1] = -1
    assert torch.equal(model.get_codes_from_indices(dropped)[1], torch.zeros(2, 5, 4))
    books = model.codebooks
    assert isinstance(books, tuple) and [tuple(b.shape) for b in books] == [(16, 4), (8, 4)]
    uniform = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)
    assert uniform.codebooks.shape == (3, 16, 8) and uniform.codebook_size == 16


def test_single_token_inputs():
    model = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)
    x = data((5, 8), 19)
    quantized, indices, losses = model(x)
    assert quantized.shape == (5, 8) and indices.shape == (5, 2) and losses.shape == (2,)


def test_non_finite_rows_get_index_minus_one_and_stay_out_of_the_averages():
    model = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8)
    x = data((1, 6, 4), 20)
    x[0, 2, 1] = float("nan")
    books = layer_books(model)
    ref = residual_quantize_reference(x[0, [0, 1, 3, 4, 5]], books, 1.0, grad_mode="layer_ste")
    _, indices, _ = model(x)
    assert torch.equal(indices[0, 2], torch.tensor([-1, -1]))
    close(model.layers[0]._codebook.cluster_size[0], 0.8 + 0.2 * ref.code_counts[0])


# ------------------------------------------------------------------------------------------
# parity with vector-quantize-pytorch (rotation_trick=False), codebooks copied across


def pair(**kwargs):
    kwargs.setdefault("rotation_trick", False)  # the straight-through cases; rotation: test_compat_options
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TheirRVQ(**kwargs)
    ours = ResidualVQ(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def assert_states_close(theirs, ours, atol=ATOL):
    mine = ours.state_dict()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(mine[key].float(), value.float(), atol=atol, rtol=RTOL,
                                   msg=lambda m: f"{key}: {m}")


def run_both(theirs, ours, x, grad, weights, mask=None):
    outs = []
    for model in (theirs, ours):
        model.zero_grad()
        outs.append(forward_backward(model, x, grad, weights, mask=mask))
    (q_t, i_t, l_t, g_t), (q_o, i_o, l_o, g_o) = outs
    assert torch.equal(i_t, i_o)
    close(q_o, q_t)
    close(l_o, l_t)
    if g_t is None:
        assert g_o is None
    else:
        close(g_o, g_t)
    for (name, p_t), p_o in zip(theirs.named_parameters(), ours.parameters()):
        assert (p_t.grad is None) == (p_o.grad is None), name
        if p_t.grad is not None:
            close(p_o.grad, p_t.grad)


PARITY_CASES = {
    "uniform": dict(dim=8, num_quantizers=3, codebook_size=16, decay=0.8, commitment_weight=0.7),
    "per_layer_sizes_projection": dict(dim=8, codebook_size=(16, 8, 32), codebook_dim=6,
                                       decay=0.9, commitment_weight=1.0),
    "learnable": dict(dim=8, num_quantizers=2, codebook_size=16, commitment_weight=0.5,
                      learnable_codebook=True, ema_update=False),
}


@needs_vqp
@pytest.mark.parametrize("case", list(PARITY_CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_parity_with_vector_quantize_pytorch(case, masked):
    theirs, ours = pair(**PARITY_CASES[case])
    weights = torch.tensor([1.0, 2.0, 3.0])[: ours.num_quantizers]
    for step in range(3):
        x, grad = data((3, 10, 8), 100 + step), data((3, 10, 8), 200 + step)
        mask = (data((3, 10), 300 + step) > -0.5) if masked else None
        for model in (theirs, ours):
            model.eval()
        run_both(theirs, ours, x, grad, weights, mask)
        for model in (theirs, ours):
            model.train()
        run_both(theirs, ours, x, grad, weights, mask)
        assert_states_close(theirs, ours)  # EMA-updated codebooks and buffers
    theirs.load_state_dict(ours.state_dict(), strict=True)  # and back


@needs_vqp
def test_parity_of_codes_from_indices():
    theirs, ours = pair(dim=8, codebook_size=(16, 8), codebook_dim=4)
    x = data((2, 5, 8), 21)
    theirs.eval(), ours.eval()
    out_t = theirs(x, return_all_codes=True)
    out_o = ours(x, return_all_codes=True)
    close(out_o[3], out_t[3])
    indices = out_o[1].clone()
    indices[0, 0, 1] = -1
    close(ours.get_codes_from_indices(indices), theirs.get_codes_from_indices(indices))
    close(ours.get_output_from_indices(indices), theirs.get_output_from_indices(indices))
    for a, b in zip(ours.codebooks, theirs.codebooks):
        assert torch.equal(a, b)


@needs_vqp
def test_parity_of_dead_code_expiry_on_alive_codes():
    theirs, ours = pair(dim=4, num_quantizers=2, codebook_size=32, decay=0.5,
                        threshold_ema_dead_code=1.2)
    x = data((2, 40, 4), 22)  # more rows than dead codes: every dead code is re-seeded
    theirs(x), ours(x)
    for layer_t, layer_o in zip(theirs.layers, ours.layers):
        size_t, size_o = layer_t._codebook.cluster_size[0], layer_o._codebook.cluster_size[0]
        reseeded = size_o == 1.2
        assert torch.equal(reseeded, size_t == 1.2)  # the same codes expired
        assert reseeded.any() and (~reseeded).any()
        close(layer_o.codebook[~reseeded], layer_t._codebook.embed[0][~reseeded])
        close(size_o, size_t)


@needs_vqp
@pytest.mark.parametrize("n, k, iters", [(200, 16, 10), (50, 20, 3), (10, 16, 2)])
def test_parity_of_kmeans(n, k, iters):
    samples = data((n, 5), 23)
    torch.manual_seed(8)
    means_t, bins_t = their_kmeans(samples[None], k, iters)
    torch.manual_seed(8)
    means_o, bins_o = kmeans(samples, k, iters)
    close(means_o, means_t[0])
    assert torch.equal(bins_o, bins_t[0])


@needs_vqp
def test_parity_of_kmeans_init():
    theirs, ours = pair(dim=8, num_quantizers=2, codebook_size=16, kmeans_init=True, decay=0.9)
    x = data((4, 30, 8), 24)
    outs = []
    for model in (theirs, ours):
        torch.manual_seed(9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs.append(model(x))
    assert torch.equal(outs[0][1], outs[1][1])
    close(outs[1][0], outs[0][0])
    assert_states_close(theirs, ours)


def test_vector_quantize_pytorch_semantics_hold_without_it():
    """The oracle used above in one line: F.mse on the codes chosen by the reference."""
    model = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, commitment_weight=2.0)
    x = data((2, 4, 8), 25)
    books = layer_books(model)
    ref = residual_quantize_reference(x.reshape(-1, 8), books, 0.0, grad_mode="layer_ste")
    residual, expected = x.reshape(-1, 8), []
    for layer in range(2):
        code = books[layer][ref.indices[:, layer]]
        expected.append(2.0 * F.mse_loss(code, residual))
        residual = residual - code
    _, _, losses = model(x)
    close(losses, torch.stack(expected))


@needs_vqp
def test_parity_learnable_codebook_with_inputs_without_gradient():
    theirs, ours = pair(dim=8, num_quantizers=2, codebook_size=16, commitment_weight=0.5,
                        learnable_codebook=True, ema_update=False)
    x, grad = data((2, 6, 8), 26), data((2, 6, 8), 27)
    for training in (True, False):
        grads = []
        for model in (theirs, ours):
            model.train(training)
            model.zero_grad()
            quantized, _, losses = model(x)  # x does not require grad: no straight-through
            ((quantized * grad).sum() + losses.sum()).backward()
            grads.append([layer._codebook.embed.grad for layer in model.layers])
        for g_t, g_o in zip(*grads):
            assert g_t is not None and g_o is not None
            close(g_o, g_t)
