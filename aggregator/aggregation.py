"""Pure aggregation math: staleness factors, weighted FedAvg, FedBuff and FedAsync steps.

Functions here take and return numpy arrays and plain values; they do no I/O and keep no state
beyond the accumulator objects handed to them, so the same inputs always give the same model.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from shared.jobs import StrategyConfig
from shared.tensors import Tensors


def is_averaged(array: np.ndarray) -> bool:
    """Only floating-point tensors are averaged; integer buffers are taken, never averaged."""
    return array.dtype.kind == "f"


# ---------------------------------------------------------------- buffers
# The buffer rule (docs/architecture.md, Strategies): a model's buffers (state entries that are
# not parameters: BatchNorm running_mean, running_var, num_batches_tracked) are statistics, not
# weights. They are never moved by a delta: every strategy sets floating-point buffers to a
# weighted mean of the values the updates carry (a convex mix of non-negative variances stays
# non-negative), and integer tensors (counters) to the largest value seen, so they advance and
# the result does not depend on the order updates arrived in.


def max_counter(current: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The elementwise largest of two integer tensors: counters advance, never go back."""
    out: np.ndarray = np.maximum(current, value).astype(current.dtype, copy=False)
    return out


def staleness_factor(staleness: int, config: StrategyConfig) -> float:
    """Return f(s) of the configured staleness function (constant, polynomial(a), hinge(a, b))."""
    if staleness < 0:
        raise ValueError("staleness must be >= 0")
    if config.staleness == "constant":
        return 1.0
    if config.staleness == "polynomial":
        return float((staleness + 1) ** (-config.staleness_a))
    if config.staleness == "hinge":
        if staleness <= config.staleness_b:
            return 1.0
        return 1.0 / (config.staleness_a * (staleness - config.staleness_b) + 1.0)
    raise ValueError(f"unknown staleness function {config.staleness!r}")


def sum_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a weighted sum of `dtype` tensors is taken in: one no valid input overflows.

    A weight is at most MAX_NUM_SAMPLES (1e9) and a float32 value at most 3.4e38, so a float32
    product can overflow; in float64 (up to 1.8e308) neither a product nor a sum of them can.
    float16 values (up to 65504) are summed in float32 for the same reason. float64 and integer
    tensors keep their dtype.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype == np.float32:
        return np.dtype(np.float64)
    return dtype


class WeightedSum:
    """A running sum of weighted tensors: memory is one model's worth, whatever the count.

    Floating-point tensors accumulate weight * value in a wider dtype (sum_dtype: float32 in
    float64, float16 in float32), so that no valid input can overflow the sum and small weights
    are not lost; other tensors (integer counters) keep the largest value added. `total_weight`
    sums the weights; `norm` sums the normalising weights, which FedBuff keeps apart (n_i, not
    n_i f(s_i)).
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.sums: Tensors = {
            name: np.zeros(a.shape, sum_dtype(a.dtype)) for name, a in reference.items()
        }
        # One small scratch per floating dtype, shared by every tensor of that dtype.
        largest: dict[np.dtype, int] = {}
        for total in self.sums.values():
            if is_averaged(total):
                largest[total.dtype] = max(largest.get(total.dtype, 1), total.size)
        self._scratch = {dt: np.empty(min(AXPY_CHUNK, n), dt) for dt, n in largest.items()}
        self.total_weight = 0.0
        self.norm = 0.0
        self.count = 0

    def add(
        self, tensors: Mapping[str, np.ndarray], weight: float, norm: float | None = None
    ) -> None:
        """Add weight * tensors (floating-point entries); keep the largest of the others."""
        if not weight > 0:
            raise ValueError("weight must be > 0")
        for name, total in self.sums.items():
            value = tensors[name]
            if is_averaged(total):
                axpy(total, value, weight, self._scratch[total.dtype])
            else:
                # A fresh array, never written in place: mean() hands these out as they are.
                self.sums[name] = value.copy() if not self.count else max_counter(total, value)
        self.total_weight += weight
        self.norm += weight if norm is None else norm
        self.count += 1

    def reset(self) -> None:
        """Empty the sum in place, so a new round or buffer reuses the same memory."""
        for name, total in self.sums.items():
            if is_averaged(total):
                total.fill(0)
            else:
                # mean() hands these arrays out as they are: rebind, never overwrite them.
                self.sums[name] = np.zeros_like(total)
        self.total_weight = 0.0
        self.norm = 0.0
        self.count = 0

    def mean(self) -> Tensors:
        """Return sum / total weight for floating tensors, the largest value for the others."""
        if not self.total_weight > 0:
            raise ValueError("nothing to average")
        return {
            name: (s / self.total_weight if is_averaged(s) else s) for name, s in self.sums.items()
        }


# Elements per slice in axpy: its scratch (1 MiB of float64, the sums of float32 models) stays
# in the core's cache.
AXPY_CHUNK = 1 << 17


def axpy(total: np.ndarray, value: np.ndarray, weight: float, scratch: np.ndarray) -> None:
    """total += weight * value, slice by slice through a small cache-resident scratch buffer.

    Done whole, numpy writes weight * value into a model-sized temporary and reads it back; in
    slices the product never leaves the cache, so each update is read once from memory, which
    is what bounds the aggregator's arithmetic (docs/benchmarks.md). `scratch` is 1-d, of the
    total's dtype and at least AXPY_CHUNK long.
    """
    flat_total, flat_value = total.reshape(-1), value.reshape(-1)
    for start in range(0, flat_total.size, AXPY_CHUNK):
        end = min(start + AXPY_CHUNK, flat_total.size)
        product = scratch[: end - start]
        # Widened by a plain copy, then scaled in place: numpy's mixed-dtype multiply is slower.
        product[...] = flat_value[start:end]
        product *= weight
        flat_total[start:end] += product


def cast_like(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Tensors:
    """Return tensors cast to the reference's dtypes (float64 sums back to float32, etc.)."""
    return {name: np.asarray(tensors[name], dtype=ref.dtype) for name, ref in reference.items()}


