"""Benchmark of :mod:`rqvae_fast.compat` against vector-quantize-pytorch in its own modes.

    python -m rqvae_fast.bench_compat                        # N=16384 D=32 K=256 L=3, CPU
    python -m rqvae_fast.bench_compat --n 4096 --reps 5 --json out.json

Modes (same arguments, state copied by strict ``load_state_dict``):

- ``rotation``: a training step (forward + backward, EMA update) with their defaults (rotation trick);
- ``ste``: the same with ``rotation_trick=False``;
- ``cosine``: a training step with ``use_cosine_sim=True``;
- ``beam4``: eval encoding with ``beam_size=4`` (also reports the squared reconstruction error of
  beam 4 and greedy).

Providers are timed interleaved (one call of each per repetition) and the median is reported.
CPU timings on a shared machine are noisy; the Triton kernels only count on a GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .compat import ResidualVQ

MODES = ("rotation", "ste", "cosine", "beam4")
MODE_KWARGS: Dict[str, dict] = {
    "rotation": {}, "ste": {"rotation_trick": False}, "cosine": {"use_cosine_sim": True},
    "beam4": {"beam_size": 4},
}


def _pair(mode: str, n: int, d: int, k: int, layers: int, device: torch.device):
    """``(ours, theirs or None, x)`` for one mode; theirs is None when the library is missing."""
    kwargs = dict(dim=d, num_quantizers=layers, codebook_size=k, **MODE_KWARGS[mode])
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from vector_quantize_pytorch import ResidualVQ as TheirRVQ
        theirs = TheirRVQ(**kwargs).to(device)
    except ImportError:
        theirs = None
    ours = ResidualVQ(**kwargs).to(device)
    if theirs is not None:
        ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, n, d, device=device)
    return ours, theirs, x


def _step(model, x: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    if mode == "beam4":
        model.eval()

        def encode():
            with torch.no_grad():
                return model(x)[0]
        return encode
    model.train()
    leaf = x.clone().requires_grad_()

    def train_step():
        leaf.grad = None
        quantized, _, losses = model(leaf)
        (quantized.square().mean() + losses.sum()).backward()
        return quantized
    return train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(modes: Sequence[str], n: int, d: int, k: int, layers: int, reps: int,
        device: torch.device) -> List[dict]:
    """One row per (mode, provider): median and min ms over ``reps`` interleaved calls."""
    rows = []
    for mode in modes:
        ours, theirs, x = _pair(mode, n, d, k, layers, device)
        steps = {"rqvae_fast.compat": _step(ours, x, mode)}
        if theirs is not None:
            steps["vector_quantize_pytorch"] = _step(theirs, x, mode)
        times: Dict[str, List[float]] = {name: [] for name in steps}
        for fn in steps.values():  # warm-up
            fn()
        for _ in range(reps):
            for name, fn in steps.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append((time.perf_counter() - start) * 1e3)
        extra = {}
        if mode == "beam4":
            with torch.no_grad():
                beam_q = ours(x)[0]
                greedy_q = ours(x, beam_size=1)[0]
            extra = {"sq_error_beam4": float((beam_q - x).square().sum()),
                     "sq_error_greedy": float((greedy_q - x).square().sum())}
        for name, samples in times.items():
            rows.append({"mode": mode, "provider": name, "N": n, "D": d, "K": k, "L": layers,
                         "device": str(device), "ms": statistics.median(samples),
                         "min_ms": min(samples), "reps": reps, **extra})
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    lines = [f"{'mode':9s} {'provider':26s} {'median ms':>10s} {'min ms':>9s} {'speed-up':>9s}"]
    by_mode: Dict[str, Dict[str, dict]] = {}
    for row in rows:
        by_mode.setdefault(row["mode"], {})[row["provider"]] = row
    for mode, group in by_mode.items():
        theirs = group.get("vector_quantize_pytorch")
        for name, row in group.items():
            speed = f"{theirs['ms'] / row['ms']:.2f}x" if theirs else "-"
            lines.append(f"{mode:9s} {name:26s} {row['ms']:10.2f} {row['min_ms']:9.2f} {speed:>9s}")
        first = next(iter(group.values()))
        if "sq_error_beam4" in first:
            lines.append(f"{'':9s} squared error: beam 4 {first['sq_error_beam4']:.1f}, "
                         f"greedy {first['sq_error_greedy']:.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rqvae_fast.bench_compat",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {MODES}")
    rows = run(modes, args.n, args.d, args.k, args.layers, args.reps, torch.device(args.device))
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
