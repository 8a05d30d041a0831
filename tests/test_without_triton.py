"""On a machine without Triton (macOS, Windows) the package imports and the PyTorch path runs."""
import subprocess
import sys
import textwrap


def test_import_and_run_without_triton():
    code = textwrap.dedent("""
        import sys
        class BlockTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("no triton here")
                return None
        sys.meta_path.insert(0, BlockTriton())
        import torch
        import rqvae_fast
        from rqvae_fast import ResidualVQ
        assert not rqvae_fast.HAS_TRITON
        rvq = ResidualVQ(2, [16, 8], 4, ema=True)
        q, i, loss = rvq(torch.randn(10, 4, requires_grad=True))
        loss.backward()
        assert i.shape == (10, 2) and "triton" not in sys.modules
        try:
            ResidualVQ(1, [4], 4, backend="triton")(torch.randn(2, 4))
        except RuntimeError as e:
            assert "needs the 'triton' package" in str(e)
            print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("OK"), out.stderr
