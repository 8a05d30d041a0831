"""Work counting of rqvae_fast.roofline, the peer adapters, and the report's table/JSON (tiny CPU run)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rqvae_fast import bench
from rqvae_fast import peer_adapters as pa
from rqvae_fast.roofline import (Ceilings, Shape, flops, matmul_precision, min_bytes, output_bytes,
                                 roofline)

SHAPE_A = Shape(1 << 20, 32, 256, 3, "A")
H200 = Ceilings(device="NVIDIA H200", copy_gbps=4248.2,
                tflops={"ieee": 51.31, "tf32": 360.5, "bf16": 788.4})


def test_flops_match_the_anchors():
    assert flops(SHAPE_A) == pytest.approx(51.54e9, rel=1e-3)
    assert flops(SHAPE_A, "train") == flops(SHAPE_A, "inference")  # the backward is elementwise
    shape_b = Shape(1 << 18, 64, 1024, 4)
    assert flops(shape_b) == 2 * (1 << 18) * 1024 * 64 * 4


def test_floors_match_the_anchors():
    # ../shared/anchors/README.md: 0.143 ms tf32, 1.00 ms fp32, 0.069 ms memory, ~293 MB.
    assert min_bytes(SHAPE_A, "forward") == pytest.approx(293e6, rel=0.01)
    assert roofline(SHAPE_A, "forward", "tf32", 1.0, H200).floor_ms == pytest.approx(0.143, abs=1e-3)
    assert roofline(SHAPE_A, "forward", "ieee", 1.0, H200).floor_ms == pytest.approx(1.00, abs=5e-3)
    memory_ms = min_bytes(SHAPE_A, "forward") / (H200.copy_gbps * 1e9) * 1e3
    assert memory_ms == pytest.approx(0.069, abs=1e-3)


def test_byte_model_per_mode():
    s = Shape(n=100, d=8, k=16, layers=2)
    rows, codes, idx = 100 * 8 * 4, 32 * 8 * 4, 100 * 2 * 8
    assert min_bytes(s, "inference") == rows + codes + idx
    assert min_bytes(s, "forward") == rows + codes + idx + rows
    assert min_bytes(s, "train") == rows + codes + idx + rows + 2 * rows + codes
    ema_state = 2 * (32 * 4 + codes) + codes
    assert min_bytes(s, "ema") == rows + codes + idx + rows + 2 * rows + ema_state
    assert output_bytes(s, "inference") == idx
    assert output_bytes(s, "train") == 2 * rows + idx + codes
    assert output_bytes(s, "ema") == 2 * rows + idx
    with pytest.raises(ValueError):
        flops(s, "nope")


def test_roofline_fraction_and_bound():
    s = Shape(1 << 16, 32, 256, 3)
    fast_math = Ceilings("x", copy_gbps=1.0, tflops={"ieee": 1e6})
    r = roofline(s, "inference", "ieee", 1e9, fast_math)
    assert r.bound == "memory"
    floor = roofline(s, "inference", "tf32", 1.0, H200).floor_ms
    half = roofline(s, "inference", "tf32", 2 * floor, H200)
    assert half.fraction == pytest.approx(0.5) and half.bound == "compute"
    assert half.tflops == pytest.approx(flops(s) / (2 * floor * 1e-3) / 1e12)
    # CPU has no tf32 unit: falls back to the fp32 rate.
    cpu = Ceilings("cpu", 10.0, {"ieee": 0.1})
    assert cpu.matmul_tflops("tf32") == 0.1


def test_shape_parse_and_anchor_ceilings(tmp_path):
    assert Shape.parse("65536,32,256,3") == Shape(65536, 32, 256, 3)
    with pytest.raises(ValueError):
        Shape.parse("1,2,3")
    path = tmp_path / "anchor.json"
    path.write_text(json.dumps({"device": "G", "copy_GBps": 100.0, "fp32_TFLOPs": 1.0,
                                "tf32_TFLOPs": 2.0, "bf16_TFLOPs": 4.0}))
    c = Ceilings.from_anchor(str(path))
    assert c.copy_gbps == 100.0 and c.matmul_tflops("bf16") == 4.0


def test_matmul_precision_context_restores():
    before = torch.get_float32_matmul_precision()
    with matmul_precision("tf32"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_clean_timing_keeps_budget():
    wait = bench.runqueue_wait_ns()
    assert wait is None or wait >= 0
    clean, every = bench.clean_times(lambda: sum(range(1000)), reps=3, max_seconds=0.5)
    assert len(every) >= 1 and len(clean) <= 3 and all(t >= 0 for t in every)
    assert set(clean) <= set(every)


def test_fit_exponent():
    xs = [2.0 ** e for e in range(4, 10)]
    assert bench.fit_exponent(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert bench.fit_exponent(xs, [5.0] * len(xs)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bench.fit_exponent([1.0], [1.0]))


# --------------------------------------------------------------------------- adapters

TINY = Shape(512, 16, 32, 2, "t")


@pytest.mark.parametrize("mode", ["inference", "train", "ema"])
def test_adapters_agree_on_indices(mode):
    """Every provider is built from the same inputs and codebooks: same first-step indices."""
    providers = [p for p in pa.PROVIDERS if not p.endswith("+compile")]
    results = {}
    for provider in providers:
        try:
            case = pa.build_case(provider, mode, TINY, "cpu", "ieee")
        except pa.Unavailable:
            continue
        out = case.step()
        indices = out if mode == "inference" else out[0]
        results[provider] = indices.reshape(TINY.n, TINY.layers)
        if mode == "train":
            grads = out[1]
            assert grads[0].numel() == TINY.n * TINY.d and len(grads) >= 2
    assert {"rqvae_fast", "reference", "seed"} <= set(results)
    for provider, indices in results.items():
        assert torch.equal(indices, results["reference"]), provider


def test_triton_on_cpu_is_refused_unless_asked():
    with pytest.raises(pa.Unavailable, match="Triton|triton"):
        pa.build_case("rqvae_fast", "inference", TINY, "cpu", "ieee", backend="triton")


def test_vqp_absent_is_skipped(monkeypatch):
    monkeypatch.setattr(pa, "vqp_available", lambda: False)
    with pytest.raises(pa.Unavailable, match="not installed"):
        pa.build_case("vector_quantize_pytorch", "train", TINY, "cpu")
    assert "vector_quantize_pytorch" not in pa.available_providers(torch.device("cpu"))


def test_peak_memory_on_cpu_is_measured():
    case = pa.build_case("seed", "inference", Shape(4096, 16, 64, 2), "cpu")
    peak = pa.peak_extra_bytes(case)
    assert math.isnan(peak) or peak >= 0


# --------------------------------------------------------------------------- report


def _row(provider, ms, **extra):
    row = {"provider": provider, "backend": "eager", "mode": "train", "shape": "s", "N": 8, "D": 4,
           "K": 16, "L": 2, "precision": "ieee", "ms": ms, "gflop": 1e-6, "min_mbytes": 1e-3,
           "floor_ms": 0.1, "bound": "compute", "tflops": 1.0, "gbps": 2.0,
           "roofline_fraction": 0.1 / ms, "peak_extra_mib": 1.0, "peak_over_outputs": 1.5,
           "first_call_s": 0.01, "interpreted": False}
    row.update(extra)
    return row


def test_table_speedups_skips_and_interpreted():
    rows = [_row("rqvae_fast", 1.0, backend="torch"), _row("seed", 4.0),
            _row("rqvae_fast[torch]", 100.0, interpreted=True),
            {"provider": "vector_quantize_pytorch", "mode": "train", "shape": "s", "N": 8, "D": 4,
             "K": 16, "L": 2, "precision": "ieee", "skipped": "not installed"}]
    bench.add_speedups(rows)
    assert rows[0]["speedup_vs"] == {"seed": 4.0}
    assert rows[1]["speedup_vs"]["rqvae_fast"] == pytest.approx(0.25)
    assert "speedup_vs" not in rows[2]          # interpreted: never a speed
    text = bench.format_table(rows)
    assert "xseed" in text and "4.00" in text and "INTERPRETED" in text and "not installed" in text
    md = bench.format_table(rows, markdown=True)
    assert md.count("INTERPRETED") == 1 and "|---|" in md


def test_report_tiny_cpu_run(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = bench.main(["--device", "cpu", "--quick", "--shapes", "512,16,32,2",
                       "--providers", "rqvae_fast,reference,seed", "--modes", "inference,train",
                       "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert set(report) == {"meta", "ceilings", "rows", "sweeps"}
    for key in ("date", "device", "torch", "triton", "commit", "precision"):
        assert key in report["meta"]
    assert report["ceilings"]["copy_gbps"] > 0 and report["ceilings"]["tflops"]["ieee"] > 0
    rows = report["rows"]
    assert len(rows) == 6 and all("ms" in r for r in rows)
    ours = [r for r in rows if r["provider"] == "rqvae_fast"]
    assert all(r["backend"] == "torch" and not r["interpreted"] for r in ours)
    for r in rows:
        assert set(r["speedup_vs"]) == {"rqvae_fast", "reference", "seed"} - {r["provider"]}
        for key in ("tflops", "gbps", "roofline_fraction", "peak_extra_mib", "device"):
            assert key in r
    printed = capsys.readouterr().out
    assert "rqvae_fast[torch]" in printed and "%roof" in printed
    assert "| provider |" in out_md.read_text()


def test_report_refuses_interpreted_triton(tmp_path):
    out_json = tmp_path / "r.json"
    bench.main(["--device", "cpu", "--quick", "--shapes", "256,16,32,2", "--providers", "rqvae_fast",
                "--modes", "inference", "--backend", "triton", "--json", str(out_json)])
    rows = json.loads(out_json.read_text())["rows"]
    assert "ms" not in rows[0] and "Triton-interpreted" in rows[0]["skipped"]


def test_sweep_shapes_and_plot(tmp_path):
    cpu = torch.device("cpu")
    n_shapes = bench.sweep_shapes(cpu, "n")
    assert [s.n for s in n_shapes] == [1 << e for e in range(10, 17)]
    cuda_n = bench.sweep_shapes(torch.device("cuda"), "n")
    assert cuda_n[0].n == 1 << 12 and cuda_n[-1].n == 1 << 24
    cuda_k = bench.sweep_shapes(torch.device("cuda"), "k")
    assert cuda_k[0].k == 64 and cuda_k[-1].k == 16384
    sweep = {"axis": "n", "rows": [_row("rqvae_fast", 1.0 * i, N=256 * i, K=16, mode="inference")
                                   for i in (1, 2, 4)],
             "fits": [{"provider": "rqvae_fast", "mode": "inference", "axis": "n",
                       "time_exponent": 1.0, "memory_exponent": 1.0}]}
    assert "N^1.00" in bench.format_sweep(sweep)
    path = bench.plot_sweeps([sweep], str(tmp_path / "s.png"))
    assert path is None or (tmp_path / "s.png").stat().st_size > 0
