"""Model registry: build a torch module from a ModelSpec, and move its state to and from numpy."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np
import torch
from torch import nn

from shared.errors import RegistryError, TensorError
from shared.jobs import ModelSpec
from shared.references import call_reference

TORCHVISION_PREFIX = "torchvision:"


class FedNet(nn.Module):
    """The seed model: two 7x7 convolutions, one max-pool and one linear layer."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 20, kernel_size=7)
        self.conv2 = nn.Conv2d(20, 40, kernel_size=7)
        self.pool = nn.MaxPool2d(2)
        # Each unpadded 7x7 convolution trims 6 pixels per side pair, then the pool halves.
        self.fc = nn.Linear(40 * ((height - 12) // 2) * ((width - 12) // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch (N, C, H, W)."""
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))  # type: ignore[no-any-return]


class MnistCNN(nn.Module):
    """The CNN of the FedAvg paper (McMahan et al. 2017): 1,663,370 parameters on 1x28x28."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        # Padded 5x5 convolutions keep the size; only the two pools shrink it.
        self.fc1 = nn.Linear(64 * (height // 2 // 2) * (width // 2 // 2), 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch (N, C, H, W)."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)  # type: ignore[no-any-return]


class MLP(nn.Module):
    """The 2NN of the FedAvg paper: two hidden layers of 200; 199,210 parameters on 784 inputs."""

    def __init__(self, num_inputs: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_inputs, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of any shape (N, ...)."""
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)  # type: ignore[no-any-return]


def _build_fednet(spec: ModelSpec) -> nn.Module:
    channels, height, width = _image_shape(spec)
    if height < 14 or width < 14:
        raise RegistryError(f"model 'fednet' needs inputs of at least 14x14, got {height}x{width}")
    return FedNet(channels, height, width, spec.num_classes)


def _build_cnn(spec: ModelSpec) -> nn.Module:
    channels, height, width = _image_shape(spec)
    if height < 4 or width < 4:
        raise RegistryError(f"model 'cnn' needs inputs of at least 4x4, got {height}x{width}")
    return MnistCNN(channels, height, width, spec.num_classes)


def _build_mlp(spec: ModelSpec) -> nn.Module:
    _image_shape(spec)
    return MLP(int(np.prod(spec.input_shape)), spec.num_classes)


BUILTIN_MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "cnn": _build_cnn,
    "fednet": _build_fednet,
    "mlp": _build_mlp,
}


def list_models() -> list[str]:
    """Return the names of the built-in models, sorted."""
    return sorted(BUILTIN_MODELS)


def build_model(
    spec: ModelSpec, seed: int | None = None, *, allowed_modules: Collection[str] = ()
) -> nn.Module:
    """Build the model a spec names; with a seed, its initial weights are the same on every machine.

    Names: a built-in (list_models()), "torchvision:<name>" (never with pretrained weights), or
    "package.module:function" where function(spec) returns an nn.Module, imported only from
    allowed_modules (shared.references). Raises RegistryError when the name cannot be resolved or
    the model cannot take the spec's input shape, ReferenceNotAllowedError when not allowed.
    """
    if not spec.complete:
        raise RegistryError(
            f"model {spec.name!r}: input_shape {list(spec.input_shape)} and num_classes "
            f"{spec.num_classes} must both be given (a job leaves them to its data set; "
            "shared.shapes.complete_job fills them in)"
        )
    if seed is None:
        return _build_unseeded(spec, allowed_modules)
    # devices=[] forks only the CPU generator: models are built on the CPU, and forking CUDA
    # generators would initialise CUDA for nothing.
    with torch.random.fork_rng(devices=[]):
        # torch.manual_seed would also reseed every CUDA generator, outside the fork.
        torch.default_generator.manual_seed(seed)
        return _build_unseeded(spec, allowed_modules)


def _build_unseeded(spec: ModelSpec, allowed_modules: Collection[str]) -> nn.Module:
    name = spec.name
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name](spec)
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name.removeprefix(TORCHVISION_PREFIX), spec)
    if ":" in name:
        called_as = "function(spec), spec a ModelSpec with name, input_shape, num_classes"
        model = call_reference(name, allowed_modules, spec, called_as)
        if not isinstance(model, nn.Module):
            raise RegistryError(
                f"model factory {name!r} returned {type(model).__name__}, not a Module"
            )
        return model
    raise RegistryError(
        f"unknown model {name!r}: use one of {list_models()}, 'torchvision:<name>' "
        "or 'package.module:function'"
    )


def _build_torchvision(name: str, spec: ModelSpec) -> nn.Module:
    import torchvision

    channels, _, _ = _image_shape(spec)
    try:
        model: nn.Module = torchvision.models.get_model(
            name, weights=None, num_classes=spec.num_classes
        )
    except ValueError as e:
        raise RegistryError(f"torchvision has no model {name!r}: {e}") from e
    if channels != 3:
        _adapt_first_conv(model, name, channels)
    return model


def _adapt_first_conv(model: nn.Module, name: str, channels: int) -> None:
    """Replace a ResNet-style stem convolution by one taking `channels` input channels."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3 or conv.groups != 1:
        raise RegistryError(
            f"torchvision model {name!r} takes 3 input channels and fedq can only adapt a "
            f"ResNet-style 'conv1'; give it 3-channel inputs or use a 'module:function' model"
        )
    stem = nn.Conv2d(
        channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    # Same initialisation torchvision's ResNet gives its own convolutions.
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = stem


def _image_shape(spec: ModelSpec) -> tuple[int, int, int]:
    shape = tuple(spec.input_shape)
    if len(shape) != 3 or any(size < 1 for size in shape):
        raise RegistryError(
            f"model {spec.name!r}: input_shape must be (channels, height, width), got {shape}"
        )
    return shape[0], shape[1], shape[2]


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Return the model's parameters and buffers as CPU numpy copies, in state_dict order."""
    return {
        name: tensor.detach().to("cpu", copy=True).numpy()
        for name, tensor in model.state_dict().items()
    }


def buffer_names(model: nn.Module) -> frozenset[str]:
    """The state_dict entries that are not parameters: buffers such as BatchNorm's running_mean,
    running_var and num_batches_tracked. A delta update carries their values, not differences
    (docs/protocol.md, section 5.1), and the aggregator sets them rather than moving them.
    """
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return frozenset(name for name in model.state_dict() if name not in parameters)


def load_numpy_state(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy arrays into the model's parameters and buffers in place; all-or-nothing.

    Names must match the state_dict exactly, shapes too, and dtypes may only change within a kind
    (float64 into float32, not float into an integer buffer). Raises TensorError, and then the model
    is untouched. Read-only arrays, such as those decoded from the wire, are fine.
    """
    targets = model.state_dict(keep_vars=True)
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise TensorError(f"state names differ: missing {missing}, unexpected {unexpected}")
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    for name, target in targets.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(target.shape):
            raise TensorError(f"{name}: shape {array.shape} != model's {tuple(target.shape)}")
        target_dtype = torch.empty((), dtype=target.dtype).numpy().dtype
        if not np.can_cast(array.dtype, target_dtype, casting="same_kind"):
            raise TensorError(f"{name}: dtype {array.dtype} cannot go into {target.dtype}")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(_as_tensor(arrays[name]))


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    # torch.from_numpy warns on read-only arrays (writes through it would be undefined) and
    # rejects non-native byte order; those take one extra copy instead.
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable:
        return torch.tensor(array)
    return torch.from_numpy(array)
