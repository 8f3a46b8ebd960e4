"""The demo's small CNN (conv -> conv -> linear -> linear), optionally with batch norm."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(
        self, channels: int = 16, hidden: int = 64, batch_norm: bool = False, ghost: bool = False
    ) -> None:
        super().__init__()
        bn2d: type[nn.Module] = nn.BatchNorm2d
        bn1d: type[nn.Module] = nn.BatchNorm1d
        if ghost:
            from historystore.protocol import GhostBatchNorm1d, GhostBatchNorm2d

            bn2d, bn1d = GhostBatchNorm2d, GhostBatchNorm1d
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = bn2d(channels) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.bn2 = bn2d(2 * channels) if batch_norm else nn.Identity()
        self.fc1 = nn.Linear(2 * channels * 4 * 4, hidden)
        self.bn3 = bn1d(hidden) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.bn3(self.fc1(x.flatten(1))))
        return self.fc2(x)
