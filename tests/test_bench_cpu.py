"""The CPU reports of the benchmark: plain ops compute what the fused pass computes; both reports
run end to end at tiny sizes and leave no busy process behind."""
import json

import torch

from rqvae_fast import bench, bench_cpu, torch_backend
from rqvae_fast.backend import search_operands
from rqvae_fast.routing import FULL


def test_plain_ops_compute_what_the_fused_pass_computes():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 12, generator=gen)
    codes = torch.randn(70, 12, generator=gen)
    sizes = [30, 40]
    search, norms = search_operands(codes)
    fused = torch_backend.residual_quantize_forward(x, codes, search, norms, sizes, routing=FULL,
                                                    precision="ieee", with_stats=True)
    plain = bench_cpu.plain_ops_forward(x, codes, sizes, with_stats=True)
    assert torch.equal(fused[1], plain[1])
    for a, b in zip((fused[0], fused[2], fused[3], fused[4]), (plain[0], plain[2], plain[3], plain[4])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_busy_process_is_stopped():
    with bench_cpu.BusyProcess() as busy:
        proc = busy.proc
        assert proc.poll() is None
    assert proc.poll() is not None


def test_vs_plain_ops_report_runs(tmp_path, capsys):
    out = tmp_path / "plain.json"
    assert bench.main(["--vs-plain-ops", "--quick", "--dims", "8,20", "--plain-n", "300",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["D"], r["stats"]) for r in rows] == [(8, False), (8, True), (20, False), (20, True)]
    assert all(r["fused_ms"] > 0 and r["plain_ms"] > 0 and r["same_indices"] for r in rows)
    assert "plain/fused" in capsys.readouterr().out


def test_contention_report_runs(tmp_path, capsys):
    out = tmp_path / "contention.json"
    assert bench.main(["--contention", "--quick", "--reps", "1", "--modes", "inference",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows] == list(bench_cpu.CONTENTION_PROVIDERS)
    assert all(r["idle_ms"] > 0 and r["busy_ms"] > 0 for r in rows)
    assert "vs seed busy" in capsys.readouterr().out
