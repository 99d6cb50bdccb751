"""The local training loop: E epochs of SGD or Adam over the local data, optional FedProx; and
the check that the local data fits a task's model before any training."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from shared.jobs import ModelSpec, TrainingConfig
from worker.data import TrainingData

# Examples in the one forward pass of the fit check.
CHECK_BATCH = 8


def make_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """A fresh optimizer per task: momentum from another version's weights would be stale."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def train(
    model: nn.Module,
    data: TrainingData,
    config: TrainingConfig,
    generator: torch.Generator,
) -> tuple[int, dict[str, float]]:
    """Train in place; return (examples seen, {loss, accuracy, duration_s}) of the last epoch.

    Batches come on the model's device. With config.mu > 0 the FedProx proximal term
    mu/2 * ||w - w_global||^2 keeps the local model near the one it started from.
    """
    started = time.perf_counter()
    model.train()
    optimizer = make_optimizer(model, config)
    anchor = [p.detach().clone() for p in model.parameters()] if config.mu > 0 else []
    seen = 0
    loss_sum, correct, count = 0.0, 0, 0
    for _ in range(config.epochs):
        loss_sum, correct, count = 0.0, 0, 0
        for xb, yb in data.epoch(config.batch_size, config.max_batches, generator):
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


def check_fit(model: nn.Module, data: TrainingData, spec: ModelSpec) -> str | None:
    """Why the local data cannot train this model, in words that name each mismatch; None if it
    fits. Labels must be in 0..num_classes-1, examples of the spec's input shape, and one
    forward pass on a batch must give [batch, num_classes]."""
    problems = []
    labels = data.labels()
    low, high = int(labels.min()), int(labels.max())
    if high >= spec.num_classes:
        problems.append(f"labels go up to {high} but the model has {spec.num_classes} classes")
    if low < 0:
        problems.append(f"labels go down to {low}; they must be 0 or more")
    x, _ = data.sample(CHECK_BATCH)
    shape = tuple(x.shape[1:])
    if shape != tuple(spec.input_shape):
        problems.append(
            f"local images are {_dims(shape)} but the model takes {_dims(spec.input_shape)}"
        )
    else:
        problems += _forward_problems(model, x, spec.num_classes)
    return "; ".join(problems) or None


def _forward_problems(model: nn.Module, x: torch.Tensor, num_classes: int) -> list[str]:
    was_training = model.training
    model.eval()  # no batch statistics are updated by the check
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # whatever a user's model raises on this input is the answer
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return [f"the model fails on a batch of local data: {type(e).__name__}: {first_line}"]
    finally:
        model.train(was_training)
    wanted = (len(x), num_classes)
    if tuple(out.shape) != wanted:
        return [
            f"the model's output is {_dims(tuple(out.shape))} for a batch of {len(x)} "
            f"but must be {_dims(wanted)}"
        ]
    return []


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)
