"""The gateway logs bundle (`kubegate gateway logs NAME -o FILE.tgz`): one .tgz holding the
agent's logs, the gateway's state and step history, and recent vCenter events and tasks of
the gateway's objects, with every secret redacted. See docs/logs.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import textwrap
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from domain.events import EventsResult
from domain.lifecycle import Step
from plumbing.settings import Settings

REDACTED = "<redacted>"

#: JSON keys whose values never enter a bundle (compared without case), at any depth.
SECRET_KEYS = frozenset(
    {
        "ciphertext",
        "nonce",
        "ephemeral_public_key",
        "password",
        "secrets",
        "pairing_code",
        "private_key",
        "api_key",
    }
)

#: ... and, in text, what `KEY=value` / `KEY: value` / `"KEY": "value"` is redacted for.
_TEXT_KEYS = SECRET_KEYS | {"passwd", "pwd", "secret", "token", "apikey", "api-key"}
_KEY_ALTERNATIVES = "|".join(re.escape(k) for k in sorted(_TEXT_KEYS, key=len, reverse=True))
_TEXT_SECRET = re.compile(
    rf"""(?ix)
    (?<![a-z0-9])                            # a whole word: 'db_password=' counts, 'xpwd=' not
    (?P<key>["']?(?:{_KEY_ALTERNATIVES})["']?)
    (?P<sep>\s*[=:]\s*)
    (?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s"',;&}})\]]+)
    """
)
#: user:password@ in a URL
_URL_SECRET = re.compile(r"(?P<head>://[^/\s:@]+:)[^/\s@]+@")

AGENT_LOG = "agent.log"


def redact_text(text: str) -> str:
    """text with the values of `password=…`-style pairs and URL passwords replaced."""

    def value(match: re.Match[str]) -> str:
        quote = match["value"][0] if match["value"][0] in "\"'" else ""
        return f"{match['key']}{match['sep']}{quote}{REDACTED}{quote}"

    text = _TEXT_SECRET.sub(value, text)
    return _URL_SECRET.sub(lambda m: f"{m['head']}{REDACTED}@", text)


def redact(value: Any) -> Any:
    """A JSON-like value with every SECRET_KEYS value replaced, and every string redacted."""
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in SECRET_KEYS else redact(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


@dataclass(frozen=True)
class BundleSummary:
    """What write_bundle wrote."""

    path: Path
    members: list[str]
    notes: list[str]
    size: int


def agent_log_files(settings: Settings, gateway: str) -> list[Path]:
    """The agent's log and its rotated files (agent.log, agent.log.1, …), newest first."""
    directory = settings.agent_dir(gateway)
    rotated = []
    for path in directory.glob(f"{AGENT_LOG}.*"):
        suffix = path.name.removeprefix(f"{AGENT_LOG}.")
        if suffix.isdigit() and path.is_file():
            rotated.append((int(suffix), path))
    current = directory / AGENT_LOG
    return ([current] if current.is_file() else []) + [p for _, p in sorted(rotated)]


def write_bundle(
    out: Path,
    *,
    gateway: str,
    state: dict[str, Any],
    steps: list[Step],
    agent_logs: list[Path],
    events: EventsResult | None,
    notes: list[str],
) -> BundleSummary:
    """Write the bundle to out (a .tgz, replaced whole: written beside it, then renamed).

    `notes` says what the caller could not collect ("vCenter events: <error>"); the bundle's
    notes.txt adds what could not be read here. Nothing is written unredacted.
    """
    made = datetime.now(UTC)
    notes = [redact_text(n) for n in notes]
    if events is None and not any(n.lower().startswith("vcenter events") for n in notes):
        notes.append("vCenter events: not collected")
    if events is not None and events.missing:
        notes.append(
            "vCenter objects no longer there (skipped): " + ", ".join(sorted(events.missing))
        )
    if not agent_logs:
        notes.append("agent log: no log files found")
    texts: list[tuple[str, str]] = [
        ("state.json", json.dumps(redact(state), indent=2, default=str) + "\n"),
        ("steps.txt", steps_table(steps)),
    ]
    if events is not None:
        dumped = redact(events.model_dump(mode="json"))
        texts.append(("events.json", json.dumps(dumped, indent=2) + "\n"))
    texts += [("events.txt", events_table(events)), ("tasks.txt", tasks_table(events))]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    with ExitStack() as stack:
        logs: list[tuple[str, IO[bytes], float]] = []
        for path in agent_logs:
            try:
                with path.open("rb") as source:
                    logs.append((f"agent/{path.name}", *_redacted_copy(source, stack)))
            except OSError as exc:
                notes.append(f"agent log {path}: cannot read ({exc.strerror or exc})")
        texts.append(("notes.txt", "\n".join(notes or ["Everything was collected."]) + "\n"))
        members = ["README.txt"] + [n for n, _ in texts] + [n for n, _, _ in logs]
        texts.insert(0, ("README.txt", _readme(gateway, made, members)))
        try:
            with tarfile.open(partial, "w:gz") as tar:
                for name, text in texts:
                    data = text.encode()
                    tar.addfile(_info(name, len(data), made.timestamp()), io.BytesIO(data))
                for name, copy, mtime in logs:
                    size = copy.seek(0, io.SEEK_END)
                    copy.seek(0)
                    tar.addfile(_info(name, size, mtime), copy)
            partial.replace(out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return BundleSummary(path=out, members=members, notes=notes, size=out.stat().st_size)


# --- members ---------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "README.txt": "this file",
    "state.json": "the gateway's state as the gateway workflow reports it",
    "steps.txt": "the gateway's steps: state, start, end, seconds, attempts, error, objects",
    "events.json": "recent vCenter events and tasks of the gateway's objects, as data",
    "events.txt": "those events, newest first",
    "tasks.txt": "those tasks, newest first",
    "notes.txt": "what could not be collected, and why",
}


def _readme(gateway: str, made: datetime, members: list[str]) -> str:
    width = max(len(m) for m in members)
    lines = [
        f"kubegate logs bundle of gateway {gateway}",
        f"made {made.isoformat(timespec='seconds')}",
        "",
    ]
    for member in members:
        what = _DESCRIPTIONS.get(member, "a log file of the gateway agent")
        lines.append(f"{member.ljust(width)}  {what}")
    redaction = (
        "Secrets are redacted: in JSON the values of the keys "
        + ", ".join(sorted(SECRET_KEYS))
        + "; in text (logs, errors, messages) the values of password=…-style pairs and URL "
        f"passwords. Each reads {REDACTED}. See docs/logs.md."
    )
    return "\n".join([*lines, "", *textwrap.wrap(redaction, 90)]) + "\n"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    """Rows under headers in aligned columns (the last column is not padded)."""
    if not rows:
        return empty + "\n"
    cells = [[c.replace("\n", " | ") for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [list(headers), *cells]) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *cells]
    ]
    return "\n".join(lines) + "\n"


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


def steps_table(steps: list[Step]) -> str:
    rows = [
        [
            s.name,
            str(s.state),
            _when(s.started),
            _when(s.ended),
            "-" if s.seconds is None else f"{s.seconds:.1f}",
            str(s.attempts),
            redact_text(s.error) if s.error else "-",
            ", ".join(s.objects) or "-",
        ]
        for s in steps
    ]
    headers = ["STEP", "STATE", "START", "END", "SECONDS", "ATTEMPTS", "ERROR", "OBJECTS"]
    return table(headers, rows, "(no steps)")


def _named(ref: str, name: str) -> str:
    return f"{name} ({ref})" if name and ref else ref or name or "-"


def events_table(events: EventsResult | None) -> str:
    if events is None:
        return "vCenter events were not collected: see notes.txt\n"
    rows = [
        [
            _when(e.time),
            e.type,
            _named(e.object, e.object_name),
            e.user or "-",
            redact_text(e.message),
        ]
        for e in events.events
    ]
    return table(["TIME", "TYPE", "OBJECT", "USER", "MESSAGE"], rows, "(no events)")


def tasks_table(events: EventsResult | None) -> str:
    if events is None:
        return "vCenter tasks were not collected: see notes.txt\n"
    rows = [
        [
            _when(t.time),
            _when(t.completed),
            t.name,
            t.state,
            _named(t.object, t.object_name),
            t.result or "-",
            redact_text(t.error) if t.error else "-",
        ]
        for t in events.tasks
    ]
    headers = ["TIME", "COMPLETED", "TASK", "STATE", "OBJECT", "RESULT", "ERROR"]
    return table(headers, rows, "(no tasks)")


# --- tar plumbing ----------------------------------------------------------------------------


def _info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    return info


def _redacted_copy(source: IO[bytes], stack: ExitStack) -> tuple[IO[bytes], float]:
    """A temporary copy of a log, line by line through redact_text (bytes that are not UTF-8
    kept as they are), and the log's modification time."""
    copy = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - the stack closes it
    for line in source:
        text = line.decode("utf-8", "surrogateescape")
        copy.write(redact_text(text).encode("utf-8", "surrogateescape"))
    return copy, os.fstat(source.fileno()).st_mtime
