"""torch.compile(fullgraph=True) traces through the quantizer (custom ops with fake kernels)."""
import pytest
import torch

from rqvae_fast import ResidualVQ
from rqvae_fast.backend import quantize_forward

from helpers import assert_compiled_matches_eager


class Tiny(torch.nn.Module):
    def __init__(self, ema):
        super().__init__()
        self.encoder = torch.nn.Linear(12, 10)
        self.rvq = ResidualVQ(3, [16, 9, 20], 10, ema=ema, grad_mode="full", backend="torch")
        self.decoder = torch.nn.Linear(10, 12)

    def forward(self, x):
        quantized, indices, vq_loss = self.rvq(self.encoder(x))
        return torch.nn.functional.mse_loss(self.decoder(quantized), x) + vq_loss, indices


@pytest.mark.parametrize("ema, compiler", [(False, "aot_eager"), (True, "aot_eager"), (True, "inductor")])
def test_compiled_training_step_equals_eager(ema, compiler):
    torch.manual_seed(0)
    eager = Tiny(ema)
    compiled_model = Tiny(ema)
    compiled_model.load_state_dict(eager.state_dict())
    step = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    for _ in range(2):
        x = torch.randn(40, 12)
        eager_out, compiled_out = eager(x), step(x)
        eager_out[0].backward()
        compiled_out[0].backward()
        assert_compiled_matches_eager(eager, compiled_model, eager_out, compiled_out,
                                      atol=1e-5, rtol=1e-4)


def test_custom_op_passes_opcheck():
    x = torch.randn(9, 6)
    codes = torch.randn(7, 6)
    torch.library.opcheck(quantize_forward, (x, codes, [3, 4], 0, "ieee", False, True, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_export_sees_the_custom_op():
    torch.manual_seed(0)
    model = Tiny(ema=False).eval()
    x = torch.randn(40, 12)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("rqvae_fast.quantize_forward" in t for t in targets), targets
    loss_e, idx_e = model(x)
    loss_x, idx_x = exported.module()(x)
    assert torch.equal(idx_e, idx_x)
    torch.testing.assert_close(loss_x, loss_e)
