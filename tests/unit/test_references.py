"""`package.module:function` references are imported only from the allowed_modules a service's
operator configured: an entry allows its module and submodules, never a look-alike name, and a
refused reference is refused before anything of it is imported."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.cli import add_aggregator_arguments, aggregator_settings
from aggregator.settings import AggregatorSettings
from shared.datasets import load_dataset
from shared.errors import ConfigError, ReferenceNotAllowedError, RegistryError
from shared.jobs import ModelSpec
from shared.models import build_model
from shared.references import requested_modules
from shared.settings import load_settings
from worker.settings import WorkerSettings

DIGITS = ModelSpec("mlp", (1, 8, 8), 10)
PROBES = ("fedqprobe", "fedqprobe.models", "fedqprobex")


@pytest.fixture
def probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package `fedqprobe` with a submodule `models`, and a look-alike module `fedqprobex`;
    each leaves a file named after itself in the returned folder when it is imported."""
    marks = tmp_path / "imported"
    marks.mkdir()

    def mark(name: str) -> str:
        return f"open({str(marks / name)!r}, 'w').close()\n"

    model = """
        import os
        from os import mkdir
        from torch import nn

        def build(spec):
            return nn.Linear(1, spec.num_classes)
    """
    (tmp_path / "fedqprobe").mkdir()
    (tmp_path / "fedqprobe" / "__init__.py").write_text(mark("fedqprobe"))
    (tmp_path / "fedqprobe" / "models.py").write_text(
        mark("fedqprobe.models") + textwrap.dedent(model)
    )
    (tmp_path / "fedqprobex.py").write_text(mark("fedqprobex") + textwrap.dedent(model))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marks
    for name in PROBES:
        sys.modules.pop(name, None)


def imported(marks: Path) -> list[str]:
    """The probe modules whose code ran, and those Python holds as imported."""
    return sorted({p.name for p in marks.iterdir()} | {n for n in PROBES if n in sys.modules})


def test_a_module_on_the_list_gives_its_model(probes: Path) -> None:
    model = build_model(
        ModelSpec("fedqprobe.models:build", (1,), 3), allowed_modules=["fedqprobe.models"]
    )

    assert model.out_features == 3


def test_a_package_on_the_list_allows_its_submodules(probes: Path) -> None:
    model = build_model(ModelSpec("fedqprobe.models:build", (1,), 3), allowed_modules=["fedqprobe"])

    assert model.out_features == 3


def test_a_module_off_the_list_is_refused_and_never_imported(probes: Path) -> None:
    with pytest.raises(ReferenceNotAllowedError, match="not in allowed_modules"):
        build_model(ModelSpec("fedqprobe.models:build", (1,), 3), allowed_modules=["mysite"])

    assert imported(probes) == []


def test_a_look_alike_name_does_not_match_an_entry_as_a_prefix(probes: Path) -> None:
    with pytest.raises(ReferenceNotAllowedError):
        build_model(ModelSpec("fedqprobex:build", (1,), 3), allowed_modules=["fedqprobe"])
    with pytest.raises(ReferenceNotAllowedError):
        load_dataset("fedqprobex:build", "test", allowed_modules=["fedqprobe"])

    assert imported(probes) == []


def test_an_entry_does_not_allow_the_package_above_it(probes: Path) -> None:
    with pytest.raises(ReferenceNotAllowedError):
        load_dataset("fedqprobe:anything", "test", allowed_modules=["fedqprobe.models"])

    assert imported(probes) == []


def test_a_function_the_allowed_module_took_from_elsewhere_is_refused_and_not_called(
    probes: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    allowed = ["fedqprobe.models"]

    for reference in ("fedqprobe.models:mkdir", "fedqprobe.models:os.mkdir"):
        with pytest.raises(ReferenceNotAllowedError, match=r"defined in module '(posix|nt)'"):
            load_dataset(reference, "test", allowed_modules=allowed)

    assert not (tmp_path / "test").exists()  # os.mkdir("test") would have made it


def test_os_mkdir_as_a_data_set_is_refused_with_an_empty_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []
    monkeypatch.setattr("os.mkdir", lambda *args, **kwargs: calls.append(args))

    with pytest.raises(ReferenceNotAllowedError, match="'os'"):
        load_dataset("os:mkdir", "test")
    with pytest.raises(ReferenceNotAllowedError, match="'os'"):
        build_model(ModelSpec("os:mkdir", (1, 8, 8), 10))

    assert calls == []


@pytest.mark.parametrize(
    "reference",
    [".fedqprobe:build", "fedqprobe..models:build", "fedqprobe/models:build", "fedqprobe:"],
)
def test_relative_or_malformed_references_are_refused_unimported(
    probes: Path, reference: str
) -> None:
    with pytest.raises(RegistryError):
        load_dataset(reference, "test", allowed_modules=["fedqprobe"])

    assert imported(probes) == []


def test_built_in_models_and_data_sets_need_no_allowed_module() -> None:
    model = build_model(DIGITS, seed=0)
    data = load_dataset("digits", "test")

    assert model.fc3.out_features == 10 and len(data) == 360  # type: ignore[arg-type]


def test_requested_modules_are_those_of_references_not_built_ins_or_registry_kinds() -> None:
    names = ["mlp", "digits", "torchvision:resnet18", "npz:/data/a.npz", "imagefolder:/data/b"]
    names += ["torchvision:MNIST:/data", "mysite.models:build", "mysite.models:other", "x:y"]

    assert requested_modules(*names) == ("mysite.models", "x")


def test_allowed_modules_come_from_a_toml_list_a_variable_or_repeated_flags(
    tmp_path: Path,
) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text('allowed_modules = ["mysite.models", "other"]\n')
    parser = argparse.ArgumentParser()
    add_aggregator_arguments(parser)

    from_file = load_settings(AggregatorSettings, str(config))
    from_env = load_settings(WorkerSettings, environ={"FEDQ_ALLOWED_MODULES": "a.b, c"})
    from_flags = aggregator_settings(
        parser.parse_args(["--config", str(config), "--allow-module", "x", "--allow-module", "y"])
    )

    assert from_file.allowed_modules == ("mysite.models", "other")
    assert from_env.allowed_modules == ("a.b", "c")
    assert from_flags.allowed_modules == ("x", "y")


@pytest.mark.parametrize("entry", ["", "os.*", "*", ".rel", "a/b", "a..b"])
def test_an_allowed_modules_entry_that_is_not_a_module_name_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="allowed_modules"):
        AggregatorSettings(allowed_modules=(entry,))
    with pytest.raises(ConfigError, match="allowed_modules"):
        load_settings(WorkerSettings, overrides={"allowed_modules": [entry]})
