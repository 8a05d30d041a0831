"""Diagnostics for semantic IDs: code usage, perplexity, collisions, prefix purity, collapse causes.

All functions take codes as ``(N, L)`` integer arrays (NumPy or torch); ``-1`` marks a row that
was not quantized (NaN/Inf input) and is ignored by the per-layer statistics.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def _as_numpy(codes) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes[:, None]
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (N, L), got {codes.shape}")
    return codes


# ----------------------------------------------------------------------------------------------
# Per-layer usage
# ----------------------------------------------------------------------------------------------

def layer_counts(codes, sizes: Sequence[int]) -> List[np.ndarray]:
    """Per layer ``l``, a ``(sizes[l],)`` int64 count of how many rows chose each code."""
    codes = _as_numpy(codes)
    out = []
    for layer, size in enumerate(sizes):
        column = codes[:, layer]
        column = column[column >= 0]
        out.append(np.bincount(column, minlength=size)[:size].astype(np.int64))
    return out


def usage(counts) -> float:
    """Share of codes ``(K,)`` chosen at least once, in ``[0, 1]``."""
    counts = np.asarray(counts)
    return float((counts > 0).sum() / max(1, counts.size))


def perplexity(counts) -> float:
    """``exp(entropy)`` of the code distribution ``(K,)``: 1 when one code takes everything, K when
    all codes are used equally. 0 when nothing was counted."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


@dataclass
class LayerStats:
    """Usage of one layer's codebook."""

    layer: int
    size: int
    used: int
    usage: float
    perplexity: float


def layer_stats(codes, sizes: Sequence[int]) -> List[LayerStats]:
    """:class:`LayerStats` for every layer of ``codes (N, L)`` with codebook ``sizes``."""
    stats = []
    for layer, counts in enumerate(layer_counts(codes, sizes)):
        stats.append(LayerStats(layer, int(counts.size), int((counts > 0).sum()), usage(counts),
                                perplexity(counts)))
    return stats


# ----------------------------------------------------------------------------------------------
# Collisions of the full ID
# ----------------------------------------------------------------------------------------------

def row_keys(codes) -> np.ndarray:
    """One int64 key ``(N,)`` per row of ``codes (N, L)``: equal rows <=> equal keys.

    Packs the columns into one integer when their ranges allow, else ranks unique rows.
    """
    codes = _as_numpy(codes).astype(np.int64, copy=False)
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    low = codes.min(axis=0)
    spans = codes.max(axis=0) - low + 1
    if float(np.prod(spans.astype(np.float64))) < 2.0 ** 62:
        keys = np.zeros(codes.shape[0], dtype=np.int64)
        for column, span, base in zip(codes.T, spans, low):
            keys = keys * int(span) + (column - base)
        return keys
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


@dataclass
class CollisionStats:
    """How unique the full IDs are.

    - ``collision_rate``: ``1 - unique_ids / items`` (0 = every item has its own ID).
    - ``colliding_share``: share of items whose ID another item also has.
    - ``largest_group``: most items sharing one ID; ``colliding_groups``: IDs held by > 1 item.
    """

    items: int
    unique_ids: int
    collision_rate: float
    colliding_share: float
    largest_group: int
    colliding_groups: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def collision_stats(codes) -> CollisionStats:
    """:class:`CollisionStats` of the rows of ``codes (N, L)`` (rows with ``-1`` count too)."""
    codes = _as_numpy(codes)
    n = int(codes.shape[0])
    if n == 0:
        return CollisionStats(0, 0, 0.0, 0.0, 0, 0)
    _, counts = np.unique(row_keys(codes), return_counts=True)
    shared = counts[counts > 1]
    return CollisionStats(
        items=n,
        unique_ids=int(counts.size),
        collision_rate=1.0 - counts.size / n,
        colliding_share=float(shared.sum() / n),
        largest_group=int(counts.max()),
        colliding_groups=int(shared.size),
    )


# ----------------------------------------------------------------------------------------------
# Do ID prefixes follow a known hierarchy?
# ----------------------------------------------------------------------------------------------

