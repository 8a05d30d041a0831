"""Offline compile report: every launch configuration, compiled for sm_80 / sm_90a without a GPU.

``python -m rqvae_fast.kernels.report [--arch sm_80 sm_90a] [--dims 32 64] [--json PATH]``

Each configuration comes from :func:`rqvae_fast.kernels.config.launch_configs` (the launchers'
own table). It is compiled with Triton's compiler for a named target (``GPUTarget("cuda", 80|90,
32)``), its PTX assembled by the ptxas the triton wheel ships (the first one that accepts the PTX
version), and reported as one row: registers, spill bytes, shared memory, tensor-core
instructions in the PTX (``wgmma.mma_async`` on sm_90a, ``mma.sync`` on sm_80) and programs per
SM. :func:`gate_failures` lists what the CI gate rejects. Must run without ``TRITON_INTERPRET``.

Specialisation: pointers are 16-byte aligned and ``D`` divisible by 16 when it is (as Triton's
launcher specialises them); ``N`` is compiled unspecialised (the launch for ``N % 16 == 0`` differs
only in the row-bound masks).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .config import BEAM_PRECISIONS, BEAM_SIZES, KERNELS, LaunchConfig, launch_configs, launch_options

DIMS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
FORWARD_PRECISIONS = ("ieee", "tf32", "bf16", "exact")
ROUTINGS = (0, 1, 2)
GROUPED_CI_DIMS = (64, 128, 192, 256, 384, 768)


@dataclass(frozen=True)
class Target:
    """Limits of one GPU target (per SM unless noted)."""
    name: str            # ptxas --gpu-name
    family: str          # config table column
    capability: int
    smem_per_block: int  # bytes a block may use (opt-in maximum)
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024
    tensor_core_op: str = "mma.sync"


TARGETS = {
    "sm_80": Target("sm_80", "sm80", 80, 163 * 1024, 164 * 1024),
    "sm_90a": Target("sm_90a", "sm90", 90, 227 * 1024, 228 * 1024, tensor_core_op="wgmma.mma_async"),
}


@dataclass
class Row:
    kernel: str
    arch: str
    dim: int
    precision: str
    with_stats: bool
    routing: int
    variant: str                       # input_grad: "grad_out" / "no_grad_out"; forward: ""
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    max_registers: Optional[int] = None
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    static_smem: Optional[int] = None
    dynamic_smem: Optional[int] = None
    tensor_core_instructions: Optional[int] = None
    programs_per_sm: Optional[int] = None
    error: Optional[str] = None

    @property
    def smem(self) -> int:
        return (self.static_smem or 0) + (self.dynamic_smem or 0)

    @property
    def reduced_precision(self) -> bool:
        return self.kernel in ("forward", "beam") and self.precision in ("tf32", "bf16", "exact")


# --------------------------------------------------------------------------------------------
# ptxas output and occupancy: small pure functions (unit-tested with fake reports)

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> Dict[str, int]:
    """Registers, spill store/load bytes and static shared memory from ``ptxas -v`` output."""
    regs = _REGS.search(text)
    spill = _SPILL.search(text)
    if regs is None or spill is None:
        raise ValueError(f"unrecognised ptxas report: {text[-400:]!r}")
    smem = _SMEM.search(text)
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)),
            "spill_loads": int(spill.group(2)), "static_smem": int(smem.group(1)) if smem else 0}


def count_tensor_core_instructions(ptx: str, target: Target) -> int:
    """Tensor-core instructions in the PTX: ``wgmma.mma_async`` (sm_90a) or ``mma.sync`` (sm_80)."""
    return sum(1 for line in ptx.splitlines() if line.lstrip().startswith(target.tensor_core_op))


def programs_per_sm(registers: int, smem: int, num_warps: int, target: Target) -> int:
    """Resident programs per SM, limited by registers (allocated per warp in 256-register
    units), shared memory (plus the per-block reservation), threads and the block cap."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (target.regs_per_sm // per_warp) // num_warps if per_warp else target.max_blocks_per_sm
    by_smem = target.smem_per_sm // (smem + target.smem_reserved_per_block)
    by_threads = target.max_threads_per_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, target.max_blocks_per_sm))


def gate_failures(row: Row, target: Target) -> List[str]:
    """Why ``row`` fails the gate (empty if it passes): compile error, spills, shared memory over
    the per-block limit, a reduced-precision search without tensor-core instructions."""
    if row.error:
        return [f"compile error: {row.error}"]
    failures = []
    if row.spill_stores or row.spill_loads:
        failures.append(f"spills {row.spill_stores} B stores / {row.spill_loads} B loads")
    if row.smem > target.smem_per_block:
        failures.append(f"shared memory {row.smem} B > {target.smem_per_block} B per block")
    if row.reduced_precision and not row.tensor_core_instructions:
        failures.append(f"{row.precision} without {target.tensor_core_op} instructions")
    if row.programs_per_sm == 0:
        failures.append("does not fit on an SM")
    return failures


