"""Training loop for :class:`~rqvae_fast.RQVAE`: schedules, warm-ups, dead-code reset, validation,
early stopping, resumable checkpoints and per-epoch diagnostics (the seed's chapters 3-4).
"""
from __future__ import annotations

import copy
import csv
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn as nn

from ._validation import float_matrix
from .checkpoint import CheckpointError, check_config, cpu_state, load_checkpoint, save_checkpoint
from .data import UserError, atomic_output
from .functional import residual_quantize
from .metrics import COLLAPSE_USAGE, TrainingFacts, collision_stats, diagnose, layer_counts, \
    perplexity, usage

OPTIMIZERS = ("adamw", "adagrad")
SCHEDULERS = ("onecycle", "cosine", "none")
# TIGER trained with Adagrad at 0.4, but Adagrad's first steps move every weight by about the
# learning rate; with these BatchNorm MLPs 0.4 collapses the codebooks, 0.005-0.05 trains well.
DEFAULT_LR = {"adamw": 1e-3, "adagrad": 0.01}
# Below this many steps BatchNorm's running statistics still remember their start values; the
# trainer then recomputes them before evaluating (eval-mode IDs must match what training saw).
BN_SETTLE_STEPS = 100
# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("batch_size", "optimizer", "lr", "weight_decay", "scheduler", "seed", "val_fraction",
               "epochs", "beta_start", "beta_warmup", "dead_code_window", "recon_weight",
               "codebook_lr_scale")
# What checkpoints written before a setting existed trained with (they resume unchanged).
RESUME_LEGACY = {"recon_weight": 1.0, "codebook_lr_scale": 1.0}


class TrainingDiverged(UserError):
    """The loss became NaN/Inf; the message says what to change."""


