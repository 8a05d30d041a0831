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


def _tensor_blocks(source: EmbeddingSource, batch_size: int, pin: bool):
    """``(start, (b, D) float32 tensor)`` blocks, pinned for fast host-to-GPU copies if ``pin``."""
    for start, block in source.iter_blocks(batch_size):
        tensor = torch.from_numpy(block)
        yield start, (tensor.pin_memory() if pin else tensor)


@torch.no_grad()
def encode_source(model, source: EmbeddingSource, *, batch_size: int = 65536, device=None,
                  drop_nonfinite: bool = False, progress: bool = True) -> EncodedIDs:
    """Codes ``(M, L)`` int64 of every row of ``source``, reading ``batch_size`` rows at a time.

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
    codes = np.empty((source.num_rows, num_layers), dtype=np.int64)
    bad: List[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=source.num_rows, desc="encoding", unit="item", unit_scale=True,
                   dynamic_ncols=True, leave=False)
    for start, block in _prefetch(_tensor_blocks(source, batch_size, device.type == "cuda")):
        x = block.to(device, non_blocking=True)
        ids = model.get_semantic_ids(x)
        # NaN/Inf inputs (checked on the device) and latents the quantizer could not use (-1)
        unusable = ~torch.isfinite(x).all(dim=1) | (ids < 0).any(dim=1)
        codes[start:start + x.shape[0]] = ids.cpu().numpy()
        rows = torch.nonzero(unusable).flatten().cpu().numpy()
        bad.extend((rows + start).tolist())
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if bad and not drop_nonfinite:
        raise nonfinite_error(source.path, bad)
    item_ids = source.item_ids if source.item_ids is not None else np.arange(source.num_rows)
    if bad:
        keep = np.ones(source.num_rows, dtype=bool)
        keep[bad] = False
        codes = codes[keep]
        item_ids = item_ids[keep] if isinstance(item_ids, np.ndarray) else \
            [item for item, k in zip(item_ids, keep) if k]
        if codes.shape[0] == 0:
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
    "read_table",
    "table_format",
    "token_string",
    "token_strings",
    "write_codes",
    "write_table",
]
