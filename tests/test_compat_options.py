"""rqvae_fast.compat with vector-quantize-pytorch's options: parity with that library (state copied
by strict load_state_dict; forward values, indices, losses, input and parameter gradients and the
state after a training step, within 1e-4 relative), and the options' documented semantics."""
import random
import warnings

import pytest
import torch

from rqvae_fast.compat import GroupedResidualVQ, ResidualVQ

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vector_quantize_pytorch import GroupedResidualVQ as TheirGRVQ
        from vector_quantize_pytorch import ResidualVQ as TheirRVQ
except Exception:  # noqa: BLE001 - not installed, or a dependency fails to import
    TheirRVQ = TheirGRVQ = None
needs_vqp = pytest.mark.skipif(TheirRVQ is None, reason="vector-quantize-pytorch is not installed")

REL = 1e-4


def assert_rel(ours, theirs, what):
    ours, theirs = ours.float(), theirs.float()
    scale = theirs.abs().max().clamp(min=1e-6) if theirs.numel() else 1.0
    err = (ours - theirs).abs().max() / scale if theirs.numel() else 0.0
    assert err <= REL, f"{what}: relative difference {float(err):.2e}"


def one_step(model, x, grad, mask=None, **forward):
    x = x.clone().requires_grad_()
    quantized, indices, losses = model(x, mask=mask, **forward)
    weights = torch.rand(losses.shape, generator=torch.Generator().manual_seed(5))
    total = (quantized * grad).sum() + (losses * weights).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = (torch.autograd.grad(total, [x] + params, allow_unused=True) if total.requires_grad
             else (None,) * (1 + len(params)))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return quantized.detach(), indices, losses.detach(), grads, state


def compare(make_theirs, make_ours, *, dim, train=True, masked=False, seed=0, skip_state=(),
            batch=3, **forward):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = make_theirs().train(train)
    ours = make_ours().train(train)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 41, dim, generator=gen) * 2
    grad = torch.randn(batch, 41, dim, generator=gen)
    mask = (torch.rand(batch, 41, generator=gen) > 0.3) if masked else None
    results = []
    for model in (theirs, ours):
        torch.manual_seed(seed + 2)  # same global generator state for sampling / dropout draws
        out = one_step(model, x, grad, mask, **forward)
        results.append(out)
    (q1, i1, l1, g1, s1), (q2, i2, l2, g2, s2) = results
    assert torch.equal(i1, i2), "indices"
    assert_rel(q2, q1, "output")
    assert_rel(l2, l1, "losses")
    assert len(g1) == len(g2)
    for k, (a, b) in enumerate(zip(g2, g1)):
        assert (a is None) == (b is None) or not (a if a is not None else b).any(), f"gradient {k}"
        if a is not None and b is not None:
            assert_rel(a, b, "input gradient" if k == 0 else f"parameter gradient {k}")
    assert s1.keys() == s2.keys()
    for key in s1:
        if not any(part in key for part in skip_state):
            assert_rel(s2[key], s1[key], f"state {key}")
    return results


BASE = dict(dim=12, num_quantizers=3, codebook_size=24)
CASES = {
    "defaults": dict(),
    "rotation_per_layer_sizes_projection": dict(codebook_size=(24, 10, 7), num_quantizers=None,
                                                codebook_dim=5),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "cosine": dict(use_cosine_sim=True),
    "cosine_straight_through": dict(use_cosine_sim=True, rotation_trick=False),
    "shared_codebook": dict(shared_codebook=True),
    "quant_grad_frac": dict(quant_grad_frac=0.5),
    "implicit_neural_codebook": dict(implicit_neural_codebook=True, mlp_kwargs=dict(depth=2)),
    "stochastic_sample_codes": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "quantize_dropout": dict(quantize_dropout=True, quantize_dropout_cutoff_index=1),
    "quantize_dropout_cosine": dict(quantize_dropout=True, use_cosine_sim=True),
}


@needs_vqp
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_parity(case, masked):
    kwargs = {**BASE, **CASES[case]}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    compare(lambda: TheirRVQ(**kwargs), lambda: ResidualVQ(**kwargs), dim=kwargs["dim"],
            masked=masked)


@needs_vqp
@pytest.mark.parametrize("case", [
    # straight-through for the shared case: there a row nearly opposite its code makes their
    # rotated value (ours: the code exactly) round off by ~1e-3 relative
    dict(threshold_ema_dead_code=2),
    dict(threshold_ema_dead_code=2, shared_codebook=True, rotation_trick=False),
    dict(threshold_ema_dead_code=2, use_cosine_sim=True), dict(kmeans_init=True, use_cosine_sim=True)])
