"""The ended jobs of a state dir: outcome per stop reason, durable records, the old file."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.outcomes import MAX_LISTED, JobOutcomes, outcome_of


@pytest.mark.parametrize(
    ("stop_reason", "outcome"),
    [
        ("max_versions", "finished"),
        ("target_accuracy", "finished"),
        ("max_time", "finished"),
        ("bad_job", "failed"),
        ("diverged", "failed"),
        ("cancelled", "cancelled"),
    ],
)
def test_each_stop_reason_means_one_outcome(stop_reason: str, outcome: str) -> None:
    assert outcome_of(stop_reason) == outcome


def test_recorded_outcomes_are_read_back_by_a_new_reader(tmp_path: Path) -> None:
    outcomes = JobOutcomes(tmp_path)
    outcomes.record("a", "max_versions")
    outcomes.record("b", "bad_job", "RegistryError: unknown model 'cnnn'")
    outcomes.record("c", "cancelled")

    again = JobOutcomes(tmp_path)

    assert again.counts() == {"finished": 1, "failed": 1, "cancelled": 1}
    assert again.failed() == [
        {"job_id": "b", "reason": "bad_job", "detail": "RegistryError: unknown model 'cnnn'"}
    ]
    assert "a" in again and "z" not in again


def test_the_ids_of_the_old_finished_jobs_file_count_as_ended(tmp_path: Path) -> None:
    (tmp_path / "finished-jobs.txt").write_text("old-1\nold-2\n")

    outcomes = JobOutcomes(tmp_path)

    assert "old-1" in outcomes and "old-2" in outcomes
    assert outcomes.counts() == {"finished": 2, "failed": 0, "cancelled": 0}


def test_a_line_cut_short_by_a_crash_is_not_read_as_a_record(tmp_path: Path) -> None:
    JobOutcomes(tmp_path).record("whole", "max_versions")
    with open(tmp_path / "job-outcomes.jsonl", "a") as fh:
        fh.write('{"job_id": "cut", "outc')

    outcomes = JobOutcomes(tmp_path)

    assert "whole" in outcomes and "cut" not in outcomes


def test_only_the_newest_failed_jobs_are_listed(tmp_path: Path) -> None:
    outcomes = JobOutcomes(tmp_path)
    for i in range(MAX_LISTED + 5):
        outcomes.record(f"bad-{i}", "bad_job")

    listed = outcomes.failed()

    assert len(listed) == MAX_LISTED
    assert listed[-1]["job_id"] == f"bad-{MAX_LISTED + 4}"
    assert outcomes.counts()["failed"] == MAX_LISTED + 5


def test_a_record_written_after_a_line_cut_short_is_read_by_this_reader_and_the_next(
    tmp_path: Path,
) -> None:
    JobOutcomes(tmp_path).record("whole", "max_versions")
    with open(tmp_path / "job-outcomes.jsonl", "a") as fh:
        fh.write('{"job_id": "cut", "outc')
    outcomes = JobOutcomes(tmp_path)

    outcomes.record("after", "cancelled")

    for reader in (outcomes, JobOutcomes(tmp_path)):
        assert "whole" in reader and "after" in reader and "cut" not in reader


def test_a_standby_sharing_the_state_dir_sees_a_job_the_active_aggregator_ended(
    tmp_path: Path,
) -> None:
    standby = JobOutcomes(tmp_path)
    active = JobOutcomes(tmp_path)

    active.record("job-1", "max_versions")
    outcome = standby.get("job-1")

    assert outcome is not None and outcome.stop_reason == "max_versions"
