"""`package.module:function` references in jobs: imported only from an operator's allow-list.

A job names its model and data set; a name that is not a built-in of fedq's registries (a model
in shared.models, a data set or a data kind such as `npz:` in shared.datasets) is a reference to
code, `package.module:function`, that the service imports and calls. A job is a message, so what
it may import is the receiving service's `allowed_modules` setting, never the message itself:

- an entry allows its module and every submodule of it ("mysite.models" allows "mysite.models"
  and "mysite.models.cnn", never "mysite.modelsx" nor "mysite"); no wildcards;
- the function the reference reaches must be defined in an allowed module too, so that
  "mysite.models:os.mkdir" (a name the allowed module imported) is refused;
- a refused reference raises ReferenceNotAllowedError before anything is imported.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Collection, Iterable
from typing import Any

from shared.errors import ConfigError, ReferenceNotAllowedError, RegistryError

# The kinds of name the registries resolve themselves ("torchvision:resnet18",
# "npz:/data/a.npz", ...): never a module to import from a job's say-so.
REGISTRY_KINDS = ("torchvision", "npz", "imagefolder")


def is_module_name(name: str) -> bool:
    """Whether a name is an absolute dotted module name ("a.b_c"), not relative nor a path."""
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def module_allowed(module_name: str, allowed_modules: Iterable[str]) -> bool:
    """Whether an allow-list entry is the module or a package it is inside."""
    return any(
        module_name == entry or module_name.startswith(entry + ".") for entry in allowed_modules
    )


def check_allowed_modules(allowed_modules: Iterable[str]) -> None:
    """Raise ConfigError for an allow-list entry that is not a dotted module name."""
    bad = [entry for entry in allowed_modules if not is_module_name(entry)]
    if bad:
        raise ConfigError(
            f"allowed_modules takes dotted module names such as 'mysite.models', not {bad}"
        )


def add_allow_module_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """A service's repeatable --allow-module MODULE (its allowed_modules setting); `what` names
    the references it allows ("jobs' module:function models and data sets")."""
    parser.add_argument(
        "--allow-module",
        dest="allowed_modules",
        action="append",
        metavar="MODULE",
        help=f"a module (and its submodules) {what} may be imported from; repeatable; replaces "
        "the setting allowed_modules",
    )


def requested_modules(*names: str) -> tuple[str, ...]:
    """The modules that model and data set names refer to (built-ins and registry kinds left
    out): what someone who names them on their own command line or job file asks to import."""
    out: list[str] = []
    for name in names:
        module, _, attribute = name.partition(":")
        wanted = attribute and module not in REGISTRY_KINDS and is_module_name(module)
        if wanted and module not in out:
            out.append(module)
    return tuple(out)


def import_callable(reference: str, allowed_modules: Collection[str]) -> Callable[..., Any]:
    """Import "package.module:function" from an allowed module and return the function.

    Raises ReferenceNotAllowedError (nothing imported) for a module outside allowed_modules or a
    function defined outside them, RegistryError when it cannot be resolved.
    """
    module_name, _, attribute = reference.partition(":")
    if not is_module_name(module_name) or not is_module_name(attribute):
        raise RegistryError(f"{reference!r} is not of the form 'package.module:function'")
    if not module_allowed(module_name, allowed_modules):
        raise ReferenceNotAllowedError(
            f"{reference!r}: module {module_name!r} is not in allowed_modules "
            f"{sorted(allowed_modules)}; an operator allows it with the allowed_modules setting "
            "(--allow-module)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {module_name!r} for {reference!r}: {e}") from e
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise RegistryError(f"module {module_name!r} has no attribute {attribute!r}") from e
    if not callable(target):
        raise RegistryError(f"{reference!r} is not callable")
    owner = getattr(target, "__module__", None)
    if not isinstance(owner, str) or not module_allowed(owner, allowed_modules):
        raise ReferenceNotAllowedError(
            f"{reference!r} is defined in module {owner!r}, which is not in allowed_modules "
            f"{sorted(allowed_modules)}"
        )
    return target  # type: ignore[no-any-return]


def call_reference(
    reference: str, allowed_modules: Collection[str], argument: Any, called_as: str
) -> Any:
    """Import an allowed "package.module:function" and call it with one argument; what the
    user's function raises comes out as a RegistryError that names it and says how it is called
    (`called_as`), not as a traceback from deep inside a service."""
    function = import_callable(reference, allowed_modules)
    try:
        return function(argument)
    except Exception as e:  # the user's code: any error is theirs to read, with its cause
        raise RegistryError(
            f"{reference!r} raised {type(e).__name__}: {e} (it is called as {called_as})"
        ) from e
