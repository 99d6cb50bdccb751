"""`fedq status` shows the workers that cannot train the running job."""

from __future__ import annotations

from aggregator.status import render

FAILED = {"worker_id": "rgb-site", "reason": "data_mismatch", "detail": "labels go up to 11"}


def test_the_status_block_has_a_line_for_each_worker_that_failed() -> None:
    block = render({"state": "running", "failed_workers": [FAILED]})

    assert "worker failed  rgb-site: data_mismatch: labels go up to 11" in block.splitlines()


def test_the_status_block_has_no_failed_worker_line_when_none_failed() -> None:
    assert "worker failed" not in render({"state": "running", "failed_workers": []})


def test_a_long_list_of_failed_workers_is_cut_with_a_count() -> None:
    failed = [FAILED | {"worker_id": f"w{i}"} for i in range(13)]

    lines = [line for line in render({"failed_workers": failed}).splitlines() if "failed" in line]

    assert len(lines) == 11
    assert lines[-1] == "worker failed  ... and 3 more (see --json)"
