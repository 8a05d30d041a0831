"""autocast (bf16/fp16) and low-precision parameters: fp32 accumulation, outputs in the activation dtype."""
import pytest
import torch

from conftest import DEVICE, HAS_TRITON
from rqvae_fast import ResidualVQ
from rqvae_fast.reference import residual_quantize_reference

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast(backend, dtype, ema):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(24, 16).to(DEVICE)
    rvq = ResidualVQ(3, [32, 16, 8], 16, ema=ema, backend=backend, precision="ieee").to(DEVICE)
    x = torch.randn(70, 24, device=DEVICE)
    with torch.autocast(device_type=DEVICE, dtype=dtype):
        z = encoder(x)
        quantized, indices, loss = rvq(z)
        objective = quantized.float().square().mean() + loss
    assert z.dtype == dtype and quantized.dtype == dtype and loss.dtype == torch.float32
    objective.backward()
    assert encoder.weight.grad is not None and torch.isfinite(encoder.weight.grad).all()
    for layer in rvq.vq_layers:
        assert layer.embeddings.dtype == torch.float32
        if ema:
            assert layer.ema_dw.dtype == torch.float32 and layer.ema_cluster_size.dtype == torch.float32
        else:
            assert layer.embeddings.grad.dtype == torch.float32
    # Indices are those of the fp32 search on the (rounded) activations.
    books = [layer.embeddings.detach() for layer in rvq.vq_layers]
    if not ema:
        ref = residual_quantize_reference(z.detach().float(), books, 0.25)
        assert torch.equal(indices, ref.indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_parameters_and_inputs(backend):
    torch.manual_seed(1)
    rvq = ResidualVQ(2, [32, 16], 16, backend=backend, precision="ieee").to(DEVICE, torch.bfloat16)
    z = torch.randn(50, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    quantized, indices, loss = rvq(z)
    (quantized.float().sum() + loss).backward()
    assert quantized.dtype == torch.bfloat16 and z.grad.dtype == torch.bfloat16
    assert all(layer.embeddings.grad.dtype == torch.bfloat16 for layer in rvq.vq_layers)
    books = [layer.embeddings.detach().float() for layer in rvq.vq_layers]
    ref = residual_quantize_reference(z.detach().float(), books, 0.25)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(loss, ref.loss, atol=1e-4, rtol=1e-3)
