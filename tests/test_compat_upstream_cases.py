"""vector-quantize-pytorch's own ResidualVQ / GroupedResidualVQ test cases (its tests/test_readme.py,
tests/test_beam.py and tests/test_residual_beam_ema.py), restated here against rqvae_fast.compat: the
same constructor arguments, inputs and checks, written for this project. The large README-sized
cases are marked slow (seconds each on 2 CPU cores); the rest run in CI."""
import random

import pytest
import torch
import torch.nn.functional as F

from rqvae_fast.compat import GroupedResidualVQ, ResidualVQ

slow = pytest.mark.slow


@pytest.fixture(autouse=True)
def _seeded():
    """Their cases draw unseeded inputs; a fixed seed makes ours reproducible."""
    torch.manual_seed(1234)


def reconstructs(model, quantized, indices, atol=1e-5):
    assert torch.allclose(quantized, model.get_output_from_indices(indices), atol=atol)


# --- test_readme.py ----------------------------------------------------------------------


@pytest.mark.parametrize("implicit, cosine", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_readme_residual_vq(implicit, cosine, train, shared):
    model = ResidualVQ(dim=32, num_quantizers=8, codebook_size=128, implicit_neural_codebook=implicit,
                       use_cosine_sim=cosine, shared_codebook=shared).train(train)
    x = torch.randn(1, 256, 32)
    quantized, indices, _ = model(x, freeze_codebook=train and not implicit)
    reconstructs(model, quantized, indices)


@slow
def test_readme_stochastic_shared():
    model = ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024, stochastic_sample_codes=True,
                       sample_codebook_temp=0.1, shared_codebook=True)
    quantized, indices, losses = model(torch.randn(1, 1024, 256))
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and losses.shape == (8,)


@slow
def test_readme_grouped():
    model = GroupedResidualVQ(dim=256, num_quantizers=8, groups=2, codebook_size=1024)
    quantized, indices, losses = model(torch.randn(1, 1024, 256))
    assert quantized.shape == (1, 1024, 256) and indices.shape == (2, 1, 1024, 8)
    assert losses.shape == (2, 8)


@slow
def test_readme_kmeans_init():
    model = ResidualVQ(dim=256, codebook_size=256, num_quantizers=4, kmeans_init=True, kmeans_iters=10)
    quantized, indices, _ = model(torch.randn(1, 1024, 256))
    assert indices.shape == (1, 1024, 4) and (indices >= 0).all()


def test_readme_tiger():
    model = ResidualVQ(dim=2, codebook_size=(5, 128, 256)).train()
    quantized, indices, _ = model(torch.randn(2, 2, 2), freeze_codebook=True)
    reconstructs(model, quantized, indices)


# --- test_beam.py ------------------------------------------------------------------------


@slow
@pytest.mark.parametrize("codebook_dim", [256, 128])
def test_beam_search_with_quantize_dropout(codebook_dim):
    model = ResidualVQ(dim=256, codebook_dim=codebook_dim, num_quantizers=8, codebook_size=1024,
                       quantize_dropout=True, beam_size=2, eval_beam_size=3)
    x = torch.randn(1, 1024, 256).requires_grad_()
    for _ in range(5):
        quantized, indices, losses = model(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8)
    assert losses.shape == (8,)


# --- test_residual_beam_ema.py -----------------------------------------------------------

PAD_MASK = [[True, True, False, True, False], [True, False, True, True, True]]


