"""rqvae_fast.bench_compat runs every mode on a tiny shape and reports both providers."""
import json

import pytest

from rqvae_fast import bench_compat


def test_bench_compat_tiny(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_compat.main(["--n", "40", "--d", "6", "--k", "8", "--layers", "2", "--reps", "1",
                              "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["mode"] for r in rows} == set(bench_compat.MODES)
    assert all(r["ms"] > 0 for r in rows)
    beam = [r for r in rows if r["mode"] == "beam4"][0]
    assert beam["sq_error_beam4"] <= beam["sq_error_greedy"] + 1e-3
    assert "rotation" in capsys.readouterr().out


def test_bench_compat_rejects_unknown_modes():
    with pytest.raises(SystemExit):
        bench_compat.main(["--modes", "nope"])
