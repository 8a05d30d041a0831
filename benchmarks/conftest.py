"""pytest-benchmark suite of rqvae-fast: ``pytest benchmarks/`` (separate from ``tests/``).

Options (see ``pytest benchmarks/ --help``):

- ``--bench-quick``: tiny shapes, no torch.compile providers -- for CI, with ``--benchmark-disable``
  (every case then runs once, untimed, so the adapters cannot rot). ``--benchmark-disable`` alone
  implies the quick shapes unless ``--bench-shapes`` names others.
- ``--bench-device auto|cuda|cpu``, ``--bench-precision ieee|tf32|bf16`` (default tf32 on CUDA,
  ieee on CPU), ``--bench-shapes small,A,B`` (names of :data:`rqvae_fast.bench.SHAPES` or
  ``N,D,K,L`` separated by ``;``), ``--bench-providers``, ``--bench-modes``.
- ``--bench-compile``: also run the ``+compile`` providers on CPU (always on for CUDA unless quick).
- ``--bench-backend triton --bench-allow-interpreted``: run the kernels through Triton's CPU
  interpreter; flagged ``interpreted`` and never a speed.

Default shapes: CUDA small (N 65,536), A (N 2^20, D 32, K 256, L 3), B (N 2^18, D 64, K 1024,
L 4); CPU cpu-small (N 8,192) and cpu (N 65,536, D 32, K 256, L 3).
"""
from __future__ import annotations

import pytest
import torch

from rqvae_fast import bench
from rqvae_fast import peer_adapters as pa
from rqvae_fast.roofline import Ceilings, Shape, device_name, measure_ceilings

CPU_SHAPES = ("cpu-small", "cpu")
CUDA_SHAPES = ("small", "A", "B")
QUICK_SHAPES = ("tiny",)


def pytest_addoption(parser):
    group = parser.getgroup("rqvae-fast benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="tiny shapes, no torch.compile providers (CI)")
    group.addoption("--bench-device", default="auto", help="auto | cuda | cpu")
    group.addoption("--bench-precision", default=None, help="ieee | tf32 | bf16")
    group.addoption("--bench-shapes", default=None,
                    help="comma list of named shapes, or 'N,D,K,L' items separated by ';'")
    group.addoption("--bench-providers", default=None, help="comma list of providers")
    group.addoption("--bench-modes", default=None, help="comma list of inference,train,ema")
    group.addoption("--bench-compile", action="store_true", default=False,
                    help="include the +compile providers on CPU")
    group.addoption("--bench-backend", default="auto", help="backend of the rqvae_fast provider")
    group.addoption("--bench-allow-interpreted", action="store_true", default=False,
                    help="allow Triton-interpreted runs on CPU (flagged, not a speed)")


class BenchConfig:
    """The suite's resolved options."""

    def __init__(self, config):
        opt = config.getoption
        wanted = opt("--bench-device")
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(wanted)
        self.disabled = bool(config.getoption("benchmark_disable", default=False))
        # Nothing is timed with --benchmark-disable: use the quick shapes unless shapes are named.
        self.quick = bool(opt("--bench-quick")) or (self.disabled and not opt("--bench-shapes"))
        self.precision = opt("--bench-precision") or ("tf32" if self.device.type == "cuda" else "ieee")
        self.backend = opt("--bench-backend")
        self.allow_interpreted = bool(opt("--bench-allow-interpreted"))
        self.shapes = self._shapes(opt("--bench-shapes"))
        self.modes = _split(opt("--bench-modes")) or list(pa.MODES)
        providers = _split(opt("--bench-providers")) or list(pa.PROVIDERS)
        if self.device.type == "cuda" and not _split(opt("--bench-providers")):
            providers += list(pa.EXTRA_PROVIDERS)
        with_compile = (self.device.type == "cuda" or opt("--bench-compile")) and not self.quick
        if not with_compile and not _split(opt("--bench-providers")):
            providers = [p for p in providers if not p.endswith("+compile")]
        self.providers = providers

    def _shapes(self, text):
        if text:
            names = [t.strip() for t in text.replace(";", "|").split("|")] if ";" in text \
                else [t.strip() for t in text.split(",")]
            return [bench.SHAPES[n] if n in bench.SHAPES else Shape.parse(n, name=n)
                    for n in names if n]
        if self.quick:
            names = QUICK_SHAPES
        else:
            names = CUDA_SHAPES if self.device.type == "cuda" else CPU_SHAPES
        return [bench.SHAPES[n] for n in names]


def _split(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def pytest_configure(config):
    config._rqvae_bench = BenchConfig(config)


def pytest_generate_tests(metafunc):
    cfg = metafunc.config._rqvae_bench
    if "bench_shape" in metafunc.fixturenames:
        metafunc.parametrize("bench_shape", cfg.shapes, ids=[s.name or s.label for s in cfg.shapes])
    if "bench_mode" in metafunc.fixturenames:
        metafunc.parametrize("bench_mode", cfg.modes)
    if "bench_provider" in metafunc.fixturenames:
        metafunc.parametrize("bench_provider", cfg.providers)


def pytest_report_header(config):
    cfg = config._rqvae_bench
    return (f"rqvae-fast bench: device={cfg.device} precision={cfg.precision} quick={cfg.quick} "
            f"shapes={[s.name for s in cfg.shapes]} providers={cfg.providers}")


@pytest.fixture(scope="session")
def bench_cfg(request) -> BenchConfig:
    cfg = request.config._rqvae_bench
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return cfg


@pytest.fixture(scope="session")
def ceilings(bench_cfg):
    """Copy bandwidth and matmul rates, measured once per session (quickly in quick mode; not at
    all with --benchmark-disable, where nothing is timed)."""
    if bench_cfg.disabled:
        return Ceilings(device=device_name(bench_cfg.device), copy_gbps=float("nan"),
                        source="not measured (--benchmark-disable)")
    return measure_ceilings(bench_cfg.device, quick=bench_cfg.quick)
