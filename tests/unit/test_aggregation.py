"""Aggregation math against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.aggregation import (
    AXPY_CHUNK,
    WeightedSum,
    apply_delta,
    cast_like,
    fedavg,
    fedbuff_step,
    mix,
    staleness_factor,
)
from shared.jobs import StrategyConfig


def _model(w: list[float], steps: int = 0) -> dict[str, np.ndarray]:
    return {"w": np.array(w, np.float32), "steps": np.array(steps, np.int64)}


def test_weighted_fedavg_matches_a_hand_computation() -> None:
    updates = [(_model([1.0, 2.0], 3), 100.0), (_model([4.0, 8.0], 5), 300.0)]

    result = fedavg(updates, _model([0.0, 0.0]))

    # (100 * [1, 2] + 300 * [4, 8]) / 400 = [3.25, 6.5]
    np.testing.assert_allclose(result["w"], [3.25, 6.5])
    assert result["w"].dtype == np.float32


def test_integer_buffers_are_taken_from_the_newest_update_not_averaged() -> None:
    updates = [(_model([1.0, 1.0], 3), 1.0), (_model([1.0, 1.0], 5), 1.0)]

    result = fedavg(updates, _model([0.0, 0.0]))

    assert int(result["steps"]) == 5
    assert result["steps"].dtype == np.int64


def test_float16_tensors_are_summed_in_float32_and_returned_as_float16() -> None:
    reference = {"h": np.zeros(1, np.float16)}
    updates = [
        ({"h": np.array([1.0], np.float16)}, 1e-4),
        ({"h": np.array([3.0], np.float16)}, 3e-4),
    ]

    result = fedavg(updates, reference)

    assert result["h"].dtype == np.float16
    np.testing.assert_allclose(result["h"].astype(np.float32), [2.5], rtol=1e-3)


@given(st.lists(st.floats(0.01, 1000), min_size=1, max_size=6))
def test_averaging_identical_updates_returns_them_whatever_the_weights(
    weights: list[float],
) -> None:
    same = _model([0.5, -2.0])

    result = fedavg([(same, w) for w in weights], _model([0.0, 0.0]))

    np.testing.assert_allclose(result["w"], same["w"], rtol=1e-5)


@pytest.mark.parametrize(
    ("config", "staleness", "expected"),
    [
        (StrategyConfig(staleness="constant"), 7, 1.0),
        (StrategyConfig(staleness="polynomial", staleness_a=0.5), 3, 0.5),
        (StrategyConfig(staleness="polynomial", staleness_a=1.0), 0, 1.0),
        (StrategyConfig(staleness="hinge", staleness_a=10, staleness_b=4), 4, 1.0),
        (StrategyConfig(staleness="hinge", staleness_a=10, staleness_b=4), 6, 1 / 21),
    ],
)
def test_staleness_functions_follow_their_definitions(
    config: StrategyConfig, staleness: int, expected: float
) -> None:
    assert staleness_factor(staleness, config) == pytest.approx(expected)


@given(st.integers(0, 1000))
def test_staleness_factors_never_grow_with_staleness(s: int) -> None:
    for name in ("constant", "polynomial", "hinge"):
        config = StrategyConfig(staleness=name)
        assert 0 < staleness_factor(s + 1, config) <= staleness_factor(s, config) <= 1


def test_negative_staleness_is_refused() -> None:
    with pytest.raises(ValueError):
        staleness_factor(-1, StrategyConfig())


def test_fedbuff_step_divides_by_samples_not_by_staleness_weighted_samples() -> None:
    model = _model([1.0, 1.0])
    buffer = WeightedSum(model)
    buffer.add(_model([2.0, 0.0]), 100 * 1.0, norm=100)
    buffer.add(_model([4.0, 4.0]), 100 * 0.5, norm=100)

    result = fedbuff_step(model, buffer, server_lr=2.0)

    # x + 2 * (100 * [2, 0] + 50 * [4, 4]) / 200 = [1, 1] + 2 * [2, 1] = [5, 3]
    np.testing.assert_allclose(result["w"], [5.0, 3.0])


def test_fedbuff_keeps_integer_buffers_of_the_global_model() -> None:
    model = _model([1.0, 1.0], steps=9)
    buffer = WeightedSum(model)
    buffer.add(_model([1.0, 1.0], steps=100), 1.0)

    assert int(fedbuff_step(model, buffer, 1.0)["steps"]) == 9


def test_fedasync_mixes_the_global_model_with_the_update() -> None:
    result = mix(_model([0.0, 10.0]), _model([10.0, 0.0]), alpha=0.25)

    np.testing.assert_allclose(result["w"], [2.5, 7.5])


def test_fedasync_refuses_an_alpha_outside_zero_to_one() -> None:
    with pytest.raises(ValueError):
        mix(_model([0.0, 0.0]), _model([1.0, 1.0]), alpha=1.5)


def test_apply_delta_scales_the_delta() -> None:
    result = apply_delta(_model([1.0, 2.0]), {"w": np.array([1.0, 1.0], np.float32)}, 0.5)

    np.testing.assert_allclose(result["w"], [1.5, 2.5])


def test_a_weighted_sum_refuses_non_positive_weights_and_empty_means() -> None:
    acc = WeightedSum(_model([0.0, 0.0]))

    with pytest.raises(ValueError):
        acc.add(_model([1.0, 1.0]), 0.0)
    with pytest.raises(ValueError):
        acc.mean()


def test_resetting_a_sum_leaves_arrays_already_handed_out_by_mean_untouched() -> None:
    acc = WeightedSum(_model([0.0, 0.0]))
    acc.add(_model([2.0, 4.0], steps=7), 1.0)
    handed_out = acc.mean()

    acc.reset()
    acc.add(_model([1.0, 1.0], steps=9), 2.0)

    assert int(handed_out["steps"]) == 7
    np.testing.assert_allclose(handed_out["w"], [2.0, 4.0])
    np.testing.assert_allclose(acc.mean()["w"], [1.0, 1.0])
    assert acc.count == 1 and acc.total_weight == 2.0


def test_float16_products_are_taken_in_float32_before_they_are_summed() -> None:
    # 2049 is not a float16: a product rounded to float16 before the sum would come out 2048.
    reference = {"h": np.zeros(1, np.float16)}
    total = WeightedSum(reference)

    total.add({"h": np.array([1.0], np.float16)}, 2049.0)

    assert total.sums["h"].dtype == np.float32
    assert float(total.sums["h"][0]) == 2049.0


def test_tensors_longer_than_one_slice_and_views_are_summed_whole() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(AXPY_CHUNK * 2 + 7,)).astype(np.float32)
    transposed = rng.normal(size=(3, 5)).astype(np.float32).T
    reference = {"big": np.zeros_like(big), "t": np.zeros((5, 3), np.float32)}
    total = WeightedSum(reference)

    total.add({"big": big, "t": transposed}, 2.0)
    total.add({"big": big, "t": transposed}, 0.5)

    np.testing.assert_allclose(total.sums["big"], 2.5 * big, rtol=1e-6)
    np.testing.assert_allclose(total.sums["t"], 2.5 * transposed, rtol=1e-6)


def test_float32_values_near_the_largest_float32_are_averaged_without_overflow() -> None:
    # 1,000 samples x 3e38 is far past float32's 3.4e38: the sum widens to float64.
    big = np.float32(3e38)
    updates = [(_model([big, -big]), 1000.0), (_model([big, big]), 3000.0)]

    result = fedavg(updates, _model([0.0, 0.0]))

    assert result["w"].dtype == np.float32
    np.testing.assert_allclose(result["w"], [3e38, 1.5e38], rtol=1e-6)


def _plain_float32_mean(updates: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """What a float32 accumulator gives: each product and each sum rounded to float32."""
    total = np.zeros_like(updates[0][0])
    for value, weight in updates:
        total += value * np.float32(weight)
    out: np.ndarray = (total / np.float32(sum(w for _, w in updates))).astype(np.float32)
    return out


def _ordinary_updates(size: int) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(7)
    return [(rng.normal(size=size).astype(np.float32), 10.0 + 3 * i) for i in range(6)]


def test_ordinary_float32_updates_give_the_bits_of_a_plain_float32_sum() -> None:
    updates = _ordinary_updates(AXPY_CHUNK + 1000)
    with_bound = WeightedSum({"w": updates[0][0]})

    result = fedavg([({"w": v}, w) for v, w in updates], {"w": updates[0][0]})
    for value, weight in updates:
        with_bound.add({"w": value}, weight, max_abs={"w": float(np.abs(value).max())})

    np.testing.assert_array_equal(result["w"], _plain_float32_mean(updates))
    np.testing.assert_array_equal(with_bound.mean()["w"], _plain_float32_mean(updates))
    assert with_bound.sums["w"].dtype == np.float32 and with_bound.widened == []


def test_a_float32_sum_widens_to_float64_when_its_bound_could_overflow() -> None:
    big = np.float32(3e38)
    first, huge = np.array([1.5, -2.0], np.float32), np.array([big, -big], np.float32)
    total = WeightedSum(_model([0.0, 0.0]))

    total.add(_model([1.5, -2.0]), 7.0, max_abs={"w": 2.0})
    assert total.sums["w"].dtype == np.float32
    total.add({"w": huge, "steps": np.array(1)}, 1e9, max_abs={"w": 3e38})

    assert total.widened == ["w"] and total.sums["w"].dtype == np.float64
    # What was summed before it widened is kept exactly; the rest is float64 math.
    expected = (7.0 * first.astype(np.float64) + 1e9 * huge.astype(np.float64)) / (7.0 + 1e9)
    np.testing.assert_allclose(total.mean()["w"], expected, rtol=1e-15)
    assert np.isfinite(cast_like(total.mean(), _model([0.0, 0.0]))["w"]).all()


def test_without_max_abs_a_float32_sum_widens_at_the_slice_that_would_overflow() -> None:
    values = np.ones(2 * AXPY_CHUNK + 5, np.float32)
    values[AXPY_CHUNK + 3] = 3e38
    total = WeightedSum({"w": values})

    total.add({"w": values}, 1000.0)
    total.add({"w": values}, 3000.0)

    assert total.widened == ["w"]
    mean = fedavg([({"w": values}, 1000.0), ({"w": values}, 3000.0)], {"w": values})
    np.testing.assert_array_equal(total.mean()["w"].astype(np.float32), values)
    np.testing.assert_array_equal(mean["w"], values)


def test_reset_narrows_a_widened_sum_and_ordinary_updates_give_float32_bits_again() -> None:
    total = WeightedSum({"w": np.zeros(3, np.float32)})
    total.add({"w": np.full(3, 3e38, np.float32)}, 1e9, max_abs={"w": 3e38})
    assert total.widened == ["w"]

    total.reset()
    updates = _ordinary_updates(3)
    for value, weight in updates:
        total.add({"w": value}, weight, max_abs={"w": float(np.abs(value).max())})

    assert total.widened == [] and total.sums["w"].dtype == np.float32
    np.testing.assert_array_equal(total.mean()["w"], _plain_float32_mean(updates))


def test_float16_tensors_need_no_max_abs_to_stay_summed_in_float32() -> None:
    total = WeightedSum({"h": np.zeros(2, np.float16)})

    for _ in range(3):
        total.add({"h": np.array([65504, -65504], np.float16)}, 1e9)

    assert total.widened == [] and total.sums["h"].dtype == np.float32
    np.testing.assert_allclose(total.sums["h"], [3 * 65504e9, -3 * 65504e9], rtol=1e-6)


def test_a_fedbuff_step_of_deltas_near_the_largest_float32_stays_finite() -> None:
    big = np.float32(3e38)
    buffer = WeightedSum(_model([0.0, 0.0]))
    buffer.add(_model([big, big]), 1000.0, norm=1000.0)
    buffer.add(_model([big, -big]), 1000.0, norm=1000.0)

    result = fedbuff_step(_model([1.0, 1.0]), buffer, server_lr=1.0)

    assert result["w"].dtype == np.float32
    np.testing.assert_allclose(result["w"], [3e38, 1.0], rtol=1e-6)
