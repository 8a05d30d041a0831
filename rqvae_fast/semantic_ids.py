"""Semantic IDs for a catalogue: streaming encoding, collision-free suffixes, export, lookup.

- :func:`encode_source` turns a file of embeddings into ``(N, L)`` codes batch by batch.
- :func:`add_dedup_position` appends TIGER's disambiguation position (0, 1, 2, ... among items
  sharing the same codes) so every item's ID is unique.
- :func:`token_string` writes an ID as ``<a_12><b_7><c_201><d_0>``.
- :func:`write_table` / :func:`write_codes` export atomically; :class:`SemanticIDIndex` maps IDs back
  to items.
"""
from __future__ import annotations

import csv
import json
import queue
import re
import string
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data import DataError, EmbeddingSource, UserError, atomic_output, nonfinite_error
from .metrics import row_keys

TABLE_FORMATS = ("csv", "jsonl", "parquet")
_WRITE_CHUNK = 100_000  # rows formatted at a time when writing tables
_TOKEN = re.compile(r"<([a-z]+)_(\d+)>")


# ----------------------------------------------------------------------------------------------
# Encoding a file in batches
# ----------------------------------------------------------------------------------------------

@dataclass
class EncodedIDs:
    """``codes (M, L)`` int64 for the kept rows, their ``item_ids`` (the id column's values, or the
    ``(M,)`` int64 row numbers when the file has none) and the ``dropped_rows``."""

    codes: np.ndarray
    item_ids: Sequence
    dropped_rows: List[int]


def _prefetch(blocks: Iterable, depth: int = 2):
    """Read the next blocks on a thread while the current one is encoded (I/O overlaps compute)."""
    buffer: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    failure: List[BaseException] = []
    stop = threading.Event()

    def produce():
        try:
            for item in blocks:
                if stop.is_set():
                    return
                buffer.put(item)
        except BaseException as exc:  # re-raised in the consumer
            failure.append(exc)
        finally:
            buffer.put(done)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                break
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                pass
            worker.join(timeout=0.05)
    if failure:
        raise failure[0]


