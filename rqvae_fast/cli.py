"""``rqvae-fast``: train an RQ-VAE (or RQ-KMeans) and turn item embeddings into semantic IDs.

    rqvae-fast fit                       # demo: synthetic 50k x 768 catalogue, reports prefix purity
    rqvae-fast fit items.npy --out runs/items
    rqvae-fast encode runs/items/checkpoint.pt items.npy --out runs/items_ids
    torchrun --nproc-per-node 8 -m rqvae_fast encode CKPT items.npy --out DIR  # one shard per rank
    rqvae-fast merge DIR                 # global dedup of the shards: same outputs as one process
    rqvae-fast stats runs/items/codes.npy
    rqvae-fast bench ...

User mistakes (bad files, options, checkpoints) end with one line ``rqvae-fast: error: ...`` on
stderr and exit status 2; outputs are written to temporary files and renamed only when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .data import UserError, atomic_output, describe_rows, load_embeddings, open_embeddings, \
    parse_int_list

PROG = "rqvae-fast"
DEMO_OUT = Path("runs/demo")
_PLURALS = {"category": "categories", "subcategory": "subcategories", "leaf": "leaves"}


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------

class _Formatter(argparse.HelpFormatter):
    """Show ``(default: X)`` where a default means something (not for flags or unset options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # identity, not ==: a default of 0 (--seed) equals False but is worth showing
        if "default" in text or action.default is None or action.default is False or \
                action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _bounded(cast, accept, expected: str):
    """An argparse type: ``cast`` the text, then require ``accept(value)``; else 'expected ...'."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _bounded(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
_fraction = _bounded(float, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
_recon_weight = _bounded(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input file")
    group.add_argument("--column", metavar="NAME",
                       help="vector column (CSV/Parquet) or dict key (.pt)")
    group.add_argument("--id-column", metavar="NAME",
                       help="item id column (CSV/Parquet); default: row numbers")
    group.add_argument("--drop-nonfinite", action="store_true",
                       help="skip rows holding NaN/Inf instead of stopping with an error")
    header = group.add_mutually_exclusive_group()
    header.add_argument("--header", dest="header", action="store_const", const=True,
                        help="CSV/TSV: the first line holds column names (default: detected, a "
                             "header when any of its fields is not a number)")
    header.add_argument("--no-header", dest="header", action="store_const", const=False,
                        help="CSV/TSV: the first line is an item; columns are named by position "
                             "0, 1, ... (for --column / --id-column)")


def _add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --out (without it, a "
                             "folder holding them is refused)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn item embeddings into collision-free semantic IDs with a residual-quantized\n"
                    "autoencoder (RQ-VAE) or residual k-means, on fused quantization kernels.",
        epilog="Run 'rqvae-fast fit' with no data for a self-checking demo on a synthetic catalogue.\n"
               "Details: rqvae-fast COMMAND --help")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    # ---- fit ----
    fit = commands.add_parser(
        "fit", formatter_class=_Formatter, help="train on embeddings (or the demo) and write IDs",
        description="Train an RQ-VAE (or RQ-KMeans) on DATA and write the checkpoint, the semantic "
                    "IDs of every item, and per-epoch logs to --out. Without DATA, train on a "
                    "deterministic synthetic catalogue with known categories and report how well "
                    "ID prefixes recover them.")
    fit.add_argument("data", nargs="?", help=".npy, .pt, .csv/.tsv or .parquet file of item "
                     "embeddings (items x dims); omit for the demo catalogue")
    fit.add_argument("--out", type=Path, metavar="DIR",
                     help="output folder (default: runs/demo, or runs/<DATA stem>)")
    fit.add_argument("--method", choices=("rqvae", "rqkmeans"), default="rqvae",
                     help="RQ-VAE (encoder + residual quantizer + decoder) or residual k-means "
                          "on the raw embeddings (no encoder)")
    fit.add_argument("--max-items", type=_positive_int, metavar="N",
                     help="train on the first N items only")
    _add_overwrite_option(fit)
    _add_input_options(fit)
    model = fit.add_argument_group("model")
    model.add_argument("--layers", type=_positive_int, default=3, metavar="L",
                       help="quantization layers (ID length)")
    model.add_argument("--codebook-size", default="256", metavar="K[,K...]",
                       help="codes per layer: one number or one per layer (e.g. 256,256,256)")
    model.add_argument("--latent-dim", type=_positive_int, default=32, metavar="D",
                       help="width of the quantized latent")
    model.add_argument("--hidden-dims", default="512,256,128", metavar="H[,H...]",
                       help="encoder hidden widths (the decoder mirrors them)")
    model.add_argument("--beta", type=float, default=0.25, metavar="B", help="commitment cost")
    model.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                       help="move codebooks by EMA of the latents they quantize (--no-ema: by "
                            "gradients of the codebook loss, the seed's)")
    model.add_argument("--decay", type=float, default=0.99, metavar="D",
                       help="EMA decay (with --ema)")
    model.add_argument("--grad-mode", choices=("seed", "full", "layer_ste", "rotation"), default="seed",
                       help="gradient routing through the quantizer (see README)")
    train = fit.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, default=20, metavar="N",
                       help="passes over the data")
    train.add_argument("--batch-size", type=_positive_int, default=1024, metavar="N",
                       help="items per step")
    train.add_argument("--optimizer", choices=("adamw", "adagrad"), default="adamw",
                       help="AdamW, or Adagrad as TIGER (which used lr 0.4)")
    train.add_argument("--lr", type=float, metavar="LR",
                       help="peak learning rate (default 1e-3 AdamW, 0.01 Adagrad)")
    train.add_argument("--weight-decay", type=float, default=1e-4, metavar="W",
                       help="AdamW weight decay")
    train.add_argument("--scheduler", choices=("onecycle", "cosine", "none"), default="onecycle",
                       help="learning-rate schedule (per step)")
    train.add_argument("--grad-clip", type=float, default=1.0, metavar="NORM",
                       help="max gradient norm (0 = off)")
    train.add_argument("--beta-start", type=float, default=0.1, metavar="B",
                       help="commitment cost at the start of the warm-up (negative = no warm-up)")
    train.add_argument("--beta-warmup", type=float, default=0.2, metavar="SHARE",
                       help="share of training over which beta rises to --beta")
    train.add_argument("--dead-code-window", type=_non_negative_int, metavar="STEPS",
                       help="re-seed codes unused for this many steps (default one epoch; 0 = off)")
    train.add_argument("--val-fraction", type=_fraction, default=0.05, metavar="SHARE",
                       help="held-out share")
    train.add_argument("--recon-weight", type=_recon_weight, default=None, metavar="W",
                       help="weight of the reconstruction MSE against the VQ loss (default: "
                            "1 / the data's mean per-dimension variance, so unit-norm "
                            "embeddings are not drowned by the VQ loss; 1 = the seed's sum)")
    train.add_argument("--monitor", choices=("recon", "total"), default="recon",
                       help="validation loss that picks the best epoch and stops early: the "
                            "reconstruction or the total with the VQ terms (the seed's)")
    train.add_argument("--patience", type=_non_negative_int, default=5, metavar="EPOCHS",
                       help="epochs without validation improvement before stopping (0 = never)")
    train.add_argument("--init-samples", type=_positive_int, default=100_000, metavar="N",
                       help="items used for the k-means codebook initialization")
    train.add_argument("--kmeans-iters", type=_positive_int, default=20, metavar="N",
                       help="Lloyd iterations of the fused k-means")
    train.add_argument("--seed", type=int, default=0, metavar="S",
                       help="seed for weights, split, shuffling (and the demo catalogue)")
    train.add_argument("--device", default="auto", metavar="DEV",
                       help="auto, cpu, cuda, cuda:1, ...")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.pt (same data and settings)")
    train.add_argument("--plot", action="store_true",
                       help="also write OUT/training.png (needs matplotlib)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    rqk = fit.add_argument_group("RQ-KMeans (--method rqkmeans)")
    rqk.add_argument("--balanced", action="store_true",
                     help="size-balanced IDs: the last code is assigned to the whole catalogue "
                          "under a capacity per ID prefix (far fewer shared IDs, a little more "
                          "error)")
    rqk.add_argument("--beam-size", type=_positive_int, default=1, metavar="B",
                     help="encode with a beam of B paths per item (1: greedy; 4 lowers the error)")
    out = fit.add_argument_group("semantic IDs")
    out.add_argument("--format", choices=("csv", "jsonl", "parquet"), default="csv",
                     help="format of the ID table")
    out.add_argument("--no-dedup", action="store_true",
                     help="do not append the disambiguation position")
    demo = fit.add_argument_group("demo catalogue (without DATA)")
    demo.add_argument("--num-items", type=_positive_int, default=50_000, metavar="N",
                      help="catalogue size")
    demo.add_argument("--dim", type=_positive_int, default=768, metavar="D", help="embedding width")
    fit.set_defaults(func=cmd_fit)

    # ---- encode ----
    enc = commands.add_parser(
        "encode", formatter_class=_Formatter, help="semantic IDs for a file with a trained model",
        description="Encode every item of DATA with the model in CHECKPOINT, streaming the file in "
                    "batches, and write OUT/codes.npy and OUT/ids.<format> (item id, codes, token "
                    "string). A last disambiguation position makes every ID unique.")
    enc.add_argument("checkpoint", type=Path, help="checkpoint.pt written by 'fit'")
    enc.add_argument("data", help=".npy, .pt, .csv/.tsv or .parquet file of item embeddings")
    enc.add_argument("--out", type=Path, metavar="DIR",
                     help="output folder (default: runs/<DATA stem>_ids)")
    enc.add_argument("--format", choices=("csv", "jsonl", "parquet"), default="csv",
                     help="format of the ID table")
    enc.add_argument("--batch-size", type=_positive_int, default=65536, metavar="N",
                     help="rows per batch")
    enc.add_argument("--no-dedup", action="store_true",
                     help="do not append the disambiguation position")
    enc.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda, cuda:1, ...")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_overwrite_option(enc)
    enc.add_argument("--beam-size", type=_positive_int, default=1, metavar="B",
                     help="RQ-KMeans checkpoints: beam search with B paths per item (1: greedy)")
    _add_input_options(enc)
    enc.set_defaults(func=cmd_encode)

    # ---- merge ----
    merge = commands.add_parser(
        "merge", formatter_class=_Formatter, help="join the shards of a multi-process 'encode'",
        description="Under torchrun (WORLD_SIZE > 1) each 'encode' rank writes only its contiguous "
                    "share of the rows to DIR/shards/. Once all ranks have finished, 'merge' joins "
                    "the shards in rank order, applies the disambiguation position over the whole "
                    "catalogue and writes DIR/codes.npy, DIR/ids.<format> and DIR/summary.json, "
                    "identical to a single-process 'encode'.")
    merge.add_argument("dir", type=Path, metavar="DIR", help="the --out folder given to 'encode'")
    merge.add_argument("--format", choices=("csv", "jsonl", "parquet"),
                       help="format of the ID table (default: the one given to 'encode')")
    merge.set_defaults(func=cmd_merge)

    # ---- stats ----
    stats = commands.add_parser(
        "stats", formatter_class=_Formatter, help="usage, perplexity and collisions of IDs",
        description="Report per-layer code usage and perplexity and full-ID collisions for a codes "
                    ".npy or an ID table; for a checkpoint, its configuration and last epoch.")
    stats.add_argument("path", type=Path,
                       help="codes .npy, ids .csv/.jsonl/.parquet, or checkpoint .pt")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=cmd_stats)

    # ---- bench ----
    # 'bench' hands all its arguments to rqvae_fast.bench (main() routes it before parsing)
    commands.add_parser("bench", help="benchmark the quantizer (see 'bench --help')",
                        add_help=False)
    return parser


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def _say(message: str) -> None:
    print(message, flush=True)


def _model_from_args(args, input_dim: int):
    from .kmeans import RQKMeans
    from .model import RQVAE

    sizes = parse_int_list(args.codebook_size, "--codebook-size")
    if len(sizes) == 1:
        sizes = sizes * args.layers
    if len(sizes) != args.layers:
        raise UserError(f"--codebook-size gives {len(sizes)} sizes for {args.layers} layers")
    if args.method == "rqkmeans":
        return RQKMeans(input_dim, args.layers, sizes)
    hidden = parse_int_list(args.hidden_dims, "--hidden-dims") if args.hidden_dims.strip() else []
    if not args.beta >= 0:
        raise UserError(f"--beta must be >= 0, got {args.beta}")
    if not 0.0 <= args.decay <= 1.0:
        raise UserError(f"--decay must be in [0, 1], got {args.decay}")
    return RQVAE(input_dim, hidden, args.latent_dim, args.layers, sizes, args.beta, ema=args.ema,
                 decay=args.decay, grad_mode=args.grad_mode)


def _train_config(args):
    from .trainer import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, scheduler=args.scheduler,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        beta_start=args.beta_start if args.beta_start >= 0 else None, beta_warmup=args.beta_warmup,
        dead_code_window=args.dead_code_window, recon_weight=args.recon_weight,
        val_fraction=args.val_fraction,
        patience=args.patience, monitor=args.monitor, seed=args.seed,
        init_samples=args.init_samples,
        kmeans_iters=args.kmeans_iters, device=args.device, progress=not args.no_progress)


def cmd_fit(args) -> int:
    from .checkpoint import save_checkpoint
    from .trainer import Trainer, resolve_device

    started = time.perf_counter()
    labels = level_names = None
    if args.data is None:
        from .synthetic import make_catalogue

        catalogue = make_catalogue(args.num_items, args.dim, seed=args.seed)
        embeddings, labels, level_names = catalogue.embeddings, catalogue.labels, catalogue.level_names
        item_ids = np.arange(len(catalogue))
        counts = [int(labels[:, i].max()) + 1 for i in range(labels.shape[1])]
        _say(f"demo catalogue: {len(catalogue)} items x {args.dim}-d, "
             + " > ".join(f"{c} {_PLURALS.get(n, n)}" for c, n in zip(counts, level_names))
             + f" (seed {args.seed}); pass a file to train on your own embeddings")
        out_dir = args.out or DEMO_OUT
    else:
        source = _open_source(args)
        loaded = load_embeddings(source, drop_nonfinite=args.drop_nonfinite, max_rows=args.max_items)
        if loaded.dropped_rows:
            _say(_skipped(loaded.dropped_rows))
        embeddings, item_ids = loaded.embeddings, loaded.item_ids
        out_dir = args.out or Path("runs") / Path(args.data).stem
    if args.max_items is not None and args.data is None:
        embeddings, item_ids = embeddings[: args.max_items], item_ids[: args.max_items]
        labels = labels[: args.max_items]
    if embeddings.shape[0] < 2:
        raise UserError(f"need at least 2 items to train, got {embeddings.shape[0]}")
    out_dir = _output_folder(out_dir)
    checkpoint = out_dir / "checkpoint.pt"
    if args.resume and not checkpoint.exists():
        raise UserError(f"--resume: no checkpoint at {checkpoint}")

    if args.method != "rqkmeans" and (args.balanced or args.beam_size > 1):
        raise UserError("--balanced and --beam-size apply to --method rqkmeans only")
    if args.balanced and args.beam_size > 1:
        raise UserError("--balanced assigns IDs jointly; it does not combine with --beam-size")
    torch.manual_seed(args.seed)
    model = _model_from_args(args, int(embeddings.shape[1]))
    device = resolve_device(args.device)
    if not args.resume:  # after every check of the options: --overwrite deletes the old run
        _claim_output_folder(out_dir, args.overwrite, "--resume to continue it, ")
    if args.method == "rqkmeans":
        if args.resume:
            raise UserError("--resume applies to --method rqvae only (RQ-KMeans has no epochs)")
        model.to(device)
        _say(f"fitting RQ-KMeans: {args.layers} layers x {model.codebook_sizes} codes on "
             f"{embeddings.shape[0]} items")
        model.fit(embeddings, iters=args.kmeans_iters, seed=args.seed, max_samples=args.init_samples)
        save_checkpoint(checkpoint, model.cpu())
        model.to(device)
    else:
        trainer = Trainer(model, _train_config(args), out_dir=out_dir, plot=args.plot, log=_say)
        _say(f"training RQ-VAE {embeddings.shape[1]} -> {args.latent_dim} on {trainer.device}: "
             f"{args.layers} layers x {model.codebook_sizes} codes, {args.epochs} epochs, batch "
             f"{args.batch_size}, {trainer.config.optimizer} lr {trainer.config.learning_rate:g}")
        result = trainer.fit(embeddings, resume_from=checkpoint if args.resume else None)
        model = result.model

    if args.method == "rqkmeans":
        codes = model.get_semantic_ids(embeddings, batch_size=65536, beam_size=args.beam_size,
                                       balanced=args.balanced).cpu().numpy()
    else:
        codes = model.get_semantic_ids(embeddings, batch_size=65536).cpu().numpy()
    summary = {"items": int(codes.shape[0]), "method": args.method, "config": model.config}
    if args.method == "rqkmeans":
        summary.update(balanced=args.balanced, beam_size=args.beam_size)
    lines = _id_report(codes, model.codebook_sizes, summary)
    if labels is not None:
        lines += _purity_report(codes, labels, level_names, summary)
    final = _final_codes(codes, args.no_dedup, summary)
    written = _write_outputs(out_dir, final, item_ids, args.format, summary)
    for line in lines:
        _say(line)
    if args.method == "rqvae":
        written.append(f"{out_dir / 'log.csv'} (per-epoch log)")
        if args.plot:
            written.append(out_dir / "training.png")
    _say(f"wrote {checkpoint} (model), " + ", ".join(str(p) for p in written))
    _say(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _skipped(rows: Sequence[int]) -> str:
    return f"skipped {describe_rows(rows)} holding NaN/Inf (--drop-nonfinite)"


def _output_folder(path) -> Path:
    """``path`` as a folder we may write to (created later, by the first output)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a folder")
    return path


# What a run writes into its --out folder (shards/ belongs to a torchrun 'encode' + 'merge').
RUN_OUTPUTS = ("checkpoint.pt", "codes.npy", "ids.csv", "ids.jsonl", "ids.parquet", "summary.json",
               "log.csv", "log.json", "training.png")


def _claim_output_folder(out_dir: Path, overwrite: bool, resume_hint: str = "") -> None:
    """Refuse a folder holding an earlier run's outputs, unless ``overwrite``: then delete them,
    so that no file of the earlier run stays mixed with the new one's."""
    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise UserError(f"--out {out_dir} holds the outputs of an earlier run "
                        f"({', '.join(found)}); pass --overwrite to replace them, {resume_hint}"
                        f"or choose another --out")
    for name in found:
        (out_dir / name).unlink()
    _say(f"--overwrite: removed the earlier run's {', '.join(found)} from {out_dir}")


def _open_source(args):
    """Open ``args.data`` with the input options; say how a CSV's first line was read."""
    source = open_embeddings(args.data, args.column, args.id_column, header=args.header)
    if args.header is not None and source.kind != "csv":
        raise UserError(f"--{'' if args.header else 'no-'}header applies to CSV/TSV files only, "
                        f"not {Path(args.data).name}")
    note = source.header_note()
    if note is not None:
        _say(note)
    return source


def _with_dedup(codes: np.ndarray) -> np.ndarray:
    from .semantic_ids import add_dedup_position

    return add_dedup_position(codes)


def _final_codes(codes: np.ndarray, no_dedup: bool, summary: dict) -> np.ndarray:
    """``codes`` with the dedup position appended unless ``no_dedup``; ``summary`` records which,
    so that 'stats' can tell the last column from a layer."""
    summary["dedup_position"] = not no_dedup
    return codes if no_dedup else _with_dedup(codes)


def _id_report(codes: np.ndarray, sizes: Sequence[int], summary: dict) -> List[str]:
    from .metrics import collision_stats, layer_stats, low_perplexity_warnings

    collisions = collision_stats(codes)
    layers = layer_stats(codes, sizes)
    summary["codebook_sizes"] = [int(k) for k in sizes]
    summary["collisions"] = collisions.as_dict()
    summary["layers"] = [vars(layer) for layer in layers]
    usage_text = ", ".join(f"layer {s.layer}: {s.used}/{s.size} used, perplexity {s.perplexity:.0f}"
                           for s in layers)
    skewed = low_perplexity_warnings([s.perplexity for s in layers], sizes, codes.shape[0])
    summary["warnings"] = skewed
    return [f"warning: {w}" for w in skewed] + [
        f"codes: {usage_text}",
        f"shared IDs: {collisions.colliding_share:.1%} of {collisions.items} items share their "
        f"{len(sizes)}-code ID with another item (largest group {collisions.largest_group}, "
        f"{collisions.unique_ids} distinct IDs); a last position 0, 1, 2, ... makes each ID unique",
    ]


def _purity_report(codes, labels, level_names, summary) -> List[str]:
    from .metrics import prefix_purity

    levels = prefix_purity(codes, labels.numpy(), level_names)
    summary["prefix_purity"] = [vars(level) for level in levels]
    lines = ["prefix purity (share of items whose ID prefix's majority category is their own; "
             "chance = same groups, shuffled labels):"]
    for level in levels:
        lines.append(f"  first {level.depth} code{'s' if level.depth > 1 else ' '} vs "
                     f"{level.level:<12} {level.purity:.3f}  (chance {level.chance:.3f}, "
                     f"{level.groups} prefixes)")
    return lines


def _write_outputs(out_dir: Path, codes: np.ndarray, item_ids: Sequence, fmt: str,
                   summary: Optional[dict]) -> List[Path]:
    """Stage codes.npy, ids.<fmt> and summary.json; all are renamed into place together at the end."""
    from .semantic_ids import table_format, token_strings, write_codes, write_table

    table_format(f"ids.{fmt}")
    paths = [out_dir / "codes.npy", out_dir / f"ids.{fmt}"]
    with contextlib.ExitStack() as stack:
        staged_codes = stack.enter_context(atomic_output(paths[0], suffix=".npy"))
        staged_table = stack.enter_context(atomic_output(paths[1], suffix=f".{fmt}"))
        write_codes(staged_codes, codes)
        write_table(staged_table, item_ids, codes, fmt)
        if summary is not None:
            paths.append(out_dir / "summary.json")
            staged_summary = stack.enter_context(atomic_output(paths[2]))
            summary["example_ids"] = dict(zip(map(str, item_ids[:3]), token_strings(codes[:3])))
            staged_summary.write_text(json.dumps(summary, indent=1, default=_json_default))
    return paths


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def _rank_and_world() -> tuple:
    """``(rank, world size)`` of this process: the default process group's if one is initialised,
    else torchrun's ``RANK`` / ``WORLD_SIZE`` environment, else ``(0, 1)``."""
    import os

    from . import distributed

    if distributed.world_size() > 1:
        return distributed.rank(), distributed.world_size()
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE in the environment are not integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} / WORLD_SIZE {world} in the environment are inconsistent")
    return rank, world


