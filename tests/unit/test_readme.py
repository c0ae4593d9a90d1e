"""The README tests itself: every command in it is run or validated, every config snippet
validated, every error line it quotes produced by the program verbatim, and every measured
figure traced to the results file it names (a stale figure fails here). The quickstart's
printed evaluation is compared with a real run's in tests/pipelines/test_pipeline_e2e.py."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from transferkit.cli import build_parser, main
from transferkit.config import validate_mapping

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!-- (\S+) (\S+) -->")
# A measured figure: a number with a unit of time, speed, size or ratio.
FIGURE = re.compile(
    r"(?<![\w.≥≤<>])(\d[\d,]*(?:\.\d+)?)(\s?(?:s|min|×|GiB|MB|examples/s|sentences/s|/s))"
    r"(?![\w/])(?!\s?\d)"  # not a shape: 9,003 × 384
)
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README) if lang == language]


def prose() -> str:
    """The README without its code blocks."""
    return BLOCK.sub("", README)


def test_the_readme_is_short() -> None:
    assert len(README.splitlines()) <= 450


def test_its_links_lead_to_files_of_the_repository() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).is_file(), target


def test_the_two_commands_are_the_ones_that_run() -> None:
    quickstart, tests = blocks("bash")[:2]
    run = "transferkit run examples/sst2-quickstart.yaml"
    assert quickstart.strip() == f"{SETUP}pip install -c constraints.txt -e . && {run}"
    # CI runs the README's test command, word for word, on a clean clone.
    assert tests.strip() in (ROOT / ".ci" / "run").read_text()


def commands() -> list[str]:
    lines = []
    for body in blocks("bash")[2:]:
        lines += [line.strip() for line in body.splitlines() if line.strip()]
    return lines


@pytest.mark.parametrize("line", commands())
def test_every_other_command_is_validated(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    words = shlex.split(line, comments=True)
    if words[0] == "transferkit":
        args = build_parser().parse_args(words[1:])  # exits 2 on an unknown option
        config = getattr(args, "config", None)
        if config:  # a config the README runs must validate, its sources included
            assert main(["validate", config, "--offline"]) == 0, capsys.readouterr().err
        elif args.command == "predict":
            assert words[2].startswith("models:/")
    elif words[0] == "mlflow":
        done = subprocess.run(
            [str(Path(sys.executable).with_name("mlflow")), *words[1:2], "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert option in done.stdout
    elif words[0] == "images/build.sh":
        script = (ROOT / words[0]).read_text()
        assert subprocess.run(["bash", "-n", str(ROOT / words[0])]).returncode == 0
        for argument in words[1:]:
            assert f"\n    {argument})" in script, argument
    else:
        pytest.fail(f"the README's command {line!r} is neither run nor validated by a test")


def subset(small: Any, large: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(large, dict) and all(
            key in large and subset(value, large[key]) for key, value in small.items()
        )
    return bool(small == large)


def test_every_config_snippet_validates_and_the_quickstart_is_the_file() -> None:
    snippets = blocks("yaml")
    assert snippets
    example = yaml.safe_load((ROOT / "examples" / "sst2-quickstart.yaml").read_text())
    for snippet in snippets:
        raw = yaml.safe_load(snippet)
        validate_mapping(raw, "README")
        assert subset(raw, example), "the README's quickstart config differs from the file"


def test_the_python_snippet_compiles() -> None:
    for snippet in blocks("python"):
        compile(snippet, "README", "exec")


def quoted_errors() -> list[tuple[str, list[str]]]:
    """($ command, the error lines under it) of the README's text blocks."""
    found = []
    for body in blocks("text"):
        for part in re.split(r"^\$ ", body, flags=re.MULTILINE)[1:]:
            command, *rest = part.splitlines()
            found.append((command, [line for line in rest if line.startswith("error: ")]))
    return found


def test_the_readme_quotes_errors() -> None:
    assert len(quoted_errors()) >= 3


@pytest.mark.parametrize(("command", "expected"), quoted_errors())
def test_every_quoted_error_is_the_programs_own(
    command: str, expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    words = shlex.split(command)
    assert words[0] == "transferkit"
    assert main(words[1:]) != 0
    assert capsys.readouterr().err.strip().splitlines() == expected


def value_at(document: Any, key: str) -> Any:
    for part in key.split("."):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


def traced() -> list[tuple[str, str, str]]:
    """(the figure as shown, results file, key) for every marked figure."""
    found = []
    for match in MARKER.finditer(README):
        before = README[: match.start()].rstrip("*")
        shown = re.search(r"(\d[\d,]*(?:\.\d+)?)\s?(?:s|×|GiB|MB|/s)?$", before)
        assert shown, f"no figure before {match.group(0)}"
        found.append((shown.group(1), match.group(1), match.group(2)))
    return found


@pytest.mark.parametrize(("shown", "path", "key"), traced())
def test_every_figure_is_its_results_files(shown: str, path: str, key: str) -> None:
    assert path.startswith("bench/results/")
    value = float(value_at(json.loads((ROOT / path).read_text()), key))
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    assert f"{value:,.{decimals}f}".replace(",", "") == shown.replace(",", ""), (path, key, value)


def test_every_measured_figure_names_its_results_file() -> None:
    text = prose()
    untraced = [
        match.group(0)
        for match in FIGURE.finditer(text)
        if not re.match(r"\**<!-- ", text[match.end() :])
    ]
    assert untraced == []
