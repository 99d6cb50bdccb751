"""Tests of the `fedq` command line: dispatch, `fedq run`'s job and flags, errors and exit status.

No test here starts a federation or reaches a broker: connect() is replaced wherever a command
could get that far.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import aggregator.cli
from aggregator.cli import main
from aggregator.federation import job_spec, parse_args, slowdowns
from aggregator.status import parse_metrics, render
from broker import MemoryBroker, MemoryTransport, Topology
from shared.errors import ConfigError, RegistryError
from shared.jobs import JobSpec
from shared.messages import Cancel, Job, decode_message
from shared.ops import finite

FEDBUFF_JOB = str(Path(__file__).resolve().parents[2] / "deploy" / "jobs" / "mnist-fedbuff.toml")


@pytest.fixture
def no_broker(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail any attempt of `fedq submit` to connect; returns the URLs it tried."""
    tried: list[str] = []

    def refuse(url: str, *args: Any, **kwargs: Any) -> Any:
        tried.append(url)
        raise AssertionError(f"connect({url!r}) was called")

    monkeypatch.setattr(aggregator.cli, "connect", refuse)
    return tried


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize("argv", [[], ["train"], ["--version"]])
def test_no_command_or_an_unknown_one_prints_the_usage_and_returns_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(argv)

    assert status == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: fedq COMMAND")
    assert all(command in out for command in ("run", "aggregator", "worker", "submit"))


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_returns_0(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([flag])

    assert status == 0
    assert "usage: fedq COMMAND" in capsys.readouterr().out


def test_a_command_s_own_help_exits_0_with_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "--help"])

    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "--target-accuracy" in out
    assert "--slowdown" in out


# ---------------------------------------------------------------- --slowdown


def test_slowdown_factors_fill_the_missing_workers_with_1() -> None:
    assert slowdowns("1,1,5", 4) == [1.0, 1.0, 5.0, 1.0]


@pytest.mark.parametrize("text", [None, ""])
def test_no_slowdown_is_1_for_every_worker(text: str | None) -> None:
    assert slowdowns(text, 3) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("text", ["1,x", "1;5", "1,,5", "fast"])
def test_slowdown_text_that_is_not_comma_separated_numbers_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="comma-separated"):
        slowdowns(text, 4)


def test_more_slowdown_factors_than_workers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="one factor"):
        slowdowns("1,1,1", 2)


@pytest.mark.parametrize("text", ["0.5", "1,0", "2,-3"])
def test_a_slowdown_factor_below_1_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match=">= 1"):
        slowdowns(text, 4)


def test_a_slowdown_factor_that_is_not_a_number_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        slowdowns("nan", 2)


# ---------------------------------------------------------------- fedq run's job


def test_without_a_job_file_fedq_run_trains_the_demo_job() -> None:
    spec = job_spec(parse_args(["--dataset", "digits"]))

    assert spec.name == "demo"
    assert (spec.stop.max_versions, spec.stop.target_accuracy, spec.stop.max_time_s) == (
        100,
        0.95,
        600,
    )
    assert spec.strategy.name == "fedavg"
    assert spec.model.name == "cnn"


def test_the_model_takes_its_input_shape_and_classes_from_the_data_set() -> None:
    spec = job_spec(parse_args(["--dataset", "digits", "--model", "mlp"]))

    assert spec.dataset == "digits"
    assert (spec.model.name, spec.model.input_shape, spec.model.num_classes) == (
        "mlp",
        (1, 8, 8),
        10,
    )


