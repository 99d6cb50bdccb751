"""The layers stay layered: shared <- broker <- aggregator | worker <- launcher, and pika is
imported only under broker/ (docs/architecture.md). Read from the source, so an import inside a
function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "broker", "aggregator", "worker")
# What each package may import of the project's packages.
ALLOWED = {
    "shared": set(),
    "broker": {"shared"},
    "aggregator": {"shared", "broker"},
    "worker": {"shared", "broker"},
}
# The launcher (`fedq` and `fedq run`) still lives in aggregator/ until it gets a package of its
# own (issue 11, part 4); these are the only modules that may import both services.
LAUNCHER = {"aggregator/cli.py", "aggregator/federation.py"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module this file imports (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _sources() -> list[tuple[str, Path]]:
    return [(package, path) for package in PACKAGES for path in (ROOT / package).rglob("*.py")]


def test_each_package_imports_only_the_layers_below_it() -> None:
    crossings = []
    for package, path in _sources():
        name = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED[package] | ({"worker"} if name in LAUNCHER else set())
        for imported in _imports(path) & set(PACKAGES) - {package}:
            if imported not in allowed:
                crossings.append(f"{name} imports {imported}")

    assert crossings == []


def test_pika_is_imported_only_under_broker() -> None:
    outside = [
        path.relative_to(ROOT).as_posix()
        for package, path in _sources()
        if package != "broker" and "pika" in _imports(path)
    ]

    assert outside == []


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import pika\n    from worker.cli import main\n")

    assert _imports(source) == {"pika", "worker"}
