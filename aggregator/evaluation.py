"""Server-side evaluation of a global model version on held-out data."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from shared.datasets import load_dataset, tensors_of
from shared.jobs import ModelSpec
from shared.models import build_model, load_numpy_state


class Evaluator:
    """Holds one model instance and the test tensors; evaluate() scores a set of weights."""

    def __init__(self, spec: ModelSpec, dataset: str, batch_size: int, device: str) -> None:
        self.device = torch.device(device)
        self.model = build_model(spec).to(self.device).eval()
        x, y = tensors_of(load_dataset(dataset, "test"))
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size = batch_size

    @property
    def num_samples(self) -> int:
        """Size of the held-out set."""
        return int(self.y.shape[0])

    @torch.no_grad()
    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """Return (accuracy, mean cross-entropy loss) of the weights on the held-out set."""
        load_numpy_state(self.model, tensors)
        correct, loss_sum = 0, 0.0
        for start in range(0, self.num_samples, self.batch_size):
            xb = self.x[start : start + self.batch_size]
            yb = self.y[start : start + self.batch_size]
            logits = self.model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
        return correct / self.num_samples, loss_sum / self.num_samples
