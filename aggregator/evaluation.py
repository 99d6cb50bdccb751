"""Server-side evaluation of global model versions on held-out data, off the service loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from shared.datasets import load_dataset, tensors_of
from shared.jobs import ModelSpec
from shared.models import build_model, load_numpy_state

logger = logging.getLogger(__name__)


class Evaluator:
    """Holds one model instance and the test tensors; evaluate() scores a set of weights."""

    def __init__(
        self,
        spec: ModelSpec,
        dataset: str,
        batch_size: int,
        device: str,
        allowed_modules: Collection[str] = (),
    ) -> None:
        self.device = torch.device(device)
        self.model = build_model(spec, allowed_modules=allowed_modules).to(self.device).eval()
        x, y = tensors_of(load_dataset(dataset, "test", allowed_modules=allowed_modules))
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


@dataclass(frozen=True)
class Evaluation:
    """The outcome of evaluating one version: scores, or the error that prevented them.

    tensors are the very arrays that were scored (the version's, never modified), so that the
    best model saved is the one evaluated, not whatever the model has become since.
    """

    version: int
    accuracy: float | None
    loss: float | None
    seconds: float
    error: str | None = None
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)


class BackgroundEvaluator:
    """Evaluates versions on a thread of its own, so the service loop never waits for one.

    One evaluation runs at a time. Versions asked for while one runs wait in a single slot:
    a newer one takes the slot and the version it displaces is skipped (its history line gets no
    accuracy). So evaluation keeps up with the newest model however fast versions come, and the
    loop only ever hands over a reference to the version's arrays, which are never modified.
    """

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedq-evaluate")
        self._running: tuple[int, Future[Evaluation]] | None = None
        self._waiting: tuple[int, Mapping[str, np.ndarray]] | None = None

    def submit(self, version: int, tensors: Mapping[str, np.ndarray]) -> int | None:
        """Ask for a version to be evaluated; return the version this skips, if any."""
        skipped = self._waiting[0] if self._waiting is not None else None
        self._waiting = (version, tensors)
        self._start_waiting()
        return skipped

    def poll(self) -> list[Evaluation]:
        """Evaluations finished since the last call (at most one), without waiting."""
        if self._running is None or not self._running[1].done():
            return []
        return self._take()

    def wait(self) -> list[Evaluation]:
        """Finish every evaluation asked for, in version order, and return them."""
        done: list[Evaluation] = []
        while self._running is not None:
            self._running[1].result()
            done += self._take()
        return done

    def evaluate_now(self, version: int, tensors: Mapping[str, np.ndarray]) -> Evaluation:
        """Evaluate on the calling thread; call wait() first so that nothing runs beside it."""
        return _evaluate(self.evaluator, version, tensors)

    def close(self) -> None:
        """Drop what waits, let what runs finish, and stop the thread."""
        self._waiting = None
        self._executor.shutdown(wait=True)

    def _take(self) -> list[Evaluation]:
        assert self._running is not None
        result = self._running[1].result()
        self._running = None
        self._start_waiting()
        return [result]

    def _start_waiting(self) -> None:
        if self._running is None and self._waiting is not None:
            version, tensors = self._waiting
            self._waiting = None
            future = self._executor.submit(_evaluate, self.evaluator, version, tensors)
            self._running = (version, future)


def _evaluate(evaluator: Evaluator, version: int, tensors: Mapping[str, np.ndarray]) -> Evaluation:
    """Evaluate one version; an error is reported in the result, never raised."""
    started = time.perf_counter()
    try:
        accuracy, loss = evaluator.evaluate(tensors)
    except Exception as e:  # the thread's edge: a failed evaluation must not stop the job
        logger.exception("evaluating version %d failed", version)
        return Evaluation(version, None, None, time.perf_counter() - started, f"{e!r}", tensors)
    return Evaluation(version, accuracy, loss, time.perf_counter() - started, tensors=tensors)
