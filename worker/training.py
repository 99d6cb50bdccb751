"""The local training loop: E epochs of SGD or Adam over in-memory tensors, optional FedProx."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from shared.jobs import TrainingConfig


def make_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """A fresh optimizer per task: momentum from another version's weights would be stale."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainingConfig,
    generator: torch.Generator,
) -> tuple[int, dict[str, float]]:
    """Train in place; return (examples seen, {loss, accuracy, duration_s}) of the last epoch.

    x and y must already be on the model's device. With config.mu > 0 the FedProx proximal
    term mu/2 * ||w - w_global||^2 keeps the local model near the one it started from.
    """
    started = time.perf_counter()
    model.train()
    optimizer = make_optimizer(model, config)
    anchor = [p.detach().clone() for p in model.parameters()] if config.mu > 0 else []
    n = int(y.shape[0])
    seen = 0
    loss_sum, correct, count = 0.0, 0, 0
    for _ in range(config.epochs):
        loss_sum, correct, count = 0.0, 0, 0
        # The permutation is drawn on the CPU so that it is the same for a seed on every device.
        order = torch.randperm(n, generator=generator).to(x.device)
        for batch, start in enumerate(range(0, n, config.batch_size)):
            if config.max_batches and batch >= config.max_batches:
                break
            idx = order[start : start + config.batch_size]
            xb, yb = x[idx], y[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if anchor:
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=False)
                )
                loss = loss + config.mu / 2 * prox
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            with torch.no_grad():
                loss_sum += float(loss) * len(yb)
                correct += int((logits.argmax(dim=1) == yb).sum())
                count += len(yb)
        seen += count
    metrics = {
        "loss": loss_sum / max(count, 1),
        "accuracy": correct / max(count, 1),
        "duration_s": time.perf_counter() - started,
    }
    return seen, metrics
