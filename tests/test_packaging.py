"""The wheel ships kernels/ as rqvae_fast.kernels and no top-level ``kernels`` package."""
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_into_the_package(tmp_path):
    pytest.importorskip("setuptools")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("rqvae_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rqvae_fast/kernels/quantize_forward.py" in names
    assert "rqvae_fast/kernels/quantize_backward.py" in names
    assert not [n for n in names if n.split("/")[0] in ("kernels", "tests", "benchmarks")]
