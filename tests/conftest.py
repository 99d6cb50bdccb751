"""Test-wide settings: small torch thread pools so that tiers stay fast on two cores; logging
levels restored after each test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from shared.logs import FEDQ_LOGGERS

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _logging_levels() -> Iterator[None]:
    """Commands run in a test set logging levels (shared.logs.configure_logging): undo them."""
    names = ["", *FEDQ_LOGGERS]
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
