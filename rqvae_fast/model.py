"""The RQ-VAE of the seed document: MLP encoder, fused residual quantizer, mirrored MLP decoder.

Module and parameter names follow the seed (``encoder.encoder.*``, ``vq.vq_layers.*``,
``decoder.decoder.*``), so a ``state_dict`` saved from the seed's model loads here (with the
default ``latent_norm=False``).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validation import float_matrix
from .kmeans import load_codebooks, residual_kmeans
from .modules import ResidualVQ


def _mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> nn.Sequential:
    """``Linear -> BatchNorm1d -> ReLU`` per hidden width, then a plain ``Linear`` to ``out_dim``."""
    layers: List[nn.Module] = []
    width = in_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class RQEncoder(nn.Module):
    """``(N, input_dim) -> (N, latent_dim)`` through the hidden widths in order (a funnel).

    ``latent_norm=True`` appends a ``BatchNorm1d(latent_dim, affine=False)``: every latent
    dimension has zero mean and unit variance over the batch, so the encoder can neither shrink
    its output to dodge the commitment loss nor grow it past codebooks that lag behind.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], latent_dim: int,
                 latent_norm: bool = False):
        super().__init__()
        self.encoder = _mlp(input_dim, hidden_dims, latent_dim)
        if latent_norm:
            self.encoder.append(nn.BatchNorm1d(latent_dim, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class RQDecoder(nn.Module):
    """``(N, latent_dim) -> (N, output_dim)`` through the hidden widths reversed (the mirror image
    of the encoder)."""

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int], output_dim: int):
        super().__init__()
        self.decoder = _mlp(latent_dim, list(reversed(list(hidden_dims))), output_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def _mark_codebooks_initialized(module: nn.Module, incompatible_keys) -> None:
    for layer in module.vq.vq_layers:
        layer.initialized_with_data = True


class RQVAEOutput(NamedTuple):
    """Everything one forward pass computes (the trainer needs the latents too)."""

    x_recon: torch.Tensor
    indices: torch.Tensor
    losses: Dict[str, torch.Tensor]
    latents: torch.Tensor
    quantized: torch.Tensor


class RQVAE(nn.Module):
    """Residual-quantized autoencoder turning item embeddings into semantic IDs.

    ``forward(x (N, input_dim), commitment_cost=None) -> (x_recon (N, input_dim), indices (N, L)
    int64, {"total", "recon", "vq"} 0-d losses)``, as the seed. Quantizer options (``ema``,
    ``decay``, ``grad_mode``, ``precision``, ``backend``) go to :class:`~rqvae_fast.ResidualVQ`.

    ``latent_norm=True`` ends the encoder with a parameter-free ``BatchNorm1d(latent_dim,
    affine=False)`` (see :class:`RQEncoder`; part of the unit-norm recipe in docs/PIPELINE.md);
    the default ``False`` is the seed's architecture exactly.
    """

    kind = "rqvae"

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], latent_dim: int,
                 num_vq_layers: int, num_embeddings_list: Union[int, Sequence[int]],
                 commitment_cost: float = 0.25, *, ema: bool = False, decay: float = 0.99,
                 grad_mode: str = "seed", precision: Optional[str] = None, backend: str = "auto",
                 latent_norm: bool = False):
        super().__init__()
        if isinstance(num_embeddings_list, int):
            num_embeddings_list = [num_embeddings_list] * num_vq_layers
        sizes = [int(k) for k in num_embeddings_list]
        if len(sizes) < num_vq_layers:
            raise ValueError(f"num_embeddings_list has {len(sizes)} sizes for {num_vq_layers} layers")
        self.input_dim = int(input_dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.latent_dim = int(latent_dim)
        self.num_embeddings_list = sizes[:num_vq_layers]
        self.commitment_cost = float(commitment_cost)
        self.ema = bool(ema)
        self.decay = float(decay)
        self.grad_mode = grad_mode
        self.latent_norm = bool(latent_norm)
        self.encoder = RQEncoder(input_dim, self.hidden_dims, latent_dim, self.latent_norm)
        self.vq = ResidualVQ(num_vq_layers, self.num_embeddings_list, latent_dim, commitment_cost,
                             ema=ema, decay=decay, grad_mode=grad_mode, precision=precision,
                             backend=backend)
        self.decoder = RQDecoder(latent_dim, self.hidden_dims, input_dim)
        # Loaded weights count as initialized: a trainer must not k-means over them again.
        self.register_load_state_dict_post_hook(_mark_codebooks_initialized)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """What defines the architecture (stored in checkpoints; runtime options are not).

        ``latent_norm`` appears only when set, so configurations of the seed's architecture equal
        those written before the option existed."""
        config = {"kind": self.kind, "input_dim": self.input_dim,
                  "hidden_dims": list(self.hidden_dims), "latent_dim": self.latent_dim,
                  "num_vq_layers": len(self.num_embeddings_list),
                  "num_embeddings_list": list(self.num_embeddings_list),
                  "commitment_cost": self.commitment_cost, "ema": self.ema, "decay": self.decay,
                  "grad_mode": self.grad_mode}
        if self.latent_norm:
            config["latent_norm"] = True
        return config

    @classmethod
    def from_config(cls, config: dict, **options) -> "RQVAE":
        """Rebuild from :attr:`config`; ``options`` (``precision``, ``backend``) are runtime choices."""
        return cls(config["input_dim"], config["hidden_dims"], config["latent_dim"],
                   config["num_vq_layers"], config["num_embeddings_list"],
                   config.get("commitment_cost", 0.25), ema=config.get("ema", False),
                   decay=config.get("decay", 0.99), grad_mode=config.get("grad_mode", "seed"),
                   latent_norm=config.get("latent_norm", False), **options)

    @property
    def codebook_sizes(self) -> List[int]:
        return list(self.num_embeddings_list)

    # -- the seed's API --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, input_dim) -> (N, latent_dim)`` latents ``z_e``."""
        return self.encoder(x)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """``(N, latent_dim) -> (N, input_dim)`` reconstruction."""
        return self.decoder(z_q)

    def run(self, x: torch.Tensor, commitment_cost: Optional[float] = None) -> RQVAEOutput:
        """The forward pass, also returning ``latents (N, latent_dim)`` and ``quantized``."""
        z_e = self.encode(x)
        z_q, indices, vq_loss = self.vq(z_e, commitment_cost)
        x_recon = self.decode(z_q)
        recon_loss = F.mse_loss(x_recon, x)
        losses = {"total": recon_loss + vq_loss, "recon": recon_loss, "vq": vq_loss}
        return RQVAEOutput(x_recon, indices, losses, z_e, z_q)

    def forward(self, x: torch.Tensor, commitment_cost: Optional[float] = None):
        out = self.run(x, commitment_cost)
        return out.x_recon, out.indices, out.losses

    @torch.no_grad()
    def get_semantic_ids(self, x: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """``(N, L)`` int64 codes of ``x (N, input_dim)`` float (tensor, NumPy array or memmap) in
        eval mode (the mode is restored after).

        ``batch_size`` bounds memory for large ``x``; rows with NaN/Inf get ``-1``.
        """
        x = float_matrix(x, "inputs")
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            step = batch_size or max(1, x.shape[0])
            parts = []
            for start in range(0, x.shape[0], step):
                z_e = self.encode(x[start:start + step].to(device, torch.float32))
                parts.append(self.vq.quantize(z_e, compute_stats=False).indices)
            if not parts:
                return torch.empty((0, len(self.num_embeddings_list)), dtype=torch.int64,
                                   device=device)
            return torch.cat(parts)
        finally:
            self.train(was_training)

    # -- codebook initialization -----------------------------------------------------------------
    @torch.no_grad()
    def collect_latents(self, data: Union[torch.Tensor, Iterable], device=None,
                        max_samples: int = 100_000, batch_size: int = 1024) -> torch.Tensor:
        """Encoder outputs ``(M, latent_dim)`` fp32 for up to ``max_samples`` rows of ``data``.

        ``data`` is an ``(N, input_dim)`` tensor or an iterable of batches (tensors, or tuples whose
        second item is the tensor, as the seed's DataLoader). BatchNorm uses batch statistics (train
        mode), as in the first training steps the codebooks must serve; the mode is restored after.
        """
        device = torch.device(device) if device is not None else next(self.parameters()).device
        if isinstance(data, torch.Tensor):
            n = min(int(data.shape[0]), max_samples)
            starts = list(range(0, n, batch_size))
            if len(starts) > 1 and n - starts[-1] < 2:  # BatchNorm needs >= 2 rows per batch
                starts.pop()
            batches = (data[s:(starts[i + 1] if i + 1 < len(starts) else n)]
                       for i, s in enumerate(starts))
        else:
            batches = (b[1] if isinstance(b, (list, tuple)) else b for b in data)
        was_training = self.encoder.training
        self.encoder.train()
        parts, total = [], 0
        try:
            for batch in batches:
                batch = batch.to(device, torch.float32)
                parts.append(self.encoder(batch) if batch.shape[0] > 1 else
                             self.encoder.eval()(batch))
                self.encoder.train()
                total += batch.shape[0]
                if total >= max_samples:
                    break
        finally:
            self.encoder.train(was_training)
        if not parts:
            raise ValueError("no data to initialize the codebooks from")
        return torch.cat(parts)[:max_samples].float()

    @torch.no_grad()
    def initialize_codebooks(self, data: Union[torch.Tensor, Iterable], device=None,
                             max_samples: int = 100_000, *, method: str = "auto", iters: int = 20,
                             seed: Optional[int] = None, batch_size: int = 1024) -> None:
        """k-means every codebook on the latents' residuals, layer by layer (the seed's step).

        ``method``: ``"sklearn"``, ``"fused"`` (k-means on the fused kernels), or ``"auto"``
        (scikit-learn for small samples on CPU). See :meth:`collect_latents` for ``data``.
        """
        latents = self.collect_latents(data, device, max_samples, batch_size)
        results = residual_kmeans(latents, self.num_embeddings_list, method=method, iters=iters,
                                  seed=seed, backend=self.vq.backend, precision=self.vq.precision)
        load_codebooks(self.vq, results)

    @torch.no_grad()
    def initialize_output_layer(self, data: torch.Tensor, scale: float = 0.01) -> None:
        """Start the decoder's last ``Linear`` at the data: bias = mean of ``data (N, input_dim)``,
        weights shrunk by ``scale``.

        Item embeddings have small per-dimension spread (a unit-norm 768-d vector: ~0.04) while a
        default-initialized output layer emits values ~0.3; the first epochs would otherwise go to
        shrinking the output, dragging the latents away from their k-means codebooks (collapse).
        """
        last = self.decoder.decoder[-1]
        last.weight.mul_(scale)
        last.bias.copy_(data.detach().to(last.bias.device, torch.float32).mean(dim=0))

    @torch.no_grad()
    def recalibrate_batchnorm(self, data: torch.Tensor, batch_size: int = 1024,
                              max_batches: int = 16) -> None:
        """Recompute every BatchNorm's running statistics as the plain average over up to
        ``max_batches`` batches of ``data (N, input_dim)`` (the quantizer is left untouched).

        After only a few training steps the momentum-averaged statistics still remember their
        initial values, so eval-mode latents (hence the IDs) would not match training; this fixes it.
        """
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or data.shape[0] < 2:
            return
        was_training = self.training
        momenta = [m.momentum for m in norms]
        device = next(self.parameters()).device
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average
            self.train()
            self.vq.eval()  # no EMA codebook updates
            for start in range(0, min(data.shape[0], batch_size * max_batches), batch_size):
                batch = data[start:start + batch_size]
                if batch.shape[0] < 2:
                    break
                self.run(batch.to(device, torch.float32))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            self.train(was_training)

    @property
    def initialized(self) -> bool:
        """Whether every codebook was set from data (by k-means or by loading a state dict)."""
        return all(getattr(layer, "initialized_with_data", False) for layer in self.vq.vq_layers)


__all__ = ["RQDecoder", "RQEncoder", "RQVAE", "RQVAEOutput"]
