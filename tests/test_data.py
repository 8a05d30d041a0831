"""Readers for .npy / .pt / CSV / Parquet, their one-line errors, NaN handling, atomic writes."""
import sys

import numpy as np
import pytest
import torch

from rqvae_fast.data import (DataError, UserError, atomic_output, load_embeddings,
                             looks_like_header, open_embeddings, parse_int_list)


pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(source, batch_size):
    return [(start, block.copy()) for start, block in source.iter_blocks(batch_size)]


def _rows(n=23, d=5, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ---- formats --------------------------------------------------------------------------------

def test_npy_is_memory_mapped_and_read_in_blocks(tmp_path):
    data = _rows()
    np.save(tmp_path / "x.npy", data)
    source = open_embeddings(tmp_path / "x.npy")
    assert (source.num_rows, source.dim, source.kind) == (23, 5, "npy")
    assert isinstance(source._array, np.memmap)  # never loaded in full
    blocks = _blocks(source, 10)
    assert [s for s, _ in blocks] == [0, 10, 20]
    assert [b.shape[0] for _, b in blocks] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), data)
    assert all(b.dtype == np.float32 and b.flags["C_CONTIGUOUS"] for _, b in blocks)


def test_float64_and_float16_npy_become_float32(tmp_path):
    data = _rows().astype(np.float64)
    np.save(tmp_path / "x.npy", data)
    out = np.concatenate([b for _, b in _blocks(open_embeddings(tmp_path / "x.npy"), 7)])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, data, rtol=1e-6)
    np.save(tmp_path / "h.npy", data.astype(np.float16))
    assert open_embeddings(tmp_path / "h.npy").dim == 5


def test_pt_tensor_and_dict(tmp_path):
    data = torch.from_numpy(_rows())
    torch.save(data, tmp_path / "t.pt")
    source = open_embeddings(tmp_path / "t.pt")
    np.testing.assert_array_equal(np.concatenate([b for _, b in _blocks(source, 8)]), data.numpy())
    torch.save({"embeddings": data, "ids": torch.arange(23)}, tmp_path / "d.pt")
    assert open_embeddings(tmp_path / "d.pt").num_rows == 23
    torch.save({"vectors": data, "other": data[:, :2]}, tmp_path / "k.pt")
    assert open_embeddings(tmp_path / "k.pt", column="other").dim == 2
    with pytest.raises(DataError, match="--column"):
        open_embeddings(tmp_path / "k.pt")


def test_csv_one_column_per_dimension_with_ids(tmp_path):
    data = _rows(6, 3)
    lines = ["item,f0,f1,f2"] + [f"sku{i}," + ",".join(repr(float(v)) for v in row)
                                 for i, row in enumerate(data)]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    source = open_embeddings(tmp_path / "x.csv", id_column="item")
    assert (source.num_rows, source.dim) == (6, 3)
    assert source.item_ids == [f"sku{i}" for i in range(6)]
    blocks = _blocks(source, 4)
    assert [s for s, _ in blocks] == [0, 4]
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), data, rtol=1e-6)


def test_csv_vector_column(tmp_path):
    data = _rows(4, 3)
    rows = ["id,emb"] + [f'{i},"[{", ".join(str(float(v)) for v in row)}]"'
                         for i, row in enumerate(data)]
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    source = open_embeddings(tmp_path / "x.csv", column="emb", id_column="id")
    np.testing.assert_allclose(np.concatenate([b for _, b in _blocks(source, 3)]), data, rtol=1e-6)
    (tmp_path / "y.tsv").write_text("emb\n0.5 1.5\n2 3\n")
    np.testing.assert_array_equal(_blocks(open_embeddings(tmp_path / "y.tsv", column="emb"), 9)[0][1],
                                  [[0.5, 1.5], [2.0, 3.0]])


def test_parquet_without_pyarrow_is_a_clear_user_error(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="pip install pyarrow"):
        open_embeddings(tmp_path / "x.parquet")


