"""Trainer: schedules, warm-up, dead-code reset, early stopping, resume, logs, diagnostics."""
import csv
import json
import re
import sys
import warnings

import numpy as np

import pytest
import torch

from rqvae_fast.checkpoint import CheckpointError, load_checkpoint, load_model
from rqvae_fast.data import UserError
from rqvae_fast.metrics import TrainingFacts, diagnose
from rqvae_fast.model import RQVAE
from rqvae_fast.synthetic import make_catalogue
from rqvae_fast.trainer import TrainConfig, Trainer, TrainingDiverged, write_plot


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def catalogue():
    return make_catalogue(num_items=640, dim=32, branching=(4, 4, 2), seed=1)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    options = dict(input_dim=32, hidden_dims=[32], latent_dim=8, num_vq_layers=2,
                   num_embeddings_list=[16, 16])
    options.update(kw)
    return RQVAE(**options)


def _config(**kw):
    options = dict(epochs=3, batch_size=128, progress=False, lr=3e-3)
    options.update(kw)
    return TrainConfig(**options)


def _quiet(_message):
    pass


def test_fit_trains_logs_and_checkpoints(tmp_path, catalogue):
    model = _model()
    result = Trainer(model, _config(), out_dir=tmp_path, log=_quiet).fit(catalogue.embeddings)
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2, 3] and result.model is model
    assert history[-1]["val_total"] < history[0]["val_total"]
    for key in ("train_recon", "train_vq", "val_recon", "usage_l0", "usage_l1", "perplexity_l0",
                "colliding_share", "lr", "beta", "dead_codes_reset", "seconds"):
        assert key in history[0]
    assert "collision_rate" not in history[0]  # one name per metric: the share of items sharing
    assert 0 < history[-1]["usage_l0"] <= 1 and 1 <= history[-1]["perplexity_l0"] <= 16
    logged = json.loads((tmp_path / "log.json").read_text())
    assert [row["epoch"] for row in logged] == [1, 2, 3]
    with open(tmp_path / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and float(rows[2]["val_total"]) == pytest.approx(history[2]["val_total"])
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["config"] == model.config and payload["trainer"]["epoch"] == 3
    assert payload["trainer"]["finished"] is True
    loaded = load_model(tmp_path / "checkpoint.pt")
    torch.testing.assert_close(loaded.get_semantic_ids(catalogue.embeddings),
                               model.get_semantic_ids(catalogue.embeddings))


def test_same_seed_same_result(catalogue):
    runs = []
    for _ in range(2):
        model = _model()
        Trainer(model, _config(epochs=2), log=_quiet).fit(catalogue.embeddings)
        runs.append(model.state_dict())
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key])


def test_data_is_not_modified(catalogue):
    data = catalogue.embeddings.clone()
    Trainer(_model(), _config(epochs=1), log=_quiet).fit(data)
    torch.testing.assert_close(data, catalogue.embeddings)


