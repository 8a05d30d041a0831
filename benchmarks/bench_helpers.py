"""Shared body of the benchmark tests: build a case, time it with pytest-benchmark, annotate it."""
from __future__ import annotations

import gc
import math

import pytest
import torch

from rqvae_fast import peer_adapters as pa
from rqvae_fast.roofline import output_bytes, roofline

MIB = float(1 << 20)


def run_case(benchmark, cfg, ceilings, provider, mode, shape):
    """Benchmark one (provider, mode, shape); returns ``(case output, extra_info dict)``.

    Warm-up (compilation, autotuning) runs outside timing; the timed function synchronizes the
    device. ``extra_info`` holds TFLOP/s, GB/s, the roofline fraction for the precision, the peak
    extra memory and the device name (rates only when timing is enabled and not interpreted).
    """
    pa.reset_compiled()
    try:
        case = pa.build_case(provider, mode, shape, cfg.device, cfg.precision, backend=cfg.backend,
                             allow_interpreted=cfg.allow_interpreted)
    except pa.Unavailable as err:
        pytest.skip(str(err))
    benchmark.group = f"{mode} {shape.name or shape.label} {cfg.precision}"
    if not cfg.disabled:
        case.warm(2)
    out = benchmark(case.step)

    info = {
        "provider": provider, "backend": case.backend, "mode": mode,
        "shape": shape.name or shape.label, "N": shape.n, "D": shape.d, "K": shape.k,
        "L": shape.layers, "precision": cfg.precision, "device": ceilings.device,
        "interpreted": case.interpreted, "first_call_s": case.first_call_s,
    }
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    ms = stats.median * 1e3 if stats is not None else float("nan")
    if math.isfinite(ms) and not case.interpreted:
        roof = roofline(shape, mode, cfg.precision, ms, ceilings)
        info.update(ms=ms, tflops=roof.tflops, gbps=roof.gbps,
                    roofline_fraction=roof.fraction, floor_ms=roof.floor_ms, bound=roof.bound)
    peak = pa.peak_extra_bytes(case)
    outputs = output_bytes(shape, mode)
    info.update(peak_extra_mib=peak / MIB, output_mib=outputs / MIB,
                peak_over_outputs=peak / outputs if outputs else float("nan"))
    benchmark.extra_info.update(info)
    del case
    gc.collect()
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return out, info


def check_indices(out, mode, shape):
    """Every step returns the ``(N, L)`` indices (alone in inference, first otherwise) in range."""
    indices = out if mode == "inference" else out[0]
    indices = indices.reshape(-1, shape.layers)
    assert indices.shape == (shape.n, shape.layers)
    assert int(indices.min()) >= 0 and int(indices.max()) < shape.k
