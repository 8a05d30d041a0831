"""The pipeline speed report runs end to end at tiny sizes (no speed is asserted here)."""
import json
import math

from rqvae_fast import bench_pipeline


def test_quick_pipeline_report(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    markdown = tmp_path / "pipeline.md"
    assert bench_pipeline.main(["--quick", "--device", "cpu", "--json", str(out),
                                "--markdown", str(markdown), "--tmpdir", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    km, enc = report["kmeans"], report["encode"]
    assert (km["rows"], km["codes"], km["iters"]) == (8192, 64, 5)
    assert math.isclose(km["total_s"], km["init_s"] + km["iters_s"])
    assert km["inertia"] > 0 and math.isfinite(km["inertia"])
    for value in (km["iter_roofline_fraction"], enc["device_roofline_fraction"],
                  enc["device_items_per_s"], enc["file_items_per_s"]):
        assert value > 0 and math.isfinite(value)
    assert enc["codes_agreement"] == 1.0  # the file-based encode equals the in-memory one
    assert math.isnan(enc["h2d_gbps"])  # no host-to-device copy on a CPU
    table = markdown.read_text()
    assert table.count("\n| ") == 5  # header + 4 rows (the separator starts with "|---")
    assert "k-means, 5 iterations" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) and not list(tmp_path.glob("tmp*"))  # temporary .npy removed
