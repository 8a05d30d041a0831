"""The offline compile gate: every launch configuration compiles for sm_80 and sm_90a with no
spills, shared memory within the per-block limit, and tensor cores for tf32/bf16/exact searches.

The gate runs ``python -m rqvae_fast.kernels.report --subset ci`` in a subprocess (Triton's
compiler cannot run under ``TRITON_INTERPRET``, which conftest sets). The CI subset covers every
D, precision, kernel and arch (see ``report.ci_subset``); the full matrix runs from the CLI.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import requires_triton

pytestmark = requires_triton

FAKE_PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    {spill_st} bytes stack frame, {spill_st} bytes spill stores, {spill_ld} bytes spill loads
ptxas info    : Used {regs} registers, used 1 barriers, {smem} bytes smem, 400 bytes cmem[0]
"""


@pytest.fixture(scope="module")
def report():
    from rqvae_fast.kernels import report

    return report


def make_row(report, **fields):
    base = dict(kernel="forward", arch="sm_90a", dim=32, precision="tf32", with_stats=True, routing=0,
                variant="", constexprs={}, num_warps=4, num_stages=2, registers=128, spill_stores=0,
                spill_loads=0, static_smem=0, dynamic_smem=24576, tensor_core_instructions=4,
                programs_per_sm=3)
    base.update(fields)
    return report.Row(**base)


def test_parse_ptxas(report):
    stats = report.parse_ptxas(FAKE_PTXAS.format(spill_st=8, spill_ld=12, regs=255, smem=96))
    assert stats == {"registers": 255, "spill_stores": 8, "spill_loads": 12, "static_smem": 96}
    with pytest.raises(ValueError, match="unrecognised"):
        report.parse_ptxas("ptxas fatal: Unsupported .version 9.4")


def test_gate_rejects_spills_smem_missing_tensor_cores_and_errors(report):
    target = report.TARGETS["sm_90a"]
    assert report.gate_failures(make_row(report), target) == []
    spilled = report.parse_ptxas(FAKE_PTXAS.format(spill_st=4, spill_ld=0, regs=255, smem=0))
    assert any("spill" in f for f in report.gate_failures(make_row(report, **spilled), target))
    big = make_row(report, dynamic_smem=target.smem_per_block + 1)
    assert any("shared memory" in f for f in report.gate_failures(big, target))
    for precision in ("tf32", "bf16", "exact"):
        no_tc = make_row(report, precision=precision, tensor_core_instructions=0)
        assert any("wgmma" in f for f in report.gate_failures(no_tc, target))
    assert report.gate_failures(make_row(report, precision="ieee", tensor_core_instructions=0), target) == []
    assert report.gate_failures(make_row(report, error="CompilationError: boom"), target)
    sm80 = report.TARGETS["sm_80"]
    assert report.gate_failures(make_row(report, arch="sm_80", dynamic_smem=164 * 1024), sm80)


def test_tensor_core_count_and_occupancy(report):
    ptx = "\twgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {...};\n\tmma.sync.aligned.m16n8k8 ...;\n"
    assert report.count_tensor_core_instructions(ptx, report.TARGETS["sm_90a"]) == 1
    assert report.count_tensor_core_instructions(ptx, report.TARGETS["sm_80"]) == 1
    sm90 = report.TARGETS["sm_90a"]
    assert report.programs_per_sm(255, 0, 4, sm90) == 2      # 65536 / (256 * 32 * 4)
    assert report.programs_per_sm(128, 0, 4, sm90) == 4
    assert report.programs_per_sm(32, 0, 4, sm90) == 16      # 2048 threads / 128
    assert report.programs_per_sm(32, 100 * 1024, 4, sm90) == 2
    assert report.programs_per_sm(16, 0, 1, sm90) == 32      # block cap


