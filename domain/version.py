"""kubegate's version, and which gateway agents this release works with.

Read only where decisions are not replayed (Update validators, queries, the CLI): a workflow
must never decide on the version of the code that happens to replay it.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _version() -> str:
    """The version of this source tree (its pyproject.toml), else of the installed package:
    code checked out beside another release's environment reports its own release."""
    try:
        return str(tomllib.loads(_PYPROJECT.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return importlib.metadata.version("kubegate")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"


VERSION = _version()


def _minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    return int(parts[0]), int(parts[1])


def accepted_agents(version: str = VERSION) -> str:
    """The agent releases this one works with, in words: its own minor release and the one
    before (N and N-1)."""
    minor = _minor(version)
    if minor is None:
        return "the same release"
    major, number = minor
    return f"{major}.{number}.x" + (f" and {major}.{number - 1}.x" if number > 0 else "")


def agent_version_problem(agent: str, version: str = VERSION) -> str | None:
    """Why an agent of release `agent` cannot serve this release, or None (unknown = too old)."""
    mine, theirs = _minor(version), _minor(agent)
    if mine is None:
        return None
    if theirs is None:
        return (
            f"its agent reports no version (older than this release's); this kubegate "
            f"({version}) works with agents {accepted_agents(version)}: upgrade the agent"
        )
    if theirs[0] != mine[0] or not (mine[1] - 1 <= theirs[1] <= mine[1]):
        return (
            f"its agent is {agent}; this kubegate ({version}) works with agents "
            f"{accepted_agents(version)}: upgrade the agent"
        )
    return None


_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


def version_key(value: str) -> tuple[int, int, int] | None:
    """'v1.30.4' or '1.30' as (1, 30, 4) / (1, 30, 0); None when it is not a version."""
    match = _VERSION.match(value.strip())
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def version_at_least(version: str, least: str) -> bool:
    """Whether release `version` ('0.3.0', 'v0.3.1') is `least` or later (False when it
    cannot be read, e.g. an agent that did not say)."""
    ours, wanted = version_key(version), version_key(least)
    return ours is not None and wanted is not None and ours >= wanted