def test_dead_codes_and_cosine_kmeans_parity_with_the_same_random_draws(case):
    # one sequence per batch: with B > 1 their shared-codebook re-seed samples the first sequence only
    kwargs = {**BASE, **case}
    compare(lambda: TheirRVQ(**kwargs), lambda: ResidualVQ(**kwargs), dim=kwargs["dim"], batch=1)


@needs_vqp
@pytest.mark.parametrize("case", ["defaults", "cosine", "implicit_neural_codebook"])
def test_eval_parity(case):
    kwargs = {**BASE, **CASES[case]}
    compare(lambda: TheirRVQ(**kwargs), lambda: ResidualVQ(**kwargs), dim=kwargs["dim"], train=False)


@needs_vqp
@pytest.mark.parametrize("seed", [3, 8])
def test_quantize_dropout_with_a_fixed_seed(seed):
    kwargs = dict(BASE, num_quantizers=6, quantize_dropout=True, quantize_dropout_multiple_of=2)
    results = compare(lambda: TheirRVQ(**kwargs), lambda: ResidualVQ(**kwargs), dim=kwargs["dim"],
                      rand_quantize_dropout_fixed_seed=seed)
    indices, losses = results[1][1], results[1][2]
    cutoff = random.Random(seed).randrange(0, 6)
    cutoff = min(-(-(cutoff + 1) // 2) * 2 - 1, 5)
    assert (indices[..., cutoff + 1:] == -1).all() and (indices[..., :cutoff + 1] >= 0).all()
    assert (losses[cutoff + 1:] == 0).all()


@needs_vqp
@pytest.mark.parametrize("train, beam, cosine", [(False, 3, False), (False, 2, True), (True, 2, False),
                                                 (True, 3, True)])
def test_beam_search_parity(train, beam, cosine):
    kwargs = dict(BASE, beam_size=beam, use_cosine_sim=cosine)
    # vector-quantize-pytorch 1.32 moves only layer 0's averages after a beam search in training
    # (it picks the residuals of layer 0 for every layer); we move every active layer's: compare
    # layer 0 there, and check the others against the winners' residuals below.
    skip = ("layers.1.", "layers.2.") if train else ()
    compare(lambda: TheirRVQ(**kwargs), lambda: ResidualVQ(**kwargs), dim=kwargs["dim"],
            train=train, skip_state=skip)


GROUPED_CASES = {  # (constructor options, forward options, masked, train, groups run in one pass)
    "defaults": (dict(), {}, False, True, True),
    "straight_through_masked": (dict(rotation_trick=False), {}, True, True, True),
    "learnable": (dict(learnable_codebook=True, ema_update=False), {}, False, True, True),
    "quantize_dropout": (dict(num_quantizers=4, quantize_dropout=True), {}, False, True, True),
    "projection": (dict(codebook_dim=3), {}, False, True, True),
    "eval": (dict(), {}, False, False, True),
    "frozen": (dict(), dict(freeze_codebook=True), False, True, True),
    "cosine": (dict(use_cosine_sim=True), {}, False, True, False),
}


@needs_vqp
@pytest.mark.parametrize("case", list(GROUPED_CASES))
def test_grouped_residual_vq_parity(case, monkeypatch):
    options, forward, masked, train, one_pass = GROUPED_CASES[case]
    kwargs = dict(dict(dim=12, groups=3, num_quantizers=2, codebook_size=16), **options)
    import rqvae_fast.compat as compat_module

    calls = []
    real = compat_module.residual_quantize_grouped
    monkeypatch.setattr(compat_module, "residual_quantize_grouped",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    compare(lambda: TheirGRVQ(**kwargs), lambda: GroupedResidualVQ(**kwargs), dim=12, masked=masked,
            train=train, batch=1 if "dead" in case else 3, **forward)
    assert len(calls) == (1 if one_pass else 0)  # all groups in one grouped call, or group by group


def test_grouped_kmeans_init_runs_group_by_group_once(monkeypatch):
    import rqvae_fast.compat as compat_module

    calls = []
    real = compat_module.residual_quantize_grouped
    monkeypatch.setattr(compat_module, "residual_quantize_grouped",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=8, kmeans_init=True)
    x = torch.randn(2, 30, 8)
    model(x)  # k-means init, group by group (theirs draws in that order)
    assert calls == [] and all(not rvq._needs_init for rvq in model.rvqs)
    _, indices, _ = model(x)
    assert calls == [1] and indices.shape == (2, 2, 30, 2)


@pytest.mark.parametrize("options", [dict(threshold_ema_dead_code=2), dict(rotation_trick=False, learnable_codebook=True,
                                                                         ema_update=False, quantize_dropout=True)])
def test_grouped_one_pass_equals_group_by_group(options, monkeypatch):
    """The one-launch path against our own group-by-group path (same random draws), including
    dead-code re-seeding (where vector-quantize-pytorch 1.32's grouped module differs, see COMPAT.md)."""
    kwargs = dict(dim=12, groups=3, num_quantizers=3, codebook_size=16, **options)
    torch.manual_seed(0)
    one = GroupedResidualVQ(**kwargs)
    other = GroupedResidualVQ(**kwargs)
    other.load_state_dict(one.state_dict())
    monkeypatch.setattr(other, "_one_pass", lambda *a: False)
    gen = torch.Generator().manual_seed(1)
    x, grad = torch.randn(1, 40, 12, generator=gen) * 2, torch.randn(1, 40, 12, generator=gen)
    results = []
    for model in (one, other):
        torch.manual_seed(7)
        results.append(one_step(model, x, grad))
    (q1, i1, l1, g1, s1), (q2, i2, l2, g2, s2) = results
    assert torch.equal(i1, i2)
    for a, b in [(q1, q2), (l1, l2)] + list(zip(g1, g2)) + [(s1[k], s2[k]) for k in s1]:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# semantics without the other library


def test_rotation_trick_default_follows_theirs():
    assert ResidualVQ(dim=4, num_quantizers=2, codebook_size=8).rotation_trick
    assert not ResidualVQ(dim=4, codebook_dim=1, num_quantizers=2, codebook_size=8).rotation_trick
    assert not ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, rotation_trick=False).rotation_trick


def test_beam_updates_every_active_layer_from_the_winning_residuals():
    torch.manual_seed(0)
    model = ResidualVQ(dim=3, num_quantizers=3, codebook_size=5, beam_size=2, decay=0.5,
                       rotation_trick=False).train()
    books = [layer.codebook.detach().clone() for layer in model.layers]
    sizes = [layer._codebook.cluster_size.clone() for layer in model.layers]
    x = torch.randn(17, 3)
    _, indices, _ = model(x)
    residual = x
    for layer, (book, size) in enumerate(zip(books, sizes)):
        counts = torch.bincount(indices[:, layer], minlength=5).float()
        torch.testing.assert_close(model.layers[layer]._codebook.cluster_size[0], 0.5 * size[0] + 0.5 * counts)
        residual = residual - book[indices[:, layer]]


def test_beam_size_one_is_greedy_and_beam_lowers_the_error():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 6, generator=gen) * 3
    x = (centers[torch.randint(0, 8, (400,), generator=gen)] + 0.7 * torch.randn(400, 6, generator=gen))
    torch.manual_seed(0)
    model = ResidualVQ(dim=6, num_quantizers=3, codebook_size=8, kmeans_init=True).train()
    model(x[None])  # k-means init
    model.eval()
    greedy_q, greedy_i, _ = model(x[None])
    one_q, one_i, _ = model(x[None], beam_size=1)
    assert torch.equal(one_i, greedy_i) and torch.equal(one_q, greedy_q)
    beam_q, beam_i, _ = model(x[None], beam_size=4)
    err_greedy = (greedy_q[0] - x).square().sum()
    err_beam = (beam_q[0] - x).square().sum()
    assert err_beam < err_greedy
    torch.testing.assert_close(beam_q, model.get_output_from_indices(beam_i))


def test_stochastic_sampling_is_reproducible_and_off_in_eval():
    model = ResidualVQ(dim=6, num_quantizers=2, codebook_size=32, stochastic_sample_codes=True,
                       sample_codebook_temp=5.0, ema_update=False).train()
    x = torch.randn(1, 200, 6)
    torch.manual_seed(7)
    _, first, _ = model(x)
    torch.manual_seed(7)
    _, again, _ = model(x)
    assert torch.equal(first, again)
    model.eval()
    _, greedy, _ = model(x)
    assert not torch.equal(first, greedy)
    _, zero_temp, _ = model.train()(x, sample_codebook_temp=0.0)
    assert torch.equal(zero_temp, greedy)


def test_shared_codebook_is_one_module():
    model = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, shared_codebook=True)
    assert model.layers[1]._codebook is model.layers[0]._codebook
    assert "layers.2._codebook.embed" in model.state_dict()