# --------------------------------------------------------------------------------------------
# compiling


def find_ptxas_candidates() -> List[str]:
    """ptxas binaries to try, in order: ``$TRITON_PTXAS_PATH``, the wheel's ``ptxas-blackwell``
    and ``ptxas``, then ``ptxas`` on ``PATH``."""
    import triton

    found = []
    if os.environ.get("TRITON_PTXAS_PATH"):
        found.append(os.environ["TRITON_PTXAS_PATH"])
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    found += [os.path.join(bin_dir, name) for name in ("ptxas-blackwell", "ptxas")]
    on_path = shutil.which("ptxas")
    if on_path:
        found.append(on_path)
    return [p for p in dict.fromkeys(found) if os.path.isfile(p) and os.access(p, os.X_OK)]


def run_ptxas(ptxas: str, ptx: str, gpu_name: str) -> Tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
        return proc.returncode, proc.stdout + proc.stderr


def _kernel_fn(kernel: str):
    if kernel == "forward":
        from .quantize_forward import _residual_quantize_fwd_kernel as fn
    elif kernel == "beam":
        from .beam_search import _beam_search_kernel as fn
    else:
        from .quantize_backward import _residual_quantize_input_grad_kernel as fn
    return fn


_POINTER_TYPES = {
    "forward": {"layer_start_ptr": "*i32", "idx_ptr": "*i64", "count_ptr": "*i32", "rescan_ptr": "*i32"},
    "input_grad": {"layer_start_ptr": "*i32", "idx_ptr": "*i64"},
    "beam": {"layer_start_ptr": "*i32", "idx_ptr": "*i64", "hist_ptr": "*i32"},
}
_SCALAR_TYPES = {"N": "i32", "D": "i32", "x_stride": "i32", "num_active": "i32", "grad_out_scale": "fp32"}


def _source(fn, kernel: str, constexprs: Dict[str, object], dim: int):
    """A Triton ``ASTSource`` for fp32 tensors, adapting to the installed Triton's signature."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _SCALAR_TYPES:
            signature[name] = _SCALAR_TYPES[name]
            if name in ("D", "x_stride") and dim % 16 == 0:  # x_stride = G * D
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = _POINTER_TYPES[kernel].get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # Triton >= 3.3
        return ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    # Triton 3.2: constants keyed by argument index, no divisibility attributes in this form.
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    return ASTSource(fn=fn, signature=signature, constants=consts)


def compile_row(row: Row, ptxas: str) -> Row:
    """Compile ``row``'s configuration and fill in its measurements (or ``error``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = TARGETS[row.arch]
    try:
        fn = _kernel_fn(row.kernel)
        src = _source(fn, row.kernel, row.constexprs, row.dim)
        compiled = triton.compile(src, target=GPUTarget("cuda", target.capability, 32),
                                  options=launch_options(row))
        ptx = compiled.asm["ptx"]
        code, text = run_ptxas(ptxas, ptx, target.name)
        if code != 0:
            raise RuntimeError(f"ptxas failed: {text.strip()[-400:]}")
        stats = parse_ptxas(text)
    except Exception as exc:  # noqa: BLE001 -- reported per row, the gate fails on it
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:500]
        return row
    row.registers = stats["registers"]
    row.spill_stores, row.spill_loads = stats["spill_stores"], stats["spill_loads"]
    row.static_smem = stats["static_smem"]
    row.dynamic_smem = int(getattr(compiled.metadata, "shared", 0) or 0)
    row.tensor_core_instructions = count_tensor_core_instructions(ptx, target)
    row.programs_per_sm = programs_per_sm(row.registers, row.smem, row.num_warps, target)
    return row


