"""Tests of partition: iid, Dirichlet and shard splits of sample indices for simulated clients."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.datasets import partition
from shared.errors import ConfigError, DatasetError

# 10 classes of 60 samples each, in label order.
BALANCED = np.repeat(np.arange(10), 60)


def label_shares(labels: np.ndarray, parts: list[np.ndarray]) -> list[float]:
    """Return, for each part, the share of its most common label."""
    return [np.bincount(labels[part]).max() / len(part) for part in parts]


@st.composite
def partition_cases(draw: st.DrawFn) -> tuple[np.ndarray, int, str, int]:
    labels = np.array(draw(st.lists(st.integers(0, 9), min_size=1, max_size=300)))
    num_parts = draw(st.integers(1, min(len(labels), 20)))
    scheme = draw(
        st.one_of(
            st.just("iid"),
            st.sampled_from(["0.01", "0.1", "1", "100"]).map(lambda a: f"dirichlet:{a}"),
            st.integers(1, max(1, len(labels) // num_parts)).map(lambda k: f"shards:{k}"),
        )
    )
    return labels, num_parts, scheme, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None)
@given(partition_cases())
def test_every_index_lands_in_exactly_one_non_empty_part(
    case: tuple[np.ndarray, int, str, int],
) -> None:
    labels, num_parts, scheme, seed = case

    parts = partition(labels, num_parts, scheme, seed)

    assert len(parts) == num_parts
    assert all(len(part) > 0 for part in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "shards:2"])
def test_the_same_seed_gives_the_same_parts(scheme: str) -> None:
    first = partition(BALANCED, 10, scheme, seed=7)
    second = partition(BALANCED, 10, scheme, seed=7)

    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "shards:2"])
def test_another_seed_gives_other_parts(scheme: str) -> None:
    first = partition(BALANCED, 10, scheme, seed=7)
    second = partition(BALANCED, 10, scheme, seed=8)

    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_parts_hold_sorted_int64_indices() -> None:
    parts = partition(BALANCED, 4, "iid", seed=0)

    assert all(part.dtype == np.int64 for part in parts)
    assert all(np.array_equal(part, np.sort(part)) for part in parts)


def test_iid_part_sizes_differ_by_at_most_one() -> None:
    sizes = [len(part) for part in partition(np.zeros(103, dtype=int), 10, "iid", seed=0)]

    assert max(sizes) - min(sizes) <= 1


def test_iid_parts_see_a_mix_of_labels() -> None:
    parts = partition(BALANCED, 10, "iid", seed=0)

    assert np.mean(label_shares(BALANCED, parts)) < 0.3


def test_dirichlet_with_small_alpha_skews_each_part_towards_few_labels() -> None:
    parts = partition(BALANCED, 10, "dirichlet:0.1", seed=0)

    assert np.mean(label_shares(BALANCED, parts)) > 0.5


def test_dirichlet_with_large_alpha_is_close_to_uniform() -> None:
    parts = partition(BALANCED, 10, "dirichlet:100", seed=0)

    assert np.mean(label_shares(BALANCED, parts)) < 0.25


def test_dirichlet_fills_every_part_even_when_alpha_is_tiny_and_parts_many() -> None:
    labels = np.repeat(np.arange(3), 20)

    parts = partition(labels, 50, "dirichlet:0.01", seed=1)

    assert min(len(part) for part in parts) >= 1


def test_shards_aligned_with_classes_give_each_part_at_most_k_labels() -> None:
    # 20 parts x 2 shards = 40 shards of 15 samples: each shard lies inside one class of 60.
    parts = partition(BALANCED, 20, "shards:2", seed=0)

    assert all(len(np.unique(BALANCED[part])) <= 2 for part in parts)
    assert all(len(part) == 30 for part in parts)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_each_part_at_most_2k_labels(k: int) -> None:
    labels = np.repeat(np.arange(10), 47)

    parts = partition(labels, 13, f"shards:{k}", seed=3)

    assert max(len(np.unique(labels[part])) for part in parts) <= 2 * k


def test_shards_are_far_more_skewed_than_iid() -> None:
    shards = partition(BALANCED, 20, "shards:2", seed=0)
    iid = partition(BALANCED, 20, "iid", seed=0)

    assert np.mean(label_shares(BALANCED, shards)) > 2 * np.mean(label_shares(BALANCED, iid))


def test_partition_does_not_modify_read_only_labels() -> None:
    labels = BALANCED.copy()
    labels.setflags(write=False)

    partition(labels, 5, "shards:2", seed=0)

    assert np.array_equal(labels, BALANCED)


@pytest.mark.parametrize(
    "scheme",
    [
        "",
        "IID",
        "random",
        "dirichlet",
        "dirichlet:",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:abc",
        "dirichlet:nan",
        "dirichlet:inf",
        "shards",
        "shards:0",
        "shards:1.5",
        "shards:-2",
        "shards:two",
    ],
)
def test_malformed_schemes_raise_config_error(scheme: str) -> None:
    with pytest.raises(ConfigError, match="partition"):
        partition(BALANCED, 4, scheme, seed=0)


def test_zero_parts_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="num_parts"):
        partition(BALANCED, 0, "iid", seed=0)


@pytest.mark.parametrize(("num_parts", "scheme"), [(11, "iid"), (6, "shards:2")])
def test_too_few_samples_for_non_empty_parts_raise_dataset_error(
    num_parts: int, scheme: str
) -> None:
    with pytest.raises(DatasetError, match="too few"):
        partition(np.arange(10), num_parts, scheme, seed=0)
