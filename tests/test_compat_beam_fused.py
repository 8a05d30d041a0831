"""compat.ResidualVQ's beam search through the fused path (rqvae_fast.compat_beam) against its
layer-by-layer path (forward_layers, itself checked against vector-quantize-pytorch 1.32 in
test_compat_options.py / test_compat_upstream_cases.py): outputs, indices, losses, input and
parameter gradients and the state after a step, with dropout, masks, per-layer sizes, learnable
codebooks, score weights; on CPU through beam_encode and through the kernel forced under the
interpreter. The fused beam runs where the beam kernel does (CUDA); here it is forced by
patching compat_beam.use_beam_kernel (the dispatch), and beam_path.use_beam_kernel for the kernel."""
import copy

import pytest
import torch

from conftest import requires_triton
from rqvae_fast import beam_path, compat, compat_beam
from rqvae_fast.compat import ResidualVQ

CONFIGS = {
    "defaults": dict(dim=12, num_quantizers=3, codebook_size=24, beam_size=2),
    "sizes_projection_weights": dict(dim=12, codebook_size=(24, 10, 7), num_quantizers=None, codebook_dim=5,
                                     beam_size=3, beam_score_quantizer_weights=[1.0, 3.0, 0.5],
                                     commitment_weight=0.7),
    "learnable_no_rotation": dict(dim=9, num_quantizers=3, codebook_size=16, beam_size=4, learnable_codebook=True,
                                  ema_update=False, rotation_trick=False),
    "dropout": dict(dim=12, num_quantizers=4, codebook_size=16, beam_size=2, quantize_dropout=True,
                    quantize_dropout_cutoff_index=1),
}


def run(model, x, mask, seed):
    """Outputs, gradients and state after one call and backward (eval: under no_grad, as used)."""
    x = x.clone().requires_grad_(model.training)
    with torch.set_grad_enabled(model.training):
        out, indices, losses = model(x, mask=mask, rand_quantize_dropout_fixed_seed=seed)
    if torch.is_grad_enabled() and (out.requires_grad or losses.requires_grad):
        (out.square().sum() * 0.1 + losses.sum() * 3.0).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone() if x.grad is not None else None
    return out.detach(), indices, losses.detach(), grads, copy.deepcopy(model.state_dict())


def both_paths(monkeypatch, model, x, mask=None, seed=None, kernel=False):
    taken = []
    real = compat.fused_beam_applies

    def spy(*args):
        taken.append(real(*args))
        return taken[-1]

    layered_model, fused_model = copy.deepcopy(model), copy.deepcopy(model)
    with monkeypatch.context() as m:
        m.setattr(compat, "fused_beam_applies", lambda *a: False)
        layered = run(layered_model, x, mask, seed)
    with monkeypatch.context() as m:
        m.setattr(compat, "fused_beam_applies", spy)
        m.setattr(compat_beam, "use_beam_kernel", lambda *a, **k: True)
        if kernel:
            m.setattr(beam_path, "use_beam_kernel", lambda *a, **k: True)
        fused = run(fused_model, x, mask, seed)
    assert taken == [True]
    return layered, fused


def assert_same(layered, fused, tol=1e-5):
    (q1, i1, l1, g1, s1), (q2, i2, l2, g2, s2) = layered, fused
    assert torch.equal(i1, i2)
    torch.testing.assert_close(q2, q1, rtol=tol, atol=tol)
    torch.testing.assert_close(l2, l1, rtol=tol, atol=tol)
    assert g1.keys() == g2.keys()
    for name in g1:
        if g1[name] is None:
            assert g2[name] is None, name
        else:
            torch.testing.assert_close(g2[name], g1[name], rtol=tol, atol=tol, msg=name)
    assert s1.keys() == s2.keys()
    for name in s1:
        torch.testing.assert_close(s2[name].float(), s1[name].float(), rtol=tol, atol=tol, msg=name)


