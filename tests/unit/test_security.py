"""Source-level guards: what a review would check by hand on every change."""

from __future__ import annotations

import ast
from pathlib import Path

import transferkit

PACKAGE = Path(transferkit.__file__).parent


def calls_to(name: str, attribute: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == attribute
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == name
            ):
                found.append((path, node))
    return found


def test_every_torch_load_refuses_pickled_code() -> None:
    loads = calls_to("torch", "load")
    assert loads, "the scan found no torch.load at all: it is looking in the wrong place"
    unsafe = [
        f"{path.relative_to(PACKAGE)}:{call.lineno}"
        for path, call in loads
        if not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )
    ]
    assert unsafe == []


def test_no_pickle_or_unsafe_yaml_loading() -> None:
    assert calls_to("pickle", "load") + calls_to("pickle", "loads") == []
    assert calls_to("yaml", "load") == []  # yaml.safe_load only


def test_archives_are_never_unpacked_wholesale() -> None:
    # extractall/extract trust the names inside; storage.extract_archive checks each entry.
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("extractall", "extract"):
                raise AssertionError(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.attr}")
