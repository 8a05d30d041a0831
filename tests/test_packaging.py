"""The wheel ships kernels/ as rqvae_fast.kernels and no top-level ``kernels`` package."""
import importlib.util
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _local_setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the ``wheel`` package (a fresh
    Python 3.11 venv has setuptools 65.5 and no ``wheel``)."""
    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_wheel_maps_kernels_into_the_package(tmp_path):
    pytest.importorskip("setuptools")
    # build with this environment's setuptools when it can (offline, fast), else in pip's isolated
    # build environment (pyproject's build-system requirements)
    isolation = [] if not _local_setuptools_builds_wheels() else ["--no-build-isolation"]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", *isolation,
         "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("rqvae_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rqvae_fast/kernels/quantize_forward.py" in names
    assert "rqvae_fast/kernels/quantize_backward.py" in names
    assert not [n for n in names if n.split("/")[0] in ("kernels", "tests", "benchmarks")]
