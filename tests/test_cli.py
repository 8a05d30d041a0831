"""The ``rqvae-fast`` command line: the demo end to end, encode/stats, bad input, bench delegation."""
import csv
import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from helpers import assert_user_error, run_cli, write_catalogue_npy
from rqvae_fast.cli import main
from rqvae_fast.synthetic import make_catalogue


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = ["--hidden-dims", "16", "--latent-dim", "4", "--layers", "2", "--codebook-size", "8",
         "--epochs", "1", "--batch-size", "64", "--no-progress"]


def _no_outputs(folder):
    return not folder.exists() or sorted(p.name for p in folder.iterdir()) == []


@pytest.fixture
def small_npy(tmp_path):
    return write_catalogue_npy(tmp_path, 300, 16)


# ---- the demo, end to end ----------------------------------------------------------------------

def test_demo_fit_then_encode_then_stats(tmp_path, capsys):
    out = tmp_path / "demo"
    code, text, err = run_cli(capsys, "fit", "--num-items", 3000, "--epochs", 2, "--out", out,
                           "--no-progress")
    assert code == 0, err
    for name in ("checkpoint.pt", "codes.npy", "ids.csv", "summary.json", "log.csv", "log.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files left
    # the demo proves semantics: first-code purity far above shuffled-label chance
    match = re.search(r"first 1 code\s+vs category\s+([\d.]+)\s+\(chance ([\d.]+)", text)
    assert match, text
    purity, chance = float(match.group(1)), float(match.group(2))
    assert purity > 0.8 and purity > chance + 0.4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == 3000 and summary["prefix_purity"][0]["purity"] == pytest.approx(
        purity, abs=1e-3)
    codes = np.load(out / "codes.npy")
    assert codes.shape == (3000, 4) and len({tuple(r) for r in codes.tolist()}) == 3000
    with open(out / "ids.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3000 and rows[0]["item_id"] == "0"
    assert re.fullmatch(r"<a_\d+><b_\d+><c_\d+><d_\d+>", rows[0]["semantic_id"])
    assert str(out / "ids.csv") in text and "prefix purity" in text

    # encode the same catalogue from a file: the same IDs
    items = tmp_path / "catalogue.npy"
    np.save(items, make_catalogue(3000, 768, seed=0).embeddings.numpy())
    code, text, err = run_cli(capsys, "encode", out / "checkpoint.pt", items, "--out", tmp_path / "enc",
                           "--batch-size", 1000, "--no-progress", "--format", "jsonl")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "enc" / "codes.npy"), codes)
    first = json.loads((tmp_path / "enc" / "ids.jsonl").read_text().splitlines()[0])
    assert first["semantic_id"] == rows[0]["semantic_id"]

    code, text, err = run_cli(capsys, "stats", out / "codes.npy", "--json")
    assert code == 0, err
    stats = json.loads(text)
    assert stats["items"] == 3000 and stats["unique_ids_with_dedup"] == 3000
    assert stats["dedup_position"] is True and stats["codebook_sizes"] == [256, 256, 256]
    assert len(stats["layers"]) == 3 and not stats["layout_assumed"]
    code, text, err = run_cli(capsys, "stats", out / "ids.csv")
    assert code == 0 and "3000 distinct" in text
    code, text, err = run_cli(capsys, "stats", out / "checkpoint.pt")
    assert code == 0 and "epochs done: 2" in text and "latent_dim=32" in text


# ---- other methods and options ------------------------------------------------------------------

def test_fit_on_a_file_with_rqkmeans(tmp_path, small_npy, capsys):
    out = tmp_path / "km"
    code, text, err = run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", "--layers", 2,
                           "--codebook-size", "4,8", "--out", out)
    assert code == 0, err
    assert np.load(out / "codes.npy").shape == (300, 3)
    code, _, err = run_cli(capsys, "encode", out / "checkpoint.pt", small_npy, "--out", tmp_path / "e",
                        "--no-progress", "--no-dedup")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "e" / "codes.npy"),
                                  np.load(out / "codes.npy")[:, :2])


def test_fit_drops_nonfinite_rows_on_request(tmp_path, small_npy, capsys):
    data = np.load(small_npy)
    data[[4, 250]] = np.nan
    np.save(small_npy, data)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "fit", small_npy, "--out", out, *SMALL)
    assert_user_error(code, err, r"rows 4, 250 .*--drop-nonfinite")
    assert _no_outputs(out)
    code, text, err = run_cli(capsys, "fit", small_npy, "--out", out, "--drop-nonfinite", *SMALL)
    assert code == 0, err
    assert "skipped rows 4, 250 (2 rows)" in text
    ids = [row["item_id"] for row in csv.DictReader(open(out / "ids.csv"))]
    assert len(ids) == 298 and "4" not in ids and "250" not in ids


