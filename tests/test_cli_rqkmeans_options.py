"""``fit --method rqkmeans --balanced / --beam-size`` and ``encode --beam-size``."""
import json

import numpy as np
import pytest
import torch

from helpers import assert_user_error, run_cli, write_catalogue_npy
from rqvae_fast.beam import beam_encode
from rqvae_fast.checkpoint import load_model
from rqvae_fast.metrics import collision_stats

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = ["--layers", "2", "--codebook-size", "16,64"]  # 1,024 IDs for 400 items


@pytest.fixture
def small_npy(tmp_path):
    return write_catalogue_npy(tmp_path, 400, 12)


def test_beam_size_on_fit_and_encode(tmp_path, small_npy, capsys):
    out = tmp_path / "beam"
    code, _, err = run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", *SIZES,
                           "--beam-size", "4", "--out", out, "--no-dedup")
    assert code == 0, err
    model = load_model(out / "checkpoint.pt")
    data = torch.from_numpy(np.load(small_npy))
    expected, _ = beam_encode(data, [b.detach() for b in model.vq.codebooks], 4)
    np.testing.assert_array_equal(np.load(out / "codes.npy"), expected.numpy())
    assert json.loads((out / "summary.json").read_text())["beam_size"] == 4
    code, _, err = run_cli(capsys, "encode", out / "checkpoint.pt", small_npy, "--out",
                           tmp_path / "e", "--no-progress", "--no-dedup", "--beam-size", "4",
                           "--batch-size", "37")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "e" / "codes.npy"), expected.numpy())


def test_balanced_fit_cuts_shared_ids(tmp_path, small_npy, capsys):
    shares = []
    for extra in ([], ["--balanced"]):
        out = tmp_path / ("bal" if extra else "plain")
        code, text, err = run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", *SIZES, *extra,
                                  "--out", out, "--no-dedup")
        assert code == 0, err
        shares.append(collision_stats(np.load(out / "codes.npy")).colliding_share)
    assert shares[1] < shares[0]
    assert json.loads((tmp_path / "bal" / "summary.json").read_text())["balanced"] is True


def test_option_misuse_is_a_clear_error(tmp_path, small_npy, capsys):
    code, _, err = run_cli(capsys, "fit", small_npy, "--balanced", "--out", tmp_path / "a")
    assert_user_error(code, err, "rqkmeans only")
    code, _, err = run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", "--balanced",
                           "--beam-size", "2", "--out", tmp_path / "b")
    assert_user_error(code, err, "does not combine")
    with pytest.raises(SystemExit) as stop:  # argparse rejects it with its usage message
        run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", "--beam-size", "0")
    assert stop.value.code == 2
    assert "--beam-size: expected a positive integer" in capsys.readouterr().err


def test_beam_encode_reports_nonfinite_rows(tmp_path, small_npy, capsys):
    out = tmp_path / "km"
    code, _, err = run_cli(capsys, "fit", small_npy, "--method", "rqkmeans", *SIZES, "--out", out)
    assert code == 0, err
    data = np.load(small_npy)
    data[7] = np.nan
    bad = tmp_path / "bad.npy"
    np.save(bad, data)
    code, _, err = run_cli(capsys, "encode", out / "checkpoint.pt", bad, "--out", tmp_path / "e",
                           "--no-progress", "--beam-size", "3")
    assert_user_error(code, err, "row 7")
    code, _, err = run_cli(capsys, "encode", out / "checkpoint.pt", bad, "--out", tmp_path / "e",
                           "--no-progress", "--beam-size", "3", "--drop-nonfinite")
    assert code == 0, err
    assert np.load(tmp_path / "e" / "codes.npy").shape[0] == 399
