"""On a machine without Triton (macOS, Windows) the package imports and the PyTorch path runs.

"No Triton" is simulated with ``sys.modules["triton"] = None`` set in a fresh interpreter before
anything is imported: ``import triton`` then raises ``ImportError`` and
``importlib.util.find_spec("triton")`` returns ``None`` without raising, which is what torch
itself probes at import (torch 2.14 does; an import hook that raises breaks ``import torch``).
"""
import subprocess
import sys
import textwrap

BLOCK_TRITON = textwrap.dedent("""
    import importlib.util
    import sys
    sys.modules["triton"] = None            # as if the package were not installed
    assert importlib.util.find_spec("triton") is None
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("triton is still importable")
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TRITON + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_import_and_run_without_triton():
    out = _run("""
        import torch
        import rqvae_fast
        from rqvae_fast import ResidualVQ
        assert not rqvae_fast.HAS_TRITON
        rvq = ResidualVQ(2, [16, 8], 4, ema=True)
        q, i, loss = rvq(torch.randn(10, 4, requires_grad=True))
        loss.backward()
        assert i.shape == (10, 2) and sys.modules.get("triton") is None
        try:
            ResidualVQ(1, [4], 4, backend="triton")(torch.randn(2, 4))
        except RuntimeError as e:
            assert "needs the 'triton' package" in str(e), e
            print("OK")
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr


def test_the_simulation_keeps_torchs_own_triton_probe_working():
    """torch's import-time ``find_spec("triton")`` must see "absent", not an exception."""
    out = _run("""
        import torch
        import torch.utils._triton as probe
        assert not probe.has_triton_package(), "torch still sees triton"
        print("OK", torch.__version__)
    """)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr
