"""Side-by-side benchmark report: every provider, one process, one table, one JSON.

    python -m rqvae_fast.bench                      # all providers x modes x default shapes
    python -m rqvae_fast.bench --quick              # tiny shapes, no torch.compile (seconds)
    python -m rqvae_fast.bench --sweep both --plot runs/scaling.png
    python -m rqvae_fast.bench --contention        # CPU: idle vs one busy process (rqvae_fast.bench_cpu)
    python -m rqvae_fast.bench --vs-plain-ops      # CPU: fused pass vs plain ops over D

Per (shape, mode) it prints, for each provider: median ms, TFLOP/s and GB/s against the work model
of :mod:`rqvae_fast.roofline`, the % of the roofline for the precision (ceilings measured at start:
a large device copy and a large matmul per precision), the peak extra memory in MiB, and the
speed-up versus each other provider (``x<peer>`` = peer ms / this ms). Timings: CUDA, the median of
``triton.testing.do_bench`` (CUDA events, L2 flushed) or of CUDA-event-timed calls; CPU, the
median of synchronized ``perf_counter`` calls -- by default only of the *clean* ones, during which
no thread of this process waited for a core (Linux schedstat), so other jobs on a shared machine
do not leak into the numbers; the share of CPU that other processes used is recorded too.
Compilation and warm-up happen before timing.

On CPU, ``rqvae_fast`` runs the chunked PyTorch path (shown as ``rqvae_fast[torch]``); Triton is
only run there with ``--backend triton --allow-interpreted``, and then flagged as interpreted and
left out of every speed-up and roofline figure.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import gc
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import peer_adapters as pa
from .roofline import (Ceilings, Shape, clean_times, device_name, fmt_si, measure_ceilings,
                       median_ms, output_bytes, roofline, runqueue_wait_ns)
from .roofline import median as _median

MIB = float(1 << 20)

# Named shapes. A and B are the H200 targets; "cpu" is the CPU target shape.
SHAPES: Dict[str, Shape] = {
    "tiny": Shape(1024, 16, 64, 2, "tiny"),
    "small": Shape(65536, 32, 256, 3, "small"),
    "cpu": Shape(65536, 32, 256, 3, "cpu"),
    "cpu-small": Shape(8192, 32, 256, 3, "cpu-small"),
    "A": Shape(1 << 20, 32, 256, 3, "A"),
    "B": Shape(1 << 18, 64, 1024, 4, "B"),
}
DEFAULT_SHAPES = {"cuda": ("small", "A", "B"), "cpu": ("cpu",)}
QUICK_SHAPES = {"cuda": ("small",), "cpu": ("tiny",)}
SHORT = {"rqvae_fast": "ours", "rqvae_fast[torch]": "ours-torch", "reference": "ref",
         "reference+compile": "ref+c", "seed": "seed", "seed+compile": "seed+c",
         "vector_quantize_pytorch": "vqp"}


# ----------------------------------------------------------------------------- metadata


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def collect_meta(device: torch.device, precision: str, argv: Sequence[str]) -> dict:
    """Date, device, versions, commit and machine state of this run."""
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "vector_quantize_pytorch": _version("vector-quantize-pytorch"),
        "python": platform.python_version(),
        "commit": _git_commit(),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "argv": list(argv),
    }
    if hasattr(os, "getloadavg"):
        meta["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    return meta


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes between :meth:`start` and
    :meth:`share` (Linux ``/proc/stat`` minus this process's own CPU time); ``nan`` elsewhere.
    Recorded with every CPU report: CPU timings on a shared machine are only as good as this."""

    def __init__(self):
        self.start()

    @staticmethod
    def _snap():
        try:
            with open("/proc/stat") as fh:
                ticks = [int(v) for v in fh.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return sum(ticks), ticks[3] + ticks[4], time.monotonic(), os.times()

    def start(self) -> None:
        self.begin = self._snap()

    def share(self) -> float:
        end = self._snap()
        if self.begin is None or end is None:
            return float("nan")
        hz = os.sysconf("SC_CLK_TCK")
        busy = ((end[0] - self.begin[0]) - (end[1] - self.begin[1])) / hz
        own = (end[3].user + end[3].system) - (self.begin[3].user + self.begin[3].system)
        wall = end[2] - self.begin[2]
        ncpu = os.cpu_count() or 1
        return min(1.0, max(0.0, (busy - own) / (ncpu * wall))) if wall > 0 else float("nan")


# ----------------------------------------------------------------------------- measuring


def time_case(case: pa.Case, *, reps: int, max_seconds: float, stat: str = "median") -> tuple:
    """``(median ms, min ms, extra)`` of one step of ``case`` (already warmed).

    With ``stat="clean"`` on CPU only clean repetitions count (see :func:`clean_times`); when
    none was clean in ``max_seconds`` all repetitions are used and ``extra["clean_reps"]`` is 0.
    """
    if case.device.type == "cpu" and stat == "clean":
        clean, every = clean_times(case.step, reps=reps, max_seconds=max_seconds)
        mid = _median(clean) if clean else min(every)   # none clean: the least disturbed one
        return mid, min(clean or every), {"clean_reps": len(clean), "reps": len(every)}
    if case.device.type == "cuda":
        try:
            import triton.testing

            med, low = triton.testing.do_bench(case.run, warmup=25, rep=100, quantiles=[0.5, 0.0])
            return float(med), float(low), {}
        except ImportError:
            pass
    ms, times = median_ms(case.step, case.device, warmup=0, reps=reps, max_seconds=max_seconds)
    return ms, min(times), {"reps": len(times)}


def measure_case(case: pa.Case, ceilings: Ceilings, *, reps: int, max_seconds: float,
                 warm_calls: int = 2, stat: str = "median") -> dict:
    """Warm, time and size one case; returns its JSON row. ``ms`` is the median of the
    repetitions; with ``stat="min"`` the fastest; with ``stat="clean"`` (CPU) the median of the
    repetitions no other job disturbed. ``median_ms`` and ``min_ms`` are kept as well."""
    case.warm(warm_calls)
    median, min_ms, extra = time_case(case, reps=reps, max_seconds=max_seconds, stat=stat)
    return finish_row(case, ceilings, median, min_ms, extra, stat)


def finish_row(case: pa.Case, ceilings: Ceilings, median: float, min_ms: float, extra: dict,
               stat: str) -> dict:
    """Peak memory of one more step, then the JSON row of a timed case."""
    ms = min_ms if stat == "min" else median
    peak = pa.peak_extra_bytes(case)
    roof = roofline(case.shape, case.mode, case.precision, ms, ceilings)
    outputs = output_bytes(case.shape, case.mode)
    row = {
        "provider": case.provider, "backend": case.backend, "mode": case.mode,
        "shape": case.shape.name or case.shape.label, "N": case.shape.n, "D": case.shape.d,
        "K": case.shape.k, "L": case.shape.layers, "precision": case.precision,
        "device": ceilings.device, "ms": ms, "stat": stat, "median_ms": median,
        "min_ms": min_ms, "tflops": roof.tflops, "gbps": roof.gbps,
        "gflop": roof.gflop, "min_mbytes": roof.mbytes, "floor_ms": roof.floor_ms,
        "roofline_fraction": roof.fraction, "bound": roof.bound,
        "peak_extra_mib": peak / MIB, "output_mib": outputs / MIB,
        "peak_over_outputs": peak / outputs if outputs > 0 else float("nan"),
        "first_call_s": case.first_call_s, "interpreted": case.interpreted, **extra,
    }
    if case.interpreted:   # never presented as a speed
        row.update(tflops=float("nan"), gbps=float("nan"), roofline_fraction=float("nan"))
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_matrix(shapes: Sequence[Shape], modes: Sequence[str], providers: Sequence[str],
               device: torch.device, precision: str, ceilings: Ceilings, *, backend: str = "auto",
               allow_interpreted: bool = False, reps: int = 5, max_seconds: float = 3.0,
               skip: Iterable[str] = (), stat: str = "median", log=None,
               rows: Optional[List[dict]] = None) -> List[dict]:
    """Measure every (shape, mode, provider); unavailable or failing ones get a row with ``skipped``
    or ``error`` instead of numbers. ``skip`` holds ``provider:mode:shape`` glob patterns. Rows are
    appended to ``rows`` (when given) as they come, so an interrupted run keeps what it measured."""
    skip = list(skip)
    rows = [] if rows is None else rows
    total = len(shapes) * len(modes) * len(providers)
    count = 0
    if device.type == "cpu" and stat == "clean":
        for shape in shapes:
            for mode in modes:
                rows += run_group_interleaved(shape, mode, providers, device, precision, ceilings,
                                              backend=backend, allow_interpreted=allow_interpreted,
                                              reps=reps, max_seconds=max_seconds, skip=skip,
                                              log=log)
        add_speedups(rows)
        return rows
    for shape in shapes:
        for mode in modes:
            for provider in providers:
                count += 1
                key = f"{provider}:{mode}:{shape.name or shape.label}"
                base = {"provider": provider, "mode": mode, "shape": shape.name or shape.label,
                        "N": shape.n, "D": shape.d, "K": shape.k, "L": shape.layers,
                        "precision": precision}
                if any(fnmatch.fnmatchcase(key, pattern) for pattern in skip):
                    rows.append({**base, "skipped": "--skip"})
                    continue
                t0 = time.perf_counter()
                pa.reset_compiled()
                try:
                    case = pa.build_case(provider, mode, shape, device, precision, backend=backend,
                                         allow_interpreted=allow_interpreted)
                    row = measure_case(case, ceilings, reps=reps, max_seconds=max_seconds,
                                       stat=stat)
                    del case
                except pa.Unavailable as err:
                    row = {**base, "skipped": str(err)}
                except Exception as err:  # OOM, compiler failure: keep the rest of the report
                    row = {**base, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                _release(device)
                rows.append(row)
                if log is not None:
                    what = (f"{row['ms']:.4g} ms" if "ms" in row
                            else row.get("skipped") or row.get("error"))
                    log(f"[{count}/{total}] {key}: {what} ({time.perf_counter() - t0:.1f}s)")
    add_speedups(rows)
    return rows


def run_group_interleaved(shape: Shape, mode: str, providers: Sequence[str], device: torch.device,
                          precision: str, ceilings: Ceilings, *, backend: str,
                          allow_interpreted: bool, reps: int, max_seconds: float,
                          skip: Sequence[str], log=None) -> List[dict]:
    """CPU, ``stat="clean"``: build and warm every provider of one (shape, mode), then time them
    round-robin -- so all meet the same machine conditions -- keeping only undisturbed repetitions,
    until each has ``reps`` of them or ``max_seconds`` per provider ran out."""
    name = shape.name or shape.label
    rows: Dict[str, dict] = {}
    cases: Dict[str, pa.Case] = {}
    pa.reset_compiled()
    for provider in providers:
        base = {"provider": provider, "mode": mode, "shape": name, "N": shape.n, "D": shape.d,
                "K": shape.k, "L": shape.layers, "precision": precision}
        if any(fnmatch.fnmatchcase(f"{provider}:{mode}:{name}", pat) for pat in skip):
            rows[provider] = {**base, "skipped": "--skip"}
            continue
        try:
            case = pa.build_case(provider, mode, shape, device, precision, backend=backend,
                                 allow_interpreted=allow_interpreted)
            case.warm(2)
            cases[provider] = case
        except pa.Unavailable as err:
            rows[provider] = {**base, "skipped": str(err)}
        except Exception as err:
            rows[provider] = {**base, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    clean: Dict[str, List[float]] = {p: [] for p in cases}
    every: Dict[str, List[float]] = {p: [] for p in cases}
    start = time.perf_counter()
    budget = max_seconds * max(1, len(cases))
    while cases and any(len(clean[p]) < reps for p in cases):
        for provider, case in cases.items():
            if len(clean[provider]) >= reps:
                continue
            got, seen = clean_times(case.step, reps=1, max_seconds=0.0)
            clean[provider] += got
            every[provider] += seen
        if time.perf_counter() - start > budget:
            break
    for provider, case in cases.items():
        extra = {"clean_reps": len(clean[provider]), "reps": len(every[provider])}
        # No undisturbed repetition: the fastest one is the least disturbed estimate.
        mid = _median(clean[provider]) if clean[provider] else min(every[provider])
        low = min(clean[provider] or every[provider])
        try:
            rows[provider] = finish_row(case, ceilings, mid, low, extra, "clean")
        except Exception as err:
            rows[provider] = {"provider": provider, "mode": mode, "shape": name, "N": shape.n,
                              "D": shape.d, "K": shape.k, "L": shape.layers,
                              "precision": precision, "error": f"{type(err).__name__}: {err}"}
        if log is not None:
            row = rows[provider]
            log(f"{provider}:{mode}:{name}: " + (f"{row['ms']:.4g} ms ({extra['clean_reps']}/"
                                                 f"{extra['reps']} clean)" if "ms" in row
                                                 else row.get("error", "")))
    cases.clear()
    _release(device)
    return [rows[p] for p in providers if p in rows]


def add_speedups(rows: List[dict]) -> None:
    """``speedup_vs[peer] = peer ms / ms`` within each (shape, mode), timed non-interpreted rows."""
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        if "ms" in row and not row.get("interpreted"):
            groups.setdefault((row["shape"], row["mode"]), []).append(row)
    for group in groups.values():
        for row in group:
            row["speedup_vs"] = {peer["provider"]: peer["ms"] / row["ms"]
                                 for peer in group if peer is not row and row["ms"] > 0}


# ----------------------------------------------------------------------------- tables


def _label(row: dict) -> str:
    if row["provider"] == "rqvae_fast[torch]":
        return row["provider"]
    backend = row.get("backend")
    return f"{row['provider']}[{backend}]" if backend else row["provider"]


def format_table(rows: Sequence[dict], *, markdown: bool = False) -> str:
    """One table per (shape, mode): ms, speed-ups, TFLOP/s, GB/s, % roofline, MiB."""
    out: List[str] = []
    order: List[tuple] = []
    for row in rows:
        key = (row["shape"], row["mode"])
        if key not in order:
            order.append(key)
    for shape, mode in order:
        group = [r for r in rows if (r["shape"], r["mode"]) == (shape, mode)]
        timed = [r for r in group if "ms" in r]
        peers = [r["provider"] for r in timed if not r.get("interpreted")]
        first = group[0]
        head = (f"{mode} | {shape}: N={first['N']} D={first['D']} K={first['K']} L={first['L']}"
                f" | {first['precision']}")
        if timed:
            head += (f" | {timed[0]['gflop']:.3g} GFLOP, {timed[0]['min_mbytes']:.3g} MB,"
                     f" floor {timed[0]['floor_ms']:.3g} ms ({timed[0]['bound']})")
        stat = timed[0].get("stat", "median") if timed else "median"
        cols = ["provider", f"ms ({stat})"] + [f"x{SHORT.get(p, p)}" for p in peers] + \
            ["median", "min", "reps", "TFLOP/s", "GB/s", "%roof", "MiB", "MiB/out", "1st call s"]
        lines = []
        for r in group:
            if "ms" not in r:
                reason = r.get("skipped") or r.get("error")
                kind = "skipped" if "skipped" in r else "ERROR"
                lines.append([r["provider"], f"{kind}: {reason}"] + [""] * (len(cols) - 2))
                continue
            speed = r.get("speedup_vs", {})
            cells = [_label(r) + (" INTERPRETED (not a speed)" if r.get("interpreted") else ""),
                     f"{r['ms']:.4g}"]
            cells += ["" if p == r["provider"] else
                      (f"{speed[p]:.2f}" if p in speed else "n/a") for p in peers]
            reps = (f"{r['clean_reps']}/{r.get('reps', '?')}" if "clean_reps" in r
                    else str(r.get("reps", "")))
            cells += [f"{r.get('median_ms', r['ms']):.4g}", f"{r.get('min_ms', r['ms']):.4g}", reps,
                      fmt_si(r["tflops"]), fmt_si(r["gbps"]),
                      fmt_si(100 * r["roofline_fraction"], 2), fmt_si(r["peak_extra_mib"]),
                      fmt_si(r["peak_over_outputs"], 2), fmt_si(r["first_call_s"], 2)]
            lines.append(cells)
        if markdown:
            out.append(f"**{head}**\n")
            out.append("| " + " | ".join(cols) + " |")
            out.append("|" + "|".join("---" for _ in cols) + "|")
            for cells in lines:
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        else:
            full = [cells for cells in lines if any(cells[2:])]
            widths = [max([len(c)] + [len(cells[i]) for cells in full]) for i, c in enumerate(cols)]
            out.append(f"== {head}")
            out.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
            for cells in lines:
                if not any(cells[2:]):
                    out.append(f"{cells[0].ljust(widths[0])}  {cells[1]}")
                else:
                    out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
            out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- scaling sweep


def sweep_shapes(device: torch.device, axis: str, quick: bool = False) -> List[Shape]:
    """N sweep (D 32, K 256, L 3) or K sweep (D 32, L 3, fixed N) for ``device``."""
    if axis == "n":
        if device.type == "cuda":
            exps = range(12, 25, 2) if quick else range(12, 25)
        else:
            exps = range(10, 13) if quick else range(10, 17)
        return [Shape(1 << e, 32, 256, 3, f"N=2^{e}") for e in exps]
    if axis == "k":
        n = (1 << 20) if device.type == "cuda" else (1 << 12)
        if quick:
            n = min(n, 1 << 16) if device.type == "cuda" else 1 << 10
        exps = range(6, 15, 2) if quick or device.type != "cuda" else range(6, 15)
        return [Shape(n, 32, 1 << e, 3, f"K={1 << e}") for e in exps]
    raise ValueError(f"sweep axis must be 'n' or 'k', got {axis!r}")


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` on ``log x`` (``y ~ x^slope``); nan for < 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var > 0 else float("nan")


def run_sweep(axis: str, device: torch.device, precision: str, ceilings: Ceilings, *,
              modes: Sequence[str], providers: Sequence[str], quick: bool, backend: str,
              reps: int, max_seconds: float, stat: str = "median", log=None,
              into: Optional[dict] = None) -> dict:
    """Time and memory over an N or K sweep; exponents fitted over the upper half of the sweep
    (where the device is saturated), so ``time ~ (N K)^1`` and ``memory ~ N^1, K^0`` show up as
    slopes near 1, 1 and 0. Fills ``into`` (when given) as it goes."""
    sweep = {"axis": axis, "rows": [], "fits": []} if into is None else into
    sweep.update(axis=axis, fits=[])
    sweep.setdefault("rows", [])
    shapes = sweep_shapes(device, axis, quick)
    run_matrix(shapes, modes, providers, device, precision, ceilings, backend=backend, reps=reps,
               max_seconds=max_seconds, stat=stat, log=log, rows=sweep["rows"])
    fit_sweep(sweep, modes, providers)
    return sweep


def fit_sweep(sweep: dict, modes: Sequence[str], providers: Sequence[str]) -> None:
    """(Re)compute ``sweep["fits"]`` from its rows."""
    axis, rows = sweep["axis"], sweep["rows"]
    fits = []
    for provider in providers:
        for mode in modes:
            pts = [r for r in rows if r["provider"] == provider and r["mode"] == mode and "ms" in r]
            upper = pts[len(pts) // 2:] if len(pts) >= 4 else pts
            var = [r["N"] if axis == "n" else r["K"] for r in upper]
            fits.append({
                "provider": provider, "mode": mode, "axis": axis,
                "time_exponent": fit_exponent(var, [r["ms"] for r in upper]),
                "memory_exponent": fit_exponent(var, [max(r["peak_extra_mib"], 1e-9)
                                                      for r in upper]),
            })
    sweep["fits"] = fits


def format_sweep(sweep: dict) -> str:
    axis = sweep["axis"]
    lines = [f"== scaling over {'N' if axis == 'n' else 'K'}"
             f" (time should grow ~ N*K, memory ~ N and flat in K)"]
    lines.append(f"{'provider':24s} {'mode':10s} {'N':>9s} {'K':>6s} {'ms':>10s} "
                 f"{'ns/(N*K*L)':>11s} {'MiB':>9s} {'B/row':>8s} {'%roof':>6s}")
    for r in sweep["rows"]:
        if "ms" not in r:
            lines.append(f"{r['provider']:24s} {r['mode']:10s} {r['N']:9d} {r['K']:6d} "
                         f"{r.get('skipped') or r.get('error')}")
            continue
        per = r["ms"] * 1e6 / (r["N"] * r["K"] * r["L"])
        lines.append(f"{_label(r):24s} {r['mode']:10s} {r['N']:9d} {r['K']:6d} {r['ms']:10.4g} "
                     f"{per:11.4g} {r['peak_extra_mib']:9.4g} "
                     f"{r['peak_extra_mib'] * MIB / r['N']:8.4g} "
                     f"{fmt_si(100 * r['roofline_fraction'], 2):>6s}")
    for fit in sweep["fits"]:
        lines.append(f"fit {fit['provider']} {fit['mode']}: time ~ {axis.upper()}^"
                     f"{fit['time_exponent']:.2f}, memory ~ {axis.upper()}^"
                     f"{fit['memory_exponent']:.2f} (upper half of the sweep)")
    return "\n".join(lines) + "\n"


def plot_sweeps(sweeps: Sequence[dict], path: str) -> Optional[str]:
    """PNG of time and memory versus N (and K when swept); needs matplotlib (extra ``plot``).
    Returns the path, or None (with a message on stderr) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 4 * len(sweeps)), squeeze=False)
    for (ax_t, ax_m), sweep in zip(axes, sweeps):
        var = "N" if sweep["axis"] == "n" else "K"
        series: Dict[str, List[dict]] = {}
        for r in sweep["rows"]:
            if "ms" in r:
                series.setdefault(f"{_label(r)} {r['mode']}", []).append(r)
        for name, pts in series.items():
            xs = [p[var] for p in pts]
            ax_t.loglog(xs, [p["ms"] for p in pts], "o-", label=name)
            ax_m.loglog(xs, [max(p["peak_extra_mib"], 1e-3) for p in pts], "o-", label=name)
        ax_t.set(xlabel=var, ylabel="ms", title=f"time vs {var}")
        ax_m.set(xlabel=var, ylabel="peak extra MiB", title=f"memory vs {var}")
        for ax in (ax_t, ax_m):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


class _Stopped(Exception):
    """Raised in the main thread on SIGTERM (e.g. from ``timeout``) to report partial results."""


def _stop_on_sigterm():
    import signal

    def handler(signum, frame):
        raise _Stopped()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:          # not the main thread
        return None


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _parse_shapes(items: Optional[Sequence[str]], device: torch.device, quick: bool) -> List[Shape]:
    if not items:
        names = (QUICK_SHAPES if quick else DEFAULT_SHAPES)[device.type]
        return [SHAPES[n] for n in names]
    shapes = []
    for item in items:
        for part in item.split(";"):
            part = part.strip()
            if part in SHAPES:
                shapes.append(SHAPES[part])
            elif part:
                shapes.append(Shape.parse(part, name=part))
    return shapes


def _split(text: Optional[str]) -> Optional[List[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqvae-fast bench",
        description="Time rqvae_fast against its peers in one process; print a table, write JSON.")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--shapes", action="append",
                        help=f"named ({', '.join(SHAPES)}) or 'N,D,K,L'; repeatable "
                             "(default: small,A,B on CUDA; cpu on CPU)")
    parser.add_argument("--providers", help="comma list (default: all available; "
                        f"known: {', '.join(pa.PROVIDERS + pa.EXTRA_PROVIDERS)})")
    parser.add_argument("--modes", default="inference,train,ema", help="comma list")
    parser.add_argument("--precision", choices=("ieee", "tf32", "bf16"),
                        help="distance-matmul precision (default: tf32 on CUDA, ieee on CPU)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                        help="backend of the rqvae_fast provider")
    parser.add_argument("--allow-interpreted", action="store_true",
                        help="let --backend triton run interpreted on CPU (flagged, not a speed)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the +compile providers")
    parser.add_argument("--skip", action="append", default=[],
                        help="glob 'provider:mode:shape' to leave out, e.g. '*+compile:ema:*'")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, quick ceilings, 2 repetitions, no torch.compile")
    parser.add_argument("--reps", type=int, help="timed repetitions per case on CPU (default 5)")
    parser.add_argument("--max-seconds", type=float, default=3.0,
                        help="stop timing a case after this many seconds")
    parser.add_argument("--stat", choices=("median", "min", "clean"),
                        help="what 'ms' is: median of repetitions (default on CUDA), min, or "
                             "clean = median of the repetitions during which no other job took "
                             "this process's CPUs (default on Linux CPUs; up to --max-seconds "
                             "per case to collect --reps of them)")
    parser.add_argument("--ceilings", default="measure",
                        help="'measure' (default) or an anchors JSON with copy_GBps/*_TFLOPs")
    parser.add_argument("--sweep", choices=("none", "n", "k", "both"), default="none",
                        help="also run the scaling sweep over N and/or K")
    parser.add_argument("--sweep-modes", default="inference,train",
                        help="comma list of modes timed in the sweep (default: inference,train)")
    parser.add_argument("--sweep-providers", default="rqvae_fast",
                        help="comma list of providers timed in the sweep (default: rqvae_fast; "
                             "the names --providers knows)")
    parser.add_argument("--plot", help="PNG path for the sweep plot (needs matplotlib)")
    parser.add_argument("--json", help="output JSON path (default runs/bench_<device>_<time>.json)")
    parser.add_argument("--markdown", help="also write the tables as Markdown to this path")
    parser.add_argument("--no-matrix", action="store_true", help="only the sweep")
    cpu = parser.add_argument_group("CPU reports (instead of the matrix; see rqvae_fast.bench_cpu)")
    cpu.add_argument("--contention", action="store_true",
                     help="CPU: our PyTorch path (with and without its worker pool) and the seed's "
                          "code, idle and with one competing busy process this command starts and "
                          "stops; --reps rounds (default 7), first --shapes entry (default cpu)")
    cpu.add_argument("--pin-busy", type=int, metavar="CPU",
                     help="with --contention: pin the busy process to this CPU (default: not pinned)")
    cpu.add_argument("--vs-plain-ops", action="store_true",
                     help="CPU: the fused pass against plain addmm + argmin + index_add_ on the "
                          "whole batch, for each D of --dims (N --plain-n, K 256, L 3)")
    cpu.add_argument("--dims", help="with --vs-plain-ops: comma list of D (default 32,64,128,256,512,768,1024)")
    cpu.add_argument("--plain-n", type=int, help="with --vs-plain-ops: rows N (default 32768)")
    return parser


def resolve_device_and_precision(device: str, precision: Optional[str]
                                 ) -> Optional[Tuple[torch.device, str]]:
    """``--device`` (auto/cuda/cpu) and ``--precision`` (default tf32 on CUDA, ieee on CPU) as
    used by the benchmark commands; ``None`` (after saying why) when CUDA was asked for but is
    not available."""
    resolved = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                            else ("cpu" if device == "auto" else device))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return None
    return resolved, precision or ("tf32" if resolved.type == "cuda" else "ieee")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m rqvae_fast.bench`` / ``rqvae-fast bench``; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    resolved = resolve_device_and_precision(args.device, args.precision)
    if resolved is None:
        return 2
    device, precision = resolved
    if args.contention or args.vs_plain_ops:
        device, precision = torch.device("cpu"), "ieee"
    stat = args.stat or ("clean" if device.type == "cpu" and runqueue_wait_ns() is not None
                         else "median")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    providers = _split(args.providers) or pa.available_providers(
        device, include_extra=device.type == "cuda")
    if args.no_compile or (args.quick and not args.providers):
        providers = [p for p in providers if not p.endswith("+compile")]
    modes = _split(args.modes) or list(pa.MODES)
    shapes = _parse_shapes(args.shapes, device, args.quick)
    reps = args.reps or (2 if args.quick else 5)

    meta = collect_meta(device, precision, argv)
    load = OtherLoad()
    if device.type == "cpu":
        time.sleep(1.0)
        meta["other_jobs_cpu_share_at_start"] = round(load.share(), 3)
        if meta["other_jobs_cpu_share_at_start"] > 0.1:
            log(f"warning: other processes use {100 * meta['other_jobs_cpu_share_at_start']:.0f}% "
                "of the CPUs" + (": only undisturbed repetitions count (--stat clean)"
                                 if stat == "clean" and not (args.contention or args.vs_plain_ops)
                                 else ": timings will be noisy"))
        load.start()
    if args.contention or args.vs_plain_ops:
        from .bench_cpu import main_cpu_report

        return main_cpu_report("contention" if args.contention else "vs-plain-ops", args, meta,
                               load, log)
    if args.ceilings == "measure":
        log("measuring ceilings (device copy, matmul per precision) ...")
        ceilings = measure_ceilings(device, quick=args.quick)
    else:
        ceilings = Ceilings.from_anchor(args.ceilings)
    log(f"ceilings: copy {ceilings.copy_gbps:.4g} GB/s, matmul "
        + ", ".join(f"{k} {v:.4g}" for k, v in ceilings.tflops.items()) + " TFLOP/s")

    report = {"meta": meta, "ceilings": ceilings.to_dict(), "rows": [], "sweeps": []}
    text_parts = [f"rqvae-fast bench | {meta['date']} | {meta['device']} | torch {meta['torch']}"
                  f" | triton {meta['triton']} | commit {meta['commit']} | precision {precision}"
                  f" | ms = {stat}" + (" (median of undisturbed repetitions)" if stat == "clean"
                                         else " of repetitions")]
    sweep_modes, sweep_providers = _split(args.sweep_modes), _split(args.sweep_providers)
    previous = _stop_on_sigterm()
    try:
        if not args.no_matrix:
            run_matrix(shapes, modes, providers, device, precision, ceilings,
                       backend=args.backend, allow_interpreted=args.allow_interpreted, reps=reps,
                       max_seconds=args.max_seconds, skip=args.skip, stat=stat, log=log,
                       rows=report["rows"])
        axes = {"none": (), "n": ("n",), "k": ("k",), "both": ("n", "k")}[args.sweep]
        for axis in axes:
            report["sweeps"].append({"axis": axis, "rows": [], "fits": []})
            run_sweep(axis, device, precision, ceilings, modes=sweep_modes,
                      providers=sweep_providers, quick=args.quick, backend=args.backend,
                      reps=reps, max_seconds=args.max_seconds, stat=stat, log=log,
                      into=report["sweeps"][-1])
    except _Stopped:
        meta["interrupted"] = True
        log("interrupted (SIGTERM): reporting what was measured")
        add_speedups(report["rows"])
        for sweep in report["sweeps"]:
            add_speedups(sweep["rows"])
            fit_sweep(sweep, sweep_modes, sweep_providers)
    finally:
        _restore_sigterm(previous)
    if report["rows"]:
        text_parts.append(format_table(report["rows"]))
    for sweep in report["sweeps"]:
        text_parts.append(format_sweep(sweep))
    if meta.get("interrupted"):
        text_parts.append("INTERRUPTED: the run was stopped before it finished")
    if args.plot and report["sweeps"]:
        if plot_sweeps(report["sweeps"], args.plot):
            text_parts.append(f"plot: {args.plot}")

    if hasattr(os, "getloadavg"):
        meta["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    if device.type == "cpu":
        meta["other_jobs_cpu_share_during_run"] = round(load.share(), 3)
        text_parts.append(f"other processes used {100 * meta['other_jobs_cpu_share_during_run']:.0f}% "
                          "of the CPUs during this run")
    text = "\n".join(text_parts)
    print(text, flush=True)
    path = args.json or os.path.join(
        "runs", f"bench_{device.type}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    log(f"wrote {path}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"{text_parts[0]}\n\n")
            fh.write(f"Ceilings: copy {ceilings.copy_gbps:.4g} GB/s; matmul "
                     + ", ".join(f"{k} {v:.4g}" for k, v in ceilings.tflops.items())
                     + " TFLOP/s\n\n")
            if report["rows"]:
                fh.write(format_table(report["rows"], markdown=True))
            for sweep in report["sweeps"]:
                fh.write("\n```\n" + format_sweep(sweep) + "```\n")
        log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