def test_csv_with_item_ids_and_a_bad_row(tmp_path, small_npy, capsys):
    data = np.load(small_npy)[:40]
    data[7, 3] = np.inf
    lines = ["sku," + ",".join(f"f{i}" for i in range(16))]
    lines += [f"sku-{i}," + ",".join(repr(float(v)) for v in row) for i, row in enumerate(data)]
    (tmp_path / "items.csv").write_text("\n".join(lines) + "\n")
    assert run_cli(capsys, "fit", small_npy, "--out", tmp_path / "run", *SMALL)[0] == 0
    encode = ["encode", tmp_path / "run" / "checkpoint.pt", tmp_path / "items.csv", "--id-column",
              "sku", "--out", tmp_path / "ids", "--batch-size", 16, "--no-progress"]
    code, _, err = run_cli(capsys, *encode)
    assert_user_error(code, err, r"row 7 \(1 row\)")
    assert _no_outputs(tmp_path / "ids")
    code, text, err = run_cli(capsys, *encode, "--drop-nonfinite")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "ids" / "ids.csv")))
    assert [r["item_id"] for r in rows] == [f"sku-{i}" for i in range(40) if i != 7]
    assert "skipped row 7 (1 row)" in text


# ---- bad input: one line, exit 2, nothing half-written -------------------------------------------

@pytest.mark.parametrize("array, pattern", [
    (np.zeros(50, dtype=np.float32), "2-D"),
    (np.zeros((50, 16), dtype=np.int32), "floating-point"),
    (np.zeros((0, 16), dtype=np.float32), "no rows"),
])
def test_fit_rejects_bad_arrays(tmp_path, capsys, array, pattern):
    np.save(tmp_path / "bad.npy", array)
    code, _, err = run_cli(capsys, "fit", tmp_path / "bad.npy", "--out", tmp_path / "run", *SMALL)
    assert_user_error(code, err, pattern)
    assert _no_outputs(tmp_path / "run")


