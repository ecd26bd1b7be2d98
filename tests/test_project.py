"""The project's declared contract matches what it runs on: the minimum Python version is the
same in the package metadata, the linter and the type checker, and this interpreter meets it
(CI runs the suite on exactly that minimum, 3.11)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_declared_python_version_is_one_version_everywhere_and_true_here() -> None:
    cfg = _pyproject()
    m = re.fullmatch(r">=(\d+)\.(\d+)", cfg["project"]["requires-python"])
    assert m, "requires-python must be a plain minimum (>=X.Y)"
    minimum = (int(m.group(1)), int(m.group(2)))
    assert cfg["tool"]["ruff"]["target-version"] == f"py{minimum[0]}{minimum[1]}"
    assert cfg["tool"]["mypy"]["python_version"] == f"{minimum[0]}.{minimum[1]}"
    assert sys.version_info[:2] >= minimum
    # typing.Self (used by the HTTP wiring) exists from 3.11 on: the declared minimum allows it.
    assert minimum >= (3, 11)


def test_the_linters_ci_runs_are_pinned() -> None:
    """ruff and mypy run in the README's test command: unpinned, a new release's new rules
    could fail CI on unchanged code."""
    extras = _pyproject()["project"]["optional-dependencies"]["test"]
    pins = {re.split(r"[=<>!~]", e)[0]: e for e in extras}
    assert re.fullmatch(r"ruff==[\d.]+", pins["ruff"]) and re.fullmatch(r"mypy==[\d.]+", pins["mypy"])


def test_ci_runs_exactly_the_readmes_test_command_and_it_lints() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{ci}\n" in readme
    assert ".venv/bin/ruff check" in ci and ".venv/bin/mypy" in ci and "pytest" in ci
