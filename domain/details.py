"""What the Web UI shows on a workflow's first screen (its current details, in Markdown).

The Web UI draws Markdown tables without borders, so tables here are fixed-width text in a
code block: columns line up in every viewer. The trouble (a failed step with its error, a
repair given up) comes first, before the history."""

from __future__ import annotations

from collections.abc import Sequence

from domain.lifecycle import Step, StepState

#: a cell is cut to this many characters (an error's whole text is in the line above)
CELL = 80


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A table as lines of a fenced code block, columns padded to their widest cell."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(widths[i]) for i, v in enumerate(values)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return ["```", line([h.upper() for h in headers]), rule, *(line(r) for r in cells), "```"]


def _cell(value: str) -> str:
    text = " ".join(str(value).split()).replace("```", "'''")
    return text if len(text) <= CELL else text[: CELL - 1] + "…"


def trouble(failed: bool, steps: Sequence[Step], error: str | None, reason: str) -> list[str]:
    """The top of the page: for a failed lifecycle its failed step (the newest) and error,
    else the reason of a troubled one (degraded, disconnected); nothing when all is well."""
    if failed:
        down = [s for s in steps if s.state is StepState.FAILED]
        said = " ".join(((down[-1].error if down else None) or error or reason or "").split())
        title = f"**Failed: {down[-1].title}**" if down else "**Failed**"
        return [f"{title} — {said}" if said else title, ""]
    if reason:
        return [f"**{' '.join(reason.split())}**", ""]
    return []


def steps_table(steps: Sequence[Step]) -> list[str]:
    """A lifecycle's steps: title, state, seconds, attempts, detail or error."""
    return text_table(
        ["step", "state", "seconds", "attempts", "detail / error"],
        [
            [
                s.title,
                s.state.value,
                f"{s.seconds:.1f}" if s.seconds is not None else "",
                str(s.attempts),
                s.error or s.detail or "",
            ]
            for s in steps
        ],
    )
