"""A small BatchNorm CNN for the 8x8 digits, loaded by reference as `batchnorm_model:digits_bn`.

It is "a model of your own" as a user would bring one: not a built-in, built through the
registry's `module:function` form, with BatchNorm buffers (running_mean, running_var and the
integer num_batches_tracked) that every strategy must aggregate without breaking them.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.jobs import ModelSpec

REFERENCE = "batchnorm_model:digits_bn"


class DigitsBN(nn.Module):
    """conv 3x3 16 -> BN -> ReLU -> conv 3x3 32 -> BN -> ReLU -> pool 2 -> linear (8x8 inputs)."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * (height // 2) * (width // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch (N, C, H, W)."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


def digits_bn(spec: ModelSpec) -> nn.Module:
    """Build DigitsBN for the spec's (channels, height, width) and classes."""
    channels, height, width = spec.input_shape
    return DigitsBN(channels, height, width, spec.num_classes)
