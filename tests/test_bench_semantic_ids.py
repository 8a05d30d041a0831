"""python -m rqvae_fast.bench_semantic_ids: metrics and a quick run (peers skipped when absent)."""
import json

import numpy as np
import pytest

from rqvae_fast import bench_semantic_ids as bench
from rqvae_fast._bench_worker import unpack_codes


def test_prefix_coherence_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    codes = rng.integers(0, 3, size=(60, 2))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    for depth in (1, 2):
        sims = []
        for i in range(60):
            for j in range(60):
                if i != j and (codes[i, :depth] == codes[j, :depth]).all():
                    sims.append(u[i] @ u[j])
        assert bench.prefix_coherence(x, codes, depth) == pytest.approx(np.mean(sims), abs=1e-6)
    assert np.isnan(bench.prefix_coherence(x[:2], np.array([[0], [1]]), 1))


def test_unpack_faiss_codes():
    codes = np.array([[3, 0, 15], [1, 9, 4]])
    bits = 4
    stream = np.zeros((2, 16), dtype=np.uint8)
    for row in range(2):
        for layer in range(3):
            for b in range(bits):
                stream[row, layer * bits + b] = (codes[row, layer] >> b) & 1
    packed = np.packbits(stream, axis=1, bitorder="little")
    assert np.array_equal(unpack_codes(packed, 3, bits), codes)


def test_quick_run_without_faiss(tmp_path, monkeypatch, capsys):
    real = bench._available
    monkeypatch.setattr(bench, "_available", lambda m: False if m == "faiss" else real(m))
    out = tmp_path / "report.json"
    assert bench.main(["--quick", "--data", "synthetic", "--json", str(out)]) == 0
    report = json.loads(out.read_text())[0]
    names = [row["name"] for row in report["rows"]]
    assert not any("FAISS" in n for n in names)
    assert any("FAISS" in note and "skipped" in note for note in report["notes"])
    assert len(names) == 4
    for row in report["rows"]:
        assert 0 < row["rel_error"] < 1
        assert len(row["perplexity"]) == 3 and all(1 <= p <= 8 for p in row["perplexity"])
        assert 0 <= row["colliding_share"] <= 1 and len(row["coherence"]) == 3
        assert row["total_s"] > 0
    by_name = {row["name"]: row for row in report["rows"]}
    greedy = by_name["rqvae-fast RQ-KMeans (default, greedy)"]
    assert by_name["rqvae-fast RQ-KMeans, beam 4"]["rel_error"] <= greedy["rel_error"] + 1e-9
    assert "| method |" in capsys.readouterr().out


def test_quality_columns_are_means_over_seeds():
    runs = [{"rel_error": 0.5, "colliding_share": 0.1, "perplexity": [4.0, 2.0],
             "coherence": [0.2, float("nan")]},
            {"rel_error": 0.7, "colliding_share": 0.3, "perplexity": [6.0, 4.0],
             "coherence": [0.4, 0.6]}]
    mean = bench.mean_quality(runs)
    assert mean["rel_error"] == pytest.approx(0.6) and mean["colliding_share"] == pytest.approx(0.2)
    assert mean["perplexity"] == pytest.approx([5.0, 3.0])
    assert mean["coherence"] == pytest.approx([0.3, 0.6])  # a seed without shared prefixes is left out


def test_quick_run_with_two_seeds(tmp_path):
    out = tmp_path / "report.json"
    assert bench.main(["--quick", "--data", "synthetic", "--methods", "ours", "--seeds", "0,1",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())[0]
    assert report["seeds"] == [0, 1]
    row = report["rows"][0]
    assert len(row["per_seed"]) == 2 and len(row["total_runs_s"]) == 2
    assert row["rel_error"] == pytest.approx(np.mean([r["rel_error"] for r in row["per_seed"]]))
