"""Log lines as text or as one JSON object a line (KUBEGATE_LOG_FORMAT, `--log-format`).

A JSON line holds the time (UTC, ISO 8601), level, logger and message, and the workflow or
activity the line came from when the SDK's `workflow.logger` / `activity.logger` wrote it
(their ids, type, task queue, attempt: never their inputs), and the error's traceback.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: what the SDK's loggers attach to a record, and the key each has in a JSON line
_CONTEXT = {"temporal_workflow": "workflow", "temporal_activity": "activity"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for attribute, key in _CONTEXT.items():
            context = getattr(record, attribute, None)
            if isinstance(context, dict):
                entry[key] = {
                    k: v for k, v in context.items() if isinstance(v, str | int | float | bool)
                }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["error"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT)


def setup_logging(log_format: LogFormat, *handlers: logging.Handler) -> None:
    """The root logger at INFO writing to stderr (and `handlers`) in `log_format`."""
    chosen = formatter(log_format)
    every = [logging.StreamHandler(), *handlers]
    for handler in every:
        handler.setFormatter(chosen)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.handlers[:] = every
