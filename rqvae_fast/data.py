"""Reading item embeddings from files, in batches, with checks that give one-line errors.

Formats (chosen by extension):

- ``.npy``: a 2-D float array, opened with ``np.load(mmap_mode="r")`` (never read in full).
- ``.pt`` / ``.pth``: a 2-D float tensor, or a dict holding one (``column`` names the key, else
  ``"embeddings"`` or the only tensor), opened with ``torch.load(mmap=True)``.
- ``.csv`` / ``.tsv``: either one column holding a whole vector (``"0.1 0.2"``, ``"[0.1, 0.2]"``,
  named by ``column``) or one numeric column per dimension (all columns but ``id_column``).
  Read line by line with the ``csv`` module; pandas is not needed. The first line is a header
  when any of its fields is not a number (``header=None``), or as forced by ``header=True/False``;
  without a header, columns are named by position: ``"0"``, ``"1"``, ...
- ``.parquet``: one list-of-floats column (``column``), read by row groups; needs ``pyarrow``.

Every reader yields ``(start_row, block)`` with ``block`` a C-contiguous ``(b, D)`` float32 array.
Also here: :class:`UserError` (what the CLI turns into a one-line message) and :func:`atomic_output`.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

SUPPORTED_SUFFIXES = (".npy", ".pt", ".pth", ".csv", ".tsv", ".parquet")


class UserError(Exception):
    """A mistake in what the user passed (file, option, data): reported as one line, no traceback."""


class DataError(UserError):
    """An input file that cannot be used as item embeddings."""


# ----------------------------------------------------------------------------------------------
# Writing outputs without leaving half-written files behind
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output(path, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step.

    On any exception the temporary file is removed and ``path`` is left as it was. ``suffix`` is
    kept on the temporary name for writers that insist on an extension (``np.save`` adds ``.npy``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix,
                                    dir=str(path.parent))
    os.close(fd)
    tmp = Path(tmp_name)
    with contextlib.suppress(OSError):  # mkstemp makes 0600 files; give the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

@dataclass
class EmbeddingSource:
    """A readable file of ``num_rows`` item embeddings of width ``dim``.

    ``item_ids`` holds the id column (CSV/Parquet with ``id_column``), else ``None`` (row numbers).
    CSV only: ``has_header`` says whether the first line was read as column names, and
    ``header_detected`` whether that was decided from the file (not forced by the caller).
    """

    path: Path
    kind: str
    num_rows: int
    dim: int
    column: Optional[str] = None
    id_column: Optional[str] = None
    item_ids: Optional[List[str]] = None
    has_header: Optional[bool] = None
    header_detected: bool = False
    _array: object = field(default=None, repr=False)

    def header_note(self) -> Optional[str]:
        """One line saying how a CSV's first line was read (``None`` for other formats)."""
        if self.kind != "csv":
            return None
        how = "detected" if self.header_detected else "as requested"
        if self.has_header:
            return (f"{self.path}: first line read as a header ({how}; "
                    f"{self.num_rows} data rows); pass --no-header if it holds data")
        return (f"{self.path}: no header row ({how}); all {self.num_rows} lines are items, "
                "columns named by position 0, 1, ...")

    def iter_blocks(self, batch_size: int) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(start_row, block (b, D) float32)`` in file order, ``b <= batch_size``."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if self.kind in ("npy", "pt"):
            for start in range(0, self.num_rows, batch_size):
                stop = min(self.num_rows, start + batch_size)
                block = self._array[start:stop]
                if isinstance(block, torch.Tensor):
                    block = block.detach().to(torch.float32).numpy()
                # an owned copy: the file is read here (on the caller's prefetch thread, if any)
                yield start, np.array(block, dtype=np.float32, order="C", copy=True)
        elif self.kind == "csv":
            yield from _iter_csv(self, batch_size)
        elif self.kind == "parquet":
            yield from _iter_parquet(self, batch_size)
        else:  # pragma: no cover - guarded by open_embeddings
            raise DataError(f"{self.path}: unsupported format {self.kind!r}")


