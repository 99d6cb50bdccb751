"""Tests of the model registry: built-in architectures, seeding, user models and numpy state."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared.errors import ConfigError, RegistryError, TensorError
from shared.jobs import ModelSpec
from shared.models import build_model, list_models, load_numpy_state, state_to_numpy

MNIST = (1, 28, 28)
DIGITS = (1, 8, 8)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "expected"), [("fednet", 65_850), ("cnn", 1_663_370), ("mlp", 199_210)]
)
def test_builtin_models_have_the_reference_parameter_counts_on_mnist(
    name: str, expected: int
) -> None:
    model = build_model(ModelSpec(name, MNIST, 10))

    assert count_parameters(model) == expected


def test_fednet_flattens_2560_features_into_its_linear_layer_on_mnist() -> None:
    model = build_model(ModelSpec("fednet", MNIST, 10))

    assert model.fc.in_features == 2560


def test_list_models_names_the_three_builtins() -> None:
    assert list_models() == ["cnn", "fednet", "mlp"]


@pytest.mark.parametrize(
    ("name", "shape"),
    [("fednet", MNIST), ("cnn", MNIST), ("mlp", MNIST), ("cnn", DIGITS), ("mlp", DIGITS)],
)
def test_a_forward_pass_gives_one_logit_per_class(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(ModelSpec(name, shape, 7))

    logits = model(torch.zeros(5, *shape))

    assert logits.shape == (5, 7)


def test_fednet_refuses_inputs_too_small_for_its_two_7x7_convolutions() -> None:
    with pytest.raises(RegistryError, match="14x14"):
        build_model(ModelSpec("fednet", DIGITS, 10))


def test_an_input_shape_without_three_dimensions_is_refused() -> None:
    with pytest.raises(RegistryError, match="input_shape"):
        build_model(ModelSpec("cnn", (28, 28), 10))


def test_negative_classes_are_refused_when_the_spec_is_made() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        ModelSpec("mlp", MNIST, -1)


@pytest.mark.parametrize(("shape", "classes"), [((), 10), (MNIST, 0), ((), 0)])
def test_a_spec_that_leaves_its_shape_to_the_data_is_refused_when_built(
    shape: tuple[int, ...], classes: int
) -> None:
    with pytest.raises(RegistryError, match="must both be given"):
        build_model(ModelSpec("mlp", shape, classes))


def test_the_same_seed_builds_identical_weights() -> None:
    first = state_to_numpy(build_model(ModelSpec("cnn", MNIST, 10), seed=3))
    second = state_to_numpy(build_model(ModelSpec("cnn", MNIST, 10), seed=3))

    assert all(np.array_equal(first[name], second[name]) for name in first)


def test_different_seeds_build_different_weights() -> None:
    first = state_to_numpy(build_model(ModelSpec("cnn", MNIST, 10), seed=3))
    second = state_to_numpy(build_model(ModelSpec("cnn", MNIST, 10), seed=4))

    assert not np.array_equal(first["conv1.weight"], second["conv1.weight"])


def test_a_seeded_build_leaves_the_global_random_state_untouched() -> None:
    before = torch.get_rng_state()

    build_model(ModelSpec("mlp", MNIST, 10), seed=11)

    assert torch.equal(torch.get_rng_state(), before)


def test_torchvision_resnet_gets_a_stem_for_one_channel_inputs() -> None:
    model = build_model(ModelSpec("torchvision:resnet18", MNIST, 10), seed=0)

    logits = model(torch.zeros(2, *MNIST))

    assert model.conv1.in_channels == 1
    assert logits.shape == (2, 10)


def test_torchvision_models_without_a_resnet_stem_refuse_other_channel_counts() -> None:
    with pytest.raises(RegistryError, match="3 input channels"):
        build_model(ModelSpec("torchvision:mobilenet_v3_small", MNIST, 10))


@pytest.mark.parametrize(
    "name",
    [
        "nope",
        "torchvision:no_such_net",
        "fedq_no_such_module_anywhere:build",
        "shared.models:no_such_function",
        "shared.models:",
        ":build",
    ],
)
def test_names_that_cannot_be_resolved_raise_registry_error(name: str) -> None:
    with pytest.raises(RegistryError):
        build_model(ModelSpec(name, MNIST, 10))


USER_MODULE = "fedq_test_user_models"


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    source = """
        from torch import nn

        def tiny(spec):
            channels, height, width = spec.input_shape
            inputs = channels * height * width
            return nn.Sequential(nn.Flatten(), nn.Linear(inputs, spec.num_classes))

        def not_a_model(spec):
            return "a string"

        def two_arguments(input_shape, num_classes):
            return nn.Identity()
    """
    (tmp_path / f"{USER_MODULE}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


def test_a_user_model_is_built_from_module_and_function(user_module: str) -> None:
    model = build_model(ModelSpec(f"{user_module}:tiny", DIGITS, 3), allowed_modules=[user_module])

    assert count_parameters(model) == 64 * 3 + 3
    assert model(torch.zeros(4, *DIGITS)).shape == (4, 3)


def test_a_user_factory_returning_no_module_raises_registry_error(user_module: str) -> None:
    with pytest.raises(RegistryError, match="str"):
        build_model(
            ModelSpec(f"{user_module}:not_a_model", DIGITS, 3), allowed_modules=[user_module]
        )


def test_a_user_factory_that_raises_is_a_registry_error_saying_how_it_is_called(
    user_module: str,
) -> None:
    # A factory written for another signature raised TypeError through `fedq submit`.
    with pytest.raises(RegistryError, match=r"raised TypeError: .* called as function\(spec\)"):
        build_model(
            ModelSpec(f"{user_module}:two_arguments", DIGITS, 3), allowed_modules=[user_module]
        )


def test_state_survives_a_round_trip_through_numpy() -> None:
    source = build_model(ModelSpec("cnn", DIGITS, 10), seed=1)
    target = build_model(ModelSpec("cnn", DIGITS, 10), seed=2)

    load_numpy_state(target, state_to_numpy(source))

    assert all(
        torch.equal(a, b)
        for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True)
    )


def test_state_to_numpy_returns_copies_in_state_dict_order() -> None:
    model = build_model(ModelSpec("mlp", DIGITS, 10), seed=0)

    state = state_to_numpy(model)
    state["fc1.weight"][...] = 0.0

    assert list(state) == list(model.state_dict())
    assert model.fc1.weight.abs().sum().item() > 0


def test_loading_read_only_arrays_copies_into_the_existing_parameters() -> None:
    model = build_model(ModelSpec("mlp", DIGITS, 10), seed=0)
    parameter = model.fc1.weight
    state = state_to_numpy(build_model(ModelSpec("mlp", DIGITS, 10), seed=5))
    for array in state.values():
        array.setflags(write=False)

    load_numpy_state(model, state)

    assert model.fc1.weight is parameter
    assert np.array_equal(parameter.detach().numpy(), state["fc1.weight"])


def test_loading_keeps_integer_buffers_and_accepts_float64_for_float32() -> None:
    model = nn.BatchNorm1d(3)
    state = {
        "weight": np.full(3, 2.0),
        "bias": np.zeros(3),
        "running_mean": np.ones(3),
        "running_var": np.ones(3),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    }

    load_numpy_state(model, state)

    assert model.weight.dtype == torch.float32
    assert model.weight.tolist() == [2.0, 2.0, 2.0]
    assert int(model.num_batches_tracked) == 7


def test_a_float_array_for_an_integer_buffer_is_refused() -> None:
    model = nn.BatchNorm1d(3)
    state = state_to_numpy(model)
    state["num_batches_tracked"] = np.array(1.5)

    with pytest.raises(TensorError, match="num_batches_tracked"):
        load_numpy_state(model, state)


def test_a_wrong_shape_is_refused_and_leaves_the_model_untouched() -> None:
    model = build_model(ModelSpec("mlp", DIGITS, 10), seed=0)
    before = state_to_numpy(model)
    state = {name: np.zeros_like(array) for name, array in before.items()}
    state["fc3.bias"] = np.zeros(11, dtype=np.float32)

    with pytest.raises(TensorError, match=r"fc3\.bias"):
        load_numpy_state(model, state)

    assert np.array_equal(state_to_numpy(model)["fc1.weight"], before["fc1.weight"])


def test_missing_or_unexpected_names_are_refused() -> None:
    model = build_model(ModelSpec("mlp", DIGITS, 10), seed=0)
    state = state_to_numpy(model)
    state["extra"] = state.pop("fc2.bias")

    with pytest.raises(TensorError, match=r"missing \['fc2.bias'\], unexpected \['extra'\]"):
        load_numpy_state(model, state)
