"""Providers x modes x shapes throughput (see conftest.py for options).

    pytest benchmarks/                                   # full suite on this device
    pytest benchmarks/ --bench-quick --benchmark-disable # CI: every case once, untimed
"""
from __future__ import annotations

from bench_helpers import check_indices, run_case


def test_throughput(benchmark, bench_cfg, ceilings, bench_provider, bench_mode, bench_shape):
    out, _ = run_case(benchmark, bench_cfg, ceilings, bench_provider, bench_mode, bench_shape)
    check_indices(out, bench_mode, bench_shape)
