"""RQEncoder / RQDecoder / RQVAE: the seed's structure and API on the fused quantizer."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rqvae_fast.model import RQDecoder, RQEncoder, RQVAE


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw):
    torch.manual_seed(0)
    options = dict(input_dim=24, hidden_dims=[20, 12], latent_dim=6, num_vq_layers=3,
                   num_embeddings_list=[8, 8, 4])
    options.update(kw)
    return RQVAE(**options)


def _blobs(n=400, d=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=gen) * 3
    return centres[torch.randint(8, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)


def test_encoder_decoder_are_symmetric_linear_batchnorm_relu():
    enc = RQEncoder(24, [20, 12], 6)
    dec = RQDecoder(6, [20, 12], 24)
    kinds = [type(m) for m in enc.encoder]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    enc_widths = [m.out_features for m in enc.encoder if isinstance(m, nn.Linear)]
    dec_widths = [m.out_features for m in dec.decoder if isinstance(m, nn.Linear)]
    assert enc_widths == [20, 12, 6] and dec_widths == [12, 20, 24]
    assert enc(torch.randn(5, 24)).shape == (5, 6) and dec(torch.randn(5, 6)).shape == (5, 24)
    assert [type(m) for m in RQEncoder(8, [], 3).encoder] == [nn.Linear]


def test_state_dict_uses_the_seed_names():
    keys = set(_model().state_dict())
    for key in ("encoder.encoder.0.weight", "encoder.encoder.1.running_mean",
                "decoder.decoder.6.weight", "vq.vq_layers.0.embeddings", "vq.vq_layers.2.embeddings"):
        assert key in keys


def test_forward_returns_the_seed_tuple_and_losses():
    model = _model()
    x = _blobs(64)
    x_recon, indices, losses = model(x)
    assert x_recon.shape == x.shape and indices.shape == (64, 3) and indices.dtype == torch.int64
    assert set(losses) == {"total", "recon", "vq"}
    torch.testing.assert_close(losses["recon"], F.mse_loss(x_recon, x))
    torch.testing.assert_close(losses["total"], losses["recon"] + losses["vq"])
    assert (indices[:, 2] < 4).all() and (indices >= 0).all()


def test_gradients_reach_encoder_decoder_and_codebooks():
    model = _model()
    _, _, losses = model(_blobs(64))
    losses["total"].backward()
    assert model.encoder.encoder[0].weight.grad.abs().sum() > 0
    assert model.decoder.decoder[0].weight.grad.abs().sum() > 0
    for layer in model.vq.vq_layers:
        assert layer.embeddings.grad is not None and layer.embeddings.grad.abs().sum() > 0


def test_ema_codebooks_get_no_gradient_but_move_in_training():
    model = _model(ema=True)
    before = model.vq.codebooks[0].detach().clone()
    _, _, losses = model(_blobs(64))
    losses["total"].backward()
    assert all(layer.embeddings.grad is None for layer in model.vq.vq_layers)
    assert not torch.equal(before, model.vq.codebooks[0].detach())


def test_commitment_cost_argument_changes_only_the_vq_term():
    model = _model().eval()
    x = _blobs(64)
    _, _, low = model(x, commitment_cost=0.0)
    _, _, high = model(x, commitment_cost=1.0)
    torch.testing.assert_close(low["recon"], high["recon"])
    # per layer the vq term is (1 + beta) * mse(residual, code): doubling when beta goes 0 -> 1
    torch.testing.assert_close(high["vq"], 2 * low["vq"])


def test_get_semantic_ids_is_eval_mode_batched_and_restores_mode():
    model = _model()
    x = _blobs(300)
    model.train()
    ids = model.get_semantic_ids(x)
    assert model.training
    assert ids.shape == (300, 3) and ids.dtype == torch.int64
    torch.testing.assert_close(model.get_semantic_ids(x, batch_size=7), ids)
    model.eval()
    _, forward_ids, _ = model(x)
    torch.testing.assert_close(forward_ids, ids)


def test_initialize_codebooks_fits_latents_layer_by_layer():
    model = _model(num_embeddings_list=[8, 8, 8])
    x = _blobs(400)
    latents = model.collect_latents(x, batch_size=128)
    random_error = model.vq.quantize(latents).layer_losses.sum()
    model.initialize_codebooks(x, max_samples=400, seed=0, batch_size=128)
    assert model.initialized
    after = model.vq.quantize(latents)
    assert after.layer_losses.sum() < 0.5 * random_error
    # layer l quantizes what earlier layers left: later codebooks hold smaller vectors
    norms = [c.detach().norm(dim=1).mean() for c in model.vq.codebooks]
    assert norms[1] < norms[0] and norms[2] < norms[0]


@pytest.mark.parametrize("method", ["sklearn", "fused"])
def test_initialize_codebooks_methods_are_seeded(method):
    x = _blobs(300)
    first, second = _model(), _model()
    first.initialize_codebooks(x, method=method, seed=3)
    second.initialize_codebooks(x, method=method, seed=3)
    for a, b in zip(first.vq.codebooks, second.vq.codebooks):
        torch.testing.assert_close(a, b)


def test_initialize_codebooks_accepts_a_seed_style_dataloader():
    x = _blobs(256)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(256), x),
                                         batch_size=64)
    model = _model()
    model.initialize_codebooks(loader, max_samples=128, seed=0)
    assert model.initialized


def test_recalibrate_batchnorm_makes_eval_match_training_statistics():
    model = _model()
    x = _blobs(512) * 0.01  # tiny inputs: the default running stats (mean 0, var 1) are far off
    model.train()
    model.vq.eval()
    with torch.no_grad():
        train_latents = model.encode(x)
    model.eval()
    stale = model.encode(x).detach()
    model.recalibrate_batchnorm(x, batch_size=512)
    model.eval()
    fresh = model.encode(x).detach()
    scale = train_latents.abs().max()
    # equal up to BatchNorm's unbiased running variance (n / (n - 1) with n = 512)
    assert (fresh - train_latents).abs().max() < 0.01 * scale
    assert (stale - train_latents).abs().max() > 0.2 * scale
    assert model.encoder.encoder[1].momentum == 0.1  # restored


def test_config_round_trip():
    model = _model(ema=True, decay=0.9, grad_mode="full", commitment_cost=0.5)
    clone = RQVAE.from_config(model.config)
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())
    x = _blobs(32)
    model.eval(), clone.eval()
    torch.testing.assert_close(clone.get_semantic_ids(x), model.get_semantic_ids(x))


def test_loaded_weights_count_as_initialized():
    trained = _model()
    trained.initialize_codebooks(_blobs(200), seed=0)
    fresh = _model()
    assert not fresh.initialized
    fresh.load_state_dict(trained.state_dict())
    assert fresh.initialized  # a Trainer will not re-run k-means over loaded codebooks


def test_too_few_codebook_sizes_is_an_error():
    with pytest.raises(ValueError, match="sizes"):
        _model(num_embeddings_list=[8, 8])