def _encode_device(name: str, world: int) -> torch.device:
    """``--device auto`` under torchrun: this process's GPU (``LOCAL_RANK``)."""
    import os

    from .trainer import resolve_device

    device = resolve_device(name)
    if name == "auto" and world > 1 and device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device = torch.device("cuda", local % torch.cuda.device_count())
    return device


def _encode_summary(items: int, checkpoint, data, dropped_rows: Sequence[int]) -> dict:
    return {"items": int(items), "checkpoint": str(checkpoint), "data": str(data),
            "dropped_rows": list(dropped_rows)[:1000]}


def cmd_encode(args) -> int:
    from .checkpoint import load_model
    from .semantic_ids import encode_source, shard_rows, write_shard

    started = time.perf_counter()
    out_dir = _output_folder(args.out or Path("runs") / f"{Path(args.data).stem}_ids")
    rank, world = _rank_and_world()
    if world == 1:
        _claim_output_folder(out_dir, args.overwrite)
    device = _encode_device(args.device, world)
    model = load_model(args.checkpoint, device=device)
    if args.beam_size > 1 and getattr(model, "kind", None) != "rqkmeans":
        raise UserError("--beam-size applies to RQ-KMeans checkpoints only")
    source = _open_source(args)
    rows = shard_rows(source.num_rows, rank, world) if world > 1 else None
    encode_started = time.perf_counter()
    encoded = encode_source(model, source, batch_size=args.batch_size, device=device,
                            drop_nonfinite=args.drop_nonfinite,
                            progress=not args.no_progress and rank == 0, rows=rows,
                            beam_size=args.beam_size)
    encode_seconds = time.perf_counter() - encode_started
    if world > 1:  # one shard per rank; 'merge' dedups globally and writes the outputs
        if encoded.dropped_rows:
            _say(f"rank {rank}: " + _skipped(encoded.dropped_rows))
        meta = {"rows": list(rows), "num_rows": source.num_rows, "checkpoint": str(args.checkpoint),
                "data": str(args.data), "format": args.format, "no_dedup": args.no_dedup,
                "codebook_sizes": list(model.codebook_sizes)}
        written = write_shard(out_dir / "shards", rank, world, encoded, meta)
        items = encoded.codes.shape[0]
        _say(f"rank {rank} of {world}: encoded rows [{rows[0]}, {rows[1]}) ({items} items) on "
             f"{device} in {encode_seconds:.1f} s; wrote {written[0]}; when all {world} ranks are "
             f"done: {PROG} merge {out_dir}")
        return 0
    if encoded.dropped_rows:
        _say(_skipped(encoded.dropped_rows))
    summary = _encode_summary(encoded.codes.shape[0], args.checkpoint, args.data,
                              encoded.dropped_rows)
    lines = _id_report(encoded.codes, model.codebook_sizes, summary)
    final = _final_codes(encoded.codes, args.no_dedup, summary)
    written = _write_outputs(out_dir, final, encoded.item_ids, args.format, summary)
    for line in lines:
        _say(line)
    items = encoded.codes.shape[0]
    _say(f"encoded {items} items on {device} in {encode_seconds:.1f} s "
         f"({items / max(encode_seconds, 1e-9):,.0f} items/s); wrote "
         + ", ".join(str(p) for p in written)
         + f"; done in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_merge(args) -> int:
    from .semantic_ids import read_shards

    started = time.perf_counter()
    out_dir = _output_folder(args.dir)
    codes, item_ids, metas = read_shards(out_dir / "shards")
    first = metas[0]
    dropped = [row for meta in metas for row in meta["dropped_rows"]]
    if dropped:
        _say(_skipped(dropped))
    if codes.shape[0] == 0:
        raise UserError(f"{first['data']}: every row holds NaN/Inf; nothing to encode")
    summary = _encode_summary(codes.shape[0], first["checkpoint"], first["data"], dropped)
    lines = _id_report(codes, first["codebook_sizes"], summary)
    final = _final_codes(codes, bool(first.get("no_dedup")), summary)
    written = _write_outputs(out_dir, final, item_ids, args.format or first.get("format", "csv"),
                             summary)
    for line in lines:
        _say(line)
    _say(f"merged {len(metas)} shards ({codes.shape[0]} items); wrote "
         + ", ".join(str(p) for p in written) + f"; done in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_stats(args) -> int:
    from .codes_layout import find_layout
    from .metrics import collision_stats, layer_stats

    path: Path = args.path
    if not path.exists():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return _checkpoint_stats(path, args.json)
    if suffix == ".npy":
        try:
            codes = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"{path}: not a readable .npy file ({exc})") from None
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise UserError(f"{path}: expected (items x positions) integer codes, got "
                            f"{codes.dtype} {codes.shape}")
        codes = np.asarray(codes)
    else:
        from .semantic_ids import read_table

        _, codes = read_table(path)
    if codes.shape[0] == 0:
        raise UserError(f"{path}: holds no IDs")
    layout = find_layout(path, codes)
    layer_codes = codes[:, :-1] if layout.dedup_position else codes
    layers = layer_stats(layer_codes, layout.codebook_sizes)
    collisions = collision_stats(layer_codes)
    prefixes = [collision_stats(layer_codes[:, :d]) for d in range(1, layer_codes.shape[1])]
    unique_with_dedup = collision_stats(codes).unique_ids if layout.dedup_position else None
    if args.json:
        print(json.dumps({"items": int(codes.shape[0]), "positions": int(codes.shape[1]),
                          "codebook_sizes": layout.codebook_sizes,
                          "dedup_position": layout.dedup_position,
                          "layout_source": layout.source, "layout_assumed": layout.assumed,
                          "layers": [vars(s) for s in layers],
                          "collisions": collisions.as_dict(),
                          "unique_ids_with_dedup": unique_with_dedup,
                          "prefix_groups": [p.unique_ids for p in prefixes]}, default=_json_default))
        return 0
    _say(f"{path}: {codes.shape[0]} items, {len(layers)} layers"
         + (" + a dedup position" if layout.dedup_position else ""))
    _say(("  assumed: " if layout.assumed else "  layout from ") + layout.source)
    for s in layers:
        _say(f"  layer {s.layer}: {s.used}/{s.size} codes used, perplexity {s.perplexity:.1f}")
    for depth, p in enumerate(prefixes, start=1):
        _say(f"  first {depth} code{'s' if depth > 1 else ''}: {p.unique_ids} distinct prefixes, "
             f"largest group {p.largest_group}")
    _say(f"  {len(layers)}-code ID: {collisions.unique_ids} distinct; shared IDs: "
         f"{collisions.colliding_share:.2%} of items share their ID with another item (largest "
         f"group {collisions.largest_group}); collision rate (1 - distinct / items) "
         f"{collisions.collision_rate:.2%}")
    if unique_with_dedup is not None:
        _say(f"  with the dedup position: {unique_with_dedup} distinct IDs")
    return 0


def _checkpoint_stats(path: Path, as_json: bool) -> int:
    from .checkpoint import load_checkpoint

    payload = load_checkpoint(path)
    trainer = payload.get("trainer") or {}
    info = {"config": payload["config"], "epochs_done": trainer.get("epoch"),
            "best_epoch": trainer.get("best_epoch"), "finished": trainer.get("finished"),
            "last_metrics": payload.get("metrics") or {}}
    if as_json:
        print(json.dumps(info, default=_json_default))
        return 0
    _say(f"{path}: {payload['config'].get('kind')} checkpoint, format v{payload['format_version']}")
    _say("  config: " + ", ".join(f"{k}={v}" for k, v in payload["config"].items() if k != "kind"))
    if trainer:
        _say(f"  epochs done: {trainer.get('epoch')}, best epoch: {trainer.get('best_epoch')}, "
             f"finished: {trainer.get('finished')}")
    metrics = payload.get("metrics") or {}
    shown = {k: v for k, v in metrics.items() if k != "warnings"}
    if shown:
        _say("  last epoch: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    for warning in metrics.get("warnings", []):
        _say(f"  warning: {warning}")
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    """Run ``rqvae_fast.bench.main(argv)`` (imported only now: it may pull in heavy modules)."""
    try:
        from . import bench
    except ImportError as exc:
        raise UserError(f"the benchmark module is not available in this installation ({exc})") from None
    result = bench.main(list(argv))
    return int(result or 0)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(argv)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one line ``rqvae-fast: warning: ...``; others as Python prints them."""
    if getattr(category, "__module__", "").startswith("rqvae_fast"):
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run(argv: List[str]) -> int:
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # unwritable folder, full disk, ...: the user's environment
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{PROG}: error: out of memory; use smaller --batch-size or --max-items",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
