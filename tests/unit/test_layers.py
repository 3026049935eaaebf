"""The layers point one way: domain <- plumbing, workflows <- activities <- workers and
starters. `plumbing` (Temporal connect, data converter, Update sending) sits on `domain`
beside the workflows, which never import it (they run in the sandbox)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: what each layer must not import (the layers above it)
ABOVE = {
    "domain": ("plumbing", "workflows", "activities", "workers", "starters"),
    "plumbing": ("workflows", "activities", "workers", "starters"),
    "workflows": ("plumbing", "activities", "workers", "starters"),
    "activities": ("workers", "starters"),
}


def imported(source: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_import_runs_upward() -> None:
    upward = [
        f"{source.relative_to(ROOT)} imports {name}"
        for layer, above in ABOVE.items()
        for source in sorted(ROOT.joinpath(layer).rglob("*.py"))
        for name in sorted(imported(source))
        if name.split(".")[0] in above
    ]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text("from starters.client import KubegateClient\nimport workers.run\n")
    assert imported(source) == {"starters.client", "workers.run"}


def test_every_process_connects_through_plumbing() -> None:
    """One way to reach Temporal: nothing but plumbing calls Client.connect."""
    callers = [
        str(source.relative_to(ROOT))
        for layer in (*ABOVE, "workers", "starters")
        for source in sorted(ROOT.joinpath(layer).rglob("*.py"))
        if re.search(r"(?<![\w.])Client\.connect\(", source.read_text())
    ]
    assert callers == ["plumbing/connect.py"]


def test_only_the_cli_imports_the_cli() -> None:
    """The command is the top: nothing else (the SDK client, the dev stack, workers) imports
    it; they run it as `python -m starters.cli` when they need it."""
    cli = ROOT / "starters" / "cli"
    assert cli.joinpath("__init__.py").is_file()
    importers = [
        f"{source.relative_to(ROOT)} imports {name}"
        for layer in (*ABOVE, "workers", "starters")
        for source in sorted(ROOT.joinpath(layer).rglob("*.py"))
        if cli not in source.parents
        for name in sorted(imported(source))
        if name == "starters.cli" or name.startswith("starters.cli.")
    ]
    assert importers == []
