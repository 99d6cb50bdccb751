"""`fedq run` with per-site data files, a job name of its own, and a header without secrets.

No test here starts a federation: the processes of a RabbitMQ run are replaced by fakes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import aggregator.federation as federation
from aggregator.cli import main
from aggregator.federation import job_spec, parse_args
from shared.errors import ConfigError


@pytest.fixture
def sites(tmp_path: Path) -> list[str]:
    """Three small npz files of 8x8 images, one per site."""
    paths = []
    for i in range(3):
        path = tmp_path / f"site-{i}.npz"
        np.savez(path, x=np.zeros((4 + i, 8, 8), np.uint8), y=np.arange(4 + i) % 10)
        paths.append(str(path))
    return paths


def test_workers_default_to_one_per_data_file(sites: list[str]) -> None:
    args = parse_args(["--data", ",".join(sites), "--dataset", "digits"])

    assert args.workers == 3
    assert args.sites == sites


def test_data_files_may_be_given_one_flag_each(sites: list[str]) -> None:
    args = parse_args(["--data", sites[0], "--data", f"{sites[1]},{sites[2]}"])

    assert args.sites == sites


def test_worker_i_trains_on_the_i_th_data_file_and_not_on_a_share_of_the_data_set(
    sites: list[str],
) -> None:
    args = parse_args(["--data", ",".join(sites), "--dataset", "digits"])
    spec = job_spec(args)

    assert [federation._local_data(spec, args, i) for i in range(3)] == [
        {"data": site} for site in sites
    ]


def test_a_worker_count_that_disagrees_with_the_data_files_is_a_config_error(
    sites: list[str],
) -> None:
    with pytest.raises(ConfigError, match="--workers 2 but 3 --data entries"):
        parse_args(["--workers", "2", "--data", ",".join(sites)])


def test_a_missing_data_file_is_a_config_error_that_names_it(
    sites: list[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "site-9.npz")

    with pytest.raises(ConfigError, match=f"--data {missing}: no such file"):
        parse_args(["--data", f"{sites[0]},{missing}"])


def test_data_files_and_a_partition_together_are_a_config_error(sites: list[str]) -> None:
    with pytest.raises(ConfigError, match="--partition"):
        parse_args(["--data", ",".join(sites), "--partition", "dirichlet:0.5"])


def test_without_data_files_fedq_run_keeps_four_workers_on_iid_shares() -> None:
    args = parse_args(["--dataset", "digits"])

    assert (args.workers, args.partition, args.sites) == (4, "iid", [])
    assert federation._local_data(job_spec(args), args, 2) == {
        "dataset": "digits",
        "partition": "iid",
        "num_partitions": 4,
        "partition_index": 2,
        "partition_seed": 0,
    }


def test_name_names_the_job_over_the_job_file_and_the_demo_default() -> None:
    assert job_spec(parse_args(["--dataset", "digits"])).name == "demo"
    assert job_spec(parse_args(["--dataset", "digits", "--name", "hospitals"])).name == "hospitals"


def test_a_name_that_cannot_start_a_job_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="name must be"):
        job_spec(parse_args(["--dataset", "digits", "--name", "two words"]))


class _FakeProcess:
    """A service process that has already exited with status 0."""

    returncode = 0

    def poll(self) -> int:
        return 0

    def terminate(self) -> None:
        pass

    def wait(self, timeout: float) -> int:
        return 0


class _FakeTransport:
    def teardown(self, worker_ids: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_rabbitmq_run_gives_each_worker_process_its_own_data_file_and_shows_no_password(
    sites: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spawned: list[tuple[str, list[str]]] = []
    brokers: list[str] = []

    def spawn(service: str, argv: list[str], log: Path, broker: str) -> _FakeProcess:
        spawned.append((service, argv))
        brokers.append(broker)
        return _FakeProcess()

    submitted: list[str] = []
    monkeypatch.setattr(federation, "_spawn", spawn)
    monkeypatch.setattr(
        federation, "submit_job", lambda url, prefix, job_id, spec: submitted.append(job_id)
    )
    monkeypatch.setattr(federation, "connect", lambda url, topology: _FakeTransport())
    broker = "amqp://fedq:s3cret-pw@rabbit.example:5672/"
    argv = ["run", "--broker", broker, "--data", ",".join(sites), "--dataset", "digits"]

    status = main([*argv, "--model", "mlp", "--name", "sites", "--out", str(tmp_path / "r")])

    # No summary.json: the fake aggregator wrote none, so the run is reported as incomplete.
    assert status == 1
    out = capsys.readouterr().out
    assert "s3cret-pw" not in out
    assert "broker amqp://fedq:***@rabbit.example:5672/" in out
    assert submitted and submitted[0].startswith("sites-")
    workers = [argv for service, argv in spawned if service == "worker"]
    assert [argv[argv.index("--data") + 1] for argv in workers] == sites
    assert not any("--dataset" in argv or "--partition" in argv for argv in workers)
    # The password is in no command line (`ps` shows those): the URL goes in the environment.
    assert not any("s3cret-pw" in arg for _, argv in spawned for arg in argv)
    assert brokers == [broker] * 4


@pytest.mark.parametrize(
    ("x", "y", "why"),
    [
        (np.zeros((4, 3, 8, 8), np.uint8), np.arange(4), "does not take"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 15]), "classes"),
    ],
)
def test_a_site_file_the_model_cannot_take_is_refused_before_anything_starts(
    sites: list[str], tmp_path: Path, x: np.ndarray, y: np.ndarray, why: str
) -> None:
    bad = tmp_path / "bad-site.npz"
    np.savez(bad, x=x, y=y)
    args = parse_args(["--data", f"{sites[0]},{bad}", "--dataset", "digits", "--model", "mlp"])

    with pytest.raises(ConfigError, match=why) as caught:
        job_spec(args)

    assert str(bad) in str(caught.value) and "(worker w1)" in str(caught.value)