def test_fedq_run_flags_override_the_demo_defaults() -> None:
    argv = ["--dataset", "digits", "--strategy", "fedasync", "--alpha", "0.3"]
    argv += ["--staleness", "hinge", "--max-staleness", "5", "--epochs", "2", "--lr", "0.01"]
    argv += ["--optimizer", "adam", "--mu", "0.1", "--batch-size", "16", "--seed", "7"]
    argv += ["--max-versions", "9", "--max-time", "30", "--target-accuracy", "0.8"]

    spec = job_spec(parse_args(argv))

    s, t, stop = spec.strategy, spec.training, spec.stop
    assert (s.name, s.alpha, s.staleness, s.max_staleness) == ("fedasync", 0.3, "hinge", 5)
    assert (t.epochs, t.lr, t.optimizer, t.mu, t.batch_size) == (2, 0.01, "adam", 0.1, 16)
    assert (stop.max_versions, stop.max_time_s, stop.target_accuracy) == (9, 30.0, 0.8)
    assert spec.seed == 7


def test_fedq_run_flags_override_a_job_file_and_keep_the_rest_of_it() -> None:
    argv = ["--job", FEDBUFF_JOB, "--dataset", "digits", "--buffer-size", "2"]
    argv += ["--server-lr", "0.5", "--target-accuracy", "0.5"]

    spec = job_spec(parse_args(argv))

    assert spec.name == "mnist-fedbuff"
    assert (spec.strategy.name, spec.strategy.buffer_size, spec.strategy.server_lr) == (
        "fedbuff",
        2,
        0.5,
    )
    assert (spec.strategy.staleness, spec.strategy.staleness_a) == ("polynomial", 0.5)
    assert spec.stop.target_accuracy == 0.5
    assert (spec.stop.max_time_s, spec.stop.max_versions) == (600.0, 200)
    assert spec.training.momentum == 0.9


def test_a_job_file_that_leaves_the_model_shape_out_takes_the_data_set_s() -> None:
    spec = job_spec(parse_args(["--job", FEDBUFF_JOB, "--dataset", "digits"]))

    assert (spec.model.name, spec.model.input_shape, spec.model.num_classes) == (
        "cnn",
        (1, 8, 8),
        10,
    )


def test_a_job_file_s_own_model_shape_is_kept_and_checked_against_the_data(
    tmp_path: Path,
) -> None:
    job = tmp_path / "job.toml"
    job.write_text("[model]\nname = 'mlp'\ninput_shape = [1, 8, 8]\nnum_classes = 12\n")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[model]\nname = 'mlp'\ninput_shape = [1, 28, 28]\n")

    spec = job_spec(parse_args(["--job", str(job), "--dataset", "digits"]))

    assert (spec.model.input_shape, spec.model.num_classes) == ((1, 8, 8), 12)
    with pytest.raises(RegistryError, match=re.escape("does not take the data set's examples")):
        job_spec(parse_args(["--job", str(wrong), "--dataset", "digits"]))


def test_a_flag_value_outside_its_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("strategy.alpha")):
        job_spec(parse_args(["--dataset", "digits", "--alpha", "2"]))


def test_an_unknown_model_fails_when_the_job_is_built() -> None:
    with pytest.raises(RegistryError, match="unknown model 'resnet1000'"):
        job_spec(parse_args(["--dataset", "digits", "--model", "resnet1000"]))


def test_a_model_too_large_for_the_data_fails_when_the_job_is_built() -> None:
    with pytest.raises(RegistryError, match="14x14"):
        job_spec(parse_args(["--dataset", "digits", "--model", "fednet"]))


def test_an_unknown_data_set_fails_when_the_job_is_built() -> None:
    with pytest.raises(RegistryError, match="unknown data set"):
        job_spec(parse_args(["--dataset", "mnist60k"]))


# ---------------------------------------------------------------- errors and exit status


def test_fedq_run_with_no_workers_returns_1_with_the_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status = main(["run", "--workers", "0", "--dataset", "digits", "--out", str(tmp_path / "r")])

    assert status == 1
    assert "fedq run: --workers must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fedq_run_with_a_bad_slowdown_returns_1_before_making_its_run_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["run", "--workers", "2", "--slowdown", "1,1,1", "--dataset", "digits"]

    status = main([*argv, "--out", str(tmp_path / "r")])

    assert status == 1
    assert "--slowdown" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fedq_run_refuses_a_run_directory_that_holds_a_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "history.jsonl").write_text('{"version": 0}\n')

    status = main(["run", "--dataset", "digits", "--model", "mlp", "--out", str(tmp_path)])

    assert status == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "history.jsonl").read_text() == '{"version": 0}\n'


