"""CPU reports for the PyTorch path: robustness to a busy machine, and the pass against plain ops.

    python -m rqvae_fast.bench --contention      # idle vs one competing busy process, vs the seed's code
    python -m rqvae_fast.bench --vs-plain-ops    # the fused pass vs addmm + argmin + index_add_, over D

``--contention``: for each mode (inference, train, ema) it times rqvae-fast's PyTorch path (chunks
on the worker pool, the default), the same path with the pool off (``rqvae_fast[no-pool]``: every
op on ATen's intra-op threads, as before the pool) and the seed's code (``SeedResidualVQ``), in
rounds: each round times every provider once with the machine as it is ("idle"), then starts one
busy process (``python -c "while True: pass"``, optionally pinned to CPU 0), times every provider
once more, and stops it. ``ms`` is the median over rounds; ``slowdown`` = busy / idle.

``--vs-plain-ops``: for each D, the fused pass (:func:`rqvae_fast.torch_backend.residual_quantize_forward`,
without and with per-code statistics) against the plain PyTorch ops it replaces on the whole batch:
per layer ``addmm`` (scores), ``argmin``, ``index_select`` (gather), residual update, squared error,
and with statistics ``index_add_`` of ones and of residuals. Interleaved repetitions, medians.

Both modes record the share of CPU time other processes used while they ran: on a shared machine
the absolute numbers are only as good as that.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import cpu_pool, peer_adapters as pa
from .backend import search_operands
from .roofline import Shape
from .roofline import median as _median
from .routing import SEED
from .torch_backend import residual_quantize_forward

CONTENTION_PROVIDERS = ("rqvae_fast", "rqvae_fast[no-pool]", "seed")
DEFAULT_DIMS = (32, 64, 128, 256, 512, 768, 1024)


class BusyProcess:
    """One process spinning on a CPU (``while True: pass``) for the life of the ``with`` block;
    ``pin`` pins it to that CPU number."""

    def __init__(self, pin: Optional[int] = None):
        self.pin = pin
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "BusyProcess":
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        if self.pin is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.proc.pid, {self.pin})
        time.sleep(0.3)  # let it start spinning
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _timed_with_cpu(fn: Callable[[], object]) -> tuple:
    """``(wall ms, CPU ms of all this process's threads)`` of one call."""
    cpu = time.process_time()
    wall = _timed(fn)
    return wall, (time.process_time() - cpu) * 1e3


def _step_with_workers(case: pa.Case, workers: Optional[int]) -> Callable[[], object]:
    def step():
        with cpu_pool.use_workers(workers):
            return case.step()
    return step


def run_contention(shape: Shape, modes: Sequence[str], *, rounds: int, pin: Optional[int],
                   log=None) -> List[dict]:
    """Rows ``{provider, mode, idle_ms, busy_ms, slowdown, idle_all, busy_all}`` (ms lists)."""
    rows = []
    for mode in modes:
        steps: Dict[str, Callable[[], object]] = {}
        for provider in CONTENTION_PROVIDERS:
            case = pa.build_case("seed" if provider == "seed" else "rqvae_fast", mode, shape,
                                 torch.device("cpu"), "ieee")
            steps[provider] = _step_with_workers(case, 1 if provider.endswith("[no-pool]") else None)
            for _ in range(2):
                steps[provider]()
        times = {p: {"idle": [], "busy": []} for p in steps}
        for _ in range(rounds):
            for provider, step in steps.items():
                times[provider]["idle"].append(_timed(step))
            with BusyProcess(pin):
                for provider, step in steps.items():
                    times[provider]["busy"].append(_timed(step))
        for provider in steps:
            idle, busy = _median(times[provider]["idle"]), _median(times[provider]["busy"])
            rows.append({"provider": provider, "mode": mode, "idle_ms": idle, "busy_ms": busy,
                         "slowdown": busy / idle, "idle_all": times[provider]["idle"],
                         "busy_all": times[provider]["busy"]})
            if log is not None:
                log(f"{mode} {provider}: idle {idle:.4g} ms, busy {busy:.4g} ms ({busy / idle:.2f}x)")
    return rows


def format_contention(rows: Sequence[dict], *, markdown: bool = False) -> str:
    """One line per mode: each provider's idle ms, busy ms and slowdown; our speed-up vs seed."""
    head = ["mode"]
    for provider in CONTENTION_PROVIDERS:
        head += [f"{provider} idle ms", f"{provider} busy ms", f"{provider} slowdown"]
    head += ["vs seed idle", "vs seed busy"]
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        by = {r["provider"]: r for r in rows if r["mode"] == mode}
        cells = [mode]
        for provider in CONTENTION_PROVIDERS:
            r = by[provider]
            cells += [f"{r['idle_ms']:.4g}", f"{r['busy_ms']:.4g}", f"{r['slowdown']:.2f}x"]
        ours, seed = by["rqvae_fast"], by["seed"]
        cells += [f"{seed['idle_ms'] / ours['idle_ms']:.2f}x", f"{seed['busy_ms'] / ours['busy_ms']:.2f}x"]
        lines.append(cells)
    return _table(head, lines, markdown)


def plain_ops_forward(x: torch.Tensor, codes: torch.Tensor, layer_sizes: Sequence[int],
                      with_stats: bool):
    """What the fused pass replaces, on the whole batch at once (no NaN handling, no tie fix-up):
    ``(quantized, indices (N, L), sse (L,), counts, sums)``."""
    norms = codes.pow(2).sum(dim=1)
    residual, total = x, torch.zeros_like(x)
    counts = torch.zeros(codes.shape[0] if with_stats else 0)
    sums = torch.zeros((codes.shape[0] if with_stats else 0, x.shape[1]))
    indices, sse, start = [], [], 0
    ones = torch.ones(x.shape[0]) if with_stats else None
    for book, book_norms in zip(codes.split(list(layer_sizes)), norms.split(list(layer_sizes))):
        best = torch.addmm(book_norms, residual, book.t(), alpha=-2.0).argmin(dim=1)
        chosen = book.index_select(0, best)
        err = chosen - residual
        sse.append((err * err).sum())
        if with_stats:
            counts.index_add_(0, best + start, ones)
            sums.index_add_(0, best + start, residual)
        total += chosen
        residual = residual - chosen
        indices.append(best)
        start += book.shape[0]
    return total, torch.stack(indices, dim=1), torch.stack(sse), counts, sums


def run_vs_plain_ops(n: int, dims: Sequence[int], k: int, layers: int, *, reps: int,
                     log=None) -> List[dict]:
    """Rows ``{D, stats, fused_ms, plain_ms, speedup, same_indices}`` per D and statistics setting."""
    rows = []
    sizes = [k] * layers
    for dim in dims:
        gen = torch.Generator().manual_seed(dim)
        x = torch.randn(n, dim, generator=gen)
        codes = torch.cat([torch.randn(k, dim, generator=gen) * 0.5 ** layer for layer in range(layers)])
        search, norms = search_operands(codes)
        for with_stats in (False, True):
            fused = lambda: residual_quantize_forward(  # noqa: E731
                x, codes, search, norms, sizes, routing=SEED, precision="ieee", with_stats=with_stats)
            plain = lambda: plain_ops_forward(x, codes, sizes, with_stats)  # noqa: E731
            same = torch.equal(fused()[1], plain()[1])
            times = {"fused": [], "plain": []}
            cpu = {"fused": [], "plain": []}
            for _ in range(reps):
                for name, fn in (("fused", fused), ("plain", plain)):
                    wall, used = _timed_with_cpu(fn)
                    times[name].append(wall)
                    cpu[name].append(used)
            f_ms, p_ms = _median(times["fused"]), _median(times["plain"])
            rows.append({"N": n, "D": dim, "K": k, "L": layers, "stats": with_stats,
                         "fused_ms": f_ms, "plain_ms": p_ms, "speedup": p_ms / f_ms,
                         "fused_cpu_ms": _median(cpu["fused"]), "plain_cpu_ms": _median(cpu["plain"]),
                         "same_indices": same, "fused_all": times["fused"],
                         "plain_all": times["plain"]})
            if log is not None:
                log(f"D {dim} stats {with_stats}: fused {f_ms:.4g} ms, plain {p_ms:.4g} ms")
    return rows


def format_vs_plain_ops(rows: Sequence[dict], *, markdown: bool = False) -> str:
    """Per D: wall ms (median) of both, their ratio, and the CPU ms (all threads) each used."""
    head = ["D", "fused ms", "plain ms", "plain/fused", "fused+stats ms", "plain+stats ms",
            "plain/fused (stats)", "CPU ms fused / plain", "same indices"]
    lines = []
    for dim in dict.fromkeys(r["D"] for r in rows):
        by = {r["stats"]: r for r in rows if r["D"] == dim}
        a, b = by[False], by[True]
        lines.append([str(dim), f"{a['fused_ms']:.4g}", f"{a['plain_ms']:.4g}", f"{a['speedup']:.2f}x",
                      f"{b['fused_ms']:.4g}", f"{b['plain_ms']:.4g}", f"{b['speedup']:.2f}x",
                      f"{a['fused_cpu_ms']:.4g} / {a['plain_cpu_ms']:.4g}",
                      "yes" if a["same_indices"] and b["same_indices"] else "no"])
    return _table(head, lines, markdown)


def _table(head: List[str], lines: List[List[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out) + "\n"


def main_cpu_report(kind: str, args, meta: dict, load, log) -> int:
    """Run ``kind`` ("contention" or "vs-plain-ops") with bench's parsed ``args``; print and save."""
    if kind == "contention":
        from .bench import _parse_shapes

        shape = _parse_shapes(args.shapes, torch.device("cpu"), args.quick)[0]
        rounds = args.reps or (2 if args.quick else 7)
        modes = [m for m in (args.modes or "").split(",") if m] or list(pa.MODES)
        pin = args.pin_busy
        rows = run_contention(shape, modes, rounds=rounds, pin=pin, log=log)
        title = (f"CPU contention | N {shape.n}, D {shape.d}, K {shape.k}, L {shape.layers}, ieee | "
                 f"median of {rounds} rounds | busy = one `while True: pass` process"
                 + (f" pinned to CPU {pin}" if pin is not None else " (not pinned)"))
        table = lambda md: format_contention(rows, markdown=md)  # noqa: E731
    else:
        dims = [int(d) for d in args.dims.split(",")] if args.dims else list(DEFAULT_DIMS)
        n = args.plain_n or (4096 if args.quick else 32768)
        reps = args.reps or (2 if args.quick else 5)
        rows = run_vs_plain_ops(n, dims, 256, 3, reps=reps, log=log)
        title = f"CPU pass vs plain ops | N {n}, K 256, L 3, ieee | median of {reps} interleaved repetitions"
        table = lambda md: format_vs_plain_ops(rows, markdown=md)  # noqa: E731
    share = load.share()
    meta["other_jobs_cpu_share_during_run"] = round(share, 3)
    header = (f"{title}\n{meta['date']} | {meta['device']} | torch {meta['torch']} | "
              f"commit {meta['commit']} | threads {meta['threads']} | other processes used "
              f"{100 * share:.0f}% of the CPUs during the run")
    print(header + "\n" + table(False), flush=True)
    path = args.json or os.path.join(
        "runs", f"bench_cpu_{kind}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"meta": meta, "kind": kind, "rows": rows}, fh, indent=1, default=str)
    log(f"wrote {path}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(header + "\n\n" + table(True))
        log(f"wrote {args.markdown}")
    return 0
