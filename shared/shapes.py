"""The one rule for a job's model shape, and the check that a model takes its data.

A job gives its model's input_shape and num_classes, or leaves them out (an empty input_shape,
num_classes 0); what it leaves out is taken from its evaluation data set (the test split of
`dataset`). `fedq run`, `fedq submit` and the aggregator (when a job arrives) all apply this
rule, here, so that a job means the same model wherever it is built.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import Dataset

from shared.datasets import dataset_shape, load_dataset
from shared.errors import ConfigError, DatasetError, RegistryError
from shared.jobs import JobSpec, ModelSpec
from shared.models import build_model


def complete_model(model: ModelSpec, dataset: Dataset[Any]) -> ModelSpec:
    """The model with what it leaves out (input_shape, num_classes) taken from dataset."""
    if model.complete:
        return model
    shape, classes = dataset_shape(dataset)
    return replace(
        model,
        input_shape=model.input_shape or tuple(shape),
        num_classes=model.num_classes or classes,
    )


def complete_job(
    spec: JobSpec, dataset: Dataset[Any] | None = None, *, allowed_modules: Collection[str] = ()
) -> JobSpec:
    """The job with a complete model spec; loads its evaluation data only when needed."""
    if spec.model.complete:
        return spec
    data = (
        dataset
        if dataset is not None
        else load_dataset(spec.dataset, "test", allowed_modules=allowed_modules)
    )
    return replace(spec, model=complete_model(spec.model, data))


def check_model_takes_data(
    model: ModelSpec,
    dataset: Dataset[Any],
    seed: int = 0,
    *,
    allowed_modules: Collection[str] = (),
) -> None:
    """Build the model and run it on one example; RegistryError/DatasetError name a mismatch."""
    network = build_model(model, seed=seed, allowed_modules=allowed_modules)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DatasetError("the evaluation data set is empty")
    x = dataset[0][0]
    x = torch.as_tensor(x).float().unsqueeze(0)
    network.eval()
    try:
        with torch.no_grad():
            out = network(x)
    except (RuntimeError, ValueError) as e:
        raise RegistryError(
            f"model {model.name!r} with input_shape {list(model.input_shape)} does not take the "
            f"data set's examples of shape {list(x.shape[1:])}: {e}"
        ) from e
    if tuple(out.shape) != (1, model.num_classes):
        raise RegistryError(
            f"model {model.name!r} gives outputs of shape {list(out.shape[1:])} for one "
            f"example, not [{model.num_classes}] (num_classes)"
        )
    _, classes = dataset_shape(dataset)
    if classes > model.num_classes:
        raise RegistryError(
            f"the data set has {classes} classes, more than the model's {model.num_classes} "
            "(num_classes)"
        )


def check_job(spec: JobSpec, *, allowed_modules: Collection[str] = ()) -> JobSpec:
    """Load the job's evaluation data and build its model on it; the completed job.

    Raises ConfigError naming what failed: the data set reference, or the model.
    """
    try:
        dataset = load_dataset(spec.dataset, "test", allowed_modules=allowed_modules)
    except (RegistryError, DatasetError) as e:
        raise ConfigError(f"data set {spec.dataset!r}: {e}") from e
    try:
        completed = complete_job(spec, dataset)
        check_model_takes_data(completed.model, dataset, spec.seed, allowed_modules=allowed_modules)
    except (RegistryError, DatasetError) as e:
        raise ConfigError(f"model {spec.model.name!r}: {e}") from e
    return completed
