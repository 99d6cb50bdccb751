"""Tests of settings (defaults < TOML < FEDQ_* < flags) and of job files and job spec rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from aggregator.settings import AggregatorSettings
from shared.errors import ConfigError, FieldError
from shared.jobs import (
    JobSpec,
    ModelSpec,
    StopConfig,
    StrategyConfig,
    TrainingConfig,
    from_dict,
    load_job_file,
)
from shared.settings import load_settings, masked
from shared.shapes import complete_job
from worker.settings import WorkerSettings

JOBS = Path(__file__).resolve().parents[2] / "deploy" / "jobs"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- settings precedence


def test_settings_without_file_environment_or_flags_are_the_defaults() -> None:
    settings = load_settings(AggregatorSettings, None, {}, {})

    assert settings == AggregatorSettings()


def test_a_settings_file_overrides_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "agg.toml", 'state_dir = "/srv/fedq"\nmetrics_port = 9100\n')

    settings = load_settings(AggregatorSettings, path, {}, {})

    assert settings.state_dir == "/srv/fedq"
    assert settings.metrics_port == 9100
    assert settings.prefix == AggregatorSettings().prefix


def test_an_environment_variable_overrides_the_settings_file(tmp_path: Path) -> None:
    path = write(tmp_path / "agg.toml", 'state_dir = "/srv/fedq"\nmetrics_port = 9100\n')

    settings = load_settings(AggregatorSettings, path, {"FEDQ_METRICS_PORT": "9200"}, {})

    assert settings.metrics_port == 9200
    assert settings.state_dir == "/srv/fedq"


def test_an_override_beats_the_environment_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "agg.toml", "metrics_port = 9100\n")

    settings = load_settings(
        AggregatorSettings, path, {"FEDQ_METRICS_PORT": "9200"}, {"metrics_port": 9300}
    )

    assert settings.metrics_port == 9300


def test_none_overrides_leave_the_lower_layers_in_place(tmp_path: Path) -> None:
    path = write(tmp_path / "agg.toml", 'state_dir = "/srv/fedq"\n')

    settings = load_settings(
        AggregatorSettings,
        path,
        {"FEDQ_METRICS_PORT": "9200"},
        {"metrics_port": None, "state_dir": None, "broker": None},
    )

    assert settings.metrics_port == 9200
    assert settings.state_dir == "/srv/fedq"
    assert settings.broker == AggregatorSettings().broker


def test_environment_variables_are_parsed_by_the_type_of_their_setting() -> None:
    environ = {
        "FEDQ_WORKER_ID": "site-a",
        "FEDQ_SLOWDOWN": "2.5",
        "FEDQ_NUM_PARTITIONS": "4",
        "FEDQ_PARTITION": "dirichlet:0.5",
    }

    settings = load_settings(WorkerSettings, None, environ, {})

    assert settings.worker_id == "site-a"
    assert settings.slowdown == 2.5
    assert settings.num_partitions == 4
    assert settings.partition == "dirichlet:0.5"


def test_variables_without_the_fedq_prefix_or_of_other_services_are_ignored() -> None:
    environ = {"METRICS_PORT": "1", "FEDQ_DATA": "/data/x.npz", "fedq_metrics_port": "2"}

    settings = load_settings(AggregatorSettings, None, environ, {})

    assert settings == AggregatorSettings()


def test_a_bad_environment_value_is_an_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="FEDQ_MAX_JOBS"):
        load_settings(AggregatorSettings, None, {"FEDQ_MAX_JOBS": "many"}, {})


def test_a_float_environment_value_for_an_integer_setting_is_an_error() -> None:
    with pytest.raises(ConfigError, match="FEDQ_CHUNK_SIZE"):
        load_settings(WorkerSettings, None, {"FEDQ_CHUNK_SIZE": "1.5"}, {})


def test_an_unknown_key_in_the_settings_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path / "agg.toml", 'state_dir = "/srv"\nstate_dri = "/typo"\n')

    with pytest.raises(ConfigError, match="state_dri"):
        load_settings(AggregatorSettings, path, {}, {})


def test_a_worker_key_in_an_aggregator_settings_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "shared.toml", 'worker_id = "site-a"\n')

    with pytest.raises(ConfigError, match="worker_id"):
        load_settings(AggregatorSettings, path, {}, {})


def test_a_value_of_the_wrong_type_in_the_settings_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "agg.toml", 'metrics_port = "9100"\n')

    with pytest.raises(ConfigError, match="metrics_port"):
        load_settings(AggregatorSettings, path, {}, {})


def test_a_settings_file_that_is_not_toml_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "agg.toml", "state_dir = [unclosed\n")

    with pytest.raises(ConfigError, match=re.escape("agg.toml")):
        load_settings(AggregatorSettings, path, {}, {})


def test_a_missing_settings_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("absent.toml")):
        load_settings(AggregatorSettings, str(tmp_path / "absent.toml"), {}, {})


def test_masked_settings_hide_the_password_of_the_broker_url() -> None:
    settings = WorkerSettings(worker_id="a", broker="amqp://fedq:s3cret@rabbit:5672/vhost")

    shown = masked(settings)

    assert shown["broker"] == "amqp://fedq:***@rabbit:5672/vhost"
    assert "s3cret" not in str(shown)
    assert shown["worker_id"] == "a"


def test_masked_settings_keep_a_url_without_password_as_it_is() -> None:
    shown = masked(AggregatorSettings(broker="amqp://rabbit:5672/"))

    assert shown["broker"] == "amqp://rabbit:5672/"


# ---------------------------------------------------------------- job files


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff", "fedasync"])
def test_each_example_job_file_loads_as_a_cnn_on_mnist5k_shaped_by_the_data(strategy: str) -> None:
    spec = load_job_file(str(JOBS / f"mnist-{strategy}.toml"))

    assert spec.name == f"mnist-{strategy}"
    assert spec.strategy.name == strategy
    assert (spec.model.name, spec.model.input_shape, spec.model.num_classes) == ("cnn", (), 0)
    assert complete_job(spec).model == ModelSpec("cnn", (1, 28, 28), 10)
    assert spec.dataset == "mnist5k"
    assert spec.stop == StopConfig(max_versions=200, target_accuracy=0.95, max_time_s=600.0)


def test_the_fedbuff_example_buffers_four_updates() -> None:
    spec = load_job_file(str(JOBS / "mnist-fedbuff.toml"))

    assert spec.strategy.buffer_size == 4


def test_the_fedasync_example_mixes_with_alpha_06_and_polynomial_staleness() -> None:
    spec = load_job_file(str(JOBS / "mnist-fedasync.toml"))

    assert spec.strategy.alpha == 0.6
    assert (spec.strategy.staleness, spec.strategy.staleness_a) == ("polynomial", 0.5)


def test_an_empty_job_file_is_the_default_job(tmp_path: Path) -> None:
    spec = load_job_file(write(tmp_path / "job.toml", ""))

    assert spec == JobSpec()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[training]\nepochz = 2\n", "training.epochz"),
        ("colour = 'blue'\n", "colour"),
        ("[strategy]\nname = 'fedbuff'\nbuffer = 4\n", "strategy.buffer"),
    ],
)
def test_an_unknown_key_in_a_job_file_is_an_error_naming_it(
    tmp_path: Path, text: str, key: str
) -> None:
    path = write(tmp_path / "job.toml", text)

    with pytest.raises(ConfigError, match=re.escape(key)) as caught:
        load_job_file(path)

    assert path in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[training]\nepochs = 'two'\n", "training.epochs"),
        ("[training]\nlr = true\n", "training.lr"),
        ("[model]\ninput_shape = [1, 28.0, 28]\n", "model.input_shape"),
        ("seed = 1.5\n", "seed"),
        ("strategy = 'fedavg'\n", "strategy"),
    ],
)
def test_a_value_of_the_wrong_type_in_a_job_file_is_an_error_naming_its_key(
    tmp_path: Path, text: str, key: str
) -> None:
    path = write(tmp_path / "job.toml", text)

    with pytest.raises(ConfigError, match=re.escape(key)):
        load_job_file(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[strategy]\nname = 'nope'\n", "strategy.name"),
        ("[stop]\nmax_versions = 0\n", "stop.max_versions"),
        ("[stop]\ntarget_accuracy = 95.0\n", "stop.target_accuracy"),
        ("[training]\noptimizer = 'rmsprop'\n", "training.optimizer"),
    ],
)
def test_an_invalid_value_in_a_job_file_is_an_error_naming_its_key(
    tmp_path: Path, text: str, key: str
) -> None:
    path = write(tmp_path / "job.toml", text)

    with pytest.raises(ConfigError, match=re.escape(key)):
        load_job_file(path)


def test_a_job_map_that_stops_on_neither_versions_nor_time_is_refused() -> None:
    # TOML has no null, so this can only come as a map (from the wire); a file cannot say it.
    data: dict[str, Any] = {"stop": {"max_versions": None, "target_accuracy": 0.9}}

    with pytest.raises(FieldError, match="max_versions or max_time_s"):
        from_dict(JobSpec, data)


def test_a_job_file_that_is_not_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", "[strategy\nname = 'fedavg'\n")

    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_job_file(path)

    assert path in str(caught.value)


def test_a_missing_job_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job_file(str(tmp_path / "absent.toml"))


# ---------------------------------------------------------------- job spec rules


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "training.epochs"),
        ({"batch_size": 0}, "training.batch_size"),
        ({"optimizer": "rmsprop"}, "training.optimizer"),
        ({"lr": 0.0}, "training.lr"),
        ({"mu": -0.1}, "training.mu"),
        ({"send": "gradients"}, "training.send"),
        ({"max_batches": -1}, "training.max_batches"),
    ],
)
def test_training_config_refuses_out_of_range_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainingConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "fedprox"}, "strategy.name"),
        ({"fraction": 0.0}, "strategy.fraction"),
        ({"fraction": 1.5}, "strategy.fraction"),
        ({"min_updates": -1}, "strategy.min_updates"),
        ({"round_deadline_s": 0.0}, "strategy.round_deadline_s"),
        ({"min_updates_on_deadline": 0}, "strategy.min_updates_on_deadline"),
        ({"buffer_size": 0}, "strategy.buffer_size"),
        ({"server_lr": 0.0}, "strategy.server_lr"),
        ({"alpha": 0.0}, "strategy.alpha"),
        ({"alpha": 1.01}, "strategy.alpha"),
        ({"staleness": "linear"}, "strategy.staleness must"),
        ({"staleness_a": -0.5}, "strategy.staleness_a"),
        ({"staleness_b": -1.0}, "strategy.staleness_b"),
        ({"max_staleness": -1}, "strategy.max_staleness"),
    ],
)
def test_strategy_config_refuses_out_of_range_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        StrategyConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_versions": None, "max_time_s": None}, "max_versions or max_time_s"),
        ({"max_versions": 0}, "stop.max_versions"),
        ({"target_accuracy": 0.0}, "stop.target_accuracy"),
        ({"target_accuracy": 1.5}, "stop.target_accuracy"),
        ({"max_time_s": 0.0}, "stop.max_time_s"),
    ],
)
def test_stop_config_refuses_out_of_range_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        StopConfig(**changes)


def test_the_limits_of_each_range_are_accepted() -> None:
    training = TrainingConfig(mu=0.0, max_batches=0, send="delta", optimizer="adam")
    strategy = StrategyConfig(
        fraction=1.0,
        alpha=1.0,
        min_updates=0,
        staleness="hinge",
        staleness_a=0.0,
        staleness_b=0.0,
        max_staleness=0,
    )
    stop = StopConfig(max_versions=None, target_accuracy=1.0, max_time_s=0.5)

    assert (training.max_batches, strategy.max_staleness, stop.max_versions) == (0, 0, None)


def test_a_job_that_stops_on_time_alone_is_accepted() -> None:
    stop = StopConfig(max_versions=None, max_time_s=60.0)

    assert (stop.max_versions, stop.max_time_s) == (None, 60.0)


def test_a_checkpoint_count_not_below_the_prefetch_is_refused_at_start_up() -> None:
    # The broker would stop delivering at `prefetch` unacked updates, before the count is reached.
    with pytest.raises(ConfigError, match="less than prefetch"):
        load_settings(AggregatorSettings, None, {"FEDQ_PREFETCH": "16"}, {})

    settings = load_settings(
        AggregatorSettings, None, {"FEDQ_PREFETCH": "16", "FEDQ_CHECKPOINT_EVERY_UPDATES": "8"}, {}
    )
    assert (settings.prefetch, settings.checkpoint_every_updates) == (16, 8)


@pytest.mark.parametrize(
    "values",
    [
        {"max_chunk_sets": 0},
        {"max_chunk_pending_bytes": 1024, "max_message_bytes": 2048},
        {"chunk_max_age_s": 0.0},
    ],
)
def test_chunk_limits_that_could_never_hold_a_message_are_refused_at_start_up(
    values: dict[str, Any],
) -> None:
    with pytest.raises(ConfigError):
        AggregatorSettings(**values)
