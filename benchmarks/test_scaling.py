"""Scaling of rqvae_fast: time should grow ~ N*K, peak memory ~ N (outputs) and flat in K.

Each point is a benchmark (results in ``extra_info``); the only assertion is a memory bound on
CUDA, where ``max_memory_allocated`` is exact: no ``(N, K)`` matrix may ever be materialized.
The full sweep (N 2^12..2^24, K 64..16384) with fitted exponents and a plot is
``python -m rqvae_fast.bench --sweep both --plot runs/scaling.png``.
"""
from __future__ import annotations

import pytest
from bench_helpers import check_indices, run_case

from rqvae_fast.roofline import Shape


def _points(config):
    cfg = config._rqvae_bench
    if cfg.quick:
        n_sweep, k_sweep = (1 << 10, 1 << 11), (64, 256)
        n_for_k = 1 << 10
    elif cfg.device.type == "cuda":
        n_sweep, k_sweep = tuple(1 << e for e in (12, 16, 20, 22, 24)), (64, 256, 1024, 4096, 16384)
        n_for_k = 1 << 20
    else:
        n_sweep, k_sweep = tuple(1 << e for e in (12, 14, 16)), (64, 256, 1024, 4096)
        n_for_k = 1 << 12
    shapes = [Shape(n, 32, 256, 3, f"N={n}") for n in n_sweep]
    shapes += [Shape(n_for_k, 32, k, 3, f"K={k}") for k in k_sweep if k != 256 or n_for_k not in n_sweep]
    return shapes


def pytest_generate_tests(metafunc):
    if "scaling_shape" in metafunc.fixturenames:
        shapes = _points(metafunc.config)
        metafunc.parametrize("scaling_shape", shapes, ids=[s.name for s in shapes])


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_scaling(benchmark, bench_cfg, ceilings, mode, scaling_shape):
    out, info = run_case(benchmark, bench_cfg, ceilings, "rqvae_fast", mode, scaling_shape)
    check_indices(out, mode, scaling_shape)
    if bench_cfg.device.type == "cuda" and info["backend"] == "triton":
        # Outputs plus small per-program partials; an (N, K) fp32 matrix would be K/D times more.
        assert info["peak_extra_mib"] <= 2.0 * info["output_mib"] + 64, info
