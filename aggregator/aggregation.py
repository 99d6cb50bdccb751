"""Pure aggregation math: staleness factors, weighted FedAvg, FedBuff and FedAsync steps.

Functions here take and return numpy arrays and plain values; they do no I/O and keep no state
beyond the accumulator objects handed to them, so the same inputs always give the same model.
"""

from __future__ import annotations

import math
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


def narrow_sum_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a weighted sum of `dtype` tensors starts in: float16 in float32 (so small
    weights are not lost), others in their own dtype. WeightedSum widens a float32 (or float16)
    sum to float64 only when its running bound says the narrow one could overflow."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


WIDE = np.dtype(np.float64)
# A narrow sum stays narrow while its bound stays below SAFE_FRACTION of the dtype's largest
# value. Each add rounds the weight, the product and the sum (each by at most 2**-24 in float32),
# so the bound grows by BOUND_GROWTH per add; the fraction is margin for the bound's own float64
# rounding and for subnormals.
SAFE_FRACTION = 0.5
BOUND_GROWTH = 1.0 + 2.0**-20


class WeightedSum:
    """A running sum of weighted tensors: memory is one model's worth, whatever the count.

    Floating-point tensors accumulate weight * value (float16 sums in float32 so small weights
    are not lost); other tensors (integer counters) keep the largest value added. `total_weight`
    sums the weights; `norm` sums the normalising weights, which FedBuff keeps apart (n_i, not
    n_i f(s_i)).

    Overflow (docs/reliability.md): a weight is at most MAX_NUM_SAMPLES (1e9) and a float32 value
    at most 3.4e38, so a float32 sum of finite values can overflow. Each narrow sum keeps a
    running bound on its elements' magnitude, bound += weight * max|value|; while it stays below
    half the dtype's largest value the sum cannot overflow and is taken exactly as before. An add
    that would pass it first converts that tensor's sum to float64 (exactly: float32 -> float64
    is exact) and the rest of the buffer or round is summed in float64, where no valid input
    overflows; reset() goes back to the narrow dtype. max|value| comes from the caller (the
    aggregator's finiteness check already takes each update's min and max) or, for float16, from
    the dtype's range; without it the add watches the FPU's overflow flag instead.
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.sums: Tensors = {
            name: np.zeros(a.shape, narrow_sum_dtype(a.dtype)) for name, a in reference.items()
        }
        # Upper bounds on |element| of each narrow floating sum; inf when unknown (an add
        # without max|value|). Wide (float64) sums have none.
        self._bounds: dict[str, float] = {}
        # One small scratch per floating dtype, shared by every tensor of that dtype.
        largest: dict[np.dtype, int] = {}
        for name, total in self.sums.items():
            if is_averaged(total):
                largest[total.dtype] = max(largest.get(total.dtype, 1), total.size)
                if total.dtype != WIDE:
                    self._bounds[name] = 0.0
        self._scratch = {dt: np.empty(min(AXPY_CHUNK, n), dt) for dt, n in largest.items()}
        self._narrow = {name: total.dtype for name, total in self.sums.items()}
        self.total_weight = 0.0
        self.norm = 0.0
        self.count = 0

    @property
    def widened(self) -> list[str]:
        """The floating tensors whose sum was widened to float64 since the last reset."""
        return [n for n, s in self.sums.items() if s.dtype != self._narrow[n]]

    def add(
        self,
        tensors: Mapping[str, np.ndarray],
        weight: float,
        norm: float | None = None,
        max_abs: Mapping[str, float] | None = None,
    ) -> None:
        """Add weight * tensors (floating-point entries); keep the largest of the others.

        `max_abs`, where given, holds each floating tensor's largest |value| (known finite).
        """
        if not weight > 0:
            raise ValueError("weight must be > 0")
        for name, total in self.sums.items():
            value = tensors[name]
            if not is_averaged(total):
                # A fresh array, never written in place: mean() hands these out as they are.
                self.sums[name] = value.copy() if not self.count else max_counter(total, value)
            elif name not in self._bounds:
                axpy(total, value, weight, self._scratch_for(total.dtype))
            else:
                self._add_narrow(name, total, value, weight, max_abs)
        self.total_weight += weight
        self.norm += weight if norm is None else norm
        self.count += 1

    def _add_narrow(
        self,
        name: str,
        total: np.ndarray,
        value: np.ndarray,
        weight: float,
        max_abs: Mapping[str, float] | None,
    ) -> None:
        limit = SAFE_FRACTION * float(np.finfo(total.dtype).max)
        bound = self._bounds[name]
        largest = max_abs.get(name) if max_abs is not None else None
        if largest is None and value.dtype.kind == "f":
            # A float16 value's range bounds it for free: a float32 sum reaches the limit only
            # past a total weight of 1e33.
            in_range = float(np.finfo(value.dtype).max)
            if (bound + weight * in_range) * BOUND_GROWTH <= limit:
                largest = in_range
        if largest is not None:
            grown = (bound + weight * largest) * BOUND_GROWTH
            if grown <= limit and weight <= limit:
                axpy(total, value, weight, self._scratch[total.dtype])
                self._bounds[name] = grown
                return
            total = self._widen(name)
            axpy(total, value, weight, self._scratch_for(WIDE))
            return
        self._bounds[name] = math.inf  # the bound is lost: later adds watch the flag too
        done = axpy_checked(total, value, weight, self._scratch[total.dtype])
        if done < total.size:
            rest = self._widen(name).reshape(-1)[done:]
            axpy(rest, value.reshape(-1)[done:], weight, self._scratch_for(WIDE))

    def _widen(self, name: str) -> np.ndarray:
        """Convert one narrow sum to float64 (exactly) for the rest of this buffer or round."""
        wide = self.sums[name].astype(WIDE)
        self.sums[name] = wide
        del self._bounds[name]
        return wide

    def _scratch_for(self, dtype: np.dtype) -> np.ndarray:
        if dtype not in self._scratch:
            size = max(s.size for s in self.sums.values() if is_averaged(s))
            self._scratch[dtype] = np.empty(min(AXPY_CHUNK, max(size, 1)), dtype)
        return self._scratch[dtype]

    def reset(self) -> None:
        """Empty the sum in place (back to the narrow dtype), so a new round or buffer reuses the
        same memory."""
        for name, total in self.sums.items():
            if is_averaged(total) and total.dtype == self._narrow[name]:
                total.fill(0)
            else:
                # mean() hands integer arrays out as they are: rebind, never overwrite them.
                self.sums[name] = np.zeros(total.shape, self._narrow[name])
            if is_averaged(total) and self._narrow[name] != WIDE:
                self._bounds[name] = 0.0
        self.total_weight = 0.0
        self.norm = 0.0
        self.count = 0

    def restore(self, sums: Mapping[str, np.ndarray]) -> None:
        """Set the sums from a checkpoint: a float64 sum of a narrow tensor stays widened, a
        narrow one gets its bound back from its largest |element|."""
        for name, saved in sums.items():
            narrow = self._narrow[name]
            if not is_averaged(self.sums[name]) or narrow == WIDE:
                self.sums[name] = np.array(saved, narrow)
            elif saved.dtype == WIDE:
                self.sums[name] = np.array(saved, WIDE)
                self._bounds.pop(name, None)
            else:
                total = np.array(saved, narrow)
                self.sums[name] = total
                lo, hi = (float(total.min()), float(total.max())) if total.size else (0.0, 0.0)
                self._bounds[name] = max(-lo, hi) if math.isfinite(lo + hi) else math.inf

    def mean(self) -> Tensors:
        """Return sum / total weight for floating tensors, the largest value for the others."""
        if not self.total_weight > 0:
            raise ValueError("nothing to average")
        return {
            name: (s / self.total_weight if is_averaged(s) else s) for name, s in self.sums.items()
        }


# Elements per slice in axpy: its scratch (512 KiB of float32) stays in the core's cache.
AXPY_CHUNK = 1 << 17


def axpy(total: np.ndarray, value: np.ndarray, weight: float, scratch: np.ndarray) -> None:
    """total += weight * value, slice by slice through a small cache-resident scratch buffer.

    Done whole, numpy writes weight * value into a model-sized temporary and reads it back; in
    slices the product never leaves the cache, so each update is read once from memory, which
    is what bounds the aggregator's arithmetic (docs/benchmarks.md). `scratch` is 1-d, of the
    total's dtype and at least AXPY_CHUNK long.
    """
    flat_total, flat_value = total.reshape(-1), value.reshape(-1)
    mixed = flat_value.dtype != flat_total.dtype
    for start in range(0, flat_total.size, AXPY_CHUNK):
        end = min(start + AXPY_CHUNK, flat_total.size)
        product = scratch[: end - start]
        if mixed:
            # Widened by a plain copy, then scaled in place: numpy's mixed-dtype multiply is
            # slower.
            product[...] = flat_value[start:end]
            product *= weight
        else:
            np.multiply(flat_value[start:end], weight, out=product, dtype=product.dtype)
        flat_total[start:end] += product


def axpy_checked(total: np.ndarray, value: np.ndarray, weight: float, scratch: np.ndarray) -> int:
    """axpy, stopping before the first slice whose product or sum overflows: returns how many
    elements (from the start of the flattened total) were added, total.size if all were. The sum
    goes through the scratch, so a slice that overflows leaves the total as it was."""
    flat_total, flat_value = total.reshape(-1), value.reshape(-1)
    with np.errstate(over="raise"):
        for start in range(0, flat_total.size, AXPY_CHUNK):
            end = min(start + AXPY_CHUNK, flat_total.size)
            product, part = scratch[: end - start], flat_total[start:end]
            try:
                np.multiply(flat_value[start:end], weight, out=product, dtype=product.dtype)
                np.add(part, product, out=product)
            except FloatingPointError:
                return start
            part[...] = product
    return flat_total.size


def cast_like(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Tensors:
    """Return tensors cast to the reference's dtypes (float32 or float64 sums back to float16
    or float32, etc.)."""
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