def fedavg(
    updates: list[tuple[Mapping[str, np.ndarray], float]], reference: Mapping[str, np.ndarray]
) -> Tensors:
    """Weighted FedAvg: sum_i (w_i / sum w) * y_i over floating tensors; others the largest."""
    acc = WeightedSum(reference)
    for tensors, weight in updates:
        acc.add(tensors, weight)
    return cast_like(acc.mean(), reference)


def fedbuff_step(
    model: Mapping[str, np.ndarray],
    buffer: WeightedSum,
    server_lr: float,
    values: Collection[str] = (),
) -> Tensors:
    """FedBuff: x + eta_g * (sum_i n_i f(s_i) d_i) / (sum_i n_i) for parameters.

    The buffer must have been filled with add(update, n_i * f(s_i), norm=n_i), where an update
    holds deltas of the parameters and the values of the tensors named in `values` (buffers).
    Those are set, not moved: a floating-point buffer becomes the weighted mean of the buffered
    values, sum_i n_i f(s_i) v_i / sum_i n_i f(s_i); an integer one the largest of the global
    model's and the buffered values. Integer tensors outside `values` are kept.
    """
    if not buffer.norm > 0:
        raise ValueError("the buffer is empty")
    out = apply_delta(model, buffer.sums, server_lr / buffer.norm)
    for name in values:
        x, total = model[name], buffer.sums[name]
        if is_averaged(x):
            out[name] = (total / buffer.total_weight).astype(x.dtype, copy=False)
        else:
            out[name] = max_counter(x, total)
    return out


def apply_delta(
    model: Mapping[str, np.ndarray], delta_sum: Mapping[str, np.ndarray], scale: float
) -> Tensors:
    """Return model + scale * delta_sum for floating tensors; other tensors stay as they are."""
    return {
        name: ((x + scale * delta_sum[name]).astype(x.dtype, copy=False) if is_averaged(x) else x)
        for name, x in model.items()
    }


def mix(
    model: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], alpha: float
) -> Tensors:
    """FedAsync: (1 - alpha) * x + alpha * y for floating tensors (parameters and buffers, as
    values); integer tensors take the larger of x and y, so counters advance."""
    if not 0 < alpha <= 1:
        raise ValueError("alpha must be in (0, 1]")
    out: Tensors = {}
    for name, x in model.items():
        y = weights[name]
        if is_averaged(x):
            out[name] = ((1.0 - alpha) * x + alpha * y).astype(x.dtype, copy=False)
        else:
            out[name] = max_counter(x, y)
    return out