def test_missing_and_unreadable_files(tmp_path, capsys):
    code, _, err = run_cli(capsys, "fit", tmp_path / "nope.npy", "--out", tmp_path / "run")
    assert_user_error(code, err, "no such file")
    code, _, err = run_cli(capsys, "encode", tmp_path / "nope.pt", tmp_path / "nope.npy")
    assert_user_error(code, err, "no such checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    np.save(tmp_path / "x.npy", np.zeros((3, 4), dtype=np.float32))
    code, _, err = run_cli(capsys, "encode", tmp_path / "junk.pt", tmp_path / "x.npy",
                        "--out", tmp_path / "enc")
    assert_user_error(code, err, "truncated or not an rqvae-fast checkpoint")
    assert _no_outputs(tmp_path / "enc")
    code, _, err = run_cli(capsys, "stats", tmp_path / "nope.npy")
    assert_user_error(code, err, "no such file")
    (tmp_path / "zero.npy").write_bytes(b"")
    code, _, err = run_cli(capsys, "fit", tmp_path / "zero.npy", "--out", tmp_path / "run")
    assert_user_error(code, err, "not a readable .npy")
    code, _, err = run_cli(capsys, "fit", tmp_path / "x.npy", "--out", tmp_path / "junk.pt")
    assert_user_error(code, err, "not a folder")


def test_checkpoint_from_another_configuration(tmp_path, small_npy, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "fit", small_npy, "--out", out, *SMALL)
    assert code == 0, err
    np.save(tmp_path / "wide.npy", np.zeros((10, 24), dtype=np.float32))
    code, _, err = run_cli(capsys, "encode", out / "checkpoint.pt", tmp_path / "wide.npy",
                        "--out", tmp_path / "enc", "--no-progress")
    assert_user_error(code, err, "24-d but the checkpoint's model expects 16-d")
    assert _no_outputs(tmp_path / "enc")
    before = (out / "checkpoint.pt").read_bytes()
    code, _, err = run_cli(capsys, "fit", small_npy, "--out", out, "--resume",
                        *[a if a != "4" else "6" for a in SMALL])
    assert_user_error(code, err, "another configuration: latent_dim=4")
    assert (out / "checkpoint.pt").read_bytes() == before  # untouched
    (out / "cut.pt").write_bytes(before[: len(before) // 2])
    code, _, err = run_cli(capsys, "encode", out / "cut.pt", small_npy, "--out", tmp_path / "enc")
    assert_user_error(code, err, "truncated")


def test_resume_continues_training(tmp_path, small_npy, capsys):
    out = tmp_path / "run"
    args = ["fit", small_npy, "--out", out, *SMALL]
    assert run_cli(capsys, *args)[0] == 0
    args[args.index("--epochs") + 1] = "2"
    code, _, err = run_cli(capsys, *args, "--resume")
    assert_user_error(code, err, "epochs=1")  # other settings than the checkpoint's run
    code, _, err = run_cli(capsys, "fit", small_npy, "--out", tmp_path / "fresh", "--resume", *SMALL)
    assert_user_error(code, err, "no checkpoint")


def test_bad_option_values(tmp_path, small_npy, capsys):
    code, _, err = run_cli(capsys, "fit", small_npy, "--layers", 3, "--codebook-size", "8,8",
                        "--out", tmp_path / "r")
    assert_user_error(code, err, "2 sizes for 3 layers")
    code, _, err = run_cli(capsys, "fit", small_npy, "--hidden-dims", "16,x", "--out", tmp_path / "r")
    assert_user_error(code, err, "--hidden-dims")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--epochs", "0"])
    assert info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


# ---- entry points and help ------------------------------------------------------------------------

def test_bench_is_delegated_with_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("rqvae_fast.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "rqvae_fast.bench", fake)
    import rqvae_fast

    monkeypatch.setattr(rqvae_fast, "bench", fake, raising=False)
    assert main(["bench", "--sizes", "1000", "--quick"]) == 0
    assert seen == [["--sizes", "1000", "--quick"]]
    assert main(["bench", "--help"]) == 0 and seen[-1] == ["--help"]


def test_help_lists_commands_and_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    listing = capsys.readouterr().out
    for command in ("fit", "encode", "stats", "bench"):
        assert command in listing
    # python -m rqvae_fast is the same program
    result = subprocess.run([sys.executable, "-m", "rqvae_fast", "fit", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for default in ("(default: 3)", "(default: 256)", "(default: 32)", "(default: 0.25)",
                    "(default: 1024)", "(default: 512,256,128)"):
        assert default in text, default
    assert re.search(r"--seed S .*?\(default: 0\)", text), "a default of 0 is shown too"
    for flag in ("--header", "--no-header", "--overwrite"):
        assert flag in text


@pytest.mark.parametrize("module", ["rqvae_fast.bench", "rqvae_fast.bench_pipeline"])
def test_every_bench_option_has_help(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert missing == []


def test_library_warnings_are_one_line_in_our_words(capsys):
    import warnings

    from rqvae_fast.cli import _show_warning
    from rqvae_fast.kmeans import KMeansWarning

    _show_warning(KMeansWarning("k-means left 3 codes without rows"), KMeansWarning, "x.py", 1)
    assert capsys.readouterr().err == "rqvae-fast: warning: k-means left 3 codes without rows\n"
    _show_warning(UserWarning("other"), UserWarning, "x.py", 1)
    assert "UserWarning: other" in capsys.readouterr().err


def test_small_fit_prints_no_sklearn_convergence_warning(tmp_path, capsys):
    """Few distinct residuals for many codes made scikit-learn print its raw ConvergenceWarning."""
    data = make_catalogue(num_items=120, dim=16, branching=(4, 2, 2), seed=3).embeddings.numpy()
    np.save(tmp_path / "few.npy", np.repeat(data[:20], 6, axis=0))  # 20 distinct rows
    code, _, err = run_cli(capsys, "fit", tmp_path / "few.npy", "--method", "rqkmeans",
                           "--layers", 2, "--codebook-size", 32, "--out", tmp_path / "km")
    assert code == 0, err
    assert "ConvergenceWarning" not in err and "sklearn" not in err


# ---- CSV header row, output folders, stats metadata (issue 13) ----------------------------------

def test_fit_on_a_csv_without_header_keeps_every_item(tmp_path, small_npy, capsys):
    data = np.load(small_npy)[:60]
    (tmp_path / "raw.csv").write_text("".join(",".join(repr(float(v)) for v in row) + "\n"
                                             for row in data))
    out = tmp_path / "run"
    code, text, err = run_cli(capsys, "fit", tmp_path / "raw.csv", "--out", out, *SMALL)
    assert code == 0, err
    assert "no header row (detected); all 60 lines are items" in text
    ids = [row["item_id"] for row in csv.DictReader(open(out / "ids.csv"))]
    assert ids == [str(i) for i in range(60)]
    # the same file with an id column and no header: --no-header, columns named by position
    (tmp_path / "ids.csv").write_text("".join(f"sku-{i}," + ",".join(repr(float(v)) for v in row)
                                              + "\n" for i, row in enumerate(data)))
    encode = ["encode", out / "checkpoint.pt", tmp_path / "ids.csv", "--id-column", "0",
              "--out", tmp_path / "enc", "--no-progress", "--no-dedup"]
    code, _, err = run_cli(capsys, *encode)
    assert_user_error(code, err, "--no-header")
    code, text, err = run_cli(capsys, *encode, "--no-header")
    assert code == 0, err
    assert "no header row (as requested)" in text
    rows = list(csv.DictReader(open(tmp_path / "enc" / "ids.csv")))
    assert [r["item_id"] for r in rows] == [f"sku-{i}" for i in range(60)]
    np.testing.assert_array_equal(np.load(tmp_path / "enc" / "codes.npy"),
                                  np.load(out / "codes.npy")[:, :2])
    # --header forces the numeric first line to be a header: said, not silent
    code, text, err = run_cli(capsys, "fit", tmp_path / "raw.csv", "--header", "--out",
                              tmp_path / "run2", *SMALL)
    assert code == 0, err
    assert "first line read as a header (as requested; 59 data rows)" in text
    assert len(np.load(tmp_path / "run2" / "codes.npy")) == 59
    code, _, err = run_cli(capsys, "fit", small_npy, "--no-header", "--out", tmp_path / "r3", *SMALL)
    assert_user_error(code, err, "--no-header applies to CSV/TSV files only")


def test_fit_refuses_another_runs_folder_unless_overwrite(tmp_path, small_npy, capsys):
    out = tmp_path / "items"
    assert run_cli(capsys, "fit", small_npy, "--out", out, *SMALL)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    code, _, err = run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", "--layers", 2,
                           "--codebook-size", 8, "--out", out)
    assert_user_error(code, err, r"holds the outputs of an earlier run \(checkpoint.pt, .*"
                                 r"--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == before and (out / "log.csv").exists()
    code, text, err = run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", "--layers", 2,
                              "--codebook-size", 8, "--out", out, "--overwrite")
    assert code == 0, err
    assert "--overwrite: removed" in text
    assert not (out / "log.csv").exists() and not (out / "log.json").exists()  # no stale logs
    assert json.loads((out / "summary.json").read_text())["method"] == "rqkmeans"
    # encode too
    enc = ["encode", out / "checkpoint.pt", small_npy, "--out", tmp_path / "e", "--no-progress"]
    assert run_cli(capsys, *enc)[0] == 0
    assert_user_error(*run_cli(capsys, *enc)[::2], "--overwrite")
    assert run_cli(capsys, *enc, "--overwrite")[0] == 0


def test_stats_knows_the_dedup_column_and_codebook_sizes(tmp_path, small_npy, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", "--layers", 2,
                   "--codebook-size", "4,512", "--out", out)[0] == 0
    codes = np.load(out / "codes.npy")
    assert codes.shape == (300, 3) and codes[:, 1].max() < 511  # size not inferable from codes
    code, text, err = run_cli(capsys, "stats", out / "codes.npy", "--json")
    assert code == 0, err
    stats = json.loads(text)
    assert stats["codebook_sizes"] == [4, 512] and stats["dedup_position"] is True
    assert [layer["size"] for layer in stats["layers"]] == [4, 512]
    assert not stats["layout_assumed"] and stats["unique_ids_with_dedup"] == 300
    code, text, err = run_cli(capsys, "stats", out / "ids.csv")
    assert code == 0, err
    assert "2 layers + a dedup position" in text and "/512 codes used" in text
    # the codes file alone: the layout is inferred and the output says what was assumed
    alone = tmp_path / "alone"
    alone.mkdir()
    np.save(alone / "codes.npy", codes)
    code, text, err = run_cli(capsys, "stats", alone / "codes.npy")
    assert code == 0, err
    assert "assumed: " in text and "dedup position" in text
    assert "2 layers + a dedup position" in text
    np.save(alone / "codes.npy", codes[:, :2])
    stats = json.loads(run_cli(capsys, "stats", alone / "codes.npy", "--json")[1])
    assert stats["layout_assumed"] and stats["dedup_position"] is False
    assert len(stats["layers"]) == 2


def test_fit_defaults_ema_codebooks_and_variance_weighted_reconstruction(tmp_path, small_npy,
                                                                          capsys):
    """Issue 11: the CLI's RQ-VAE defaults are EMA codebooks and the reconstruction weighted by
    the inverse data variance (the seed's settings stay one flag away)."""
    from rqvae_fast.cli import _model_from_args, _train_config, build_parser

    args = build_parser().parse_args(["fit", "x.npy"])
    model = _model_from_args(args, 16)
    assert model.ema and all(layer.ema for layer in model.vq.vq_layers)
    assert _train_config(args).recon_weight is None
    seed_args = build_parser().parse_args(["fit", "x.npy", "--no-ema", "--recon-weight", "1"])
    assert not _model_from_args(seed_args, 16).ema
    assert _train_config(seed_args).recon_weight == 1.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "x.npy", "--recon-weight", "0"])
    assert "positive number" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "fit", small_npy, *SMALL, "--out", tmp_path / "r")
    assert code == 0, err
    saved = torch.load(tmp_path / "r" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert any("ema_cluster_size" in key for key in saved["model_state"])