@dataclass
class TrainConfig:
    """Training settings (defaults follow the seed: batch 1024, AdamW 1e-3, OneCycleLR, beta warm-up
    0.1 -> the model's commitment cost).

    - ``lr=None``: 1e-3 for AdamW, 0.01 for Adagrad (TIGER's 0.4 collapses these MLPs).
    - ``beta_start=None`` disables the commitment warm-up; ``beta_warmup`` is the share of all
      training steps over which beta rises linearly to the model's ``commitment_cost``.
    - ``dead_code_window``: steps after which codes unused during them are re-seeded from current
      residuals; ``None`` = one epoch, ``0`` = never. Not done in the final epoch.
    - ``output_init``: before the codebook k-means of a fresh model, start the decoder's output
      layer at the data mean with small weights (:meth:`RQVAE.initialize_output_layer`).
    - ``recon_weight``: weight of the reconstruction MSE in the training loss (the VQ loss has
      weight 1; the default 1.0 is the seed's plain sum). ``None`` = ``1 / mean per-dimension
      variance of the data``: the term is then the share of the data variance not reconstructed
      (about 1 at the start whatever the data's scale), so it is not drowned by the latent-space
      VQ loss. Unit-norm 256-d embeddings have a per-dimension variance of ~0.004; with weight 1
      the VQ loss outweighs the reconstruction ~30x and the encoder collapses onto a few
      directions. The logged ``recon`` stays the plain MSE; ``total`` is the weighted sum.
    - ``codebook_lr_scale``: learned codebooks train at this multiple of the learning rate (the
      schedule scales them alike; default 1, as the seed). An encoder weight step moves a latent
      by about ``lr`` times the last layer's fan-in times its activations, a codebook step by
      ``lr``: at 1x the codebooks can lag behind the latents (stale codes, a quantization error
      above the latent variance); 30 is part of the unit-norm recipe in docs/PIPELINE.md.
      Ignored for EMA codebooks.
    - ``patience``: epochs without a relative improvement of ``min_delta`` in the monitored
      validation loss before stopping (``0`` = never stop early). The best epoch's weights are kept.
    - ``monitor``: the validation loss that picks the best epoch and stops early: ``"recon"`` (the
      default: the reconstruction MSE, what the model is for) or ``"total"`` (the weighted sum
      with the VQ terms, the seed's choice). On unit-norm real embeddings the VQ terms dominate
      the total and fall most in the first epochs, so ``"total"`` kept epoch 10 of 20 (WordLlama,
      end-to-end error 0.921) where ``"recon"`` keeps epoch 19 (0.893); with
      ``recon_weight=None`` the total even picked epoch 1 (0.948) and ``"recon"`` epoch 17 (0.814).
    """

    epochs: int = 20
    batch_size: int = 1024
    optimizer: str = "adamw"
    lr: Optional[float] = None
    weight_decay: float = 1e-4
    scheduler: str = "onecycle"
    grad_clip: Optional[float] = 1.0
    beta_start: Optional[float] = 0.1
    beta_warmup: float = 0.2
    dead_code_window: Optional[int] = None
    recon_weight: Optional[float] = 1.0
    codebook_lr_scale: float = 1.0
    val_fraction: float = 0.05
    patience: int = 5
    min_delta: float = 1e-3
    monitor: str = "recon"
    seed: int = 0
    init_samples: int = 100_000
    init_method: str = "auto"
    kmeans_iters: int = 20
    eval_max_items: int = 65_536
    eval_batch_size: int = 8192
    collapse_usage: float = COLLAPSE_USAGE
    output_init: bool = True
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise UserError(f"need epochs >= 1 and batch size >= 2, "
                            f"got {self.epochs}, {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"validation fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")
        if self.beta_start is not None and self.beta_start < 0:
            raise UserError(f"beta start must be >= 0, got {self.beta_start}")
        if not (self.codebook_lr_scale > 0 and math.isfinite(self.codebook_lr_scale)):
            raise UserError(f"codebook learning-rate scale must be a finite number > 0, got "
                            f"{self.codebook_lr_scale}")
        if self.monitor not in ("recon", "total"):
            raise UserError(f"monitor must be 'recon' or 'total', got {self.monitor!r}")
        if self.recon_weight is not None and not (self.recon_weight > 0
                                                  and math.isfinite(self.recon_weight)):
            raise UserError(f"reconstruction weight must be a finite number > 0, got "
                            f"{self.recon_weight}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns; ``model`` holds the best epoch's weights."""

    model: nn.Module
    history: List[dict]
    best_epoch: int
    stopped_early: bool
    warnings: List[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names as ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    return device


def recon_weight(configured: Optional[float], data_variance: float) -> float:
    """``configured``, or for ``None`` ``1 / data_variance`` (mean per-dimension variance; 1.0
    for constant data)."""
    if configured is not None:
        return float(configured)
    return 1.0 / data_variance if data_variance > 0 and math.isfinite(data_variance) else 1.0


def _data_checksum(data: torch.Tensor) -> float:
    return float(data[:4096].double().sum())


class Trainer:
    """Trains an :class:`~rqvae_fast.RQVAE` on an in-memory ``(N, input_dim)`` float tensor.

    ``out_dir`` (optional) receives ``checkpoint.pt`` (every epoch), ``log.csv`` and ``log.json``,
    and with ``plot=True`` ``training.png``; every file is replaced atomically. ``log`` receives
    one-line progress messages; ``on_epoch_end(record)`` is called after each epoch's checkpoint.
    """

    def __init__(self, model: nn.Module, config: Optional[TrainConfig] = None, *,
                 out_dir=None, plot: bool = False, log: Callable[[str], None] = print,
                 on_epoch_end: Optional[Callable[[dict], None]] = None):
        self.model = model
        self.on_epoch_end = on_epoch_end
        self.config = config or TrainConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.plot = plot
        self.log = log
        self.device = resolve_device(self.config.device)
        if plot:
            _require_matplotlib()

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    # ---- setup ---------------------------------------------------------------------------------
    def _split(self, n: int):
        gen = torch.Generator().manual_seed(self.config.seed)
        order = torch.randperm(n, generator=gen)
        n_val = int(round(n * self.config.val_fraction))
        if self.config.val_fraction > 0 and n_val == 0 and n >= 4:
            n_val = 1
        val, train = order[:n_val], order[n_val:]
        if train.numel() < 2:
            raise UserError(f"need at least 2 training items, got {train.numel()} "
                            f"(of {n}, validation fraction {self.config.val_fraction})")
        metric_rows = order[: self.config.eval_max_items]  # a fixed sample, the same every epoch
        return train, val, metric_rows

    def _param_groups(self):
        codebooks = {id(layer.embeddings) for layer in self.model.vq.vq_layers}
        ema = bool(getattr(self.model.vq, "ema", False))
        decay, no_decay, learned_codebooks = [], [], []
        for name, param in self.model.named_parameters():
            if id(param) in codebooks:
                if not ema:  # EMA codebooks move by averages, not by the optimizer
                    learned_codebooks.append(param)
            elif param.dim() < 2:  # biases, BatchNorm
                no_decay.append(param)
            else:
                decay.append(param)
        lr = self.config.learning_rate
        wd = self.config.weight_decay if self.config.optimizer == "adamw" else 0.0
        groups = [{"params": decay, "weight_decay": wd, "lr": lr},
                  {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
        if self.config.codebook_lr_scale == 1.0:  # two groups, as checkpoints before the option
            no_decay.extend(learned_codebooks)
        else:
            groups.append({"params": learned_codebooks, "weight_decay": 0.0,
                           "lr": lr * self.config.codebook_lr_scale})
        return groups

    def _optimizer(self):
        lr = self.config.learning_rate
        if self.config.optimizer == "adagrad":
            return torch.optim.Adagrad(self._param_groups(), lr=lr)
        return torch.optim.AdamW(self._param_groups(), lr=lr)

    def _scheduler(self, optimizer, total_steps: int):
        if self.config.scheduler == "onecycle":
            if total_steps < 4:  # too short for a warm-up and an annealing phase
                return None
            # 10% warm-up, but at least two steps (OneCycleLR needs each phase to span steps)
            pct_start = min(0.5, max(0.1, 2.5 / total_steps))
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=total_steps,
                pct_start=pct_start, cycle_momentum=False)
        if self.config.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
        return None

    def _beta(self, step: int, total_steps: int) -> float:
        target = float(self.model.commitment_cost)
        start = self.config.beta_start
        if start is None or self.config.beta_warmup <= 0:
            return target
        warm = max(1, int(round(self.config.beta_warmup * total_steps)))
        return start + (target - start) * min(1.0, step / warm)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, data: torch.Tensor, resume_from=None) -> TrainResult:
        """Train on ``data (N, input_dim)``, a float tensor, NumPy array or memmap (not modified);
        ``resume_from``: a checkpoint path."""
        cfg = self.config
        try:
            data = float_matrix(data, "training data")
        except TypeError as exc:
            raise UserError(str(exc)) from None
        if data.shape[1] != self.model.input_dim:
            raise UserError(f"data has {data.shape[1]}-d rows but the model expects "
                            f"{self.model.input_dim}-d")
        if not bool(torch.isfinite(data).all()):
            bad = torch.nonzero(~torch.isfinite(data).all(dim=1)).flatten()[:5].tolist()
            raise UserError(f"training data holds NaN/Inf (rows {bad}...)")
        model = self.model.to(self.device)
        n = int(data.shape[0])
        train_rows, val_rows, metric_rows = self._split(n)
        source = data.to(self.device) if self.device.type == "cuda" else data
        source = source.float()
        steps_per_epoch = len(self._batches(train_rows, torch.Generator().manual_seed(0)))
        total_steps = cfg.epochs * steps_per_epoch
        window = steps_per_epoch if cfg.dead_code_window is None else int(cfg.dead_code_window)
        data_var = float(source.var(dim=0, unbiased=False).mean())
        self._recon_weight = recon_weight(cfg.recon_weight, data_var)

        optimizer = self._optimizer()
        scheduler = self._scheduler(optimizer, total_steps)
        state = {"epoch": 0, "step": 0, "history": [], "best_value": math.inf, "best_epoch": 0,
                 "bad_epochs": 0, "finished": False, "window_steps": 0}
        sizes = list(model.codebook_sizes)
        window_counts = [torch.zeros(k, device=self.device) for k in sizes]
        best_state = None
        if resume_from is not None:
            best_state = self._resume(resume_from, data, optimizer, scheduler, state, window_counts)
        elif not model.initialized:
            init_rows = train_rows[: cfg.init_samples]
            if cfg.output_init:
                model.initialize_output_layer(source[init_rows.to(source.device)])
            model.initialize_codebooks(source[init_rows.to(source.device)], self.device,
                                       max_samples=cfg.init_samples, method=cfg.init_method,
                                       iters=cfg.kmeans_iters, seed=cfg.seed,
                                       batch_size=cfg.batch_size)

        stopped_early = False
        warnings: List[str] = []
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if state["finished"]:
                break
            started = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            sums, resets = self._train_epoch(epoch, source, train_rows, gen, optimizer, scheduler,
                                             state, window_counts, window, total_steps)
            if state["step"] < BN_SETTLE_STEPS:
                self.model.recalibrate_batchnorm(source[train_rows[: 16 * cfg.batch_size]
                                                        .to(source.device)], cfg.batch_size)
            record = self._evaluate(epoch, source, val_rows, metric_rows, sums, resets,
                                    optimizer, state, total_steps)
            record["seconds"] = round(time.perf_counter() - started, 3)
            facts = TrainingFacts(
                layer_usage=[record[f"usage_l{i}"] for i in range(len(sizes))],
                layer_perplexity=[record[f"perplexity_l{i}"] for i in range(len(sizes))],
                codebook_sizes=sizes, lr=cfg.learning_rate, optimizer=cfg.optimizer,
                commitment_cost=float(model.commitment_cost), num_train_items=int(train_rows.numel()),
                recon_loss=record["train_recon"], vq_loss=record["train_vq"], data_variance=data_var,
                relative_quant_error=record.pop("_relative_quant_error"),
                monitor=record["monitor"], previous_monitor=[h["monitor"] for h in state["history"]],
                dead_code_reset=window > 0, ema=bool(getattr(model.vq, "ema", False)),
                settled=epoch >= 3 or epoch == cfg.epochs,
                final=self._is_last_epoch(epoch, record["monitor"], state))
            warnings = diagnose(facts, cfg.collapse_usage)
            record["warnings"] = warnings
            state["history"].append(record)
            state["epoch"] = epoch
            self._report(record, warnings)
            if not math.isfinite(record["train_total"]):
                self._write_logs(state["history"])
                raise TrainingDiverged(f"training diverged in epoch {epoch} (loss is NaN/Inf); "
                                       f"{warnings[0] if warnings else 'lower the learning rate'}")
            improved = record["monitor"] < state["best_value"] * (1.0 - cfg.min_delta) \
                if math.isfinite(state["best_value"]) else True
            if improved:
                state["best_value"] = record["monitor"]
                state["best_epoch"] = epoch
                state["bad_epochs"] = 0
                best_state = cpu_state(model)
            else:
                state["bad_epochs"] += 1
            if cfg.patience > 0 and state["bad_epochs"] >= cfg.patience and epoch < cfg.epochs:
                stopped_early = True
                state["finished"] = True
                self.log(f"early stop: no improvement for {cfg.patience} epochs; keeping epoch "
                         f"{state['best_epoch']}")
            if epoch == cfg.epochs:
                state["finished"] = True
            self._write_logs(state["history"])
            if self.checkpoint_path is not None:
                save_checkpoint(self.checkpoint_path, model, best_model_state=best_state,
                                trainer=self._trainer_state(state, optimizer, scheduler,
                                                            window_counts, data),
                                metrics=record)
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)
            if stopped_early:
                break

        if best_state is not None:
            model.load_state_dict(best_state)
        for layer in model.vq.vq_layers:  # leave the target beta on every layer, not a warm-up value
            layer.commitment_cost = float(model.commitment_cost)
        if self.plot and self.out_dir is not None:
            write_plot(self.out_dir / "training.png", state["history"],
                       self._final_counts(source, metric_rows))
        return TrainResult(model, state["history"], int(state["best_epoch"]), stopped_early,
                           warnings)

    def _is_last_epoch(self, epoch: int, monitor: float, state: dict) -> bool:
        """Whether training ends after ``epoch``: the last one, or early stopping will stop now."""
        cfg = self.config
        if epoch >= cfg.epochs:
            return True
        best = state["best_value"]
        improved = not math.isfinite(best) or monitor < best * (1.0 - cfg.min_delta)
        return cfg.patience > 0 and not improved and state["bad_epochs"] + 1 >= cfg.patience

    def _total(self, losses: dict) -> torch.Tensor:
        """The training objective: weighted reconstruction MSE + VQ loss (0-d)."""
        return self._recon_weight * losses["recon"] + losses["vq"]

    def _batches(self, rows: torch.Tensor, gen: torch.Generator) -> List[torch.Tensor]:
        shuffled = rows[torch.randperm(rows.numel(), generator=gen)]
        batches = list(shuffled.split(self.config.batch_size))
        if len(batches) > 1 and batches[-1].numel() < 2:  # BatchNorm needs 2 rows
            batches.pop()
        return batches

    def _train_epoch(self, epoch, source, train_rows, gen, optimizer, scheduler, state,
                     window_counts, window, total_steps):
        cfg, model = self.config, self.model
        model.train()
        batches = self._batches(train_rows, gen)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        resets = 0
        params = [p for g in optimizer.param_groups for p in g["params"]]
        bar = _progress(len(batches), f"epoch {epoch}/{cfg.epochs}", cfg.progress)
        for i, rows in enumerate(batches):
            xb = source[rows.to(source.device)]
            beta = self._beta(state["step"], total_steps)
            out = model.run(xb, beta)
            loss = self._total(out.losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state["step"] += 1
            with torch.no_grad():
                sums += torch.stack([v.detach().double() for v in
                                     (loss, out.losses["recon"], out.losses["vq"])])
                for layer, counts in enumerate(window_counts):
                    idx = out.indices[:, layer]
                    counts.index_add_(0, idx.clamp(min=0), (idx >= 0).float())
            state["window_steps"] += 1
            if window > 0 and state["window_steps"] >= window:
                if epoch < cfg.epochs:
                    resets += self._reset_dead_codes(out.latents.detach(), window_counts, gen,
                                                      optimizer)
                for counts in window_counts:
                    counts.zero_()
                state["window_steps"] = 0
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}", beta=f"{beta:.3g}")
        if bar is not None:
            bar.close()
        return (sums / max(1, len(batches))).tolist(), resets

    @torch.no_grad()
    def _reset_dead_codes(self, latents, window_counts, gen, optimizer) -> int:
        """Re-seed codes unused in the window with residuals of the batch ``latents (B, D)``."""
        vq = self.model.vq
        residual = latents.float()
        total = 0
        for layer, counts in zip(vq.vq_layers, window_counts):
            weight = layer.embeddings
            dead = torch.nonzero(counts == 0).flatten()
            if dead.numel() > 0 and residual.shape[0] > 0:
                k = int(dead.numel())
                pick = torch.multinomial(torch.ones(residual.shape[0]), k,
                                         replacement=k > residual.shape[0], generator=gen)
                fresh = residual[pick.to(residual.device)].to(weight.dtype)
                weight.data[dead] = fresh
                if hasattr(layer, "ema_cluster_size"):
                    layer.ema_cluster_size[dead] = 1.0
                    layer.ema_dw[dead] = fresh.to(layer.ema_dw.dtype)
                for value in optimizer.state.get(weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                        value[dead] = 0.0
                total += k
            chosen = residual_quantize(residual, [weight.detach()], 0.0, backend=vq.backend,
                                       precision=vq.precision).quantized
            residual = residual - chosen
        return total

    @torch.no_grad()
    def _evaluate(self, epoch, source, val_rows, metric_rows, sums, resets, optimizer, state,
                  total_steps) -> dict:
        cfg, model = self.config, self.model
        model.eval()
        target = float(model.commitment_cost)
        record = {"epoch": epoch, "step": state["step"], "lr": optimizer.param_groups[0]["lr"],
                  "beta": self._beta(state["step"], total_steps), "train_total": sums[0],
                  "train_recon": sums[1], "train_vq": sums[2]}
        if val_rows.numel() > 0:
            totals = np.zeros(3)
            for rows in val_rows.split(cfg.eval_batch_size):
                out = model.run(source[rows.to(source.device)], target)
                losses = [float(v) for v in
                          (self._total(out.losses), out.losses["recon"], out.losses["vq"])]
                totals += rows.numel() * np.array(losses)
            totals /= val_rows.numel()
            record.update(val_total=totals[0], val_recon=totals[1], val_vq=totals[2])
            record["monitor"] = float(totals[1] if cfg.monitor == "recon" else totals[0])
        else:
            record.update(val_total=float("nan"), val_recon=float("nan"), val_vq=float("nan"))
            record["monitor"] = float(sums[1] if cfg.monitor == "recon" else sums[0])
        codes, latent_var, quant_err = [], 0.0, 0.0
        for rows in metric_rows.split(cfg.eval_batch_size):
            z_e = model.encode(source[rows.to(source.device)])
            result = model.vq.quantize(z_e, compute_stats=False)
            codes.append(result.indices.cpu())
            quant_err += float((z_e - result.quantized).pow(2).sum())
            latent_var += float((z_e - z_e.mean(dim=0)).pow(2).sum())
        codes = torch.cat(codes).numpy()
        for layer, counts in enumerate(layer_counts(codes, model.codebook_sizes)):
            record[f"usage_l{layer}"] = usage(counts)
            record[f"perplexity_l{layer}"] = perplexity(counts)
        collisions = collision_stats(codes)
        record["colliding_share"] = collisions.colliding_share
        record["largest_group"] = collisions.largest_group
        record["dead_codes_reset"] = resets
        record["_relative_quant_error"] = quant_err / latent_var if latent_var > 0 else float("nan")
        model.train()
        return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in record.items()}

    def _final_counts(self, source, metric_rows) -> List[np.ndarray]:
        codes = self.model.get_semantic_ids(source[metric_rows.to(source.device)],
                                            batch_size=self.config.eval_batch_size)
        return layer_counts(codes, self.model.codebook_sizes)

    # ---- reporting -----------------------------------------------------------------------------
    def _report(self, record: dict, warnings: List[str]) -> None:
        layers = len(self.model.codebook_sizes)
        usage_text = "/".join(f"{record[f'usage_l{i}']:.0%}" for i in range(layers))
        ppl_text = "/".join(f"{record[f'perplexity_l{i}']:.0f}" for i in range(layers))
        val = f" val {record['val_total']:.4f}" if math.isfinite(record["val_total"]) else ""
        self.log(f"epoch {record['epoch']:>3}: loss {record['train_total']:.4f} "
                 f"(recon {record['train_recon']:.4f}, vq {record['train_vq']:.4f}){val} | usage "
                 f"{usage_text} | perplexity {ppl_text} | shared IDs {record['colliding_share']:.2%}"
                 + (f" | reset {record['dead_codes_reset']} codes"
                    if record["dead_codes_reset"] else ""))
        for message in warnings:
            self.log(f"warning: {message}")

    def _write_logs(self, history: List[dict]) -> None:
        if self.out_dir is None:
            return
        with atomic_output(self.out_dir / "log.json") as tmp:
            tmp.write_text(json.dumps(history, indent=1, default=_json_default))
        columns = [k for k in history[0] if k != "warnings"] + ["warnings"]
        with atomic_output(self.out_dir / "log.csv") as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                for row in history:
                    writer.writerow([" | ".join(row.get(c, [])) if c == "warnings" else row.get(c)
                                     for c in columns])

    # ---- checkpoints ---------------------------------------------------------------------------
    def _trainer_state(self, state, optimizer, scheduler, window_counts, data) -> dict:
        return {
            "config": asdict(self.config),
            "epoch": state["epoch"],
            "step": state["step"],
            "history": copy.deepcopy(state["history"]),
            "best_value": state["best_value"],
            "best_epoch": state["best_epoch"],
            "bad_epochs": state["bad_epochs"],
            "finished": state["finished"],
            "window_steps": state["window_steps"],
            "window_counts": [c.detach().cpu().clone() for c in window_counts],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "num_items": int(data.shape[0]),
            "data_checksum": _data_checksum(data),
        }

    def _resume(self, path, data, optimizer, scheduler, state, window_counts):
        payload = load_checkpoint(path)
        check_config(payload["config"], self.model.config, path)
        saved = payload.get("trainer")
        if not saved:
            raise CheckpointError(f"{path}: holds no training state to resume")
        saved_config = {**RESUME_LEGACY, **saved["config"]}
        diffs = [k for k in RESUME_KEYS if saved_config.get(k) != asdict(self.config).get(k)]
        if diffs:
            parts = ", ".join(f"{k}={saved_config.get(k)!r} (now {getattr(self.config, k)!r})"
                              for k in diffs[:4])
            raise CheckpointError(f"{path}: checkpoint was trained with other settings: {parts}")
        if saved["num_items"] != int(data.shape[0]) or \
                not math.isclose(saved["data_checksum"], _data_checksum(data), rel_tol=1e-6,
                                 abs_tol=1e-6):
            raise CheckpointError(f"{path}: checkpoint was trained on other data "
                                  f"({saved['num_items']} items; this data has {data.shape[0]})")
        self.model.load_state_dict(payload["model_state"])
        for layer in self.model.vq.vq_layers:
            layer.initialized_with_data = True
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        for counts, stored in zip(window_counts, saved["window_counts"]):
            counts.copy_(stored.to(counts.device))
        for key in ("epoch", "step", "history", "best_value", "best_epoch", "bad_epochs",
                    "finished", "window_steps"):
            state[key] = saved[key]
        best = payload.get("best_model_state")
        self.log(f"resuming from {path} after epoch {state['epoch']}")
        return best


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _require_matplotlib():
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None


def write_plot(path, history: List[dict], final_counts: List[np.ndarray]) -> Path:
    """PNG of the loss curves and, per layer, a histogram of how many items each code holds."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = len(final_counts)
    fig, axes = plt.subplots(1, 1 + layers, figsize=(4.5 * (1 + layers), 3.6))
    epochs = [h["epoch"] for h in history]
    for key, style in (("train_recon", "-"), ("train_vq", "-"), ("val_recon", "--"), ("val_vq", "--")):
        values = [h.get(key, float("nan")) for h in history]
        if any(math.isfinite(v) for v in values):
            axes[0].plot(epochs, values, style, label=key)
    axes[0].set_yscale("log")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    axes[0].set_xlabel("epoch")
    axes[0].set_title("losses")
    axes[0].legend(fontsize=8)
    for layer, counts in enumerate(final_counts):
        ax = axes[1 + layer]
        ax.bar(np.arange(counts.size), np.sort(counts)[::-1], width=1.0)
        ax.set_title(f"layer {layer}: {np.count_nonzero(counts)}/{counts.size} codes used")
        ax.set_xlabel("code (by popularity)")
        ax.set_ylabel("items")
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "resolve_device",
           "write_plot"]
