"""The tree's layering: each package imports only the ones below it.

protocol (what every role agrees on) < node (the peer: train, swarm, peer, verify, bench) < coordinator
< cli (the command line and the local-swarm launcher). A module that reaches up, even lazily inside a
function, makes the layers import each other.
"""

import ast
from pathlib import Path

import pytest

from tests.command import ROOT

LAYERS = ["protocol", "node", "coordinator", "cli"]


def imported_packages(path: Path) -> set[str]:
    """Top-level packages of this project that ``path`` imports anywhere in it."""
    found = set()
    for statement in ast.walk(ast.parse(path.read_text())):
        if isinstance(statement, ast.Import):
            found |= {alias.name.split(".")[0] for alias in statement.names}
        elif isinstance(statement, ast.ImportFrom) and statement.module and statement.level == 0:
            found.add(statement.module.split(".")[0])
    return found & set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_a_package_imports_nothing_above_it(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    offending = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & above)
                 for path in sorted((ROOT / layer).rglob("*.py")) if imported_packages(path) & above}
    assert offending == {}, f"{layer} imports packages above it: {offending}"


def test_only_the_hivemind_package_subclasses_hivemind_internals():
    """Private hivemind machinery (averaging, partitions, auth, compression registry) is reached from
    node/swarm/hivemind/ only, where internals.py checks it against the pinned release."""
    private = ("hivemind.averaging.allreduce", "hivemind.averaging.averager", "hivemind.averaging.matchmaking",
               "hivemind.averaging.partition", "hivemind.compression.serialization",
               "hivemind.compression.quantization", "hivemind.utils.auth", "hivemind.dht.protocol")
    outside = {}
    for path in sorted((ROOT / "node").rglob("*.py")):
        if path.is_relative_to(ROOT / "node" / "swarm" / "hivemind"):
            continue
        modules = {node.module for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and node.module}
        reached = sorted(m for m in modules if m.startswith(private))
        if reached:
            outside[str(path.relative_to(ROOT))] = reached
    assert outside == {}, f"hivemind internals used outside node/swarm/hivemind: {outside}"


@pytest.mark.parametrize("layer", LAYERS)
def test_every_folder_of_a_package_is_a_package(layer):
    """``pip install .`` finds only folders with an __init__.py: one without it would be left out of the wheel."""
    folders = [path for path in (ROOT / layer).rglob("*") if path.is_dir() and path.name != "__pycache__"]
    missing = [str(path.relative_to(ROOT)) for path in [ROOT / layer, *folders] if not (path / "__init__.py").exists()]
    assert missing == []


def test_no_test_folder_shadows_a_package():
    """A script run by path from a test folder (tests/system/attacker.py) has its folder first on sys.path: a
    sibling folder named like a package of the project would be imported instead of it."""
    shadowing = [str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("*")
                 if path.is_dir() and path.name in LAYERS]
    assert shadowing == []
