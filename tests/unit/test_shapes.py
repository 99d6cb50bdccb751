"""The one rule for a job's model shape, and the check that a model takes its data."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import TensorDataset

from shared.errors import ConfigError, RegistryError
from shared.jobs import JobSpec, ModelSpec
from shared.shapes import check_job, check_model_takes_data, complete_job, complete_model

DIGITS = TensorDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 6]))


def test_a_model_that_leaves_its_shape_out_takes_the_data_s() -> None:
    assert complete_model(ModelSpec("mlp"), DIGITS) == ModelSpec("mlp", (1, 8, 8), 7)


def test_what_a_model_gives_is_kept_and_only_the_rest_comes_from_the_data() -> None:
    assert complete_model(ModelSpec("mlp", (1, 28, 28)), DIGITS) == ModelSpec("mlp", (1, 28, 28), 7)
    assert complete_model(ModelSpec("mlp", (), 10), DIGITS) == ModelSpec("mlp", (1, 8, 8), 10)
    assert complete_model(ModelSpec("mlp", (2, 2), 3), DIGITS) == ModelSpec("mlp", (2, 2), 3)


def test_a_job_is_completed_from_its_named_evaluation_data_set() -> None:
    spec = complete_job(JobSpec(model=ModelSpec("cnn"), dataset="digits"))

    assert spec.model == ModelSpec("cnn", (1, 8, 8), 10)


def test_a_model_given_another_input_shape_than_the_data_s_is_refused_naming_both() -> None:
    with pytest.raises(RegistryError, match=re.escape("[1, 28, 28]")) as caught:
        check_model_takes_data(ModelSpec("mlp", (1, 28, 28), 10), DIGITS)

    assert "[1, 8, 8]" in str(caught.value)


def test_a_model_with_fewer_classes_than_the_data_is_refused() -> None:
    with pytest.raises(RegistryError, match="7 classes, more than the model's 3"):
        check_model_takes_data(ModelSpec("mlp", (1, 8, 8), 3), DIGITS)


def test_checking_a_job_names_a_misspelt_model_or_data_set() -> None:
    with pytest.raises(ConfigError, match=r"model 'cnnn'.*unknown model 'cnnn'"):
        check_job(JobSpec(model=ModelSpec("cnnn"), dataset="digits"))
    with pytest.raises(ConfigError, match=r"data set 'digitz'.*unknown data set"):
        check_job(JobSpec(dataset="digitz"))


def test_checking_a_good_job_gives_it_back_completed() -> None:
    assert check_job(JobSpec(model=ModelSpec("mlp"), dataset="digits")).model == ModelSpec(
        "mlp", (1, 8, 8), 10
    )
