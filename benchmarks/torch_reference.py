"""PyTorch peers for the benchmarks: the paper-form DAAM and the paper's decoder, written here.

The authors' package only has the mixture form; the paper-form layer and the decoder below follow
the experiment code as docs/design.md sections 2 and 6 describe it (same layers, sizes and
initialisation), so a JAX train step can be timed against a PyTorch one doing the same work.
"""

from __future__ import annotations

import torch
from torch import nn


class PaperDAAM(nn.Module):
    """Multi-head paper-form DAAM over dim 1 of ``[batch, N, d]`` (heads: contiguous groups)."""

    def __init__(self, num_heads: int, d: int):
        super().__init__()
        self.num_heads = num_heads
        self.delta = nn.Parameter(torch.zeros(num_heads, 1, d))
        self.xi = nn.Parameter(torch.full((num_heads, 1, d), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, N, d] -> [batch, N, d]``."""
        b, n, d = x.shape
        xs = x.view(b, self.num_heads, n // self.num_heads, d)
        mean = xs.mean(dim=2, keepdim=True)
        var = (xs**2).mean(dim=2, keepdim=True) - mean**2
        var = var.abs() + 1e-8
        z = (xs - (mean + self.delta)) / torch.sqrt(var + 1e-5)
        return (xs * torch.exp(-(z**2) / (2 * self.xi))).view(b, n, d)


class PaperDecoder(nn.Module):
    """DAAM -> Conv(N->512) -> ReLU -> Conv(512->N) -> ReLU -> Linear, as in the authors' code."""

    def __init__(self, layers: int, d: int, classes: int, heads: int, map_shape: tuple[int, int]):
        super().__init__()
        self.map_shape = map_shape
        self.daam = PaperDAAM(heads, d)
        self.conv1 = nn.Conv2d(layers, 512, 3, padding=1)
        self.conv2 = nn.Conv2d(512, layers, 3, padding=1)
        self.fc = nn.Linear(layers * d, classes)
        for module in (self.conv1, self.conv2, self.fc):
            nn.init.xavier_uniform_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, N, d] -> [batch, classes]`` logits."""
        b, n, _ = x.shape
        x = self.daam(x).reshape(b, n, *self.map_shape)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))