def open_embeddings(path, column: Optional[str] = None, id_column: Optional[str] = None,
                    header: Optional[bool] = None) -> EmbeddingSource:
    """Open ``path`` for batched reading after checking it exists, is 2-D, float and non-empty.

    ``header`` (CSV/TSV only): ``None`` detects a header row, ``True`` / ``False`` force it.

    Raises :class:`DataError` (a :class:`UserError`) with a one-line message otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file of embeddings")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        source = _open_npy(path)
    elif suffix in (".pt", ".pth"):
        source = _open_pt(path, column)
    elif suffix in (".csv", ".tsv"):
        source = _open_csv(path, column, id_column, header)
    elif suffix == ".parquet":
        source = _open_parquet(path, column, id_column)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                        f"use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if source.num_rows == 0:
        raise DataError(f"{path}: holds no rows")
    if source.dim == 0:
        raise DataError(f"{path}: rows have no values (dimension 0)")
    return source


def _check_matrix(path: Path, shape: Tuple[int, ...], dtype_name: str, is_float: bool) -> None:
    if len(shape) != 2:
        hint = " (a single vector? reshape it to (1, D))" if len(shape) == 1 else ""
        raise DataError(f"{path}: expected a 2-D array (items x dims), got shape {tuple(shape)}{hint}")
    if not is_float:
        raise DataError(f"{path}: expected floating-point embeddings, got dtype {dtype_name}")


def _open_npy(path: Path) -> EmbeddingSource:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds Python objects, expected a numeric array") from None
        raise DataError(f"{path}: not a readable .npy file ({_first_line(exc)})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({_first_line(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: not a .npy array")
    _check_matrix(path, array.shape, str(array.dtype), np.issubdtype(array.dtype, np.floating))
    return EmbeddingSource(path, "npy", int(array.shape[0]), int(array.shape[1]), _array=array)


def _open_pt(path: Path, column: Optional[str]) -> EmbeddingSource:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as exc:  # torch raises many types for a bad file
        raise DataError(f"{path}: not a readable torch file ({_first_line(exc)})") from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        key = column or ("embeddings" if "embeddings" in tensors else None)
        if key is None and len(tensors) == 1:
            key = next(iter(tensors))
        if key is None or key not in tensors:
            raise DataError(f"{path}: a dict without tensor {column or 'embeddings'!r}; "
                            f"pass --column (tensors: {', '.join(map(str, tensors)) or 'none'})")
        obj = tensors[key]
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path}: holds a {type(obj).__name__}, expected a tensor of embeddings")
    _check_matrix(path, tuple(obj.shape), str(obj.dtype).replace("torch.", ""),
                  obj.is_floating_point())
    return EmbeddingSource(path, "pt", int(obj.shape[0]), int(obj.shape[1]), column=column,
                           _array=obj)


# ---- CSV ---------------------------------------------------------------------------------------

def _csv_dialect(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _parse_vector(text: str) -> List[float]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = text.replace(",", " ").replace(";", " ").split()
    return [float(p) for p in parts]


def _is_number_field(text: str) -> bool:
    """True for a field that is a number or a whole vector of numbers (``"0.1 0.2"``)."""
    try:
        return len(_parse_vector(text)) > 0
    except ValueError:
        return False


def looks_like_header(first_row: Sequence[str]) -> bool:
    """A CSV's first row is a header when any of its fields does not parse as a number."""
    return any(not _is_number_field(field) for field in first_row)


def _csv_layout(path: Path, names: List[str], column: Optional[str], id_column: Optional[str],
                has_header: bool):
    """Which columns hold the vector: ``(vector_col or None, feature_cols, id_col or None)``."""
    def missing(what: str, name: str) -> DataError:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        hint = ("; a file without a header row? pass --no-header and name columns by position "
                "0, 1, ..." if has_header else "; without a header, columns are named 0, 1, ...")
        return DataError(f"{path}: no {what} {name!r} (columns: {shown}){hint}")

    if id_column is not None and id_column not in names:
        raise missing("id column", id_column)
    id_index = names.index(id_column) if id_column is not None else None
    if column is not None:
        if column not in names:
            raise missing("column", column)
        return names.index(column), None, id_index
    features = [i for i in range(len(names)) if i != id_index]
    return None, features, id_index


