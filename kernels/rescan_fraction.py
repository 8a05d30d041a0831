"""How often ``precision="exact"`` rescans: ``python -m rqvae_fast.kernels.rescan_fraction``.

Runs the fused forward with ``precision="exact"`` on random Gaussian data and on adversarial
near-tie data (codes in pairs 1e-3 apart, rows on codes and on pair midpoints), checks the indices
against the plain ``"ieee"`` kernel, and prints per layer the fraction of rows whose tf32 margin
was within the bound (flagged), of row tiles rescanned, and of code tiles scored exactly. Runs on
CUDA when present, else through Triton's interpreter (set here; keep N small).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import torch


def _problem(kind: str, n: int, dim: int, sizes: Sequence[int], seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    books = [torch.randn(k, dim, generator=g) * 0.5 ** i for i, k in enumerate(sizes)]
    if kind == "near_tie":
        books = []
        for i, k in enumerate(sizes):
            base = torch.randn((k + 1) // 2, dim, generator=g) * 0.5 ** i
            books.append(torch.cat([base, base + 1e-3 * torch.randn(base.shape, generator=g)])[:k])
        pick = torch.randint(0, sizes[0], (n,), generator=g)
        mid = 0.5 * (books[0][pick] + books[0][(pick + sizes[0] // 2) % sizes[0]])
        x = torch.where(torch.rand(n, 1, generator=g) < 0.5, mid, books[0][pick])
    return x.to(device), [b.to(device) for b in books]


def measure(kind: str, n: int, dim: int, sizes: Sequence[int], seed: int = 0) -> List[dict]:
    from rqvae_fast.backend import layer_starts, search_operands
    from rqvae_fast.kernels.config import forward_tiles
    from rqvae_fast.kernels.quantize_forward import device_arch, residual_quantize_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, books = _problem(kind, n, dim, sizes, seed, device)
    codes = torch.cat(books).contiguous()
    search, sq = search_operands(codes)
    starts = layer_starts(sizes, x)
    run = [residual_quantize_forward(x, codes, search, sq, starts, sizes, routing=1, precision=p,
                                     with_stats=False, rescan_counts=True) for p in ("exact", "ieee")]
    if not torch.equal(run[0][1], run[1][1]):
        raise AssertionError("exact and ieee indices differ")
    tiles = forward_tiles(dim, "exact", device_arch(x.device))
    row_tiles = -(-n // tiles.block_m)
    counts = run[0][5].cpu()
    return [dict(kind=kind, layer=layer, rows_flagged=int(c[0]) / n, row_tiles_rescanned=int(c[1]) / row_tiles,
                 code_tiles_exact=int(c[2]) / (row_tiles * -(-size // tiles.block_k)))
            for layer, (c, size) in enumerate(zip(counts, sizes))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rqvae_fast.kernels.rescan_fraction",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 256, 256])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # The kernels were defined at import (before this ran): start again under the interpreter.
        env = dict(os.environ, TRITON_INTERPRET="1")
        args_out = list(sys.argv[1:] if argv is None else argv)
        os.execve(sys.executable, [sys.executable, "-m", "rqvae_fast.kernels.rescan_fraction", *args_out], env)
    print(f"N={args.n} D={args.dim} K={args.sizes} ({'cuda' if torch.cuda.is_available() else 'interpreter'})")
    print(f"{'data':<9} {'layer':>5} {'rows flagged':>13} {'row tiles rescanned':>20} {'code tiles exact':>17}")
    for kind in ("random", "near_tie"):
        for r in measure(kind, args.n, args.dim, args.sizes, args.seed):
            print(f"{r['kind']:<9} {r['layer']:>5} {r['rows_flagged']:>13.3%} {r['row_tiles_rescanned']:>20.3%} "
                  f"{r['code_tiles_exact']:>17.3%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