def stage_statistics(model, x, indices, books):
    """Per active stage: (counts (1, K), sums (1, K, d)) of the winning residuals."""
    residual = model.project_in(x).detach()
    stats = []
    for stage, book in enumerate(books):
        chosen = indices[..., stage]
        valid = chosen >= 0
        if not valid.any():
            break
        vectors = F.normalize(residual, dim=-1) if model.use_cosine_sim else residual
        counts = torch.stack([(valid & (chosen == c)).sum() for c in range(book.shape[1])]).float()
        sums = torch.stack([vectors[valid & (chosen == c)].sum(0) for c in range(book.shape[1])])
        stats.append((counts[None], sums[None]))
        residual = residual - F.embedding(chosen.clamp_min(0), book[0]).masked_fill(~valid[..., None], 0)
    return stats


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_beam_ema_uses_the_selected_residuals_of_each_active_stage(shared, cosine, projected, dropout,
                                                                   masked):
    torch.manual_seed(40)
    model = ResidualVQ(dim=4 if projected else 2, codebook_dim=2, codebook_size=4, num_quantizers=3,
                       beam_size=2, decay=0.6, shared_codebook=shared, use_cosine_sim=cosine,
                       quantize_dropout=dropout, kmeans_init=False, threshold_ema_dead_code=0,
                       rotation_trick=False).train()
    x = torch.randn(2, 5, 4 if projected else 2)
    mask = torch.tensor(PAD_MASK) if masked else None
    books = [layer._codebook.embed.detach().clone() for layer in model.layers]
    sizes0 = [layer._codebook.cluster_size.clone() for layer in model.layers]
    sums0 = [layer._codebook.embed_avg.clone() for layer in model.layers]
    _, indices, _ = model(x, mask=mask, rand_quantize_dropout_fixed_seed=7)
    stats = stage_statistics(model, x, indices, books)
    active = random.Random(7).randrange(3) + 1 if dropout else 3
    assert len(stats) == active
    if shared:
        size, total = sizes0[0], sums0[0]
        for count, vector_sum in stats:
            size, total = 0.6 * size + 0.4 * count, 0.6 * total + 0.4 * vector_sum
        torch.testing.assert_close(model.layers[0]._codebook.cluster_size, size)
        torch.testing.assert_close(model.layers[0]._codebook.embed_avg, total)
        return
    for stage, layer in enumerate(model.layers):
        if stage < active:
            count, vector_sum = stats[stage]
            size, total = 0.6 * sizes0[stage] + 0.4 * count, 0.6 * sums0[stage] + 0.4 * vector_sum
        else:
            size, total = sizes0[stage], sums0[stage]
        torch.testing.assert_close(layer._codebook.cluster_size, size)
        torch.testing.assert_close(layer._codebook.embed_avg, total)


@pytest.mark.parametrize("beam_size", [None, 1, 2, 3])
def test_beam_inference_leaves_the_state_alone(beam_size):
    torch.manual_seed(40)
    model = ResidualVQ(dim=2, codebook_size=4, num_quantizers=3, beam_size=beam_size,
                       kmeans_init=False, threshold_ema_dead_code=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, indices, _ = model(torch.randn(2, 5, 2))
    torch.testing.assert_close(quantized, model.get_output_from_indices(indices))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_ema_update_does_not_change_this_calls_values_or_gradients(shared, beam_size):
    torch.manual_seed(40)
    kwargs = dict(dim=2, codebook_size=4, num_quantizers=3, beam_size=beam_size, shared_codebook=shared,
                  kmeans_init=False, threshold_ema_dead_code=0, rotation_trick=False)
    updating = ResidualVQ(**kwargs).train()
    fixed = ResidualVQ(**kwargs, ema_update=False).train()
    fixed.load_state_dict(updating.state_dict())
    x = torch.randn(2, 5, 2, requires_grad=True)
    x_fixed = x.detach().clone().requires_grad_()
    q1, i1, l1 = updating(x)
    q2, i2, l2 = fixed(x_fixed)
    assert torch.equal(i1, i2) and torch.equal(q1, q2) and torch.equal(l1, l2)
    (q1.square().sum() + l1.sum()).backward()
    (q2.square().sum() + l2.sum()).backward()
    assert torch.equal(x.grad, x_fixed.grad)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_expired_codes_come_from_the_winning_residuals(shared, cosine, masked):
    torch.manual_seed(40)
    model = ResidualVQ(dim=2, codebook_size=4, num_quantizers=3, beam_size=2, decay=0.6,
                       shared_codebook=shared, use_cosine_sim=cosine, kmeans_init=False,
                       threshold_ema_dead_code=100, rotation_trick=False).train()
    x = torch.randn(2, 5, 2)
    mask = torch.tensor(PAD_MASK) if masked else None
    books = [layer._codebook.embed.detach().clone() for layer in model.layers]
    _, indices, _ = model(x, mask=mask)
    residual, per_stage = x, []
    for stage, book in enumerate(books):
        vectors = F.normalize(residual, dim=-1) if cosine else residual
        per_stage.append(vectors[mask] if masked else vectors.reshape(-1, 2))
        codes = F.embedding(indices[..., stage].clamp_min(0), book[0])
        residual = residual - (codes.masked_fill(~mask[..., None], 0) if masked else codes)
    for layer, candidates in zip(model.layers, per_stage):
        candidates = torch.cat(per_stage) if shared else candidates
        nearest = torch.cdist(layer._codebook.embed.squeeze(0), candidates).min(-1).values
        torch.testing.assert_close(nearest, torch.zeros_like(nearest), rtol=0, atol=1e-5)
