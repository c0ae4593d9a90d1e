"""The package's structure: no import cycle, no upward import, one seam for model families.

Layers, bottom to top: the core library (``transferkit``), the KFP components, the pipelines
(wiring), and the orchestration that runs pipelines (``runner``, ``submit``, ``trigger``,
``cli``). A module imports only its own layer or those below; imports inside functions count.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    ("transferkit", "transferkit"),
    ("components", "transferkit.components"),
    ("pipelines", "transferkit.pipelines"),
)
ORCHESTRATION = (
    "transferkit.runner",
    "transferkit.submit",
    "transferkit.trigger",
    "transferkit.cli",
)
UPPER = ("transferkit.components", "transferkit.pipelines", *ORCHESTRATION)


def modules() -> dict[str, Path]:
    found = {}
    for folder, prefix in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts]
            found[".".join([prefix, *(p for p in parts if p != "__init__")])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` depends on that module (the package's own
                # __init__ runs too, but it only re-exports); `from module import name` on it.
                submodules = [f"{node.module}.{a.name}" for a in node.names]
                names = [a.name for a in node.names if f"{node.module}.{a.name}" not in known]
                targets = submodules + ([node.module] if names else [])
            edges[name] |= {t for t in targets if t in known and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    edges = import_graph()
    assert len(edges) > 60  # the whole package was read
    assert cycles(edges) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_never_imports_the_layers_above_it() -> None:
    edges = import_graph()
    upward = {
        module: sorted(t for t in targets if t.startswith(UPPER))
        for module, targets in edges.items()
        if not module.startswith(UPPER)
    }
    assert {m: t for m, t in upward.items() if t} == {}
    # and the components never import the pipelines or the orchestration
    components = {
        m: sorted(t for t in targets if t.startswith(UPPER[1:]))
        for m, targets in edges.items()
        if m.startswith("transferkit.components")
    }
    assert {m: t for m, t in components.items() if t} == {}


# What asks which kind of backbone or data it has: a modality compared with a literal, an
# image spec tested for None as a proxy, or a strategy config tested by class.
ASKS = re.compile(
    r"modality\s*[!=]=|[!=]=\s*\"(image|text)\"|\.image is (not )?None|"
    r"isinstance\([^)]*(Config|Encoder|Classifier)\)|family\s*[!=]=\s*\""
)


def test_only_the_backbones_package_asks_which_family_or_modality_it_has() -> None:
    offenders = []
    for name, path in modules().items():
        if name.startswith("transferkit.backbones"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ASKS.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_training_package_only_orchestrates() -> None:
    sizes = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for path in (ROOT / "transferkit" / "training").rglob("*.py")
    }
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_the_readme_support_matrix_is_the_generated_one() -> None:
    from transferkit.backbones.support import matrix_markdown

    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- support-matrix:start -->\n") + len("<!-- support-matrix:start -->\n")
    end = readme.index("\n<!-- support-matrix:end -->")
    assert readme[start:end] == matrix_markdown()
