"""The worker's check that its local data fits a task's model, before any training."""

from __future__ import annotations

import torch
from torch import nn

from shared.jobs import ModelSpec
from shared.models import build_model
from worker.data import LocalData
from worker.training import check_fit

SPEC = ModelSpec("mlp", (1, 8, 8), 10)


def data(shape: tuple[int, ...] = (1, 8, 8), top_label: int = 9, n: int = 20) -> LocalData:
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, top_label + 1, (n,), generator=generator)
    y[0] = top_label
    return LocalData(torch.randn(n, *shape, generator=generator), y)


def test_data_that_fits_the_model_passes_the_check() -> None:
    assert check_fit(build_model(SPEC), data(), SPEC) is None


def test_images_of_another_size_are_named_with_both_shapes() -> None:
    problem = check_fit(build_model(SPEC), data(shape=(3, 32, 32)), SPEC)

    assert problem == "local images are 3x32x32 but the model takes 1x8x8"


def test_labels_beyond_the_model_classes_are_named_with_the_largest() -> None:
    problem = check_fit(build_model(SPEC), data(top_label=11), SPEC)

    assert problem == "labels go up to 11 but the model has 10 classes"


def test_both_mismatches_are_named_together() -> None:
    problem = check_fit(build_model(SPEC), data(shape=(3, 8, 8), top_label=11), SPEC)

    assert problem is not None
    assert "labels go up to 11" in problem and "local images are 3x8x8" in problem


def test_a_model_whose_output_is_not_batch_by_classes_is_named() -> None:
    five_classes = build_model(ModelSpec("mlp", (1, 8, 8), 5))

    problem = check_fit(five_classes, data(), SPEC)

    assert problem == "the model's output is 8x5 for a batch of 8 but must be 8x10"


def test_a_model_that_raises_on_local_data_is_named_with_its_error() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(more lines)")

    problem = check_fit(Broken(), data(), SPEC)

    assert problem == (
        "the model fails on a batch of local data: "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    )


def test_the_check_leaves_batch_norm_statistics_and_the_training_mode_alone() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    check_fit(model, data(), SPEC)

    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