def shard_rows(num_rows: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` of ``world_size``: contiguous splits of
    ``ceil(num_rows / world_size)`` rows (the last ones may be shorter or empty)."""
    per_rank = -(-num_rows // world_size)
    return min(num_rows, rank * per_rank), min(num_rows, (rank + 1) * per_rank)


def _range_blocks(source: EmbeddingSource, batch_size: int, lo: int, hi: int):
    """``(start - lo, block)`` for the rows ``[lo, hi)`` of ``source``: arrays are sliced, streamed
    formats skip the rows before ``lo`` and stop after ``hi``."""
    if source.kind in ("npy", "pt"):
        for start in range(lo, hi, batch_size):
            block = source._array[start:min(hi, start + batch_size)]
            if isinstance(block, torch.Tensor):
                block = block.detach().to(torch.float32).numpy()
            yield start - lo, np.array(block, dtype=np.float32, order="C", copy=True)
        return
    for start, block in source.iter_blocks(batch_size):
        stop = start + block.shape[0]
        if stop <= lo:
            continue
        if start >= hi:
            break
        a, b = max(start, lo), min(stop, hi)
        yield a - lo, np.ascontiguousarray(block[a - start:b - start])
        if stop >= hi:
            break


def _tensor_blocks(blocks, pin: bool):
    """``(start, (b, D) float32 tensor)`` blocks, pinned for fast host-to-GPU copies if ``pin``."""
    for start, block in blocks:
        tensor = torch.from_numpy(block)
        yield start, (tensor.pin_memory() if pin else tensor)


@torch.no_grad()
def encode_source(model, source: EmbeddingSource, *, batch_size: int = 65536, device=None,
                  drop_nonfinite: bool = False, progress: bool = True,
                  rows: Optional[Tuple[int, int]] = None, beam_size: int = 1) -> EncodedIDs:
    """Codes ``(M, L)`` int64 of every row of ``source``, reading ``batch_size`` rows at a time.

    ``beam_size > 1`` encodes by beam search (RQ-KMeans models only, see
    :func:`rqvae_fast.beam.beam_encode`). ``rows=(start, stop)`` encodes only those rows (one rank's shard, see :func:`shard_rows`);
    item ids and dropped row numbers stay those of the whole file.

    ``model`` is an :class:`~rqvae_fast.RQVAE` or :class:`~rqvae_fast.kmeans.RQKMeans` (anything
    with ``input_dim``, ``codebook_sizes`` and ``get_semantic_ids``). Reading, conversion and
    pinning run on a background thread while the device encodes the previous block, so memory
    holds a few blocks and the codes, never the whole file. Rows with NaN/Inf (or too large to
    encode) raise a :class:`DataError` naming them, after the whole file was read, or are skipped
    with ``drop_nonfinite``.
    """
    if source.dim != model.input_dim:
        raise UserError(f"{source.path}: rows are {source.dim}-d but the checkpoint's model expects "
                        f"{model.input_dim}-d (a checkpoint for another data set?)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    num_layers = len(model.codebook_sizes)
    lo, hi = (0, source.num_rows) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= lo <= hi <= source.num_rows:
        raise ValueError(f"rows {rows} outside the {source.num_rows} rows of {source.path}")
    codes = np.empty((hi - lo, num_layers), dtype=np.int64)
    bad: List[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=hi - lo, desc="encoding", unit="item", unit_scale=True,
                   dynamic_ncols=True, leave=False)
    if rows is None:
        blocks = source.iter_blocks(batch_size)
    else:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        blocks = _range_blocks(source, batch_size, lo, hi)
    for start, block in _prefetch(_tensor_blocks(blocks, device.type == "cuda")):
        x = block.to(device, non_blocking=True)
        ids = model.get_semantic_ids(x, beam_size=beam_size) if beam_size > 1 else \
            model.get_semantic_ids(x)
        # NaN/Inf inputs (checked on the device) and latents the quantizer could not use (-1)
        unusable = ~torch.isfinite(x).all(dim=1) | (ids < 0).any(dim=1)
        codes[start:start + x.shape[0]] = ids.cpu().numpy()
        flagged = torch.nonzero(unusable).flatten().cpu().numpy()
        bad.extend((flagged + start + lo).tolist())
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if bad and not drop_nonfinite:
        raise nonfinite_error(source.path, bad)
    item_ids = source.item_ids[lo:hi] if source.item_ids is not None else np.arange(lo, hi)
    if bad:
        keep = np.ones(hi - lo, dtype=bool)
        keep[np.asarray(bad) - lo] = False
        codes = codes[keep]
        item_ids = item_ids[keep] if isinstance(item_ids, np.ndarray) else \
            [item for item, k in zip(item_ids, keep) if k]
        if codes.shape[0] == 0 and rows is None:  # a shard may be all NaN; the merge checks
            raise DataError(f"{source.path}: every row holds NaN/Inf; nothing to encode")
    return EncodedIDs(codes, item_ids, bad)


# ----------------------------------------------------------------------------------------------
# Making IDs unique
# ----------------------------------------------------------------------------------------------

def dedup_position(codes) -> np.ndarray:
    """``(N,)`` int64: 0, 1, 2, ... among the rows of ``codes (N, L)`` sharing the same codes, in
    row order (the first item of a group gets 0)."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    keys = row_keys(codes)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.ones(keys.size, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(keys.size), 0))
    position = np.empty(keys.size, dtype=np.int64)
    position[order] = np.arange(keys.size) - group_start
    return position


def add_dedup_position(codes) -> np.ndarray:
    """``(N, L + 1)`` int64: ``codes (N, L)`` plus :func:`dedup_position` as the last column, so
    every row is unique."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes, dtype=np.int64)
    return np.concatenate([codes, dedup_position(codes)[:, None]], axis=1)


# ----------------------------------------------------------------------------------------------
# Token strings
# ----------------------------------------------------------------------------------------------

def _prefix(position: int) -> str:
    letters = string.ascii_lowercase
    name = ""
    position += 1
    while position:
        position, rest = divmod(position - 1, 26)
        name = letters[rest] + name
    return name


def token_string(codes: Sequence[int]) -> str:
    """``[12, 7, 201, 0]`` -> ``"<a_12><b_7><c_201><d_0>"`` (positions a, b, ..., z, aa, ...)."""
    return "".join(f"<{_prefix(i)}_{int(c)}>" for i, c in enumerate(codes))


def token_strings(codes) -> List[str]:
    """:func:`token_string` of every row of ``codes (N, L)``."""
    codes = np.asarray(codes)
    names = [_prefix(i) for i in range(codes.shape[1])]
    templates = "".join(f"<{n}_{{}}>" for n in names)
    return [templates.format(*row) for row in codes.tolist()]


def parse_token_string(text: str) -> Tuple[int, ...]:
    """``"<a_12><b_7>"`` -> ``(12, 7)``; ``ValueError`` if it is not a well-formed ID."""
    parts = _TOKEN.findall(text.strip())
    if not parts or "".join(f"<{p}_{c}>" for p, c in parts) != text.strip():
        raise ValueError(f"not a semantic ID token string: {text!r}")
    for i, (prefix, _) in enumerate(parts):
        if prefix != _prefix(i):
            raise ValueError(f"position {i} of {text!r} is {prefix!r}, expected {_prefix(i)!r}")
    return tuple(int(c) for _, c in parts)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def table_format(path, fmt: Optional[str] = None) -> str:
    """The table format named by ``fmt`` or by ``path``'s extension (``.csv``, ``.jsonl``, ...)."""
    if fmt is None:
        suffix = Path(path).suffix.lower().lstrip(".")
        fmt = {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet"}.get(suffix, suffix)
    if fmt not in TABLE_FORMATS:
        raise UserError(f"unknown table format {fmt!r}; use one of {', '.join(TABLE_FORMATS)}")
    return fmt


def write_codes(path, codes) -> Path:
    """Save ``codes (N, L)`` int64 as ``.npy``, atomically."""
    path = Path(path)
    with atomic_output(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(codes, dtype=np.int64))
    return path


def write_table(path, item_ids: Sequence, codes, fmt: Optional[str] = None) -> Path:
    """Write one row per item: ``item_id``, ``codes`` and ``semantic_id`` (token string), atomically.

    CSV stores codes space-separated; JSONL and Parquet as integer lists. Parquet needs pyarrow.
    """
    fmt = table_format(path, fmt)
    codes = np.asarray(codes, dtype=np.int64)
    if len(item_ids) != codes.shape[0]:
        raise ValueError(f"{len(item_ids)} item ids for {codes.shape[0]} rows of codes")
    path = Path(path)
    chunks = ((start, min(codes.shape[0], start + _WRITE_CHUNK))
              for start in range(0, codes.shape[0], _WRITE_CHUNK))
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("writing Parquet needs pyarrow: pip install pyarrow "
                            "(or use --format csv / jsonl)") from None
        schema = pa.schema([("item_id", pa.string()), ("codes", pa.list_(pa.int64())),
                            ("semantic_id", pa.string())])
        with atomic_output(path, suffix=".parquet") as tmp:
            with pq.ParquetWriter(tmp, schema) as writer:
                for lo, hi in chunks:
                    writer.write_table(pa.table(
                        {"item_id": [str(i) for i in item_ids[lo:hi]],
                         "codes": pa.array(codes[lo:hi].tolist(), type=pa.list_(pa.int64())),
                         "semantic_id": token_strings(codes[lo:hi])}, schema=schema))
        return path
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if fmt == "csv":
                writer.writerow(["item_id", "codes", "semantic_id"])
            for lo, hi in chunks:  # a chunk at a time: token strings never exist for all items
                rows = codes[lo:hi].tolist()
                tokens = token_strings(codes[lo:hi])
                if fmt == "csv":
                    writer.writerows([item, " ".join(map(str, row)), token]
                                     for item, row, token in zip(item_ids[lo:hi], rows, tokens))
                else:
                    handle.writelines(json.dumps({"item_id": str(item), "codes": row,
                                                  "semantic_id": token}) + "\n"
                                      for item, row, token in zip(item_ids[lo:hi], rows, tokens))
    return path


def read_table(path) -> Tuple[List[str], np.ndarray]:
    """``(item_ids, codes (N, L) int64)`` from a table written by :func:`write_table`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    fmt = table_format(path)
    ids: List[str] = []
    rows: List[List[int]] = []
    try:
        if fmt == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError("reading Parquet needs pyarrow: pip install pyarrow") from None
            table = pq.read_table(path, columns=["item_id", "codes"])
            ids = [str(v) for v in table.column("item_id").to_pylist()]
            rows = table.column("codes").to_pylist()
        elif fmt == "csv":
            with open(path, newline="", encoding="utf-8") as handle:
                for record in csv.DictReader(handle):
                    ids.append(record["item_id"])
                    rows.append([int(v) for v in record["codes"].split()])
        else:
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        record = json.loads(line)
                        ids.append(str(record["item_id"]))
                        rows.append([int(v) for v in record["codes"]])
    except (KeyError, ValueError, TypeError, csv.Error) as exc:
        raise DataError(f"{path}: not a semantic-ID table ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DataError(f"{path}: holds no IDs")
    if len({len(r) for r in rows}) != 1:
        raise DataError(f"{path}: rows have different numbers of codes")
    return ids, np.asarray(rows, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Shards of a catalogue encoded by several ranks
# ----------------------------------------------------------------------------------------------

_SHARD_META = re.compile(r"meta\.rank(\d+)-of-(\d+)\.json$")


def shard_paths(folder, rank: int, world_size: int, string_ids: bool = False) -> Dict[str, Path]:
    """``codes``, ``items`` and ``meta`` paths of one rank's shard in ``folder``."""
    folder, tag = Path(folder), f"rank{rank}-of-{world_size}"
    return {"codes": folder / f"codes.{tag}.npy",
            "items": folder / f"items.{tag}.{'json' if string_ids else 'npy'}",
            "meta": folder / f"meta.{tag}.json"}


def write_shard(folder, rank: int, world_size: int, encoded: EncodedIDs, meta: dict) -> List[Path]:
    """Write one rank's raw codes (no dedup position), item ids and ``meta``, each atomically; the
    meta file comes last and marks the shard complete."""
    string_ids = not isinstance(encoded.item_ids, np.ndarray)
    paths = shard_paths(folder, rank, world_size, string_ids)
    write_codes(paths["codes"], encoded.codes)
    if string_ids:
        with atomic_output(paths["items"]) as tmp:
            tmp.write_text(json.dumps([str(i) for i in encoded.item_ids]), encoding="utf-8")
    else:
        with atomic_output(paths["items"], suffix=".npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, np.asarray(encoded.item_ids, dtype=np.int64))
    meta = dict(meta, rank=rank, world_size=world_size, items=int(encoded.codes.shape[0]),
                positions=int(encoded.codes.shape[1]), dropped_rows=list(encoded.dropped_rows),
                string_ids=string_ids)
    with atomic_output(paths["meta"]) as tmp:
        tmp.write_text(json.dumps(meta), encoding="utf-8")
    return [paths["codes"], paths["items"], paths["meta"]]


def read_shards(folder) -> Tuple[np.ndarray, Sequence, List[dict]]:
    """``(codes (N, L), item_ids, metas)`` of all ranks' shards in ``folder``, in rank order.

    Raises a one-line :class:`UserError` when a shard is missing or the shards do not belong to
    one run (different world sizes, widths, data or checkpoints, rows not contiguous).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (run 'encode' under torchrun first)")
    worlds = sorted({int(m.group(2)) for m in map(_SHARD_META.match, (p.name for p in folder.iterdir()))
                     if m})
    if not worlds:
        raise UserError(f"{folder}: holds no encode shards (meta.rank*-of-*.json)")
    if len(worlds) > 1:
        raise UserError(f"{folder}: shards of runs with different world sizes "
                        f"({', '.join(map(str, worlds))}); delete the stale ones")
    world = worlds[0]
    metas: List[dict] = []
    codes_parts: List[np.ndarray] = []
    ids_parts: List = []
    for r in range(world):
        paths = shard_paths(folder, r, world)
        if not paths["meta"].exists():
            raise UserError(f"missing shard {paths['codes']} (rank {r} of {world} has not finished "
                            f"encoding)")
        try:
            meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{paths['meta']}: unreadable shard metadata ({exc})") from None
        paths = shard_paths(folder, r, world, bool(meta.get("string_ids")))
        for key in ("codes", "items"):
            if not paths[key].exists():
                raise UserError(f"missing shard {paths[key]}")
        try:
            codes = np.load(paths["codes"], allow_pickle=False)
            if meta.get("string_ids"):
                ids = json.loads(paths["items"].read_text(encoding="utf-8"))
            else:
                ids = np.load(paths["items"], allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{paths['codes'].parent}: unreadable shard of rank {r} ({exc})") from None
        first = metas[0] if metas else meta
        if codes.ndim != 2 or codes.shape[0] != len(ids) or codes.shape[0] != meta.get("items"):
            raise UserError(f"{paths['codes']}: {codes.shape} codes for {len(ids)} item ids; "
                            f"a damaged shard, re-run rank {r}")
        if codes.shape[1] != first["positions"]:
            raise UserError(f"{paths['codes']}: {codes.shape[1]} codes per item, rank 0 has "
                            f"{first['positions']}; shards of different runs")
        for key in ("data", "checkpoint", "num_rows", "string_ids"):
            if meta.get(key) != first.get(key):
                raise UserError(f"{paths['meta']}: {key} {meta.get(key)!r} differs from rank 0's "
                                f"{first.get(key)!r}; shards of different runs")
        expected_start = metas[-1]["rows"][1] if metas else 0
        if meta["rows"][0] != expected_start:
            raise UserError(f"{paths['meta']}: starts at row {meta['rows'][0]}, expected "
                            f"{expected_start}; shards of different runs")
        metas.append(meta)
        codes_parts.append(codes.astype(np.int64, copy=False))
        ids_parts.append(ids)
    if metas[-1]["rows"][1] != metas[0]["num_rows"]:
        raise UserError(f"{folder}: shards cover {metas[-1]['rows'][1]} of "
                        f"{metas[0]['num_rows']} rows; shards of different runs")
    codes = np.concatenate(codes_parts, axis=0)
    if metas[0].get("string_ids"):
        item_ids: Sequence = [i for part in ids_parts for i in part]
    else:
        item_ids = np.concatenate(ids_parts).astype(np.int64, copy=False)
    return codes, item_ids, metas


class SemanticIDIndex:
    """Map semantic IDs back to items: ``index[(12, 7, 201, 0)]`` or ``index["<a_12>...<d_0>"]``.

    Built from ``codes (N, L)`` and ``item_ids`` (length N); IDs must be unique (add the
    disambiguation position first). :meth:`with_prefix` lists the items under a prefix.
    """

    def __init__(self, codes, item_ids: Sequence):
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != len(item_ids):
            raise ValueError(f"codes {codes.shape} do not match {len(item_ids)} item ids")
        self.codes = codes
        self.item_ids = list(item_ids)
        self._by_id: Dict[Tuple[int, ...], object] = {}
        for row, item in zip(map(tuple, codes.tolist()), self.item_ids):
            if row in self._by_id:
                raise ValueError(f"ID {token_string(row)} is held by items {self._by_id[row]!r} and "
                                 f"{item!r}; add the disambiguation position first")
            self._by_id[row] = item

    @classmethod
    def load(cls, path) -> "SemanticIDIndex":
        """From a table written by :func:`write_table`."""
        ids, codes = read_table(path)
        return cls(codes, ids)

    def _key(self, semantic_id: Union[str, Sequence[int]]) -> Tuple[int, ...]:
        if isinstance(semantic_id, str):
            return parse_token_string(semantic_id)
        return tuple(int(c) for c in semantic_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, semantic_id) -> bool:
        return self._key(semantic_id) in self._by_id

    def __getitem__(self, semantic_id):
        key = self._key(semantic_id)
        try:
            return self._by_id[key]
        except KeyError:
            raise KeyError(f"no item has ID {token_string(key)}") from None

    def get(self, semantic_id, default=None):
        return self._by_id.get(self._key(semantic_id), default)

    def with_prefix(self, prefix: Union[str, Sequence[int]]) -> List:
        """Items whose ID starts with ``prefix`` (codes or a token string), in table order."""
        key = np.asarray(self._key(prefix), dtype=np.int64)
        if key.size > self.codes.shape[1]:
            return []
        match = (self.codes[:, : key.size] == key).all(axis=1)
        return [self.item_ids[i] for i in np.flatnonzero(match)]


__all__ = [
    "EncodedIDs",
    "SemanticIDIndex",
    "add_dedup_position",
    "dedup_position",
    "encode_source",
    "parse_token_string",
    "read_shards",
    "read_table",
    "shard_paths",
    "shard_rows",
    "table_format",
    "token_string",
    "token_strings",
    "write_codes",
    "write_shard",
    "write_table",
]