def data(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("train", [True, False])
def test_fused_beam_equals_the_layered_path(monkeypatch, name, train):
    torch.manual_seed(0)
    model = ResidualVQ(**CONFIGS[name]).train(train)
    x = data((2, 23, model.dim), seed=1)
    layered, fused = both_paths(monkeypatch, model, x, seed=5 if train else None)
    assert_same(layered, fused)
    if train and model.ema_update:  # the step moved the codebooks
        assert not torch.equal(layered[4]["layers.0._codebook.embed"], model.state_dict()["layers.0._codebook.embed"])


@pytest.mark.parametrize("train", [True, False])
def test_fused_beam_with_a_mask(monkeypatch, train):
    torch.manual_seed(1)
    model = ResidualVQ(dim=10, num_quantizers=3, codebook_size=(12, 7, 9), beam_size=3,
                       eval_beam_size=2).train(train)
    x = data((3, 11, 10), seed=2)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(3)) > 0.4
    layered, fused = both_paths(monkeypatch, model, x, mask=mask)
    assert_same(layered, fused)
    assert (fused[1][~mask] == -1).all()


@requires_triton
@pytest.mark.parametrize("name, train", [("sizes_projection_weights", True), ("dropout", True),
                                         ("defaults", False)])
def test_fused_beam_through_the_kernel_equals_the_layered_path(monkeypatch, name, train):
    torch.manual_seed(2)
    model = ResidualVQ(**CONFIGS[name]).train(train)
    x = data((19, model.dim), seed=4)  # 2-D input, an odd row count
    layered, fused = both_paths(monkeypatch, model, x, seed=7 if train else None, kernel=True)
    assert_same(layered, fused)


@pytest.mark.parametrize("n", [0, 1])
def test_fused_beam_zero_and_one_rows(monkeypatch, n):
    torch.manual_seed(3)
    model = ResidualVQ(dim=6, num_quantizers=2, codebook_size=5, beam_size=2).train()
    before = copy.deepcopy(model.state_dict())
    layered, fused = both_paths(monkeypatch, model, data((1, n, 6), seed=5))
    if n == 1:
        assert_same(layered, fused)
        return
    # no rows: the same empty outputs and zero losses; the state stays as it was, as on the greedy
    # fused path (the layered path decays the EMA averages with zero counts)
    assert_same(layered[:4] + (before,), fused)
    assert fused[1].shape == (1, 0, 2) and (fused[2] == 0).all()


@pytest.mark.parametrize("options, train", [
    (dict(commitment_weight=0.0), True), (dict(commitment_weight=0.0), False),
    (dict(use_cosine_sim=True), True), (dict(shared_codebook=True), True),
    (dict(threshold_ema_dead_code=2), True), (dict(kmeans_init=True), True),
    (dict(quant_grad_frac=0.5), True), (dict(beam_score_quantizer_weights=[1.0, 0.0]), True),
    (dict(stochastic_sample_codes=True, sample_codebook_temp=1.0), True),
    (dict(learnable_codebook=True), False),  # eval with gradients on: their eval losses carry one
])
def test_options_the_fused_beam_does_not_cover_stay_layered(monkeypatch, options, train):
    model = ResidualVQ(dim=6, num_quantizers=2, codebook_size=5, beam_size=2, **options).train(train)
    taken = []
    real = compat.fused_beam_applies
    monkeypatch.setattr(compat, "fused_beam_applies", lambda *a: taken.append(real(*a)) or taken[-1])
    monkeypatch.setattr(compat_beam, "use_beam_kernel", lambda *a, **k: True)
    model(data((1, 8, 6), seed=6))
    assert taken == [False]


def test_cpu_rows_and_large_beams_stay_layered():
    """The fused beam runs where the beam kernel encodes: not for CPU rows, nor beams above 8."""
    model = ResidualVQ(dim=6, num_quantizers=2, codebook_size=5, beam_size=2).train()
    rows = data((8, 6), seed=7)
    assert not compat_beam.fused_beam_applies(model, rows, 2, False)
    assert not compat_beam.fused_beam_applies(model, rows, 9, False)
    assert not compat_beam.fused_beam_applies(model, rows, 1, False)