def test_matrix_and_ci_subset_cover_every_dim_precision_kernel_arch(report):
    full = report.enumerate_rows(report.TARGETS, report.DIMS)
    ci = report.ci_subset(report.TARGETS)
    for rows in (full, ci):
        seen = {(r.kernel, r.arch, r.dim, r.precision) for r in rows}
        for arch in report.TARGETS:
            for dim in report.DIMS:
                assert ("input_grad", arch, dim, "-") in seen
                for precision in report.FORWARD_PRECISIONS:
                    assert ("forward", arch, dim, precision) in seen
    assert len({(r.routing, r.with_stats) for r in full if r.kernel == "forward"}) == 6
    grouped = {(r.arch, r.dim, r.precision) for r in ci if r.variant == "grouped"}
    for arch in report.TARGETS:  # the grouped forward (G > 1) is compiled and gated too
        for dim in report.GROUPED_CI_DIMS:
            for precision in report.FORWARD_PRECISIONS:
                assert (arch, dim, precision) in grouped
    cosine = {(r.arch, r.dim, r.precision) for r in ci if r.variant == "cosine"}
    assert grouped == cosine  # the cosine epilogue: same coverage
    assert {r.variant for r in full if r.kernel == "forward"} == {"", "grouped", "cosine"}


def test_grouped_tiles_differ_only_where_values_cannot(report):
    """The grouped and cosine forwards' own tiles may change BLOCK_K and warps (per-code scores, tie rules
    and so indices do not depend on them), never the rows' chunking of D (the dot's order)."""
    from rqvae_fast.kernels.config import forward_tiles

    for precision in ("ieee", "tf32", "bf16", "exact"):
        for arch in ("sm80", "sm90"):
            for dim in report.DIMS:
                plain = forward_tiles(dim, precision, arch)
                for variant in (dict(grouped=True), dict(cosine=True)):
                    other = forward_tiles(dim, precision, arch, **variant)
                    assert (other.block_dc, other.num_chunks, other.block_m) == (
                        plain.block_dc, plain.num_chunks, plain.block_m)


def test_report_uses_the_launchers_table(report, monkeypatch):
    """The report has no tile table of its own: changing config's changes its rows."""
    from rqvae_fast.kernels import config

    before = report.enumerate_rows(["sm_90a"], [64], kernels=("forward",), precisions=("tf32",))
    monkeypatch.setattr(config, "chunk_width", lambda dim, widest=64: 16)
    after = report.enumerate_rows(["sm_90a"], [64], kernels=("forward",), precisions=("tf32",))
    assert {r.constexprs["BLOCK_DC"] for r in before} == {64}
    assert {r.constexprs["BLOCK_DC"] for r in after} == {16}


def test_compile_gate(tmp_path):
    """Compile the CI subset for sm_80 and sm_90a; fail on any row the gate rejects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    proc = subprocess.run([sys.executable, "-m", "rqvae_fast.kernels.report", "--subset", "ci",
                           "--jobs", jobs, "--json", str(out)], env=env, capture_output=True, text=True)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    if not out.exists():
        pytest.fail(f"report did not run (rc {proc.returncode}): {proc.stderr[-2000:]}")
    rows = json.loads(out.read_text())["rows"]
    failing = [f"{r['kernel']} {r['arch']} D={r['dim']} {r['precision']} stats={r['with_stats']} "
               f"routing={r['routing']} {r['variant']}: {r['failures']}" for r in rows if r["failures"]]
    assert not failing, "\n".join(failing)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}


def test_dims_pad_to_the_dot_width_not_a_power_of_two():
    from rqvae_fast.kernels.config import forward_tiles, input_grad_tiles

    for precision in ("ieee", "tf32", "bf16", "exact"):
        for arch in ("sm80", "sm90"):
            for dim, padded in [(8, 16), (48, 48), (100, 112), (768, 768), (1000, 1008), (1024, 1024)]:
                tiles = forward_tiles(dim, precision, arch)
                assert tiles.padded_dim == padded and tiles.block_m >= 64
                assert input_grad_tiles(dim, arch).padded_dim == padded
    assert forward_tiles(64, "exact", "sm90") == forward_tiles(64, "ieee", "sm90")
    with pytest.raises(ValueError, match="precision"):
        forward_tiles(64, "fp16", "sm90")
