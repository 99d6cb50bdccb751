"""The buffer rule of every strategy: BatchNorm statistics are values, never moved by a delta;
integer counters advance (docs/architecture.md, Strategies; docs/protocol.md 5.1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from torch import nn

from aggregator.aggregation import WeightedSum, fedbuff_step, mix
from aggregator.state import Accepted, JobState
from shared.jobs import JobSpec, ModelSpec, StrategyConfig
from shared.messages import Job, Update
from shared.models import buffer_names, build_model, state_to_numpy
from worker.service import _delta

pytestmark = pytest.mark.timeout(60)

_ids = itertools.count()
BUFFERS = frozenset({"bn.running_var", "bn.num_batches_tracked"})


def _tensors(w: float, var: float, batches: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full(2, w, np.float32),
        "bn.running_var": np.full(2, var, np.float32),
        "bn.num_batches_tracked": np.array(batches, np.int64),
    }


def _state(strategy: str, **config: object) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(name=strategy, **config))  # type: ignore[arg-type]
    initial = _tensors(0.0, 1.0, 100)
    return JobState(Job("job1", spec), initial, 0.0, 60.0, buffers=BUFFERS)


def _update(
    state: JobState, tensors: dict[str, np.ndarray], n: int = 10, base: int = 0, worker: str = "a"
) -> Update:
    return Update(
        job_id="job1",
        update_id=f"u{next(_ids)}",
        worker_id=worker,
        task_id=state.tasks.issue(worker, base),
        base_version=base,
        round=state.round,
        kind=state.update_kind,
        num_samples=n,
        tensors=tensors,
    )


def test_buffer_names_are_the_state_entries_that_are_not_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

    names = buffer_names(model)

    assert names == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert buffer_names(build_model(ModelSpec("mlp", (1, 8, 8), 10))) == frozenset()


def test_a_workers_delta_carries_differences_of_parameters_and_values_of_buffers() -> None:
    base = _tensors(1.0, 1.0, 100)
    trained = _tensors(1.5, 0.25, 107)

    delta = _delta(trained, base, BUFFERS)

    np.testing.assert_allclose(delta["w"], [0.5, 0.5])
    np.testing.assert_allclose(delta["bn.running_var"], [0.25, 0.25])
    assert int(delta["bn.num_batches_tracked"]) == 107


def test_a_fedbuff_release_whose_variance_deltas_would_go_negative_keeps_it_positive() -> None:
    # Two sites whose data have a variance of 0.3 where the global statistic says 1.0: as a
    # delta each moves running_var by -0.7, and a server learning rate of 2 took it to -0.4.
    state = _state("fedbuff", buffer_size=2, server_lr=2.0)
    base = state.model
    trained = _tensors(0.1, 0.3, 110)

    for worker in ("a", "b"):
        outcome = state.offer(_update(state, _delta(trained, base, BUFFERS), worker=worker), 1.0)

    assert isinstance(outcome, Accepted) and outcome.new_version == 1
    np.testing.assert_allclose(state.model["bn.running_var"], [0.3, 0.3], rtol=1e-6)
    np.testing.assert_allclose(state.model["w"], [0.2, 0.2], rtol=1e-6)  # 0 + 2 x 0.1


def test_a_fedbuff_release_sets_buffers_to_the_staleness_weighted_mean_of_their_values() -> None:
    state = _state("fedbuff", buffer_size=2, staleness="constant")
    state.offer(_update(state, _tensors(0.0, 0.25, 104), n=10), 1.0)

    state.offer(_update(state, _tensors(0.0, 0.5, 103), n=30), 1.0)

    # (10 x 0.25 + 30 x 0.5) / 40, not 1.0 + that (the global value moved by a "delta").
    np.testing.assert_allclose(state.model["bn.running_var"], [0.4375, 0.4375])


def test_a_fedbuff_release_advances_num_batches_tracked_to_the_largest_count() -> None:
    state = _state("fedbuff", buffer_size=2)
    state.offer(_update(state, _tensors(0.0, 1.0, 109)), 1.0)

    state.offer(_update(state, _tensors(0.0, 1.0, 105)), 1.0)

    assert int(state.model["bn.num_batches_tracked"]) == 109


def test_fedbuff_step_keeps_integer_tensors_it_is_not_told_are_buffers() -> None:
    model = {"w": np.zeros(2, np.float32), "steps": np.array(9, np.int64)}
    buffer = WeightedSum(model)
    buffer.add({"w": np.ones(2, np.float32), "steps": np.array(100, np.int64)}, 1.0)

    assert int(fedbuff_step(model, buffer, 1.0)["steps"]) == 9
    assert int(fedbuff_step(model, buffer, 1.0, values={"steps"})["steps"]) == 100


def test_fedasync_mixes_buffers_as_values_and_never_takes_a_counter_back() -> None:
    state = _state("fedasync", alpha=0.5, staleness="constant")
    state.offer(_update(state, _tensors(1.0, 3.0, 130)), 1.0)

    # A stale update from a worker that trained fewer batches since its base.
    state.offer(_update(state, _tensors(1.0, 0.2, 104), base=0), 2.0)

    # 1.0 -> 0.5 x 1.0 + 0.5 x 3.0 = 2.0 -> 0.5 x 2.0 + 0.5 x 0.2 = 1.1
    np.testing.assert_allclose(state.model["bn.running_var"], [1.1, 1.1], rtol=1e-6)
    assert int(state.model["bn.num_batches_tracked"]) == 130


def test_a_convex_mix_of_positive_variances_is_positive() -> None:
    x = _tensors(0.0, 1e-6, 1)
    y = _tensors(0.0, 4.0, 2)

    for alpha in (0.01, 0.5, 1.0):
        assert (mix(x, y, alpha)["bn.running_var"] > 0).all()


def test_a_fedavg_round_averages_buffers_as_values_and_takes_the_largest_counter() -> None:
    state = _state("fedavg", min_updates=2)
    state.offer(_update(state, _tensors(1.0, 0.5, 120), n=10, worker="a"), 1.0)

    # The larger count arrives first: the result must not depend on the order.
    outcome = state.offer(_update(state, _tensors(3.0, 1.5, 110), n=30, worker="b"), 1.0)

    assert isinstance(outcome, Accepted) and outcome.new_version == 1
    np.testing.assert_allclose(state.model["bn.running_var"], [1.25, 1.25])
    np.testing.assert_allclose(state.model["w"], [2.5, 2.5])
    assert int(state.model["bn.num_batches_tracked"]) == 120


def test_the_norm_bound_measures_a_delta_updates_buffers_as_value_changes() -> None:
    state = _state("fedbuff", buffer_size=100, max_update_norm_ratio=2.0)
    # Parameters moved by 0.1 each; running_var unchanged (its value equals the global 1.0).
    unchanged = _tensors(0.1, 1.0, 101)

    norm = state._change_norm(_update(state, unchanged))

    assert norm == pytest.approx(np.sqrt(2 * 0.1**2), rel=1e-6)


def test_the_aggregator_and_a_worker_find_the_same_buffers_from_the_model_spec() -> None:
    spec = ModelSpec("torchvision:resnet18", (1, 32, 32), 10)
    aggregator_side = build_model(spec, seed=0)  # the aggregator builds the initial model seeded

    names = buffer_names(build_model(spec))  # a worker builds it unseeded

    assert names == buffer_names(aggregator_side)
    assert names < set(state_to_numpy(aggregator_side))
    assert all(n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in names)
