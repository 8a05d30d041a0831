"""Speed of the semantic-ID pipeline's heavy steps: fused k-means and ``encode``.

    python -m rqvae_fast.bench_pipeline          # k-means 1M x 32 -> 256, encode 1M x 768
    python -m rqvae_fast.bench_pipeline --quick  # tiny sizes (seconds, any device)

k-means: k-means++ seeding and ``--kmeans-iters`` Lloyd iterations, timed apart. Each iteration is
one fused assignment + statistics pass, placed against the roofline (``2 N K D`` FLOPs; the input
read, the quantized output written and the indices: ``8 N D + 8 N`` bytes).

encode: an untrained :class:`~rqvae_fast.RQVAE` of the CLI's default shape (hidden 512,256,128,
latent 32, 3 x 256 codes) encodes ``--encode-rows`` items (a) already on the device and (b) end to
end from a memory-mapped ``.npy`` through :func:`~rqvae_fast.semantic_ids.encode_source` (read,
pin, copy, encode, copy back). (a) is placed against the roofline (input read vs the device copy
rate, MLP + search FLOPs vs the matmul rate); (b) against the measured pinned host-to-device copy
rate, the bound of an encode whose data starts on the host. The share of rows on which both give
the same codes is reported (it should be 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from .bench import _git_commit, resolve_device_and_precision
from .data import open_embeddings
from .kmeans import fused_kmeans, kmeans_plusplus
from .model import RQVAE
from .roofline import device_name, matmul_precision, measure_ceilings, synchronize
from .semantic_ids import encode_source

HIDDEN, LATENT, LAYERS, CODES = (512, 256, 128), 32, 3, 256


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _floor_s(flop: float, traffic: float, precision: str, ceilings) -> float:
    """Roofline time: the slower of the FLOPs at the matmul rate and the bytes at the copy rate."""
    return max(flop / (ceilings.matmul_tflops(precision) * 1e12),
               traffic / (ceilings.copy_gbps * 1e9))


def bench_kmeans(device: torch.device, rows: int, dim: int, codes: int, iters: int,
                 precision: str, ceilings) -> Dict[str, float]:
    """Seconds of k-means++ seeding and of ``iters`` Lloyd iterations, with roofline figures."""
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randn(rows, dim, device=device, generator=gen)
    fused_kmeans(data[: 4 * codes], codes, iters=2, seed=0, precision=precision)  # compile, warm
    seeds = {}
    init_s = _seconds(lambda: seeds.setdefault(
        "c", kmeans_plusplus(data, codes, torch.Generator(device=device).manual_seed(1),
                             64 * codes)), device)
    result = {}
    iters_s = _seconds(lambda: result.setdefault("r", fused_kmeans(
        data, codes, iters=iters, init=seeds["c"], precision=precision)), device)
    per_iter = iters_s / iters
    flop = 2.0 * rows * codes * dim
    traffic = 8.0 * rows * dim + 8.0 * rows
    floor = _floor_s(flop, traffic, precision, ceilings)
    return {"rows": rows, "dim": dim, "codes": codes, "iters": iters, "precision": precision,
            "init_s": init_s, "iters_s": iters_s, "total_s": init_s + iters_s,
            "iter_ms": per_iter * 1e3, "iter_floor_ms": floor * 1e3,
            "iter_roofline_fraction": floor / per_iter,
            "inertia": float(result["r"].inertia)}


def _h2d_gbps(device: torch.device, mbytes: int) -> float:
    """Pinned host-to-device copy rate (GB/s, best of 5); ``nan`` on CPU."""
    if device.type != "cuda":
        return float("nan")
    host = torch.empty(mbytes << 18, dtype=torch.float32).pin_memory()
    dev = torch.empty_like(host, device=device)
    best = min(_seconds(lambda: dev.copy_(host, non_blocking=True), device) for _ in range(5))
    return host.numel() * 4 / best / 1e9


def _write_npy(path: str, rows: int, dim: int, device: torch.device, block: int = 65536) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    gen = torch.Generator(device=device).manual_seed(2)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        rows_here = torch.randn(stop - start, dim, device=device, generator=gen)
        out[start:stop] = rows_here.cpu().numpy()
    out.flush()
    del out


def bench_encode(device: torch.device, rows: int, dim: int, batch_size: int, precision: str,
                 ceilings, folder: Optional[str] = None) -> Dict[str, float]:
    """Items/s of ``get_semantic_ids`` on device-resident rows and of ``encode_source`` from a
    memory-mapped ``.npy`` written to ``folder``."""
    torch.manual_seed(0)
    model = RQVAE(dim, HIDDEN, LATENT, LAYERS, CODES, precision=precision).to(device).eval()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = os.path.join(tmp, "items.npy")
        _write_npy(path, rows, dim, device)
        resident = torch.from_numpy(np.load(path)).to(device)
        with torch.no_grad(), matmul_precision(precision):
            model.get_semantic_ids(resident[:batch_size], batch_size=batch_size)  # compile, warm
            on_device = {}
            device_s = _seconds(lambda: on_device.setdefault(
                "codes", model.get_semantic_ids(resident, batch_size=batch_size)), device)
            source = open_embeddings(path)
            encoded = {}
            file_s = _seconds(lambda: encoded.setdefault("ids", encode_source(
                model, source, batch_size=batch_size, progress=False)), device)
        # Same batches, same model: the codes should agree row for row (reported, not raised, so
        # a rare tf32 kernel choice cannot cost a GPU run its measurements).
        same = encoded["ids"].codes == on_device["codes"].cpu().numpy()
        agreement = float(same.all(axis=1).mean())
    del resident
    widths = (dim, *HIDDEN, LATENT)
    flop = 2.0 * rows * (sum(a * b for a, b in zip(widths, widths[1:])) + LAYERS * CODES * LATENT)
    traffic = 4.0 * rows * dim  # each input row read once; everything else is smaller
    floor = _floor_s(flop, traffic, precision, ceilings)
    h2d = _h2d_gbps(device, 256)
    return {"rows": rows, "dim": dim, "batch_size": batch_size, "precision": precision,
            "input_gb": traffic / 1e9,
            "device_s": device_s, "device_items_per_s": rows / device_s,
            "device_floor_s": floor, "device_roofline_fraction": floor / device_s,
            "file_s": file_s, "file_items_per_s": rows / file_s,
            "file_gbps": traffic / file_s / 1e9,
            "h2d_gbps": h2d, "file_fraction_of_h2d": traffic / file_s / 1e9 / h2d,
            "codes_agreement": agreement}


def format_report(report: dict) -> str:
    """The report as Markdown lines."""
    km, enc, ceil = report["kmeans"], report["encode"], report["ceilings"]
    fmt = lambda v, d=3: "-" if v is None or v != v else f"{v:.{d}g}"  # noqa: E731
    dur = lambda s: f"{fmt(s)} s" if s >= 1 else f"{fmt(s * 1e3)} ms"  # noqa: E731
    return "\n".join([
        f"rqvae-fast pipeline bench | {report['date']} | {report['device']} | torch "
        f"{torch.__version__} | commit {report['commit']} | ceilings: copy "
        f"{fmt(ceil['copy_gbps'], 4)} GB/s, matmul "
        + ", ".join(f"{k} {fmt(v, 4)}" for k, v in ceil["tflops"].items()) + " TFLOP/s",
        "",
        "| step | size | time | rate | roofline |",
        "|---|---|---|---|---|",
        f"| k-means++ seeding | {km['codes']} seeds from {64 * km['codes']:,} rows | "
        f"{dur(km['init_s'])} | | |",
        f"| k-means, {km['iters']} iterations ({km['precision']}) | "
        f"{km['rows']:,} x {km['dim']} -> "
        f"{km['codes']} | {dur(km['iters_s'])} (with seeding {dur(km['total_s'])}) | "
        f"{fmt(km['iter_ms'])} ms/iteration | "
        f"{100 * km['iter_roofline_fraction']:.1f} % (floor {fmt(km['iter_floor_ms'])} ms) |",
        f"| encode, rows on the device ({enc['precision']}) | {enc['rows']:,} x {enc['dim']} | "
        f"{dur(enc['device_s'])} | {fmt(enc['device_items_per_s'] / 1e6)} M items/s | "
        f"{100 * enc['device_roofline_fraction']:.1f} % (floor {dur(enc['device_floor_s'])}) |",
        f"| encode from a memory-mapped .npy | {enc['rows']:,} x {enc['dim']} "
        f"({fmt(enc['input_gb'])} GB) | {dur(enc['file_s'])} | "
        f"{fmt(enc['file_items_per_s'] / 1e6)} M items/s, {fmt(enc['file_gbps'])} GB/s | "
        + ("-" if enc["h2d_gbps"] != enc["h2d_gbps"] else
           f"{100 * enc['file_fraction_of_h2d']:.1f} % of pinned host-to-device "
           f"{fmt(enc['h2d_gbps'])} GB/s") + " |",
        "",
        f"file and in-memory encodes agree on {100 * enc['codes_agreement']:.2f} % of the rows",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rqvae_fast.bench_pipeline",
                                     description="Time fused k-means and semantic-ID encoding.")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--precision", choices=("ieee", "tf32", "bf16"),
                        help="distance-matmul precision (default: tf32 on CUDA, ieee on CPU)")
    parser.add_argument("--kmeans-rows", type=int, default=1 << 20,
                        help="rows clustered by the k-means phase (default: 1048576)")
    parser.add_argument("--kmeans-dim", type=int, default=32,
                        help="width of those rows (default: 32)")
    parser.add_argument("--kmeans-codes", type=int, default=256,
                        help="clusters (codes) of the k-means phase (default: 256)")
    parser.add_argument("--kmeans-iters", type=int, default=20,
                        help="timed Lloyd iterations (default: 20)")
    parser.add_argument("--encode-rows", type=int, default=1 << 20,
                        help="rows of the temporary .npy the encode phase reads (default: 1048576)")
    parser.add_argument("--encode-dim", type=int, default=768,
                        help="width of those rows (default: 768)")
    parser.add_argument("--batch-size", type=int, default=65536, help="encode batch size")
    parser.add_argument("--tmpdir", help="folder for the temporary .npy (default: the system's)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: k-means 8192 x 32 -> 64 (5 iterations), encode 8192 x 96")
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--markdown", help="write the table as Markdown here")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    resolved = resolve_device_and_precision(args.device, args.precision)
    if resolved is None:
        return 2
    device, precision = resolved
    if args.quick:
        args.kmeans_rows, args.kmeans_codes, args.kmeans_iters = 8192, 64, 5
        args.encode_rows, args.encode_dim, args.batch_size = 8192, 96, 2048
    ceilings = measure_ceilings(device, precisions=(precision,), quick=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _git_commit(),
              "device": device_name(device), "ceilings": ceilings.to_dict(),
              "kmeans": bench_kmeans(device, args.kmeans_rows, args.kmeans_dim, args.kmeans_codes,
                                     args.kmeans_iters, precision, ceilings),
              "encode": bench_encode(device, args.encode_rows, args.encode_dim, args.batch_size,
                                     precision, ceilings, args.tmpdir)}
    text = format_report(report)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
