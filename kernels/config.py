"""Launch configurations: the one table the launchers use and the compile report checks.

Everything a launcher may launch is a function of ``(kernel, D, precision, with_stats, routing,
arch family)`` and is enumerated by :func:`launch_configs`, so the offline gate
(``python -m rqvae_fast.kernels.report``) compiles exactly what runs. The table is fixed without
running anything (no autotuning), chosen from that report:

- the embedding dim is cut into chunks of ``BLOCK_DC`` columns (64, 32 or 16: the widest allowed
  that divides ``D`` rounded up to 16, the narrowest ``tl.dot`` operand), so ``D`` pads at most to the
  next multiple of 16 (768 = 12 x 64, 48 = 3 x 16, 1000 -> 1008 = 63 x 16);
- 64 rows per tile at every D: tensor cores (``wgmma`` needs 64 rows per warpgroup) and a
  register footprint that does not grow with D (see :func:`forward_tiles`).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import triton

_TRITON_RELEASE = tuple(int(p) for p in triton.__version__.split(".")[:2])

KERNELS = ("forward", "input_grad", "beam")
ARCHS = ("sm80", "sm90")
DOT_MIN_WIDTH = 16
CHUNK_WIDTHS = (64, 32, 16)
MAX_REGISTERS = 255


class TileConfig(NamedTuple):
    block_m: int      # rows per tile
    block_k: int      # codes per distance tile
    block_dc: int     # embedding columns per chunk
    num_chunks: int   # chunks per row: ceil(D / block_dc); D pads to num_chunks * block_dc
    num_warps: int
    num_stages: int
    # ``.maxnreg`` for ptxas: without it ptxas may cap registers below 255 on its own (for
    # occupancy) and spill; the report showed 4-32 B spills at 128-168 registers otherwise.
    max_registers: Optional[int] = None

    @property
    def padded_dim(self) -> int:
        return self.block_dc * self.num_chunks


class LaunchConfig(NamedTuple):
    kernel: str                 # "forward" | "input_grad"
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    max_registers: Optional[int] = None

    def options(self) -> Dict[str, int]:
        """Launch/compile options (``num_warps``, ``num_stages``, ``maxnreg`` where set)."""
        return launch_options(self)


def padded_dim(dim: int) -> int:
    """``dim`` rounded up to the dot's minimum operand width."""
    return max(DOT_MIN_WIDTH, -(-dim // DOT_MIN_WIDTH) * DOT_MIN_WIDTH)


def chunk_width(dim: int, widest: int = CHUNK_WIDTHS[0]) -> int:
    """The widest of ``CHUNK_WIDTHS`` (at most ``widest``) dividing :func:`padded_dim`."""
    padded = padded_dim(dim)
    return next(w for w in CHUNK_WIDTHS if w <= widest and padded % w == 0)


def arch_family(capability_major: int) -> str:
    """``"sm90"`` for Hopper and newer, ``"sm80"`` for Ampere (the table's two columns)."""
    return "sm90" if capability_major >= 9 else "sm80"


def forward_tiles(dim: int, precision: str, arch: str, grouped: bool = False, cosine: bool = False) -> TileConfig:
    """Tiles of the fused forward, per (precision, arch family); chosen with the compile report
    (zero spills, tensor cores for tf32/bf16 at every D, at most 255 registers at 4 warps).

    - ``"ieee"`` (FMA dot): 64 x 16 score tiles, chunks of at most 32 columns (16 on sm_80); one
      pipeline stage except sm_90a's single-chunk rows.
    - ``"exact"``: the ``"ieee"`` tiles on purpose -- its rescans must reproduce the plain exact
      path bit for bit, so they run the same tile shapes and chunk order.
    - ``"tf32"``/``"bf16"``: 64 x 64 score tiles (``BLOCK_M = 64`` feeds one m64 ``wgmma`` per
      warpgroup on sm_90a), chunks of up to 64 columns (32 on sm_80, whose ``mma`` operands live in
      registers); one pipeline stage once rows are re-read from the scratch.
    - sm_80 runs the scratch path (several chunks) with 8 warps: at 4 it spills a few bytes.
      Either way two warpgroups' worth of warps are resident per SM at 255 registers.
    """
    tiles = _forward_tiles(dim, precision, arch)
    if grouped:  # the group offsets cost registers: a few of sm_80's tightest rows spill otherwise
        family = "ieee" if precision == "exact" else precision
        tiles = tiles._replace(**_GROUPED_TILES.get((arch, family, padded_dim(dim)), {}))
    if cosine:  # the epilogue's normalised row costs registers too
        family = "ieee" if precision == "exact" else precision
        tiles = tiles._replace(**_COSINE_TILES.get((arch, family, padded_dim(dim)), {}))
    return tiles


# Grouped forward (G > 1) exceptions found by the compile report, (arch, precision, padded D) ->
# TileConfig fields ("ieee" covers "exact"): each spilled with the ungrouped tiles. Only BLOCK_K
# changes: scores, tie rules and so indices do not depend on it.
# Register allocation moves between Triton releases: Triton 3.8 (the newest pip resolves beside
# torch 2.14) and 3.9 spill on different sm_80 D 192 rows, hence the release-dependent entries.
_NEW_TRITON = _TRITON_RELEASE >= (3, 9)
_GROUPED_TILES = {("sm80", "bf16", 128): dict(block_k=32),
                  ("sm80", "ieee", 192): dict(block_k=32) if _NEW_TRITON else {},
                  ("sm80", "tf32", 192): {} if _NEW_TRITON else dict(num_warps=4)}


# Cosine-epilogue forward exceptions, the same way (compile report, rows "cosine"): bf16 on sm_90a
# needs 8 warps (Triton 3.8 spilled 100-216 B at 4 warps, 3.9 from D 384 on).
_COSINE_TILES = {("sm90", "tf32", 192): dict(block_k=32),
                 **{("sm90", "bf16", d): dict(num_warps=8) for d in (128, 192, 256)},
                 **{("sm90", "bf16", d): dict(block_k=32, num_warps=8) for d in (384, 512, 768, 1024)}}


def _forward_tiles(dim: int, precision: str, arch: str) -> TileConfig:
    _check(dim, arch)
    if precision in ("ieee", "exact"):
        width = chunk_width(dim, _IEEE_WIDEST.get((arch, padded_dim(dim)), 32 if arch == "sm90" else 16))
        chunks = padded_dim(dim) // width
        warps = _WARPS.get((arch, "ieee", padded_dim(dim)), _warps(arch, chunks))
        return TileConfig(block_m=64, block_k=16, block_dc=width, num_chunks=chunks, num_warps=warps,
                          num_stages=2 if chunks == 1 and arch == "sm90" else 1,
                          max_registers=MAX_REGISTERS)
    if precision not in ("tf32", "bf16"):
        raise ValueError(f"precision must be one of ieee, tf32, bf16, exact; got {precision!r}")
    width = chunk_width(dim, 64 if arch == "sm90" else 32)
    chunks = padded_dim(dim) // width
    return TileConfig(block_m=64, block_k=64, block_dc=width, num_chunks=chunks,
                      num_warps=_WARPS.get((arch, precision, padded_dim(dim)), _warps(arch, chunks)),
                      num_stages=2 if chunks == 1 else 1,
                      max_registers=MAX_REGISTERS)


# Exceptions found by the compile report, (arch, precision, padded D) -> warps ("ieee" covers "exact":
# same tiles). Each spilled 4 B at 8 warps and compiles clean at 4 with Triton 3.8 (torch 2.14.1's) and 3.9.
_WARPS = {("sm80", "ieee", 64): 4, ("sm80", "ieee", 256): 4, ("sm80", "bf16", 192): 4}
# ptxas differs between releases: sm_80's exact search at D 192 spills with 16-column chunks under
# Triton 3.8 and with 32-column chunks under 3.9, so the widest chunk there depends on the release.
_IEEE_WIDEST = {("sm80", 192): 32} if _TRITON_RELEASE < (3, 9) else {}


def _warps(arch: str, chunks: int) -> int:
    """4 warps (one warpgroup), except sm_80's scratch path (several chunks), which spills at 4."""
    return 8 if arch == "sm80" and chunks > 1 else 4


def launch_options(cfg) -> Dict[str, int]:
    """``num_warps``/``num_stages``/``maxnreg`` of a :class:`TileConfig` or :class:`LaunchConfig`."""
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.max_registers is not None:
        opts["maxnreg"] = cfg.max_registers
    return opts


def input_grad_tiles(dim: int, arch: str) -> TileConfig:
    """Tiles of the elementwise input-gradient pass: a 2-D grid of (64 rows) x (chunk) tiles."""
    _check(dim, arch)
    width = chunk_width(dim)
    return TileConfig(block_m=64, block_k=1, block_dc=width, num_chunks=padded_dim(dim) // width,
                      num_warps=4, num_stages=1)


def forward_constexprs(tiles: TileConfig, *, num_layers: int, routing: int, precision: str,
                       with_stats: bool, emulate: bool, grouped: bool = False,
                       cosine: int = 0) -> Dict[str, object]:
    """The forward kernel's compile-time arguments (launcher and report build them here).
    ``grouped``: G > 1 column groups in one launch (``GROUPED``; G = 1 compiles without it);
    ``cosine``: the cosine-codebook epilogue (``COSINE``: 0 off, 1 or 2, see the launcher)."""
    search = "tf32x3" if precision == "exact" else precision
    return dict(NUM_LAYERS=num_layers, ROUTING=routing, WITH_STATS=with_stats, SEARCH=search,
                EXACT=precision == "exact", EMULATE=emulate, BLOCK_M=tiles.block_m,
                BLOCK_K=tiles.block_k, BLOCK_DC=tiles.block_dc, NUM_DC=tiles.num_chunks,
                GROUPED=grouped, COSINE=cosine)


def input_grad_constexprs(tiles: TileConfig, *, num_layers: int, commit_layers: int,
                          has_grad_out: bool) -> Dict[str, object]:
    return dict(NUM_LAYERS=num_layers, COMMIT_LAYERS=commit_layers, HAS_GRAD_OUT=has_grad_out,
                BLOCK_M=tiles.block_m, BLOCK_D=tiles.block_dc)


# --- beam search (kernels/beam_search.py) -----------------------------------------------------
MAX_BEAM = 8
BEAM_SIZES = tuple(range(2, MAX_BEAM + 1))  # what residual_quantize launches (1 is the greedy kernel)
BEAM_PRECISIONS = ("ieee", "tf32", "bf16")
BEAM_PATH_ROWS = 64  # rows x beam per tile: the dot's M, as the forward's 64 rows


def beam_tiles(dim: int, precision: str, arch: str, beam_size: int) -> TileConfig:
    """Tiles of the beam-search kernel: ``64 / B_pad`` rows x ``B_pad`` paths (``B`` rounded up
    to a power of two) = 64 path rows per dot; score tiles of 16 codes (``"ieee"``) or 32 codes
    (tf32/bf16, tensor cores); chunks of D as the forward's, except that tf32/bf16 rows wider than
    one chunk use half-width chunks (sm_90a's 64-column chunks spilled 8 B at D 768, beam 4); 4
    warps, one stage. Chosen with the compile report (zero spills; see ``_path_scores`` in
    ``kernels/beam_search.py`` for why its chunk loop has a runtime trip count)."""
    _check(dim, arch)
    if precision not in BEAM_PRECISIONS:
        raise ValueError(f"precision must be one of {BEAM_PRECISIONS}, got {precision!r}")
    if not 1 <= beam_size <= MAX_BEAM:
        raise ValueError(f"beam_size must be in [1, {MAX_BEAM}], got {beam_size}")
    pad = 1 << (beam_size - 1).bit_length()
    if precision == "ieee":
        width, block_k = chunk_width(dim, 32 if arch == "sm90" else 16), 16
    else:  # one chunk of up to 64 (sm_90a) / 32 (sm_80) columns, half that once rows span several
        widest = 64 if arch == "sm90" else 32
        width = chunk_width(dim, widest if padded_dim(dim) <= widest else widest // 2)
        block_k = 32
    return TileConfig(block_m=BEAM_PATH_ROWS // pad, block_k=block_k, block_dc=width,
                      num_chunks=padded_dim(dim) // width, num_warps=4, num_stages=1,
                      max_registers=MAX_REGISTERS)


def beam_constexprs(tiles: TileConfig, *, num_layers: int, beam_size: int, precision: str,
                    emulate: bool, weighted: bool = False) -> Dict[str, object]:
    """The beam kernel's compile-time arguments (launcher and report build them here);
    ``weighted``: vector-quantize-pytorch's per-layer score ranking (``WEIGHTED``)."""
    return dict(NUM_LAYERS=num_layers, BEAM=beam_size, BEAM_PAD=1 << (beam_size - 1).bit_length(),
                WEIGHTED=weighted,
                SEARCH=precision, EMULATE=emulate, BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_k,
                BLOCK_DC=tiles.block_dc, NUM_DC=tiles.num_chunks)


def launch_configs(kernel: str, dim: int, precision: str, with_stats: bool, routing: int,
                   arch: str, num_layers: int = 3, grouped: bool = False,
                   cosine: int = 0, beam_sizes=BEAM_SIZES,
                   beam_weighted=(False, True)) -> List[LaunchConfig]:
    """Every launch a launcher can make for these arguments on a GPU of family ``arch``.

    ``input_grad`` ignores precision and stats; its launches differ by routing (which layers'
    commitment terms reach the input) and by whether an output gradient is given (its group
    offsets are runtime values: one compile for every G). ``grouped``: the forward over G > 1
    column groups (``residual_quantize_grouped``), a variant of its own; ``cosine``: the forward
    with the cosine-codebook epilogue (``compat.ResidualVQ(use_cosine_sim=True)``, layer_ste routing).
    ``beam`` ignores stats and routing; its launches differ by beam size (``beam_sizes``, default
    :data:`BEAM_SIZES`) and ranking (``beam_weighted``: ``False`` final error, ``True`` the
    per-layer weighted scores of vector-quantize-pytorch).
    """
    if kernel == "beam":
        configs = []
        for beam in beam_sizes:
            for weighted in beam_weighted:
                tiles = beam_tiles(dim, precision, arch, beam)
                consts = beam_constexprs(tiles, num_layers=num_layers, beam_size=beam, precision=precision,
                                         emulate=False, weighted=weighted)
                configs.append(LaunchConfig(kernel, consts, tiles.num_warps, tiles.num_stages,
                                            tiles.max_registers))
        return configs
    if kernel == "forward":
        tiles = forward_tiles(dim, precision, arch, grouped=grouped, cosine=bool(cosine))
        consts = forward_constexprs(tiles, num_layers=num_layers, routing=routing,
                                    precision=precision, with_stats=with_stats, emulate=False,
                                    grouped=grouped, cosine=cosine)
        return [LaunchConfig(kernel, consts, tiles.num_warps, tiles.num_stages, tiles.max_registers)]
    if kernel == "input_grad":
        tiles = input_grad_tiles(dim, arch)
        commit = 1 if routing == 0 else num_layers
        return [LaunchConfig(kernel, input_grad_constexprs(tiles, num_layers=num_layers,
                                                           commit_layers=commit, has_grad_out=g),
                             tiles.num_warps, tiles.num_stages) for g in (True, False)]
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _check(dim: int, arch: str) -> None:
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
