"""Choosing the torch device once: auto means CUDA when available, then MPS, then CPU."""

from __future__ import annotations

import torch

from shared.errors import ConfigError


def select_device(name: str) -> torch.device:
    """Resolve "auto", "cpu", "cuda", "cuda:N" or "mps" to an available torch device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: fedq trains on auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise ConfigError(
            f"device {name!r} requested but only {torch.cuda.device_count()} GPUs exist"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available")
    return device
