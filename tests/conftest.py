"""Test-wide settings: small torch thread pools so that tiers stay fast on two cores."""

from __future__ import annotations

import torch

torch.set_num_threads(2)
