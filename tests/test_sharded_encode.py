"""``encode`` split across ranks (torchrun's RANK / WORLD_SIZE) + ``merge`` == one-process ``encode``."""
import csv
import json

import numpy as np
import pytest
import torch

from helpers import assert_user_error, run_cli
from rqvae_fast.semantic_ids import shard_rows
from rqvae_fast.synthetic import make_catalogue


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def catalogue(tmp_path, capsys):
    """301 items whose rows 140..149 repeat in 151..160 (across the 2-rank boundary at 151),
    and a tiny RQ-KMeans checkpoint (2 layers x 4 codes: collisions everywhere)."""
    data = make_catalogue(num_items=301, dim=16, branching=(4, 2, 2), seed=5).embeddings.numpy()
    data[151:161] = data[140:150]
    path = tmp_path / "items.npy"
    np.save(path, data)
    code, _, err = run_cli(capsys, "fit", path, "--method", "rqkmeans", "--layers", 2,
                        "--codebook-size", 4, "--kmeans-iters", 5, "--out", tmp_path / "model")
    assert code == 0, err
    return path, tmp_path / "model" / "checkpoint.pt"


def _sharded(monkeypatch, capsys, world, *argv):
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        code, text, err = run_cli(capsys, "encode", *argv, "--no-progress")
        assert code == 0, err
        assert f"rank {rank} of {world}" in text and "merge" in text
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")


def test_shard_rows_cover_the_file_once():
    for n, w in [(301, 2), (10, 3), (3, 4), (8, 8), (1, 1)]:
        spans = [shard_rows(n, r, w) for r in range(w)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert shard_rows(301, 1, 2) == (151, 301) and shard_rows(3, 3, 4) == (3, 3)


def test_two_ranks_then_merge_equal_one_process(tmp_path, catalogue, monkeypatch, capsys):
    data, ckpt = catalogue
    code, _, err = run_cli(capsys, "encode", ckpt, data, "--out", tmp_path / "single", "--no-progress")
    assert code == 0, err

    out = tmp_path / "sharded"
    _sharded(monkeypatch, capsys, 2, ckpt, data, "--out", out)
    # the ranks write only their shards (raw codes, no dedup position) ...
    assert not (out / "codes.npy").exists() and not (out / "ids.csv").exists()
    raw0 = np.load(out / "shards" / "codes.rank0-of-2.npy")
    raw1 = np.load(out / "shards" / "codes.rank1-of-2.npy")
    assert raw0.shape == (151, 2) and raw1.shape == (150, 2)
    np.testing.assert_array_equal(np.load(out / "shards" / "items.rank1-of-2.npy"),
                                  np.arange(151, 301))
    # ... so the duplicates across the boundary still collide there
    np.testing.assert_array_equal(raw1[:10], raw0[140:150])

    code, text, err = run_cli(capsys, "merge", out)
    assert code == 0, err
    assert "merged 2 shards (301 items)" in text
    single = np.load(tmp_path / "single" / "codes.npy")
    merged = np.load(out / "codes.npy")
    np.testing.assert_array_equal(merged, single)
    assert merged.shape == (301, 3) and len({tuple(r) for r in merged.tolist()}) == 301
    # dedup was global: the copies in rank 1 got positions after their originals in rank 0
    assert (merged[151:161, 2] > merged[140:150, 2]).all()
    for name in ("codes.npy", "ids.csv", "summary.json"):
        assert (out / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_missing_or_mismatched_shards_are_one_line_errors(tmp_path, catalogue, monkeypatch,
                                                          capsys):
    data, ckpt = catalogue
    out = tmp_path / "ids"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert run_cli(capsys, "encode", ckpt, data, "--out", out, "--no-progress")[0] == 0
    monkeypatch.setenv("RANK", "2")
    assert run_cli(capsys, "encode", ckpt, data, "--out", out, "--no-progress")[0] == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    code, _, err = run_cli(capsys, "merge", out)
    assert_user_error(code, err, r"missing shard .*codes\.rank1-of-3\.npy")
    assert sorted(p.name for p in out.iterdir()) == ["shards"]  # nothing half-written

    # a stale shard of another world size next to them
    (out / "shards" / "meta.rank0-of-2.json").write_text("{}")
    code, _, err = run_cli(capsys, "merge", out)
    assert_user_error(code, err, r"different world sizes \(2, 3\)")
    assert_user_error(*run_cli(capsys, "merge", tmp_path / "nothing")[::2], "no such folder")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_user_error(*run_cli(capsys, "encode", ckpt, data, "--out", out)[::2], "RANK 5")


def test_csv_with_id_column_sharded(tmp_path, catalogue, monkeypatch, capsys):
    data, ckpt = catalogue
    rows = np.load(data)[:45]
    rows[30, 2] = np.nan  # in rank 1's half (rows 23..44): reported by its global row number
    lines = ["sku," + ",".join(f"f{i}" for i in range(16))]
    lines += [f"sku-{i}," + ",".join(repr(float(v)) for v in row) for i, row in enumerate(rows)]
    path = tmp_path / "items.csv"
    path.write_text("\n".join(lines) + "\n")
    common = ["--id-column", "sku", "--drop-nonfinite", "--batch-size", 7, "--format", "jsonl"]

    code, _, err = run_cli(capsys, "encode", ckpt, path, "--out", tmp_path / "single", *common,
                        "--no-progress")
    assert code == 0, err
    out = tmp_path / "sharded"
    _sharded(monkeypatch, capsys, 2, ckpt, path, "--out", out, *common)
    assert json.loads((out / "shards" / "items.rank1-of-2.json").read_text())[:2] == \
        ["sku-23", "sku-24"]
    code, text, err = run_cli(capsys, "merge", out)
    assert code == 0, err
    assert "skipped row 30 (1 row)" in text
    single = (tmp_path / "single" / "ids.jsonl").read_text()
    assert (out / "ids.jsonl").read_text() == single
    ids = [json.loads(line)["item_id"] for line in single.splitlines()]
    assert ids == [f"sku-{i}" for i in range(45) if i != 30]
    np.testing.assert_array_equal(np.load(out / "codes.npy"),
                                  np.load(tmp_path / "single" / "codes.npy"))
    # --format on merge overrides the one given to encode
    assert run_cli(capsys, "merge", out, "--format", "csv")[0] == 0
    with open(out / "ids.csv") as handle:
        assert [r["item_id"] for r in csv.DictReader(handle)] == ids
