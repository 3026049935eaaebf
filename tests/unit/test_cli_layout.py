"""The CLI package has no import cycle: noun modules import only `starters.cli.common` of it,
`common` imports none of it, and only the package's `__init__` imports the noun modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "starters" / "cli"
COMMON = "starters.cli.common"
#: the modules that register commands (at least these; a new noun must follow the same rule)
NOUNS = {"account", "cluster", "codec", "dev", "gateway", "ippool", "worker"}
#: the package's own modules that are not nouns
NOT_NOUNS = {"__init__", "__main__", "common"}


def cli_imports(source: str) -> set[str]:
    """Every module of the CLI package that `source` (a module of the package) imports, at
    any depth (also inside functions): `import starters.cli.x`, `from starters.cli import x`
    (the module `starters.cli.x` if x is one of the package's, else the package itself) and
    relative imports, resolved."""
    names = {path.stem for path in PACKAGE.glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if is_cli(a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # relative to starters.cli, the package of every module checked here
                base = ".".join(["starters", "cli"][: 3 - node.level])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not is_cli(target):
                continue
            if target == "starters.cli":
                found.update(
                    f"starters.cli.{a.name}" if a.name in names else "starters.cli"
                    for a in node.names
                )
            else:
                found.add(target)
    return found


def is_cli(name: str) -> bool:
    return name == "starters.cli" or name.startswith("starters.cli.")


def modules() -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(PACKAGE.glob("*.py"))}


def test_the_package_has_its_noun_modules() -> None:
    found = set(modules())
    assert found >= NOUNS, f"missing noun modules: {sorted(NOUNS - found)}"
    assert found >= NOT_NOUNS
    # no module of the package is a package of its own that the checks below would miss
    assert not [p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_noun_modules_import_only_common() -> None:
    bad = {
        name: sorted(imports - {COMMON})
        for name, source in modules().items()
        if name not in NOT_NOUNS
        for imports in [cli_imports(source)]
        if imports - {COMMON}
    }
    assert bad == {}


def test_common_imports_nothing_of_the_package() -> None:
    assert cli_imports(modules()["common"]) == set()


def test_main_imports_only_the_package() -> None:
    assert cli_imports(modules()["__main__"]) <= {"starters.cli"}


def test_the_package_imports_every_noun() -> None:
    imported = cli_imports(modules()["__init__"])
    nouns = set(modules()) - NOT_NOUNS
    assert {f"starters.cli.{n}" for n in nouns} <= imported


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from starters.cli import main\n", {"starters.cli"}),
        ("from starters.cli import gateway\n", {"starters.cli.gateway"}),
        ("import starters.cli.dev\n", {"starters.cli.dev"}),
        ("from starters.cli.common import out\n", {COMMON}),
        ("def f():\n    from starters.cli.gateway import first_line\n", {"starters.cli.gateway"}),
        ("from . import gateway\n", {"starters.cli.gateway"}),
        ("from .common import out\n", {COMMON}),
        ("from starters.client import KubegateClient\nimport starters.dev\n", set()),
    ],
)
def test_the_check_sees_each_form_of_import(source: str, expected: set[str]) -> None:
    assert cli_imports(source) == expected
