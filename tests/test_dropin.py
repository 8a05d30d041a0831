"""Drop-in compatibility with the seed document's modules: state_dicts load, numbers match."""
import pytest
import torch

from conftest import DEVICE, HAS_TRITON
from rqvae_fast import ResidualVQ, VQEmbedding, VQEmbeddingEMA
from rqvae_fast.peers import SeedResidualVQ, SeedVQEmbedding, SeedVQEmbeddingEMA

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
SIZES = [33, 48, 20]


def seed_and_ours(ema, backend, dim=20, sizes=SIZES, seed=0):
    torch.manual_seed(seed)
    peer = SeedResidualVQ(len(sizes), sizes, dim, commitment_cost=0.25, ema=ema).to(DEVICE)
    with torch.no_grad():
        for layer_index, layer in enumerate(peer.vq_layers):
            layer.embeddings.mul_(0.5 ** layer_index)
            if ema:
                layer.ema_dw.copy_(layer.embeddings)
                layer.ema_cluster_size.uniform_(0.5, 2.0)
    ours = ResidualVQ(len(sizes), sizes, dim, commitment_cost=0.25, ema=ema, backend=backend,
                      precision="ieee").to(DEVICE)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return peer, ours


def train_step(module, x, g, commitment_cost=None):
    x = x.clone().requires_grad_(True)
    quantized, indices, loss = module(x, commitment_cost) if commitment_cost is not None else module(x)
    ((quantized * g).sum() + 3.0 * loss).backward()
    return quantized.detach(), indices, loss.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ema", [False, True])
def test_same_numbers_as_the_seed(ema, backend):
    peer, ours = seed_and_ours(ema, backend)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):  # several steps: EMA state and dynamic commitment cost carry over
        x = torch.randn(129, 20, generator=gen).to(DEVICE)
        g = torch.randn(129, 20, generator=gen).to(DEVICE)
        beta = 0.5 if step == 1 else None  # given once, then kept (the seed mutates the layers)
        q_ref, i_ref, l_ref, gx_ref = train_step(peer, x, g, beta)
        q, i, l, gx = train_step(ours, x, g, beta)
        assert torch.equal(i, i_ref)
        torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(l, l_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gx, gx_ref, atol=1e-7, rtol=1e-5)
        for a, b in zip(peer.vq_layers, ours.vq_layers):
            assert a.commitment_cost == b.commitment_cost
            if ema:
                assert b.embeddings.grad is None
                torch.testing.assert_close(b.embeddings, a.embeddings, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(b.ema_cluster_size, a.ema_cluster_size, atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(b.ema_dw, a.ema_dw, atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(b.embeddings.grad, a.embeddings.grad, atol=1e-7, rtol=1e-5)
                a.embeddings.grad = b.embeddings.grad = None
    assert ours.vq_layers[0].commitment_cost == 0.5


def test_ema_eval_mode_does_not_update():
    peer, ours = seed_and_ours(True, "torch")
    ours.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours(torch.randn(50, 20, device=DEVICE))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_keys_match_the_seed():
    for ema in (False, True):
        peer, ours = seed_and_ours(ema, "torch")
        assert list(ours.state_dict()) == list(peer.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in peer.named_parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_layer_dropins(backend):
    torch.manual_seed(3)
    for peer_cls, our_cls in ((SeedVQEmbedding, VQEmbedding), (SeedVQEmbeddingEMA, VQEmbeddingEMA)):
        peer = peer_cls(40, 12).to(DEVICE)
        ours = our_cls(40, 12, backend=backend, precision="ieee").to(DEVICE)
        ours.load_state_dict(peer.state_dict(), strict=True)
        x = torch.randn(77, 12, device=DEVICE)
        g = torch.randn(77, 12, device=DEVICE)
        q_ref, i_ref, l_ref, gx_ref = train_step(peer, x, g)
        q, i, l, gx = train_step(ours, x, g)
        assert i.shape == (77,) and torch.equal(i, i_ref)
        torch.testing.assert_close(q, q_ref)
        torch.testing.assert_close(l, l_ref)
        torch.testing.assert_close(gx, gx_ref)
        if peer_cls is SeedVQEmbedding:
            torch.testing.assert_close(ours.embeddings.grad, peer.embeddings.grad)
        else:
            torch.testing.assert_close(ours.embeddings, peer.embeddings, atol=1e-5, rtol=1e-5)


def test_leading_dims_match_flat_inputs():
    _, ours = seed_and_ours(False, "torch")
    x = torch.randn(4, 6, 20, device=DEVICE)
    q, i, l = ours(x)
    q_flat, i_flat, l_flat = ours(x.reshape(-1, 20))
    assert q.shape == (4, 6, 20) and i.shape == (4, 6, 3)
    assert torch.equal(i.reshape(-1, 3), i_flat)
    torch.testing.assert_close(q.reshape(-1, 20), q_flat)
    torch.testing.assert_close(l, l_flat)


def test_initialize_from_data_is_layerwise_kmeans():
    torch.manual_seed(0)
    centers = torch.randn(8, 6) * 5
    data = (centers[torch.randint(0, 8, (800,))] + 0.01 * torch.randn(800, 6)).to(DEVICE)
    rvq = ResidualVQ(2, [8, 4], 6, backend="torch").to(DEVICE)
    rvq.initialize_from_data(data, seed=0)
    assert all(layer.initialized_with_data for layer in rvq.vq_layers)
    # Layer 0 found the 8 clusters: every center has a code within the noise level.
    dist = torch.cdist(centers.to(DEVICE), rvq.vq_layers[0].embeddings.detach())
    assert dist.min(dim=1).values.max() < 0.05
    # Layer 1 was fitted on what layer 0 leaves: small residuals, so small codes.
    assert rvq.vq_layers[1].embeddings.detach().norm(dim=1).max() < 0.1
    # Once initialised, a second call changes nothing (the seed's flag).
    before = rvq.vq_layers[0].embeddings.detach().clone()
    rvq.initialize_from_data(torch.randn(100, 6, device=DEVICE))
    assert torch.equal(before, rvq.vq_layers[0].embeddings.detach())


def test_initialize_with_fewer_rows_than_codes_samples_rows():
    rvq = ResidualVQ(1, [16], 4, backend="torch")
    data = torch.randn(5, 4)
    rvq.initialize_from_data(data, seed=0)
    codes = rvq.vq_layers[0].embeddings.detach()
    assert all(any(torch.equal(c, row) for row in data) for c in codes)


def test_different_commitment_costs_per_layer_raise():
    rvq = ResidualVQ(2, [8, 8], 4)
    rvq.vq_layers[1].commitment_cost = 0.7
    with pytest.raises(ValueError, match="one commitment cost"):
        rvq(torch.randn(3, 4))


def test_ema_buffers_stay_fp32_when_the_module_is_cast():
    rvq = ResidualVQ(2, [16, 12], 8, ema=True, backend="torch").to(torch.bfloat16)
    for layer in rvq.vq_layers:
        assert layer.embeddings.dtype == torch.bfloat16
        assert layer.ema_cluster_size.dtype == torch.float32 and layer.ema_dw.dtype == torch.float32
    assert {"vq_layers.0.ema_dw", "vq_layers.1.ema_cluster_size"} <= set(rvq.state_dict())
    rvq(torch.randn(64, 8, dtype=torch.bfloat16))
    assert all(torch.isfinite(layer.ema_dw).all() for layer in rvq.vq_layers)
