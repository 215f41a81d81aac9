"""The tiny image classifier the compiled-model tests (AOTInductor packages, aot_compile libraries) build:
a conv layer and a linear head over ten ImageNet-like labels, small enough to compile in seconds."""

from __future__ import annotations

import torch

LABELS = ["tench", "goldfish", "shark", "tabby", "tiger cat", "heron", "robin", "wren", "lynx", "otter"]


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(8, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
