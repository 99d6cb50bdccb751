"""A user model of about 68 MB for tests: it is only useful for being large."""

from __future__ import annotations

from torch import nn

from shared.jobs import ModelSpec


def build(spec: ModelSpec) -> nn.Module:
    """64 inputs -> 4096 -> 4096 -> classes: 17.1 million float32 parameters (68 MB)."""
    inputs = 1
    for dim in spec.input_shape:
        inputs *= dim
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(inputs, 4096),
        nn.ReLU(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, spec.num_classes),
    )