def test_coarse_indices_need_quantize_dropout():
    model = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, quantize_dropout=True).eval()
    coarse = torch.randint(0, 8, (2, 5, 2))
    out = model.get_output_from_indices(coarse)
    full = torch.cat((coarse, torch.full((2, 5, 1), -1)), dim=-1)
    torch.testing.assert_close(out, model.get_output_from_indices(full))
    with pytest.raises(ValueError, match="quantize_dropout"):
        ResidualVQ(dim=4, num_quantizers=3, codebook_size=8).get_codes_from_indices(coarse)


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_cosine_sim=True, learnable_codebook=True, ema_update=False), "use_cosine_sim"),
    (dict(codebook_size=(8, 4), num_quantizers=None, shared_codebook=True), "shared_codebook"),
    (dict(eval_beam_size=2), "eval_beam_size"),
    (dict(beam_size=0), "beam_size"),
    (dict(quant_grad_frac=1.5), "quant_grad_frac"),
    (dict(quantize_dropout=True, quantize_dropout_cutoff_index=3), "quantize_dropout_cutoff_index"),
    (dict(quantize_dropout_multiple_of=0), "quantize_dropout_multiple_of"),
    (dict(beam_score_quantizer_weights=[1.0]), "beam_score_quantizer_weights"),
    (dict(implicit_neural_codebook=True, ema_update=True), "implicit_neural_codebook"),
])
def test_bad_option_values_name_the_option(kwargs, match):
    base = dict(dim=4, num_quantizers=3, codebook_size=8)
    base.update(kwargs)
    base = {k: v for k, v in base.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        ResidualVQ(**base)


def test_grouped_bad_dim():
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualVQ(dim=10, groups=3, num_quantizers=2, codebook_size=4)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rotation", [True, False])
def test_cosine_on_the_fused_search_equals_the_layer_by_layer_oracle(masked, rotation):
    import copy

    from rqvae_fast.compat_layers import forward_layers

    torch.manual_seed(0)
    fused = ResidualVQ(dim=10, codebook_size=(16, 7, 9), use_cosine_sim=True, rotation_trick=rotation,
                       decay=0.6).train()
    oracle = copy.deepcopy(fused)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 37, 10, generator=gen) * 3
    g = torch.randn(1, 37, 10, generator=gen)
    mask = (torch.rand(1, 37, generator=gen) > 0.3) if masked else None
    xf, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    q1, i1, l1 = fused(xf, mask=mask)
    rows = xo[0][mask[0]] if masked else xo[0]
    q2, i2, l2 = forward_layers(oracle, rows, active=3, beam=1, temperature=0.0, freeze=False,
                                row_select=mask.reshape(-1) if masked else None)
    q1r = q1[0][mask[0]] if masked else q1[0]
    i1r = i1[0][mask[0]] if masked else i1[0]
    assert torch.equal(i1r, i2)
    torch.testing.assert_close(q1r, q2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-5)
    gr = g[0][mask[0]] if masked else g[0]
    ((q1 * g).sum() + l1.sum()).backward()
    ((q2 * gr).sum() + l2.sum()).backward()
    torch.testing.assert_close(xf.grad, xo.grad, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused.state_dict().values(), oracle.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("option", [dict(shared_codebook=True), dict(use_cosine_sim=True), dict()])
def test_check_finite_names_the_bad_row_on_every_path(option):
    model = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, check_finite=True, **option)
    x = torch.randn(1, 6, 4)
    x[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="first bad row: 3"):
        model(x)