def _purity(group_keys: np.ndarray, label_keys: np.ndarray) -> float:
    """Share of items carrying their group's most common label (``(N,)`` int64 keys each)."""
    if group_keys.size == 0:
        return 0.0
    order = np.lexsort((label_keys, group_keys))
    groups = group_keys[order]
    labels = label_keys[order]
    # Runs of equal (group, label) pairs, then the longest run inside each group.
    new_pair = np.ones(groups.size, dtype=bool)
    new_pair[1:] = (groups[1:] != groups[:-1]) | (labels[1:] != labels[:-1])
    starts = np.flatnonzero(new_pair)
    run_lengths = np.diff(np.append(starts, groups.size))
    run_groups = groups[starts]
    new_group = np.ones(run_groups.size, dtype=bool)
    new_group[1:] = run_groups[1:] != run_groups[:-1]
    majority = np.maximum.reduceat(run_lengths, np.flatnonzero(new_group))
    return float(majority.sum() / groups.size)


@dataclass
class PurityLevel:
    """Purity of ID prefixes of length ``depth`` against the true label of ``level``.

    ``purity``: share of items whose prefix group's majority label is their own label.
    ``chance``: the same for labels shuffled among the items (same group sizes), the baseline
    a meaningless ID would reach. ``groups``: number of distinct prefixes.
    """

    depth: int
    level: str
    purity: float
    chance: float
    groups: int


def prefix_purity(codes, labels, level_names: Optional[Sequence[str]] = None,
                  seed: int = 0) -> List[PurityLevel]:
    """Purity of each prefix depth ``d = 1..min(L, levels)`` against label column ``d - 1``.

    ``codes (N, L)``, ``labels (N, levels)`` integer. ``labels[:, d-1]`` should identify the node
    at level ``d`` globally (as :mod:`rqvae_fast.synthetic` does).
    """
    codes = _as_numpy(codes)
    labels = _as_numpy(labels)
    if codes.shape[0] != labels.shape[0]:
        raise ValueError(f"codes have {codes.shape[0]} rows but labels {labels.shape[0]}")
    rng = np.random.default_rng(seed)
    out = []
    for depth in range(1, min(codes.shape[1], labels.shape[1]) + 1):
        groups = row_keys(codes[:, :depth])
        target = labels[:, depth - 1].astype(np.int64)
        name = level_names[depth - 1] if level_names is not None else f"level {depth}"
        out.append(PurityLevel(depth, name, _purity(groups, target),
                               _purity(groups, rng.permutation(target)),
                               int(np.unique(groups).size)))
    return out


# ----------------------------------------------------------------------------------------------
# What probably went wrong (the seed's chapter 4)
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainingFacts:
    """What :func:`diagnose` looks at, gathered by the trainer after an epoch."""

    layer_usage: Sequence[float]
    codebook_sizes: Sequence[int]
    lr: float
    optimizer: str
    commitment_cost: float
    num_train_items: int
    recon_loss: float
    vq_loss: float
    data_variance: float = float("nan")
    relative_quant_error: float = float("nan")
    monitor: float = float("nan")  # the loss early stopping watches (validation total)
    previous_monitor: Sequence[float] = ()
    dead_code_reset: bool = True
    ema: bool = False
    settled: bool = True  # False in the first epochs: only divergence is reported then
    final: bool = True  # the run's last epoch: reconstruction and layer skew are judged only then
    layer_perplexity: Sequence[float] = ()  # per layer; empty: no perplexity check


COLLAPSE_USAGE = 0.10  # warn when a layer uses fewer than 10 % of its codes
MIN_PERPLEXITY_SHARE = 0.25  # ... or when its perplexity is below 25 % of min(size, items)


def low_perplexity_warnings(perplexities: Sequence[float], sizes: Sequence[int], items: int,
                            share: float = MIN_PERPLEXITY_SHARE,
                            skip: Sequence[int] = ()) -> List[str]:
    """One warning per layer (not in ``skip``) whose perplexity is below
    ``share * min(size, items)``: most items sit on a few codes (a skewed or collapsed layer; big,
    loose ID groups). Both methods use it: RQ-KMeans after ``fit``, the RQ-VAE after every
    settled epoch and after ``fit``."""
    warnings = []
    for layer, (ppl, size) in enumerate(zip(perplexities, sizes)):
        floor = share * min(int(size), max(1, int(items)))
        if ppl < floor and layer not in skip:
            warnings.append(f"skewed layer {layer}: perplexity {ppl:.1f} of {size} codes is below "
                            f"{share:.0%} of {min(int(size), int(items))}; most items share a few "
                            "codes (with RQ-KMeans use the default k-means method; with the RQ-VAE "
                            "see the collapse causes in docs/PIPELINE.md)")
    return warnings