def pick_ptxas(candidates: Sequence[str], arch: str = "sm_90a") -> Tuple[Optional[str], str]:
    """The first candidate that assembles this Triton's PTX (a tiny kernel), or ``None`` and why."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not candidates:
        return None, "no ptxas found (looked for TRITON_PTXAS_PATH, the triton wheel's bin/, PATH)"

    @triton.jit
    def _probe(ptr):
        tl.store(ptr, 1.0)

    try:
        compiled = triton.compile(ASTSource(fn=_probe, signature={"ptr": "*fp32"}),
                                  target=GPUTarget("cuda", TARGETS[arch].capability, 32))
    except Exception as exc:  # noqa: BLE001
        return None, f"Triton cannot compile for {arch} offline: {exc}"
    reasons = []
    for candidate in candidates:
        code, text = run_ptxas(candidate, compiled.asm["ptx"], TARGETS[arch].name)
        if code == 0:
            return candidate, ""
        reasons.append(f"{candidate}: {text.strip().splitlines()[-1] if text.strip() else code}")
    return None, "no ptxas accepts this Triton's PTX: " + "; ".join(reasons)


# --------------------------------------------------------------------------------------------
# the matrix


def enumerate_rows(archs: Iterable[str], dims: Iterable[int], kernels: Iterable[str] = KERNELS,
                   precisions: Iterable[str] = FORWARD_PRECISIONS, stats: Iterable[bool] = (False, True),
                   routings: Iterable[int] = ROUTINGS, grouped: Iterable[bool] = (False, True),
                   cosine: Iterable[int] = (0, 1), beam_sizes: Iterable[int] = BEAM_SIZES,
                   beam_weighted: Iterable[bool] = (False, True)) -> List[Row]:
    """One row per distinct launch configuration (duplicates, e.g. input-grad launches that do
    not depend on precision, appear once)."""
    rows, seen = [], set()
    for arch in archs:
        family = TARGETS[arch].family
        for kernel in kernels:
            for dim in dims:
                for precision in _precisions(kernel, precisions):
                    for with_stats in (stats if kernel == "forward" else (False,)):
                        for routing in routings:
                            variants = [(g, c) for g in (grouped if kernel == "forward" else (False,))
                                        for c in (cosine if kernel == "forward" else (0,))
                                        if c == 0 or (routing == 2 and not g)]  # cosine: compat's only
                            for cfg in (cfg for g, c in variants
                                        for cfg in launch_configs(kernel, dim,
                                                                  precision if precision != "-" else "ieee",
                                                                  with_stats, routing, family, grouped=g,
                                                                  cosine=c, beam_sizes=beam_sizes,
                                                                  beam_weighted=tuple(beam_weighted))):
                                variant = _variant(cfg)
                                key = (arch, dim, kernel, variant, tuple(sorted(cfg.constexprs.items())),
                                       cfg.num_warps, cfg.num_stages, cfg.max_registers)
                                if key in seen:
                                    continue
                                seen.add(key)
                                rows.append(Row(kernel, arch, dim, precision, with_stats, routing, variant,
                                                dict(cfg.constexprs), cfg.num_warps, cfg.num_stages,
                                                cfg.max_registers))
    return rows


def _precisions(kernel: str, precisions: Iterable[str]) -> Tuple[str, ...]:
    """The precisions a kernel's rows take: the forward's as asked, the beam kernel's among
    :data:`BEAM_PRECISIONS` (``"exact"`` maps to nothing there), none for the input gradient."""
    if kernel == "forward":
        return tuple(precisions)
    if kernel == "beam":
        return tuple(p for p in precisions if p in BEAM_PRECISIONS)
    return ("-",)


def _variant(cfg: LaunchConfig) -> str:
    if cfg.kernel == "beam":
        return f"beam={cfg.constexprs['BEAM']}" + (",weighted" if cfg.constexprs["WEIGHTED"] else "")
    if cfg.kernel == "input_grad":
        return ("grad_out" if cfg.constexprs["HAS_GRAD_OUT"] else "no_grad_out") + \
            f",commit={cfg.constexprs['COMMIT_LAYERS']}"
    parts = (["grouped"] if cfg.constexprs.get("GROUPED") else []) + \
        (["cosine"] if cfg.constexprs.get("COSINE") else [])
    return ",".join(parts)


def ci_subset(archs: Iterable[str]) -> List[Row]:
    """The CI test's rows (about 260, a few minutes on 2 cores): every D, precision and kernel on
    every arch, the forward with statistics and the ``full`` routing (the most registers), the
    input gradient with every layer's term and an output gradient (the most loads); plus the other
    routings and no statistics for the tf32 and exact searches at D 64 (registers path) and 768
    (scratch path), and the grouped forward and the cosine epilogue at ``GROUPED_CI_DIMS``. The
    full matrix runs from the CLI."""
    plain = dict(grouped=(False,), cosine=(0,))
    rows = enumerate_rows(archs, DIMS, kernels=("forward",), stats=(True,), routings=(1,), **plain)
    for routings, stats in (((0, 2), (True,)), ((1,), (False,))):
        rows += enumerate_rows(archs, (64, 768), kernels=("forward",), precisions=("tf32", "exact"),
                               stats=stats, routings=routings, **plain)
    # the grouped forward (G > 1 column groups, its group offsets): every precision at the Ds
    # where sm_80's configurations are tightest, and one each of the register and scratch paths
    rows += enumerate_rows(archs, GROUPED_CI_DIMS, kernels=("forward",), stats=(True,), routings=(1,),
                           grouped=(True,), cosine=(0,))
    # the cosine epilogue (compat's use_cosine_sim: layer_ste routing, statistics): same Ds
    rows += enumerate_rows(archs, GROUPED_CI_DIMS, kernels=("forward",), stats=(True,), routings=(2,),
                           grouped=(False,), cosine=(1,))
    grads = enumerate_rows(archs, DIMS, kernels=("input_grad",), routings=(1,))
    rows += [r for r in grads if r.variant.startswith("grad_out")]
    rows += [r for r in enumerate_rows(archs, (64, 768), kernels=("input_grad",), routings=(0,))
             if r.variant.startswith("no_grad_out")]
    rows += beam_ci_rows(archs)
    return rows


BEAM_CI_DIMS = (32, 96, 256, 768)


def beam_ci_rows(archs: Iterable[str]) -> List[Row]:
    """The beam kernel's CI rows (60): beam 4 at D 32, 96 (odd chunk count), 256 and 768 (many
    chunks), beams 2 and 8 at D 768 and beam 3 (padded to 4) at D 64, in every precision; the
    weighted ranking (``WEIGHTED``, one more register row per path) at beam 4, D 32 and 768, and
    beam 8, D 768."""
    def beam_rows(dims, beams, weighted=(False,)):
        return enumerate_rows(archs, dims, kernels=("beam",), precisions=BEAM_PRECISIONS,
                              stats=(False,), routings=(0,), beam_sizes=beams, beam_weighted=weighted)

    return (beam_rows(BEAM_CI_DIMS, (4,)) + beam_rows((768,), (2, 8)) + beam_rows((64,), (3,))
            + beam_rows((32, 768), (4,), (True,)) + beam_rows((768,), (8,), (True,)))


def compile_rows(rows: List[Row], ptxas: str, jobs: int = 1) -> List[Row]:
    if jobs <= 1:
        return [compile_row(r, ptxas) for r in rows]
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(compile_row, rows, [ptxas] * len(rows)))


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'kernel':<10} {'arch':<6} {'D':>5} {'prec':<5} {'stats':<5} {'rt':>2} {'variant':<20} "
            f"{'BM':>3} {'BK':>3} {'DC':>3} {'NDC':>3} {'w':>2} {'st':>2} | {'regs':>4} {'spill':>9} "
            f"{'smem':>7} {'tc':>4} {'prog/SM':>7}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r.constexprs
        tiles = (f"{c.get('BLOCK_M', ''):>3} {c.get('BLOCK_K', ''):>3} "
                 f"{c.get('BLOCK_DC', c.get('BLOCK_D', '')):>3} {c.get('NUM_DC', ''):>3}")
        failures = gate_failures(r, TARGETS[r.arch])
        if r.error:
            meas = f"{'':>4} {'':>9} {'':>7} {'':>4} {'':>7}"
        else:
            meas = (f"{r.registers:>4} {f'{r.spill_stores}/{r.spill_loads}':>9} {r.smem:>7} "
                    f"{r.tensor_core_instructions:>4} {r.programs_per_sm:>7}")
        lines.append(f"{r.kernel:<10} {r.arch:<6} {r.dim:>5} {r.precision:<5} {str(r.with_stats):<5} "
                     f"{r.routing:>2} {r.variant:<20} {tiles} {r.num_warps:>2} {r.num_stages:>2} | {meas}  "
                     f"{'ok' if not failures else '; '.join(failures)}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rqvae_fast.kernels.report", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--dims", nargs="+", type=int, default=list(DIMS))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--precisions", nargs="+", default=list(FORWARD_PRECISIONS), choices=FORWARD_PRECISIONS)
    parser.add_argument("--subset", choices=("full", "ci"), default="full",
                        help="ci: the CI test's documented subset (every D, precision, kernel, arch)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("the compile report needs Triton's compiler: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    ptxas, why = pick_ptxas(find_ptxas_candidates(), args.arch[0])
    if ptxas is None:
        print(f"SKIP: {why}", file=sys.stderr)
        return 3
    if args.subset == "ci":
        rows = ci_subset(args.arch)
    else:
        rows = enumerate_rows(args.arch, args.dims, kernels=args.kernels, precisions=args.precisions)
    rows = compile_rows(rows, ptxas, args.jobs)
    print(f"ptxas: {ptxas}")
    print(format_table(rows))
    failing = [r for r in rows if gate_failures(r, TARGETS[r.arch])]
    print(f"\n{len(rows)} configurations, {len(failing)} failing the gate")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ptxas": ptxas, "rows": [dict(asdict(r), smem=r.smem, failures=gate_failures(r, TARGETS[r.arch]))
                                                for r in rows]}, f, indent=1)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
