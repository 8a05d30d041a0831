"""Semantic IDs: disambiguation position, token strings, export, lookup, streaming encode, metrics."""
import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rqvae_fast.data import DataError, UserError, open_embeddings
from rqvae_fast.metrics import (collision_stats, layer_stats, perplexity, prefix_purity, row_keys,
                                usage)
from rqvae_fast.model import RQVAE
from rqvae_fast.semantic_ids import (SemanticIDIndex, add_dedup_position, dedup_position,
                                     encode_source, parse_token_string, read_table, token_string,
                                     token_strings, write_codes, write_table)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- disambiguation ------------------------------------------------------------------------------

def test_dedup_position_counts_within_groups_in_row_order():
    codes = np.array([[1, 2], [1, 2], [0, 0], [1, 2], [0, 0], [3, 1]])
    assert dedup_position(codes).tolist() == [0, 1, 0, 2, 1, 0]
    unique = add_dedup_position(codes)
    assert unique.shape == (6, 3) and unique.dtype == np.int64
    assert len({tuple(r) for r in unique.tolist()}) == 6
    np.testing.assert_array_equal(unique[:, :2], codes)  # the codes themselves are kept


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=60))
def test_dedup_makes_every_id_unique(rows):
    codes = np.array(rows, dtype=np.int64)
    position = dedup_position(codes)
    assert len({tuple(r) for r in add_dedup_position(codes).tolist()}) == len(rows)
    for key in {tuple(r) for r in rows}:
        members = [i for i, r in enumerate(rows) if tuple(r) == key]
        assert position[members].tolist() == list(range(len(members)))


def test_dedup_of_wide_codes_falls_back_to_unique_rows():
    codes = np.array([[2 ** 40, 5, 2 ** 40], [2 ** 40, 5, 2 ** 40], [0, 5, 0]], dtype=np.int64)
    assert dedup_position(codes).tolist() == [0, 1, 0]
    assert len(np.unique(row_keys(codes))) == 2


# ---- tokens --------------------------------------------------------------------------------------

def test_token_strings_round_trip():
    assert token_string([12, 7, 201, 0]) == "<a_12><b_7><c_201><d_0>"
    codes = np.array([[12, 7, 201, 0], [3, 0, 1, 2]])
    tokens = token_strings(codes)
    assert tokens[0] == "<a_12><b_7><c_201><d_0>"
    assert [parse_token_string(t) for t in tokens] == [tuple(r) for r in codes.tolist()]
    assert token_string(range(28)).endswith("<z_25><aa_26><ab_27>")
    for bad in ("", "<a_1><c_2>", "<a_1>junk", "<b_1>", "a_1"):
        with pytest.raises(ValueError):
            parse_token_string(bad)


# ---- export and lookup -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_table_round_trip_and_index(tmp_path, fmt):
    codes = add_dedup_position(np.array([[1, 2], [1, 2], [0, 5]]))
    ids = ["shoe", "boot", "hat"]
    path = write_table(tmp_path / f"ids.{fmt}", ids, codes)
    read_ids, read_codes = read_table(path)
    assert read_ids == ids
    np.testing.assert_array_equal(read_codes, codes)
    index = SemanticIDIndex.load(path)
    assert index[(1, 2, 1)] == "boot" and index["<a_0><b_5><c_0>"] == "hat"
    assert index.with_prefix((1, 2)) == ["shoe", "boot"] and index.with_prefix("<a_0>") == ["hat"]
    assert (9, 9, 9) not in index and index.get((9, 9, 9)) is None
    with pytest.raises(KeyError, match="<a_9>"):
        index[(9, 9, 9)]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_tables_are_written_in_chunks(tmp_path, monkeypatch, fmt):
    import rqvae_fast.semantic_ids as sid

    monkeypatch.setattr(sid, "_WRITE_CHUNK", 2)
    codes = add_dedup_position(np.array([[1, 2], [1, 2], [0, 5], [3, 3], [1, 2]]))
    ids = np.arange(5) * 10  # row numbers / integer ids are accepted too
    read_ids, read_codes = read_table(write_table(tmp_path / f"ids.{fmt}", ids, codes))
    assert read_ids == ["0", "10", "20", "30", "40"]
    np.testing.assert_array_equal(read_codes, codes)


def test_parquet_table_round_trip_when_pyarrow_is_installed(tmp_path):
    pytest.importorskip("pyarrow")
    codes = add_dedup_position(np.array([[1, 2], [1, 2], [0, 5]]))
    path = write_table(tmp_path / "ids.parquet", ["a", "b", "c"], codes)
    ids, read_codes = read_table(path)
    assert ids == ["a", "b", "c"]
    np.testing.assert_array_equal(read_codes, codes)
    assert SemanticIDIndex.load(path)["<a_1><b_2><c_1>"] == "b"


def test_csv_table_contents(tmp_path):
    path = write_table(tmp_path / "ids.csv", ["a"], np.array([[12, 7, 201, 0]]))
    assert path.read_text().splitlines() == ["item_id,codes,semantic_id",
                                             "a,12 7 201 0,<a_12><b_7><c_201><d_0>"]
    row = json.loads(write_table(tmp_path / "ids.jsonl", ["a"], np.array([[1, 0]])).read_text())
    assert row == {"item_id": "a", "codes": [1, 0], "semantic_id": "<a_1><b_0>"}