def _open_csv(path: Path, column: Optional[str], id_column: Optional[str],
              header: Optional[bool] = None) -> EmbeddingSource:
    delimiter = _csv_dialect(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            first = next(reader, None)
            while first is not None and not first:  # blank lines before the first row
                first = next(reader, None)
            if first is None:
                raise DataError(f"{path}: empty file (no rows)")
            has_header = looks_like_header(first) if header is None else bool(header)
            names = ([h.strip() for h in first] if has_header
                     else [str(i) for i in range(len(first))])
            vector_col, features, id_index = _csv_layout(path, names, column, id_column,
                                                         has_header)
            num_rows, dim, ids = 0, None, [] if id_index is not None else None
            rows = reader if has_header else itertools.chain([first], reader)
            for row in rows:
                if not row:
                    continue
                line_no = reader.line_num
                if dim is None:  # the first row fixes the width; the rest are checked when read
                    dim = len(_csv_values(path, line_no, row, vector_col, features))
                if ids is not None:
                    try:
                        ids.append(row[id_index])
                    except IndexError:
                        raise DataError(f"{path}: line {line_no} has too few columns") from None
                num_rows += 1
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({_first_line(exc)})") from None
    return EmbeddingSource(path, "csv", num_rows, dim or 0, column=column, id_column=id_column,
                           item_ids=ids, has_header=has_header, header_detected=header is None,
                           _array=(vector_col, features, delimiter, has_header))


def _csv_values(path: Path, line_no: int, row: List[str], vector_col, features) -> List[float]:
    try:
        if vector_col is not None:
            return _parse_vector(row[vector_col])
        return [float(row[i]) for i in features]
    except IndexError:
        raise DataError(f"{path}: line {line_no} has too few columns") from None
    except ValueError:
        raise DataError(f"{path}: line {line_no} holds a value that is not a number "
                        "(non-float data? pass --column / --id-column)") from None


def _iter_csv(source: EmbeddingSource, batch_size: int) -> Iterator[Tuple[int, np.ndarray]]:
    vector_col, features, delimiter, has_header = source._array
    rows: List[List[float]] = []
    start = 0
    with open(source.path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        skip_header = has_header
        for row in reader:
            if not row:
                continue
            if skip_header:
                skip_header = False
                continue
            line_no = reader.line_num
            values = _csv_values(source.path, line_no, row, vector_col, features)
            if len(values) != source.dim:
                raise DataError(f"{source.path}: line {line_no} has {len(values)} values, "
                                f"expected {source.dim}")
            rows.append(values)
            if len(rows) == batch_size:
                yield start, np.asarray(rows, dtype=np.float32)
                start += len(rows)
                rows = []
    if rows:
        yield start, np.asarray(rows, dtype=np.float32)


# ---- Parquet -----------------------------------------------------------------------------------

def _import_pyarrow():
    try:
        import pyarrow.parquet as pq  # noqa: F401
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install pyarrow "
                        "(or convert the embeddings to .npy)") from None
    return pq


def _open_parquet(path: Path, column: Optional[str], id_column: Optional[str]) -> EmbeddingSource:
    pq = _import_pyarrow()
    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    names = handle.schema_arrow.names
    if column is None:
        column = "embedding" if "embedding" in names else ("embeddings" if "embeddings" in names
                                                           else None)
    if column is None or column not in names:
        raise DataError(f"{path}: pass --column naming the vector column (columns: {', '.join(names)})")
    if id_column is not None and id_column not in names:
        raise DataError(f"{path}: no id column {id_column!r} (columns: {', '.join(names)})")
    num_rows = handle.metadata.num_rows
    dim = 0
    if num_rows:
        first = next(handle.iter_batches(batch_size=1, columns=[column]))
        dim = _arrow_block(path, first.column(0)).shape[1]
    ids = None
    if id_column is not None:
        ids = [str(v) for v in handle.read(columns=[id_column]).column(0).to_pylist()]
    return EmbeddingSource(path, "parquet", int(num_rows), int(dim), column=column,
                           id_column=id_column, item_ids=ids, _array=handle)


def _arrow_block(path: Path, array) -> np.ndarray:
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)):
        raise DataError(f"{path}: column holds {array.type}, expected a list of floats per row")
    value_type = array.type.value_type
    if not pa.types.is_floating(value_type):
        raise DataError(f"{path}: expected floating-point embeddings, got list<{value_type}>")
    if array.null_count:
        raise DataError(f"{path}: the vector column has {array.null_count} empty (null) rows")
    lengths = np.asarray(array.value_lengths() if hasattr(array, "value_lengths")
                         else [len(v) for v in array.to_pylist()])
    if lengths.size and (lengths != lengths[0]).any():
        raise DataError(f"{path}: rows have different lengths ({lengths.min()} to {lengths.max()})")
    values = np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    width = int(lengths[0]) if lengths.size else 0
    return values.reshape(len(array), width)