def diagnose(facts: TrainingFacts, collapse_usage: float = COLLAPSE_USAGE) -> List[str]:
    """Warnings, each naming a symptom and its likely cause and fix (empty when all looks fine)."""
    warnings: List[str] = []
    total = facts.recon_loss + facts.vq_loss
    if not math.isfinite(total):
        warnings.append("loss is NaN/Inf: training diverged; the learning rate is the usual cause "
                        f"(now {facts.lr:g}): lower it, keep gradient clipping and a warm-up schedule")
        return warnings
    history = [v for v in facts.previous_monitor if math.isfinite(v)]
    current = facts.monitor
    if len(history) >= 2 and math.isfinite(current) and current > 1.5 * min(history):
        warnings.append(f"unstable training: loss {current:.4g} is "
                        f"{current / min(history):.1f}x its best "
                        f"({min(history):.4g}); lower the learning rate (now {facts.lr:g}), keep "
                        "gradient clipping, or use --ema codebooks")
    if not facts.settled:
        return warnings
    for layer, (share, size) in enumerate(zip(facts.layer_usage, facts.codebook_sizes)):
        if share >= collapse_usage:
            continue
        warnings.append(f"codebook collapse in layer {layer}: {share:.0%} of {size} codes used; "
                        f"likely cause: {_collapse_cause(facts, size)}")
    collapsed = {layer for layer, share in enumerate(facts.layer_usage) if share < collapse_usage}
    if facts.layer_perplexity and facts.final:  # early skew is routinely mended by dead-code resets
        warnings += low_perplexity_warnings(facts.layer_perplexity, facts.codebook_sizes,
                                            facts.num_train_items, skip=sorted(collapsed))
    if facts.final and math.isfinite(facts.data_variance) and facts.data_variance > 0:
        explained = 1.0 - facts.recon_loss / facts.data_variance
        if explained < 0.5:
            warnings.append(f"high reconstruction loss: only {max(0.0, explained):.0%} of the data "
                            "variance is reconstructed; train longer, or try a larger --latent-dim, "
                            "wider/deeper --hidden-dims, more layers, or a lower --beta")
    quant_warning = _quantization_warning(facts.relative_quant_error)
    if quant_warning:
        warnings.append(quant_warning)
    return warnings


def _quantization_warning(relative_error: float) -> str:
    """The warning for ``relative_error = sum ||z - z_q||^2 / sum ||z - mean(z)||^2`` (``""`` if fine).

    The ratio is not a share: above 1 the codes are farther from the latents than the latents'
    own mean is (codebooks left behind by an encoder that moved or shrank), so it is reported as
    such, never as "missing more than 100 % of the variance".
    """
    if not math.isfinite(relative_error) or relative_error <= 0.5:
        return ""
    if relative_error <= 1.0:
        return (f"high quantization loss: the codes leave {relative_error:.0%} of the latent "
                "variance unexplained; try a higher --beta, larger codebooks, or more data for "
                "the k-means initialization")
    return (f"high quantization loss: the codes are farther from the latents than the latents' "
            f"mean is (squared error {relative_error:.2f}x the latent variance, so they explain "
            "none of it); the encoder's output moved away from the codebooks or collapsed: lower "
            "the learning rate, raise --beta, keep dead-code reset on, or try --ema")


def _collapse_cause(facts: TrainingFacts, size: int) -> str:
    high_lr = facts.lr > (0.05 if facts.optimizer == "adagrad" else 1e-3)
    if high_lr:
        return (f"learning rate {facts.lr:g} too high for {facts.optimizer}; lower it "
                f"({'0.005-0.05' if facts.optimizer == 'adagrad' else '1e-4 to 1e-3'}) with a "
                "scheduler")
    if facts.num_train_items < 4 * size:
        return (f"only {facts.num_train_items} training items for {size} codes; use smaller "
                "codebooks or more data")
    if facts.commitment_cost < 0.25:
        return (f"commitment cost beta={facts.commitment_cost:g} is low; raise it toward 0.25-1.0")
    if not facts.dead_code_reset and not facts.ema:
        return "unused codes are never revived; enable dead-code reset or --ema codebooks"
    return ("encoder output concentrated in few regions; raise --beta (0.5-1.0), use --ema "
            "codebooks, or smaller codebooks")


__all__ = [
    "COLLAPSE_USAGE",
    "CollisionStats",
    "LayerStats",
    "MIN_PERPLEXITY_SHARE",
    "PurityLevel",
    "TrainingFacts",
    "collision_stats",
    "diagnose",
    "layer_counts",
    "layer_stats",
    "low_perplexity_warnings",
    "perplexity",
    "prefix_purity",
    "row_keys",
    "usage",
]
