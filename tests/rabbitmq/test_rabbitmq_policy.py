"""Reconnect backoff and URL masking of the RabbitMQ transport (no broker needed)."""

from __future__ import annotations

import random

import pytest

from broker.rabbitmq import ReconnectPolicy, masked_url

pytestmark = pytest.mark.timeout(10)


def test_backoff_delays_stay_under_an_exponentially_growing_cap() -> None:
    policy = ReconnectPolicy(base_s=0.5, cap_s=30.0)
    rng = random.Random(7)

    ceilings = {
        attempt: max(policy.delay(attempt, rng) for _ in range(200)) for attempt in range(12)
    }

    for attempt, longest in ceilings.items():
        assert longest <= min(30.0, 0.5 * 2**attempt)
    assert ceilings[3] > 2.0  # full jitter spreads over the whole range, up to 4 s here
    assert policy.delay(10_000, rng) <= 30.0


def test_full_jitter_can_retry_almost_at_once() -> None:
    policy = ReconnectPolicy(base_s=0.5, cap_s=30.0)
    rng = random.Random(11)

    shortest = min(policy.delay(8, rng) for _ in range(200))

    assert shortest < 3.0


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("amqp://fedq:s3cret@broker:5672/%2F", "amqp://fedq:***@broker:5672/%2F"),
        ("amqps://u:p%40ss@h/vh?heartbeat=10", "amqps://u:***@h/vh?heartbeat=10"),
        ("amqp://broker/%2F", "amqp://broker/%2F"),
    ],
)
def test_masked_urls_hide_the_password_but_keep_user_host_and_options(
    url: str, logged: str
) -> None:
    assert masked_url(url) == logged
