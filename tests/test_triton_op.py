"""The Triton path as a ``torch.library.triton_op``: eager dispatch, tracing, fallbacks.

Tracing is checked in a subprocess without ``TRITON_INTERPRET`` (the interpreter's kernels cannot be
traced): ``torch.compile`` captures the forward and backward graphs without running them, since no
GPU is needed to trace. On a GPU, ``tests/test_gpu.py`` runs the compiled step.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rqvae_fast import ResidualVQ, backend, residual_quantize
from rqvae_fast._triton_available import interpreter_enabled
from rqvae_fast.routing import FULL

from conftest import requires_triton
from helpers import assert_compiled_matches_eager, make_problem, run_step

needs_triton_op = pytest.mark.skipif(not backend.HAS_TRITON_OP,
                                     reason="torch < 2.6 has no torch.library.triton_op")


def _profiled_op_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@requires_triton
@needs_triton_op
def test_triton_path_dispatches_to_the_triton_op(monkeypatch, device, poison):
    x, books = make_problem(70, 12, [16, 9, 20], seed=3, device=device)
    names = _profiled_op_names(lambda: run_step(residual_quantize, x, books, backend="triton",
                                                grad_mode="full", compute_stats=True))
    assert "rqvae_fast::quantize_forward_triton" in names
    assert "rqvae_fast::quantize_input_grad_triton" in names
    assert "rqvae_fast::quantize_forward" not in names

    codes = torch.cat(books)
    by_triton_op = torch.ops.rqvae_fast.quantize_forward_triton(
        x, codes, [16, 9, 20], FULL, "ieee", True, False)
    by_custom_op = backend.quantize_forward(x, codes, [16, 9, 20], FULL, "ieee", True, True, False)
    for a, b in zip(by_triton_op, by_custom_op):
        assert torch.equal(a, b)

    monkeypatch.setenv("RQVAE_FAST_TRITON_OP", "0")  # the escape hatch: back to the custom op
    names = _profiled_op_names(lambda: run_step(residual_quantize, x, books, backend="triton"))
    assert "rqvae_fast::quantize_forward" in names
    assert "rqvae_fast::quantize_forward_triton" not in names


_TRACE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from rqvae_fast import backend
    from rqvae_fast.autograd import ResidualQuantizeFunction
    from rqvae_fast.routing import FULL

    graphs = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm.code
            def not_run(*args):
                raise RuntimeError("captured only: no GPU to run on")
            return not_run
        return compiler

    def step(x, codes, deterministic):
        quantized, indices, layer_losses, counts, sums = ResidualQuantizeFunction.apply(
            x, codes, (16, 9, 20), 0.25, FULL, True, "ieee", True, True, deterministic)
        return quantized.square().sum() + layer_losses.sum(), indices

    result = {}
    for deterministic in (False, True):
        graphs.clear()
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=aot_autograd(
            fw_compiler=capture("forward"), bw_compiler=capture("backward")))
        x = torch.randn(50, 12, requires_grad=True)
        codes = torch.randn(45, 12, requires_grad=True)
        try:
            compiled(x, codes, deterministic)
        except Exception as err:
            if "captured only" not in str(err):
                raise
        result[str(deterministic)] = dict(graphs)
    result["cached"] = [type(t).__name__ for t in backend._layer_starts.values()]

    class Quantize(torch.nn.Module):  # torch.export keeps the triton_op as one op
        def __init__(self):
            super().__init__()
            self.codes = torch.nn.Parameter(torch.randn(45, 12))

        def forward(self, x):
            return backend.fused_forward(x, self.codes, [16, 9, 20], FULL, "ieee", True, True, False)

    exported = torch.export.export(Quantize(), (torch.randn(50, 12),))
    result["exported"] = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    print("GRAPHS=" + json.dumps(result))
""")


@requires_triton
@needs_triton_op
def test_torch_compile_traces_into_the_triton_kernels():
    """Inductor gets the kernels themselves: both graphs hold Triton launches, with symbolic N and
    D, and neither holds an opaque rqvae_fast op. ``torch.export`` keeps the op whole."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("GRAPHS="))
    result = json.loads(line[len("GRAPHS="):])
    for deterministic in ("False", "True"):
        forward, backward = result[deterministic]["forward"], result[deterministic]["backward"]
        assert "triton_kernel_wrapper" in forward and "'layer_start_ptr'" in forward
        assert "'sse_ptr'" in forward
        assert "triton_kernel_wrapper" in backward and "'grad_x_ptr'" in backward
        assert "'N': primals_" in forward  # N is symbolic: one graph for every batch size
        for graph in (forward, backward):
            assert "rqvae_fast.quantize" not in graph
        # deterministic=True: counts and sums come from the sorted-segment path, also traced
        assert ("searchsorted" in forward) == (deterministic == "True")
        assert ("'WITH_STATS': True" in forward) == (deterministic == "False")
    assert result["cached"] == []  # tracing never caches a (fake) layer_starts tensor
    assert "rqvae_fast.quantize_forward_triton.default" in result["exported"]


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(12, 10)
        self.rvq = ResidualVQ(3, [16, 9, 20], 10, grad_mode="full", backend="triton")

    def forward(self, x):
        quantized, indices, vq_loss = self.rvq(self.encoder(x))
        return quantized.square().mean() + vq_loss, indices


@requires_triton
@pytest.mark.skipif(not interpreter_enabled(),
                    reason="without the interpreter, tests/test_gpu.py compiles the Triton path")
def test_compile_under_the_interpreter_keeps_the_custom_op():
    """TRITON_INTERPRET=1 kernels cannot be traced, so compiled code calls the opaque custom op,
    and the compiled step still equals eager."""
    torch.manual_seed(0)
    eager, compiled = _Tiny(), _Tiny()
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    x = torch.randn(40, 12)
    eager_out, compiled_out = eager(x), step(x)
    eager_out[0].backward()
    compiled_out[0].backward()
    assert all(p.grad is not None for p in eager.parameters())
    assert_compiled_matches_eager(eager, compiled, eager_out, compiled_out, atol=1e-6, rtol=1e-5)
    assert all(type(t) is torch.Tensor for t in backend._layer_starts.values())