def test_parquet_roundtrip_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = _rows(9, 4)
    pq.write_table(pa.table({"sku": [f"s{i}" for i in range(9)],
                             "embedding": pa.array(data.tolist(), type=pa.list_(pa.float32()))}),
                   tmp_path / "x.parquet", row_group_size=4)
    source = open_embeddings(tmp_path / "x.parquet", id_column="sku")
    assert (source.num_rows, source.dim, source.item_ids[2]) == (9, 4, "s2")
    np.testing.assert_array_equal(np.concatenate([b for _, b in _blocks(source, 4)]), data)


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("array, message", [
    (np.zeros(10, dtype=np.float32), "2-D"),
    (np.zeros((2, 3, 4), dtype=np.float32), "2-D"),
    (np.zeros((5, 3), dtype=np.int64), "floating-point"),
    (np.zeros((5, 3), dtype=bool), "floating-point"),
    (np.zeros((0, 3), dtype=np.float32), "no rows"),
    (np.zeros((4, 0), dtype=np.float32), "dimension 0"),
])
def test_bad_npy_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message) as info:
        open_embeddings(tmp_path / "bad.npy")
    assert "\n" not in str(info.value) and str(tmp_path / "bad.npy") in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_embeddings(tmp_path / "missing.npy")
    with pytest.raises(DataError, match="directory"):
        open_embeddings(tmp_path)
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(DataError, match="unsupported file type"):
        open_embeddings(tmp_path / "x.txt")
    np.save(tmp_path / "full.npy", _rows(100, 8))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:300])
    with pytest.raises(DataError, match="not a readable"):
        open_embeddings(tmp_path / "cut.npy")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="not a readable torch file"):
        open_embeddings(tmp_path / "junk.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="Python objects"):
        open_embeddings(tmp_path / "obj.npy")


def test_bad_csv(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        open_embeddings(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="no rows"):
        open_embeddings(tmp_path / "header.csv")
    (tmp_path / "text.csv").write_text("a,b\n1,cat\n")
    with pytest.raises(DataError, match="line 2 .*not a number"):
        open_embeddings(tmp_path / "text.csv")
    (tmp_path / "ragged.csv").write_text("v\n1 2 3\n1 2\n")
    source = open_embeddings(tmp_path / "ragged.csv", column="v")
    with pytest.raises(DataError, match="line 3 has 2 values"):
        _blocks(source, 10)
    with pytest.raises(DataError, match="no column 'w'"):
        open_embeddings(tmp_path / "ragged.csv", column="w")


def test_nan_rows_are_named_or_dropped(tmp_path):
    data = _rows(30, 4)
    data[3, 1] = np.nan
    data[17, 0] = np.inf
    np.save(tmp_path / "x.npy", data)
    source = open_embeddings(tmp_path / "x.npy")
    with pytest.raises(DataError, match=r"rows 3, 17 \(2 rows\).*--drop-nonfinite"):
        load_embeddings(source, batch_size=8)
    loaded = load_embeddings(source, drop_nonfinite=True, batch_size=8)
    assert loaded.dropped_rows == [3, 17]
    assert loaded.embeddings.shape == (28, 4)
    assert list(loaded.item_ids) == [i for i in range(30) if i not in (3, 17)]  # row numbers
    np.testing.assert_array_equal(loaded.embeddings.numpy(), np.delete(data, [3, 17], axis=0))
    assert np.isnan(np.load(tmp_path / "x.npy")[3, 1])  # the input file is untouched


def test_load_embeddings_max_rows(tmp_path):
    np.save(tmp_path / "x.npy", _rows(30, 4))
    loaded = load_embeddings(open_embeddings(tmp_path / "x.npy"), max_rows=12, batch_size=5)
    assert loaded.embeddings.shape == (12, 4) and list(loaded.item_ids) == list(range(12))


# ---- writing ------------------------------------------------------------------------------------

def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "out" / "result.txt"
    with atomic_output(target) as tmp:
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("crash")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]


def test_parse_int_list():
    assert parse_int_list("512, 256,128", "--hidden-dims") == [512, 256, 128]
    with pytest.raises(UserError, match="--hidden-dims"):
        parse_int_list("512,abc", "--hidden-dims")
    with pytest.raises(UserError, match="positive"):
        parse_int_list("4,0", "--codebook-size")


# ---- CSV header row: detected, or forced with header=True/False (issue 13, item 1) -------------

def _write_csv(path, data, ids=None, header=None):
    lines = [header] if header else []
    for i, row in enumerate(data):
        values = ",".join(repr(float(v)) for v in row)
        lines.append(f"{ids[i]},{values}" if ids is not None else values)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_without_header_keeps_its_first_row(tmp_path):
    data = _rows(7, 3)
    source = open_embeddings(_write_csv(tmp_path / "x.csv", data))
    assert (source.num_rows, source.has_header, source.header_detected) == (7, False, True)
    np.testing.assert_allclose(np.concatenate([b for _, b in _blocks(source, 3)]), data, rtol=1e-6)
    assert "no header row (detected)" in source.header_note()


def test_csv_header_is_detected_from_any_non_numeric_field(tmp_path):
    data = _rows(5, 3)
    source = open_embeddings(_write_csv(tmp_path / "x.csv", data, header="0.5,f1,f2"))
    assert (source.num_rows, source.has_header) == (5, True)
    np.testing.assert_allclose(np.concatenate([b for _, b in _blocks(source, 10)]), data, rtol=1e-6)
    assert "first line read as a header (detected" in source.header_note()


def test_csv_header_can_be_forced_either_way(tmp_path):
    data = _rows(6, 3)
    path = _write_csv(tmp_path / "x.csv", data)
    forced = open_embeddings(path, header=True)  # the user says the numeric first line is a header
    assert forced.num_rows == 5 and "as requested" in forced.header_note()
    np.testing.assert_allclose(np.concatenate([b for _, b in _blocks(forced, 4)]), data[1:],
                               rtol=1e-6)
    named = _write_csv(tmp_path / "h.csv", data, header="a,b,c")
    with pytest.raises(DataError, match="line 1 holds a value that is not a number"):
        open_embeddings(named, header=False)


def test_csv_without_header_with_an_id_column_by_position(tmp_path):
    data = _rows(4, 3)
    ids = [f"sku-{i}" for i in range(4)]
    path = _write_csv(tmp_path / "x.csv", data, ids=ids)
    source = open_embeddings(path, id_column="0", header=False)
    assert source.num_rows == 4 and source.item_ids == ids
    np.testing.assert_allclose(np.concatenate([b for _, b in _blocks(source, 4)]), data, rtol=1e-6)
    # detection reads "sku-0" as a column name, so the error says how to fix it
    with pytest.raises(DataError, match="--no-header"):
        open_embeddings(path, id_column="0")
    # numeric ids without a header: all numbers, so the first line is data
    numeric = _write_csv(tmp_path / "n.csv", data, ids=list(range(100, 104)))
    source = open_embeddings(numeric, id_column="0")
    assert source.num_rows == 4 and source.item_ids == ["100", "101", "102", "103"]
    np.testing.assert_allclose(np.concatenate([b for _, b in _blocks(source, 4)]), data, rtol=1e-6)


def test_csv_without_header_vector_column(tmp_path):
    data = _rows(3, 4)
    (tmp_path / "v.tsv").write_text("".join(
        "\t".join([str(i), " ".join(repr(float(v)) for v in row)]) + "\n"
        for i, row in enumerate(data)))
    source = open_embeddings(tmp_path / "v.tsv", column="1", id_column="0")
    assert (source.num_rows, source.dim, source.has_header) == (3, 4, False)
    np.testing.assert_allclose(np.concatenate([b for _, b in _blocks(source, 2)]), data, rtol=1e-6)


@pytest.mark.parametrize("row, is_header", [
    (["0.1", "2", "-3e-4", "nan"], False), (["[0.1, 0.2]"], False), (["0.1 0.2"], False),
    (["id", "0.1"], True), (["", "0.1"], True), (["f0", "f1"], True),
])
def test_looks_like_header(row, is_header):
    assert looks_like_header(row) is is_header
