"""Exact-at-speed check on a CUDA GPU: ``precision="exact"`` against the plain ``"ieee"`` and ``"tf32"``
kernels on the roofline shapes A and B (inference forward, no statistics).

Prints, per shape and precision: median ms (``triton.testing.do_bench``), the share of rows whose indices
equal the plain exact path's (must be 1.0 for ``exact``), and the time against the paper model of
``benchmarks/RESULTS.md`` ("Roofline model on paper"). Run by ``benchmarks/gpu_check.sh``; needs CUDA.

    python benchmarks/gpu_exact.py [--shapes A B] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from rqvae_fast.functional import residual_quantize

SHAPES = {"A": (1 << 20, 32, 256, 3), "B": (1 << 18, 64, 1024, 4)}
# Paper predictions (ms, low .. high) from benchmarks/RESULTS.md, inference forward.
PREDICTED = {("A", "tf32"): (0.143, 0.264), ("A", "exact"): (0.43, 0.67), ("A", "ieee"): (1.005, 1.125),
             ("B", "tf32"): (0.382, 0.542), ("B", "exact"): (1.15, 1.63), ("B", "ieee"): (2.679, 2.840)}


def problem(n: int, d: int, k: int, layers: int, seed: int = 0):
    """Random rows and codebooks whose scale shrinks per layer, like trained residual codebooks."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=gen)
    books = [torch.randn(k, d, device="cuda", generator=gen) * 0.5 ** layer for layer in range(layers)]
    return x, books


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["A", "B"], choices=sorted(SHAPES),
                        help="roofline shapes to run (default: A B)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_exact: no CUDA device; nothing measured")
        return 0
    import triton.testing

    rows = []
    for name in args.shapes:
        x, books = problem(*SHAPES[name])
        reference = None
        for precision in ("ieee", "exact", "tf32"):
            def step():
                return residual_quantize(x, books, precision=precision, compute_stats=False)
            with torch.no_grad():
                indices = step().indices
                if reference is None:
                    reference = indices
                ms = triton.testing.do_bench(lambda: step(), warmup=25, rep=200)
            agree = (indices == reference).all(dim=1).float().mean().item()
            low, high = PREDICTED[(name, precision)]
            rows.append({"shape": name, "precision": precision, "ms": ms, "rows_equal_ieee": agree,
                         "predicted_ms": [low, high]})
            print(f"{name} {precision:5s} {ms:8.3f} ms  rows equal to ieee {agree:.6f}  "
                  f"predicted {low:.3f}..{high:.3f} ms  floor/measured {low / ms:.0%}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    bad = [r for r in rows if r["precision"] == "exact" and r["rows_equal_ieee"] != 1.0]
    if bad:
        print("gpu_exact: FAILED: exact indices differ from ieee", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