def test_resumed_run_equals_uninterrupted_run(tmp_path, catalogue):
    straight = _model()
    Trainer(straight, _config(epochs=4), log=_quiet).fit(catalogue.embeddings)

    class Crash(Exception):
        pass

    def crash_after_two(record):
        if record["epoch"] == 2:
            raise Crash

    with pytest.raises(Crash):
        Trainer(_model(), _config(epochs=4), out_dir=tmp_path, log=_quiet,
                on_epoch_end=crash_after_two).fit(catalogue.embeddings)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["trainer"]["epoch"] == 2
    resumed = _model(seed=123)  # other initial weights: everything must come from the checkpoint
    result = Trainer(resumed, _config(epochs=4), out_dir=tmp_path, log=_quiet).fit(
        catalogue.embeddings, resume_from=tmp_path / "checkpoint.pt")
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_crash_mid_epoch_resumes_to_the_same_final_codebooks(tmp_path, catalogue, monkeypatch):
    """Fault injection: the process dies in the middle of epoch 3 (an optimizer step raises); a
    fresh process resumes from the last checkpoint and ends exactly where an uninterrupted run does."""
    straight = _model()
    Trainer(straight, _config(epochs=4), log=_quiet).fit(catalogue.embeddings)

    class Crash(Exception):
        pass

    steps_per_epoch = -(-int(len(catalogue.embeddings) * 0.95) // 128)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 2:  # two steps into epoch 3
            raise Crash
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(Crash):
        Trainer(_model(), _config(epochs=4), out_dir=tmp_path, log=_quiet).fit(catalogue.embeddings)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["trainer"]["epoch"] == 2

    resumed = _model(seed=321)
    Trainer(resumed, _config(epochs=4), out_dir=tmp_path, log=_quiet).fit(
        catalogue.embeddings, resume_from=tmp_path / "checkpoint.pt")
    for layer_a, layer_b in zip(straight.vq.vq_layers, resumed.vq.vq_layers):
        torch.testing.assert_close(layer_b.embeddings, layer_a.embeddings)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_resume_refuses_other_configuration_settings_or_data(tmp_path, catalogue):
    Trainer(_model(), _config(epochs=1), out_dir=tmp_path, log=_quiet).fit(catalogue.embeddings)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="latent_dim"):
        Trainer(_model(latent_dim=4), _config(epochs=1), log=_quiet).fit(catalogue.embeddings,
                                                                         resume_from=ckpt)
    with pytest.raises(CheckpointError, match="batch_size"):
        Trainer(_model(), _config(epochs=1, batch_size=64), log=_quiet).fit(catalogue.embeddings,
                                                                            resume_from=ckpt)
    with pytest.raises(CheckpointError, match="other data"):
        Trainer(_model(), _config(epochs=1), log=_quiet).fit(catalogue.embeddings * 2,
                                                             resume_from=ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer(_model(), _config(epochs=1), log=_quiet).fit(catalogue.embeddings, resume_from=ckpt)


def test_early_stopping_keeps_the_best_epoch(catalogue):
    model = _model()
    seen = []

    # a learning rate so small nothing improves by the relative margin: stop after `patience`
    result = Trainer(model, _config(epochs=10, lr=1e-9, patience=2, min_delta=0.01,
                                    dead_code_window=0, beta_start=None),
                     log=seen.append).fit(catalogue.embeddings)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1
    assert any("early stop" in line for line in seen)


def test_commitment_warm_up_and_schedules(catalogue):
    model = _model(commitment_cost=0.5)
    trainer = Trainer(model, _config(epochs=2, beta_start=0.1, beta_warmup=0.9, scheduler="cosine",
                                     optimizer="adagrad", lr=0.05), log=_quiet)
    assert trainer._beta(0, 100) == pytest.approx(0.1)
    assert trainer._beta(45, 100) == pytest.approx(0.3)
    assert trainer._beta(90, 100) == pytest.approx(0.5) == trainer._beta(99, 100)
    result = trainer.fit(catalogue.embeddings)
    assert result.history[0]["beta"] < 0.5 and result.history[-1]["beta"] == pytest.approx(0.5)
    assert result.history[-1]["lr"] < 1e-3  # cosine annealed to ~0
    assert all(layer.commitment_cost == 0.5 for layer in model.vq.vq_layers)
    assert TrainConfig(optimizer="adagrad").learning_rate == 0.01
    assert TrainConfig(optimizer="adagrad", lr=0.4).learning_rate == 0.4


def test_dead_codes_are_reseeded_from_residuals(catalogue):
    model = _model()
    model.initialize_codebooks(catalogue.embeddings, seed=0, batch_size=128)
    with torch.no_grad():
        model.vq.vq_layers[0].embeddings[10:] = 1e3  # six codes no latent will ever choose
    result = Trainer(model, _config(epochs=2, dead_code_window=3), log=_quiet).fit(
        catalogue.embeddings)
    assert result.history[0]["dead_codes_reset"] >= 6
    assert model.vq.vq_layers[0].embeddings.detach().abs().max() < 100
    assert result.history[-1]["usage_l0"] > 10 / 16


def test_ema_codebooks_train(catalogue):
    model = _model(ema=True)
    result = Trainer(model, _config(epochs=2), log=_quiet).fit(catalogue.embeddings)
    assert result.history[-1]["val_total"] < result.history[0]["train_total"]
    trainer = Trainer(model, _config(), log=_quiet)
    grouped = {id(p) for g in trainer._optimizer().param_groups for p in g["params"]}
    assert all(id(layer.embeddings) not in grouped for layer in model.vq.vq_layers)


def test_divergence_is_reported_as_a_user_error(tmp_path, catalogue):
    with pytest.raises(TrainingDiverged, match="learning rate"):
        Trainer(_model(), _config(epochs=2, lr=1e12, grad_clip=None), out_dir=tmp_path,
                log=_quiet).fit(catalogue.embeddings)


def test_bad_training_input(catalogue):
    trainer = Trainer(_model(), _config(), log=_quiet)
    with pytest.raises(UserError, match="16-d rows but the model expects 32-d"):
        trainer.fit(torch.randn(100, 16))
    bad = catalogue.embeddings.clone()
    bad[7, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        trainer.fit(bad)
    with pytest.raises(UserError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(UserError, match="validation fraction"):
        TrainConfig(val_fraction=1.0)


def test_fit_takes_numpy_arrays_and_memmaps(tmp_path, catalogue):
    array = catalogue.embeddings.numpy().copy()
    np.save(tmp_path / "x.npy", array)
    memmap = np.load(tmp_path / "x.npy", mmap_mode="r")
    results = []
    for data in (catalogue.embeddings, array, memmap):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "array is not writable" from torch either
            model = Trainer(_model(), _config(epochs=1), log=_quiet).fit(data).model
            results.append(model.get_semantic_ids(data))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    np.testing.assert_array_equal(array, catalogue.embeddings.numpy())  # not modified


@pytest.mark.parametrize("data, named", [
    ([[0.0] * 32] * 4, "builtins.list"),
    (np.zeros((4, 32), dtype=np.int64), "int64"),
    (np.zeros(32, dtype=np.float32), "shape (32,)"),
])
def test_bad_training_data_type_is_named(data, named):
    with pytest.raises(UserError, match=re.escape(named)):
        Trainer(_model(), _config(), log=_quiet).fit(data)


def test_reconstruction_is_judged_at_the_end_of_the_run(catalogue):
    """Early epochs of a run that ends well do not warn of a high reconstruction loss."""
    assert diagnose(_facts(recon_loss=0.8, final=False)) == []
    assert "reconstruction" in diagnose(_facts(recon_loss=0.8, final=True))[0]
    # the trainer marks only the last epoch final
    flags = []
    original = TrainingFacts.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        flags.append(self.final)
    try:
        TrainingFacts.__init__ = spy
        Trainer(_model(), _config(epochs=3, patience=0), log=_quiet).fit(catalogue.embeddings)
    finally:
        TrainingFacts.__init__ = original
    assert flags == [False, False, True]


def test_early_stop_epoch_counts_as_final():
    trainer = Trainer(_model(), _config(epochs=10, patience=2), log=_quiet)
    state = {"best_value": 1.0, "bad_epochs": 1}
    assert trainer._is_last_epoch(4, 1.0, state)            # no improvement: stops now
    assert not trainer._is_last_epoch(4, 0.5, state)        # improved: goes on
    assert trainer._is_last_epoch(10, 0.5, state)           # the last epoch


def test_plot_has_whole_epoch_ticks(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    for epochs in (3, 20):  # matplotlib's default ticks: 0.5, 1.5 ... and 2.5, 7.5 ...
        history = [{"epoch": e, "train_recon": 1.0 / e, "train_vq": 0.5 / e}
                   for e in range(1, epochs + 1)]
        write_plot(tmp_path / "p.png", history, [np.array([3, 0, 1]), np.array([1, 1, 2])])
        ticks = figures[-1].axes[0].get_xticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (epochs, ticks)


def test_plot_needs_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="matplotlib"):
        Trainer(_model(), _config(), plot=True)


def test_plot_is_written_when_matplotlib_is_installed(tmp_path, catalogue):
    pytest.importorskip("matplotlib")
    Trainer(_model(), _config(epochs=1), out_dir=tmp_path, plot=True, log=_quiet).fit(
        catalogue.embeddings)
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


# ---- diagnostics -----------------------------------------------------------------------------------

def _facts(**kw):
    options = dict(layer_usage=[0.9, 0.9], codebook_sizes=[256, 256], lr=1e-3, optimizer="adamw",
                   commitment_cost=0.25, num_train_items=50_000, recon_loss=0.1, vq_loss=0.1,
                   data_variance=1.0, relative_quant_error=0.1)
    options.update(kw)
    return TrainingFacts(**options)


def test_diagnose_is_quiet_when_healthy():
    assert diagnose(_facts()) == []


@pytest.mark.parametrize("changes, cause", [
    (dict(lr=1e-2), "learning rate"),
    (dict(lr=0.4, optimizer="adagrad"), "too high for adagrad"),
    (dict(commitment_cost=0.05), "beta"),
    (dict(num_train_items=500), "training items"),
    (dict(dead_code_reset=False), "dead-code reset"),
    (dict(), "--beta"),
])
def test_diagnose_names_the_likely_cause_of_collapse(changes, cause):
    warnings = diagnose(_facts(layer_usage=[0.9, 0.04], **changes))
    assert len(warnings) == 1 and "layer 1" in warnings[0] and "4%" in warnings[0]
    assert cause in warnings[0]


def test_diagnose_other_symptoms():
    assert "diverged" in diagnose(_facts(recon_loss=float("nan")))[0]
    assert "reconstruction" in diagnose(_facts(recon_loss=0.8))[0]
    assert "quantization" in diagnose(_facts(relative_quant_error=0.8))[0]
    assert "unstable" in diagnose(_facts(monitor=3.0, previous_monitor=[1.0, 1.2]))[0]
    # in the first epochs only divergence and instability are reported
    assert diagnose(_facts(layer_usage=[0.01, 0.01], recon_loss=0.9, settled=False)) == []


@pytest.mark.parametrize("ratio", [0.8, 1.0, 2.17])
def test_quantization_warning_never_reports_more_than_all_of_the_variance(ratio):
    # issue 11: a collapsed run printed "codes miss 217% of the latent variance"
    warnings = [w for w in diagnose(_facts(relative_quant_error=ratio)) if "quantization" in w]
    assert len(warnings) == 1
    percents = [int(p) for p in re.findall(r"(\d+)%", warnings[0])]
    assert all(p <= 100 for p in percents), warnings[0]
    if ratio > 1:
        assert "2.17x the latent variance" in warnings[0] and "farther" in warnings[0]
    else:
        assert f"{ratio:.0%}" in warnings[0]


@pytest.mark.parametrize("monitor, key", [("recon", "val_recon"), ("total", "val_total")])
def test_monitor_picks_the_validation_loss(catalogue, monitor, key):
    result = Trainer(_model(), _config(monitor=monitor), out_dir=None,
                     log=_quiet).fit(catalogue.embeddings)
    monitored = [h["monitor"] for h in result.history]
    assert monitored == pytest.approx([h[key] for h in result.history])
    assert result.best_epoch == 1 + int(np.argmin(monitored))
    with pytest.raises(UserError, match="monitor"):
        TrainConfig(monitor="loss")