def _iter_parquet(source: EmbeddingSource, batch_size: int) -> Iterator[Tuple[int, np.ndarray]]:
    start = 0
    for batch in source._array.iter_batches(batch_size=batch_size, columns=[source.column]):
        block = _arrow_block(source.path, batch.column(0))
        if block.shape[1] != source.dim:
            raise DataError(f"{source.path}: rows have {block.shape[1]} values, expected {source.dim}")
        yield start, np.ascontiguousarray(block)
        start += block.shape[0]


# ----------------------------------------------------------------------------------------------
# Non-finite rows and whole-matrix loading
# ----------------------------------------------------------------------------------------------

def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Row positions ``(k,)`` int64 of ``block (b, D)`` holding NaN or Inf."""
    return np.flatnonzero(~np.isfinite(block).all(axis=1))


def describe_rows(rows: Sequence[int], limit: int = 5) -> str:
    """``"rows 3, 17, 40 (3 rows)"`` with at most ``limit`` numbers shown."""
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = ", ..." if len(rows) > limit else ""
    plural = "s" if len(rows) > 1 else ""
    return f"row{plural} {shown}{more} ({len(rows)} row{plural})"


def nonfinite_error(path, rows: Sequence[int]) -> DataError:
    return DataError(f"{path}: NaN/Inf values in {describe_rows(rows)} (0-based); "
                     "fix them or pass --drop-nonfinite to skip those rows")


@dataclass
class LoadedData:
    """Embeddings ``(N, D)`` float32 in memory, the kept rows' ``item_ids`` (the id column's values,
    or the ``(N,)`` int64 row numbers when the file has none), and the dropped row numbers."""

    embeddings: torch.Tensor
    item_ids: Sequence
    dropped_rows: List[int]


def load_embeddings(source: EmbeddingSource, *, drop_nonfinite: bool = False,
                    max_rows: Optional[int] = None, batch_size: int = 65536) -> LoadedData:
    """Read ``source`` into memory (for training), checking NaN/Inf rows.

    ``max_rows`` keeps the first rows only. Non-finite rows raise :class:`DataError` naming them,
    or are skipped with ``drop_nonfinite``.
    """
    total = source.num_rows if max_rows is None else min(source.num_rows, max_rows)
    out = np.empty((total, source.dim), dtype=np.float32)
    keep = np.ones(total, dtype=bool)
    bad: List[int] = []
    for start, block in source.iter_blocks(batch_size):
        if start >= total:
            break
        block = block[: total - start]
        out[start:start + block.shape[0]] = block
        rows = nonfinite_rows(block)
        if rows.size:
            bad.extend((rows + start).tolist())
            keep[rows + start] = False
    if bad and not drop_nonfinite:
        raise nonfinite_error(source.path, bad)
    ids = source.item_ids[:total] if source.item_ids is not None else np.arange(total)
    if bad:
        out = out[keep]
        ids = ids[keep] if isinstance(ids, np.ndarray) else [i for i, k in zip(ids, keep) if k]
        if out.shape[0] == 0:
            raise DataError(f"{source.path}: every row holds NaN/Inf; nothing left to use")
    return LoadedData(torch.from_numpy(out), ids, bad)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def parse_int_list(text: str, name: str) -> List[int]:
    """``"512,256,128"`` -> ``[512, 256, 128]``; a :class:`UserError` naming ``name`` otherwise."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{name} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise UserError(f"{name} must be positive integers, got {text!r}")
    return values


__all__ = [
    "DataError",
    "EmbeddingSource",
    "LoadedData",
    "UserError",
    "atomic_output",
    "describe_rows",
    "load_embeddings",
    "looks_like_header",
    "nonfinite_error",
    "nonfinite_rows",
    "open_embeddings",
    "parse_int_list",
]
