"""The seed document's quantizer, re-expressed in plain PyTorch, as a peer for tests and benchmarks.

Behaviour and state_dict layout follow the seed (``vq_layers.{i}.embeddings``, and for EMA layers
``ema_cluster_size`` / ``ema_dw``): it builds the full ``(N, K)`` distance matrix per layer, which is
what rqvae-fast replaces. Not used by the library itself.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _full_distances(inputs: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` squared distances, the way the seed writes them."""
    return (
        inputs.pow(2).sum(dim=1, keepdim=True)
        + codebook.pow(2).sum(dim=1)
        - 2 * inputs @ codebook.t()
    )


class SeedVQEmbedding(nn.Module):
    """One learned codebook: nearest code, codebook + commitment loss, straight-through output."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.embeddings = nn.Parameter(torch.randn(num_embeddings, embedding_dim))

    def forward(self, inputs: torch.Tensor):
        indices = _full_distances(inputs, self.embeddings).argmin(dim=1)
        chosen = F.embedding(indices, self.embeddings)
        loss = F.mse_loss(chosen, inputs.detach()) + self.commitment_cost * F.mse_loss(inputs, chosen.detach())
        return inputs + (chosen - inputs).detach(), indices, loss


class SeedVQEmbeddingEMA(nn.Module):
    """One codebook moved by exponential moving averages; the loss holds the commitment term only."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.decay = decay
        self.eps = eps
        self.embeddings = nn.Parameter(torch.randn(num_embeddings, embedding_dim))
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_dw", self.embeddings.detach().clone())

    def forward(self, inputs: torch.Tensor):
        indices = _full_distances(inputs, self.embeddings).argmin(dim=1)
        chosen = F.embedding(indices, self.embeddings)
        if self.training:
            with torch.no_grad():
                assign = F.one_hot(indices, self.num_embeddings).float()
                self.ema_cluster_size.mul_(self.decay).add_(assign.sum(dim=0), alpha=1 - self.decay)
                self.ema_dw.mul_(self.decay).add_((inputs.t() @ assign).t(), alpha=1 - self.decay)
                total = self.ema_cluster_size.sum()
                smoothed = (self.ema_cluster_size + self.eps) / (total + self.num_embeddings * self.eps) * total
                self.embeddings.data.copy_(self.ema_dw / smoothed.unsqueeze(1))
        loss = self.commitment_cost * F.mse_loss(inputs, chosen.detach())
        return inputs + (chosen - inputs).detach(), indices, loss


class SeedResidualVQ(nn.Module):
    """The seed's residual stack: each layer quantizes what the previous ones left over."""

    def __init__(self, num_layers: int, num_embeddings_list: List[int], embedding_dim: int,
                 commitment_cost: float = 0.25, ema: bool = False, decay: float = 0.99):
        super().__init__()
        self.num_layers = num_layers
        if ema:
            layers = [SeedVQEmbeddingEMA(num_embeddings_list[i], embedding_dim, commitment_cost, decay)
                      for i in range(num_layers)]
        else:
            layers = [SeedVQEmbedding(num_embeddings_list[i], embedding_dim, commitment_cost)
                      for i in range(num_layers)]
        self.vq_layers = nn.ModuleList(layers)

    def forward(self, inputs: torch.Tensor, commitment_cost: Optional[float] = None):
        residual = inputs
        total = torch.zeros_like(inputs)
        all_indices, loss = [], 0.0
        for layer in self.vq_layers:
            if commitment_cost is not None:
                layer.commitment_cost = commitment_cost
            quantized, indices, layer_loss = layer(residual)
            residual = residual - quantized
            total = total + quantized
            all_indices.append(indices)
            loss = loss + layer_loss
        return total, torch.stack(all_indices, dim=1), loss