def test_submitting_a_bad_job_file_returns_1_without_touching_a_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_broker: list[str]
) -> None:
    job = tmp_path / "bad.toml"
    job.write_text("[strategy]\nname = 'nope'\n")

    status = main(["submit", str(job), "--broker", "amqp://guest:guest@127.0.0.1:1/"])

    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("fedq submit: ")
    assert "strategy.name" in err
    assert no_broker == []


def test_submitting_with_an_invalid_job_id_returns_1_without_touching_a_broker(
    capsys: pytest.CaptureFixture[str], no_broker: list[str]
) -> None:
    status = main(["submit", FEDBUFF_JOB, "--job-id", "my job"])

    assert status == 1
    assert "invalid job id 'my job'" in capsys.readouterr().err
    assert no_broker == []


def test_submit_puts_the_job_on_the_job_queue_and_prints_its_id(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = MemoryBroker()
    monkeypatch.setattr(
        aggregator.cli, "connect", lambda url, topology, **kw: MemoryTransport(memory, topology)
    )

    status = main(["submit", FEDBUFF_JOB, "--prefix", "test-submit", "--job-id", "fb-1"])

    assert status == 0
    assert capsys.readouterr().out == "fb-1\n"
    reader = MemoryTransport(memory, Topology("test-submit"))
    reader.subscribe(reader.topology.jobs)
    delivery = reader.receive(1.0)
    assert delivery is not None
    message = decode_message(delivery.body)
    assert isinstance(message, Job)
    assert message.job_id == "fb-1"
    assert isinstance(message.spec, JobSpec)
    assert (message.spec.strategy.name, message.spec.strategy.buffer_size) == ("fedbuff", 4)


def test_the_aggregator_refuses_the_in_process_broker_and_returns_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["aggregator", "--broker", "memory", "--log-level", "WARNING"])

    assert status == 1
    assert "only works inside `fedq run`" in capsys.readouterr().err


def test_a_worker_without_local_data_returns_1_with_the_reason(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDQ_DATA", raising=False)
    monkeypatch.delenv("FEDQ_DATASET", raising=False)

    status = main(["worker", "--worker-id", "site-a", "--log-level", "WARNING"])

    assert status == 1
    assert "exactly one of --data PATH or --dataset NAME" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["my job", "", "x" * 65, "-leading-dash"])
def test_a_job_name_that_cannot_start_an_id_is_refused_before_anything_runs(name: str) -> None:
    with pytest.raises(ConfigError, match="name must be"):
        JobSpec(name=name)


def test_eval_every_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="eval_every"):
        JobSpec(eval_every=0)


# ---------------------------------------------------------------- submit's check, cancel, status


def _job_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def _memory_connect(monkeypatch: pytest.MonkeyPatch) -> MemoryBroker:
    memory = MemoryBroker()
    monkeypatch.setattr(
        aggregator.cli, "connect", lambda url, topology, **kw: MemoryTransport(memory, topology)
    )
    MemoryTransport(memory, Topology("fedq")).declare()
    return memory


def _published(memory: MemoryBroker) -> list[Any]:
    reader = MemoryTransport(memory, Topology("fedq"))
    reader.subscribe(reader.topology.jobs)
    out = []
    while (delivery := reader.receive(0)) is not None:
        out.append(decode_message(delivery.body))
    return out


def test_submitting_a_job_with_a_misspelt_model_returns_1_and_publishes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_broker: list[str]
) -> None:
    job = _job_file(tmp_path, "dataset = 'digits'\n[model]\nname = 'cnnn'\n")

    status = main(["submit", job])

    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("fedq submit: model 'cnnn': unknown model 'cnnn'")
    assert "Nothing was published" in err and "--no-check" in err
    assert no_broker == []