# --- cosine codebooks inside the fused kernels (backend="triton": the interpreter on CPU) -------

@needs_vqp
@pytest.mark.skipif(not __import__("rqvae_fast").HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", ["cosine", "cosine_straight_through", "quantize_dropout_cosine",
                                  "cosine_dead_codes"])
def test_cosine_epilogue_in_the_kernel_matches_theirs(case, masked, train, monkeypatch):
    import rqvae_fast.compat as compat_module
    from rqvae_fast.cosine import CosineQuantizeFunction, FusedCosineQuantizeFunction

    options = dict(CASES.get(case, dict(use_cosine_sim=True, threshold_ema_dead_code=2)))
    kwargs = {**BASE, **options}
    calls = []
    monkeypatch.setattr(compat_module, "FusedCosineQuantizeFunction", type(
        "Counting", (), {"apply": staticmethod(lambda *a: calls.append(1) or FusedCosineQuantizeFunction.apply(*a))}))
    monkeypatch.setattr(compat_module, "CosineQuantizeFunction", None)  # the chunked pass must not run
    assert CosineQuantizeFunction is not None
    compare(lambda: TheirRVQ(**kwargs), lambda: ResidualVQ(**kwargs, backend="triton"), dim=kwargs["dim"],
            masked=masked, train=train, batch=1 if "dead" in case else 3)
    assert calls == [1]
