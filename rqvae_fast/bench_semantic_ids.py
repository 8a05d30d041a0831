"""Semantic IDs on real and synthetic embeddings: rqvae-fast's RQ-KMeans against FAISS.

``python -m rqvae_fast.bench_semantic_ids [--quick] [--data synthetic,wordllama] [--rqvae]``

For each data set (L2-normalised rows; ``wordllama`` needs ``pip install wordllama``) and each
method, 3 layers x 256 codes by default:

- ``rqvae-fast`` RQ-KMeans, default (greedy), ``balanced`` and ``beam 4`` (the default fit,
  beam-search encoding);
- FAISS ``ResidualQuantizer`` greedy (``max_beam_size=1``) and with its default beam (5), and
  scikit-learn residual k-means (the floor), each in its own process (``_bench_worker``) with the
  same number of threads; rows are skipped with a note when the package is missing;
- with ``--rqvae``: the default RQ-VAE of ``rqvae-fast fit`` (its end-to-end error
  ``||x - dec(z_q)||^2 / ||x||^2``) and the mean-vector baseline.

Every method runs once per k-means seed of ``--seeds`` (default 0, 1, 2): one seed's figures move
by more than the gaps between the methods (FAISS on WordLlama: colliding share 16.5-17.2 %,
coherence @2 0.559-0.565 over seeds 0-3), so the quality columns are means over the seeds.
Reported: fit and encode seconds (median of all runs, methods interleaved), relative
error ``sum ||x - x^||^2 / sum ||x||^2``, per-layer perplexity, colliding share (items whose
full ID another item also has), and prefix coherence: the mean cosine similarity over all pairs
of items sharing their first 1, 2, 3 codes (pairs weighted equally; a group of ``n`` unit
vectors ``u`` has mean pairwise cosine ``(||sum u||^2 - n) / (n (n - 1))``, no N^2 memory).
Output: a markdown table on stdout, JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .metrics import collision_stats, layer_stats, row_keys

DATASETS = ("synthetic", "wordllama")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def load_dataset(name: str, quick: bool, seed: int = 0, synthetic_shape=(50_000, 768)
                 ) -> np.ndarray:
    """``(N, D)`` float32 L2-normalised rows of data set ``name``; ``ImportError`` if the
    package holding it is missing. ``synthetic_shape``: items and width of the catalogue (the
    demo's by default)."""
    if name == "synthetic":
        from .synthetic import make_catalogue

        items, dim = (1000, 32) if quick else synthetic_shape
        return _normalise(make_catalogue(items, dim, seed=seed).embeddings.numpy())
    if name == "wordllama":
        from .embedding_sets import wordllama_embeddings

        x = wordllama_embeddings(normalize=True)
        return x[np.random.default_rng(seed).permutation(x.shape[0])[:1000]] if quick else x
    raise ValueError(f"unknown data set {name!r}; use one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def prefix_coherence(x: np.ndarray, codes: np.ndarray, depth: int) -> float:
    """Mean cosine similarity over all pairs of rows of ``x (N, D)`` whose ``codes (N, L)``
    agree on the first ``depth`` positions (NaN when no two rows share a prefix)."""
    units = _normalise(x).astype(np.float64)
    _, group, sizes = np.unique(row_keys(codes[:, :depth]), return_inverse=True,
                                return_counts=True)
    sums = np.zeros((sizes.size, x.shape[1]))
    np.add.at(sums, group.reshape(-1), units)
    shared = sizes > 1
    pairs = (sizes[shared] * (sizes[shared] - 1.0)).sum()
    if pairs == 0:
        return float("nan")
    return float(((sums[shared] ** 2).sum(axis=1) - sizes[shared]).sum() / pairs)


def reconstruct(codes: np.ndarray, codebooks) -> np.ndarray:
    """``(N, D)``: the sum over layers of ``codebooks[l][codes[:, l]]``."""
    out = np.zeros((codes.shape[0], codebooks[0].shape[1]), dtype=np.float64)
    for layer, book in enumerate(codebooks):
        out += np.asarray(book, dtype=np.float64)[codes[:, layer]]
    return out


def quality(x: np.ndarray, codes: np.ndarray, sizes, recon: np.ndarray) -> Dict[str, object]:
    """Relative error, per-layer perplexity, colliding share and prefix coherence."""
    err = float(((x.astype(np.float64) - recon) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
    return {"rel_error": err,
            "perplexity": [s.perplexity for s in layer_stats(codes, sizes)],
            "colliding_share": collision_stats(codes).colliding_share,
            "coherence": [prefix_coherence(x, codes, d) for d in range(1, codes.shape[1] + 1)]}


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

def _ours(balanced: bool = False, beam_size: int = 1) -> Callable:
    def run(x: np.ndarray, layers: int, codes: int, seed: int):
        from .kmeans import RQKMeans

        data = torch.from_numpy(x)
        start = time.perf_counter()
        model = RQKMeans(x.shape[1], layers, codes).fit(data, seed=seed)
        fitted = time.perf_counter()
        ids = model.get_semantic_ids(data, beam_size=beam_size, balanced=balanced).numpy()
        done = time.perf_counter()
        books = [b.detach().numpy() for b in model.vq.codebooks]
        return ids, books, fitted - start, done - fitted
    return run


def _peer(method: str, beam: int = 1) -> Callable:
    """A peer in its own process (see :mod:`rqvae_fast._bench_worker`)."""
    def run(x: np.ndarray, layers: int, codes: int, seed: int):
        with tempfile.TemporaryDirectory() as tmp:
            data, out = Path(tmp) / "x.npy", Path(tmp) / "out.npz"
            np.save(data, x)
            cmd = [sys.executable, "-m", "rqvae_fast._bench_worker", method, str(data), str(out),
                   str(layers), str(codes), str(torch.get_num_threads()), str(beam), str(seed)]
            env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{method} worker failed: {proc.stderr.strip()[-500:]}")
            result = np.load(out)
            return (result["codes"], list(result["codebooks"]), float(result["fit_s"]),
                    float(result["encode_s"]))
    return run


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def methods(quick: bool) -> List[Dict[str, object]]:
    """The compared methods: ``name``, ``run`` and ``needs`` (a module, or None)."""
    return [
        {"key": "ours", "name": "rqvae-fast RQ-KMeans (default, greedy)", "run": _ours(),
         "needs": None},
        {"key": "balanced", "name": "rqvae-fast RQ-KMeans --balanced", "run": _ours(balanced=True),
         "needs": None},
        {"key": "beam4", "name": "rqvae-fast RQ-KMeans, beam 4", "run": _ours(beam_size=4),
         "needs": None},
        {"key": "faiss", "name": "FAISS ResidualQuantizer, greedy (max_beam_size=1)",
         "run": _peer("faiss", 1), "needs": "faiss"},
        {"key": "faiss-beam", "name": "FAISS ResidualQuantizer, default beam (5)",
         "run": _peer("faiss", 5), "needs": "faiss"},
        {"key": "sklearn", "name": "scikit-learn residual k-means (floor)", "run": _peer("sklearn"),
         "needs": "sklearn"},
    ]


def rqvae_row(x: np.ndarray, layers: int, codes: int, seed: int, quick: bool) -> Dict[str, object]:
    """The default RQ-VAE of ``rqvae-fast fit`` (the CLI's defaults), trained and scored."""
    from .cli import _model_from_args, _train_config, build_parser
    from .trainer import Trainer

    argv = ["fit", "--method", "rqvae", "--layers", str(layers), "--codebook-size", str(codes),
            "--seed", str(seed), "--no-progress"]
    if quick:
        argv += ["--epochs", "2"]
    args = build_parser().parse_args(argv)
    torch.manual_seed(seed)
    model = _model_from_args(args, x.shape[1])
    data = torch.from_numpy(x)
    start = time.perf_counter()
    result = Trainer(model, _train_config(args), out_dir=None, plot=False,
                     log=lambda *_: None).fit(data)
    fitted = time.perf_counter()
    model = result.model.eval()
    with torch.no_grad():
        ids = model.get_semantic_ids(data, batch_size=8192).cpu().numpy()
        done = time.perf_counter()
        recon = torch.cat([model(data[i:i + 8192])[0] for i in range(0, len(data), 8192)])
    row = quality(x, ids, model.codebook_sizes, recon.double().numpy())
    row.update(name="rqvae-fast RQ-VAE (fit defaults; end-to-end error)",
               fit_s=fitted - start, encode_s=done - fitted)
    return row


def mean_vector_error(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(((x - x.mean(axis=0)) ** 2).sum() / (x ** 2).sum())


# ----------------------------------------------------------------------------------------------
# Running and reporting
# ----------------------------------------------------------------------------------------------

def _warm_up(dim: int) -> None:
    """One tiny fit and encode, untimed: one-off imports and backend set-up are not fit time
    (FAISS's import is not timed either)."""
    from .kmeans import RQKMeans

    x = torch.randn(64, dim)
    model = RQKMeans(dim, 2, 4).fit(x, seed=0)
    model.get_semantic_ids(x)
    model.get_semantic_ids(x, beam_size=2)
    model.get_semantic_ids(x, balanced=True)


def mean_quality(rows: List[Dict[str, object]]) -> Dict[str, object]:
    """The mean of several runs' :func:`quality` dicts (lists averaged element by element)."""
    out: Dict[str, object] = {}
    for key in ("rel_error", "colliding_share"):
        out[key] = float(np.mean([row[key] for row in rows]))
    for key in ("perplexity", "coherence"):
        out[key] = [float(v) for v in np.nanmean(np.array([row[key] for row in rows], dtype=float),
                                                 axis=0)]
    return out


def bench_dataset(name: str, x: np.ndarray, layers: int, codes: int, repeats: int, seed: int,
                  quick: bool, with_rqvae: bool, only: Optional[List[str]] = None,
                  seeds: Optional[List[int]] = None) -> Dict[str, object]:
    """Every method on ``x`` with each k-means seed of ``seeds`` (default ``[seed]``): quality
    columns are means over the seeds (each seed's in ``per_seed``), times are medians over all
    ``repeats x len(seeds)`` runs, methods interleaved."""
    seeds = [seed] if not seeds else list(seeds)
    report: Dict[str, object] = {"dataset": name, "items": int(x.shape[0]), "dim": int(x.shape[1]),
                                 "layers": layers, "codes": codes, "threads": torch.get_num_threads(),
                                 "seeds": seeds, "rows": [], "notes": []}
    from .cpu_gemm import backend

    report["notes"].append(f"rqvae-fast's CPU score matmul ran on {backend()}'s BLAS "
                           "(rqvae_fast.cpu_gemm: the faster of torch's and NumPy's on this machine)")
    _warm_up(x.shape[1])
    todo = []
    for method in methods(quick):
        if only is not None and method["key"] not in only:
            continue
        if method["needs"] and not _available(method["needs"]):
            report["notes"].append(f"{method['name']}: skipped ({method['needs']} not installed)")
            continue
        todo.append(method)
    times: Dict[str, List[tuple]] = {m["name"]: [] for m in todo}
    per_seed: Dict[str, Dict[int, Dict[str, object]]] = {m["name"]: {} for m in todo}
    for _ in range(repeats):
        for run_seed in seeds:
            for method in todo:
                ids, books, fit_s, encode_s = method["run"](x, layers, codes, run_seed)
                times[method["name"]].append((fit_s, encode_s))
                if run_seed not in per_seed[method["name"]]:
                    per_seed[method["name"]][run_seed] = quality(x, ids, [codes] * layers,
                                                                 reconstruct(ids, books))
    for method in todo:
        runs = [per_seed[method["name"]][s] for s in seeds]
        row = mean_quality(runs)
        fits = [t[0] for t in times[method["name"]]]
        encodes = [t[1] for t in times[method["name"]]]
        totals = [a + b for a, b in times[method["name"]]]
        row.update(name=method["name"], fit_s=statistics.median(fits),
                   encode_s=statistics.median(encodes), total_s=statistics.median(totals),
                   total_runs_s=totals, per_seed=runs)
        report["rows"].append(row)
    if with_rqvae:
        row = rqvae_row(x, layers, codes, seed, quick)
        row["total_s"] = row["fit_s"] + row["encode_s"]
        report["rows"].append(row)
        report["mean_vector_error"] = mean_vector_error(x)
    return report


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def markdown(report: Dict[str, object]) -> str:
    """One markdown table for one data set's report."""
    seeds = report.get("seeds", [0])
    lines = [f"**{report['dataset']}**: {report['items']} x {report['dim']}, {report['layers']} "
             f"layers x {report['codes']} codes, {report['threads']} threads; quality: mean of "
             f"k-means seeds {', '.join(map(str, seeds))}; times: median of all runs", "",
             "| method | fit + encode s | rel. error | perplexity per layer | colliding share | "
             "coherence @1/@2/@3 |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(
            f"| {row['name']} | {row['total_s']:.2f} ({row['fit_s']:.2f} + {row['encode_s']:.2f})"
            f" | {row['rel_error']:.4f} | {' / '.join(f'{p:.0f}' for p in row['perplexity'])} | "
            f"{row['colliding_share']:.1%} | {' / '.join(_fmt(c) for c in row['coherence'])} |")
    if "mean_vector_error" in report:
        lines.append(f"| mean vector (baseline) | - | {report['mean_vector_error']:.4f} | - | - | - |")
    lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rqvae_fast.bench_semantic_ids",
        description="rqvae-fast RQ-KMeans vs FAISS's ResidualQuantizer and scikit-learn residual "
                    "k-means on the synthetic catalogue and WordLlama's token embeddings.")
    parser.add_argument("--data", default=",".join(DATASETS),
                        help=f"comma-separated data sets from {', '.join(DATASETS)}")
    parser.add_argument("--layers", type=int, default=3, help="ID length (codebooks)")
    parser.add_argument("--codes", type=int, default=256, help="codes per layer (a power of two "
                        "for FAISS)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved rounds of all methods; times are medians")
    parser.add_argument("--seed", type=int, default=0, help="seed of data sampling (and of "
                        "k-means without --seeds)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated k-means seeds (default 0,1,2; with --quick, --seed); "
                             "every method runs with each, the "
                             "quality columns are their means (one seed's figures move by more "
                             "than the gaps between methods)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every method (default: torch's)")
    parser.add_argument("--rqvae", action="store_true",
                        help="also train the default RQ-VAE and report its end-to-end error and "
                             "the mean-vector baseline")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of ours, balanced, beam4, faiss, faiss-beam, "
                             "sklearn (default: all)")
    parser.add_argument("--synthetic-items", type=int, default=50_000,
                        help="rows of the synthetic catalogue")
    parser.add_argument("--synthetic-dim", type=int, default=768,
                        help="width of the synthetic catalogue")
    parser.add_argument("--quick", action="store_true",
                        help="1,000 rows, 3 x 8 codes: a smoke run for CI")
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.codes = min(args.codes, 8)
    reports = []
    for name in [d.strip() for d in args.data.split(",") if d.strip()]:
        try:
            x = load_dataset(name, args.quick, args.seed,
                             (args.synthetic_items, args.synthetic_dim))
        except ImportError as exc:
            print(f"{name}: skipped ({exc})\n", flush=True)
            reports.append({"dataset": name, "skipped": str(exc)})
            continue
        only = [m.strip() for m in args.methods.split(",")] if args.methods else None
        seeds = ([args.seed] if args.quick else [0, 1, 2]) if args.seeds is None else \
            [int(v) for v in args.seeds.split(",") if v.strip()]
        report = bench_dataset(name, x, args.layers, args.codes, args.repeats, args.seed,
                               args.quick, args.rqvae, only, seeds)
        reports.append(report)
        print(markdown(report) + "\n", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