def test_submitting_a_job_whose_data_set_does_not_resolve_here_returns_1_with_the_hint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_broker: list[str]
) -> None:
    job = _job_file(tmp_path, f"dataset = 'npz:{tmp_path / 'on-the-aggregator.npz'}'\n")

    status = main(["submit", job])

    assert status == 1
    err = capsys.readouterr().err
    assert "data set 'npz:" in err and "no such file or directory" in err and "--no-check" in err
    assert no_broker == []


def test_submitting_with_no_check_publishes_a_job_this_machine_cannot_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = _memory_connect(monkeypatch)
    job = _job_file(tmp_path, "dataset = 'npz:/only/on/the/aggregator.npz'\n")

    status = main(["submit", job, "--job-id", "remote-1", "--no-check"])

    assert status == 0
    [published] = _published(memory)
    assert isinstance(published, Job) and published.job_id == "remote-1"
    assert published.spec.model.input_shape == ()  # left for the aggregator's data to fill


def test_submit_refuses_a_broker_url_that_is_not_amqp_without_suggesting_memory(
    capsys: pytest.CaptureFixture[str], no_broker: list[str]
) -> None:
    status = main(["submit", FEDBUFF_JOB, "--broker", "memory", "--no-check"])

    assert status == 1
    err = capsys.readouterr().err
    assert "amqp://" in err and "use 'memory'" not in err
    assert no_broker == []


def test_cancel_publishes_a_cancel_for_the_job_on_the_job_queue(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = _memory_connect(monkeypatch)

    status = main(["cancel", "mnist-fedbuff-1a2b3c4d"])

    assert status == 0
    assert "mnist-fedbuff-1a2b3c4d" in capsys.readouterr().out
    [published] = _published(memory)
    assert isinstance(published, Cancel) and published.job_id == "mnist-fedbuff-1a2b3c4d"


def test_cancel_refuses_an_invalid_job_id_without_touching_a_broker(
    capsys: pytest.CaptureFixture[str], no_broker: list[str]
) -> None:
    assert main(["cancel", "no such job"]) == 1
    assert "invalid job id" in capsys.readouterr().err
    assert no_broker == []


def test_an_idle_aggregator_s_status_shows_no_version_from_its_last_job() -> None:
    metrics = "fedq_aggregator_model_version 41.0\nfedq_aggregator_eval_loss NaN\n"
    idle = {"state": "idle", "job_id": None, "version": None, "loss": None}

    block = render(dict(finite(parse_metrics(metrics) | idle)))

    assert "job            -\n" in block
    assert "version        -\n" in block
    assert "41" not in block


def test_status_shows_failed_jobs_apart_with_their_reason() -> None:
    status = {
        "jobs_done": 3,
        "jobs_ended": {"finished": 1, "failed": 1, "cancelled": 1},
        "failed_jobs": [{"job_id": "typo-1", "reason": "bad_job", "detail": "unknown model"}],
    }

    block = render(status)

    ended = "in its state dir 1 finished, 1 failed, 1 cancelled"
    assert f"jobs ended     3 by this process; {ended}" in block
    assert "failed job     typo-1: bad_job (unknown model)" in block


@pytest.mark.parametrize(
    ("module", "args", "status", "says"),
    [
        ("aggregator.cli", [], 2, "usage: fedq COMMAND"),
        ("aggregator.cli", ["submit", "no-such-job.toml"], 1, "cannot read job file"),
        ("worker.cli", ["--help"], 0, "usage:"),
    ],
)
def test_python_dash_m_of_a_cli_module_runs_its_command_rather_than_doing_nothing(
    tmp_path: Path, module: str, args: list[str], status: int, says: str
) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == status, done.stderr
    assert says in done.stdout + done.stderr