def test_index_refuses_duplicate_ids():
    with pytest.raises(ValueError, match="disambiguation"):
        SemanticIDIndex(np.array([[1, 2], [1, 2]]), ["x", "y"])


def test_parquet_export_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="pyarrow"):
        write_table(tmp_path / "ids.parquet", ["a"], np.array([[1]]))
    assert list(tmp_path.iterdir()) == []


def test_write_codes_is_atomic_npy(tmp_path):
    codes = np.arange(12).reshape(4, 3)
    path = write_codes(tmp_path / "codes.npy", codes)
    np.testing.assert_array_equal(np.load(path), codes)
    assert np.load(path).dtype == np.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy"]


# ---- streaming encode ------------------------------------------------------------------------------

def _trained_model():
    torch.manual_seed(0)
    model = RQVAE(6, [8], 4, 2, [5, 3])
    model.initialize_codebooks(torch.randn(200, 6), seed=0, batch_size=100)
    return model.eval()


def test_encode_source_streams_and_matches_the_model(tmp_path):
    data = np.random.default_rng(0).standard_normal((103, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    model = _trained_model()
    encoded = encode_source(model, open_embeddings(tmp_path / "x.npy"), batch_size=10,
                            progress=False)
    np.testing.assert_array_equal(encoded.codes, model.get_semantic_ids(torch.from_numpy(data)).numpy())
    assert list(encoded.item_ids) == list(range(103)) and encoded.dropped_rows == []


def test_encode_source_nan_rows(tmp_path):
    data = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    data[5] = np.nan
    data[33, 2] = -np.inf
    np.save(tmp_path / "x.npy", data)
    model = _trained_model()
    source = open_embeddings(tmp_path / "x.npy")
    with pytest.raises(DataError, match=r"rows 5, 33"):
        encode_source(model, source, batch_size=16, progress=False)
    encoded = encode_source(model, source, batch_size=16, drop_nonfinite=True, progress=False)
    assert encoded.dropped_rows == [5, 33] and encoded.codes.shape == (38, 2)
    assert 5 not in list(encoded.item_ids) and 6 in list(encoded.item_ids)
    assert (encoded.codes >= 0).all()


def test_encode_source_rejects_other_dimensions(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 9), dtype=np.float32))
    with pytest.raises(UserError, match="9-d .* expects 6-d"):
        encode_source(_trained_model(), open_embeddings(tmp_path / "x.npy"), progress=False)


def test_encode_source_propagates_reader_errors(tmp_path):
    (tmp_path / "x.csv").write_text("v\n1 2 3 4 5 6\n1 2\n")
    source = open_embeddings(tmp_path / "x.csv", column="v")
    with pytest.raises(DataError, match="line 3"):
        encode_source(_trained_model(), source, batch_size=1, progress=False)


# ---- metrics ---------------------------------------------------------------------------------------

def test_collision_stats():
    codes = np.array([[1, 2], [1, 2], [1, 2], [0, 0], [0, 1], [0, 1]])
    stats = collision_stats(codes)
    assert (stats.items, stats.unique_ids, stats.largest_group, stats.colliding_groups) == (6, 3, 3, 2)
    assert stats.collision_rate == pytest.approx(0.5)
    assert stats.colliding_share == pytest.approx(5 / 6)
    assert collision_stats(add_dedup_position(codes)).collision_rate == 0.0


def test_usage_and_perplexity():
    assert perplexity([5, 5, 5, 5]) == pytest.approx(4.0)
    assert perplexity([9, 0, 0]) == pytest.approx(1.0)
    assert perplexity([0, 0]) == 0.0
    assert usage([3, 0, 1, 0]) == 0.5
    stats = layer_stats(torch.tensor([[0, 1], [0, 1], [2, -1]]), [4, 2])
    assert (stats[0].used, stats[0].size, stats[1].used) == (2, 4, 1)  # -1 (NaN row) ignored


def test_prefix_purity_against_known_hierarchy():
    labels = np.array([[0, 0], [0, 0], [0, 1], [1, 2], [1, 2], [1, 3]])
    perfect = np.array([[4, 0], [4, 0], [4, 1], [7, 0], [7, 0], [7, 5]])
    levels = prefix_purity(perfect, labels, ["category", "subcategory"])
    assert [(lv.depth, lv.level, lv.purity, lv.groups) for lv in levels] == \
        [(1, "category", 1.0, 2), (2, "subcategory", 1.0, 4)]
    mixed = np.array([[4, 0], [7, 0], [4, 1], [7, 0], [4, 0], [7, 5]])
    assert prefix_purity(mixed, labels)[0].purity == pytest.approx(4 / 6)
    rng = np.random.default_rng(0)
    big_labels = np.repeat(np.arange(10), 100)[:, None]
    shuffled = prefix_purity(big_labels, big_labels)[0]
    assert shuffled.purity == 1.0 and shuffled.chance < 0.3  # shuffled labels: near 1/10
    del rng
