"""The import-linter contracts cover every module, and hold."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT

EDGES = {"relay.cli", "relay.cli_client", "relay.__main__", "relay.__init__"}
"""Modules directly under relay/ that are not core: the CLI starts everything."""


def test_every_module_directly_under_relay_is_in_the_core_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(contract for contract in config["contracts"]
                if contract["name"].startswith("Core"))
    modules = {f"relay.{path.stem}" for path in (ROOT / "relay").glob("*.py")} - EDGES
    assert modules == set(core["source_modules"])


def test_the_layers_hold() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")
