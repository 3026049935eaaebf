"""JSON log lines: one object a line, with the SDK's workflow/activity context."""

from __future__ import annotations

import io
import json
import logging

from plumbing.logformat import JsonFormatter, formatter


def logged(*records: tuple[str, dict[str, object]], error: bool = False) -> list[dict[str, object]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("kubegate.test-logformat")
    log.handlers[:] = [handler]
    log.propagate = False
    for message, extra in records:
        log.warning(message, "x\ny", extra=extra)
    if error:
        try:
            raise ValueError("broken")
        except ValueError:
            log.exception("failed")
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_line_is_one_object_with_the_sdk_context() -> None:
    workflow = {"workflow_id": "cluster/a", "attempt": 1, "input": object()}
    entries = logged(
        ("plain %s", {}),
        ("in a workflow %s", {"temporal_workflow": workflow}),
        ("in an activity %s", {"temporal_activity": {"activity_type": "vm_create"}}),
        error=True,
    )
    assert len(entries) == 4  # a newline in the message stays inside its line
    plain, in_workflow, in_activity, failed = entries
    assert plain["message"] == "plain x\ny"
    assert {k: plain[k] for k in ("level", "logger")} == {
        "level": "WARNING",
        "logger": "kubegate.test-logformat",
    }
    assert str(plain["time"]).endswith("+00:00")
    assert in_workflow["workflow"] == {"workflow_id": "cluster/a", "attempt": 1}  # no objects
    assert in_activity["activity"] == {"activity_type": "vm_create"}
    assert "ValueError: broken" in str(failed["error"])


def test_text_stays_the_default_format() -> None:
    assert not isinstance(formatter("text"), JsonFormatter)
    assert isinstance(formatter("json"), JsonFormatter)


def test_empty_metrics_and_tracing_settings_mean_unset() -> None:
    from plumbing.settings import Settings

    settings = Settings(metrics_address="", otel_endpoint="")
    assert (settings.metrics_address, settings.otel_endpoint) == (None, None)
    assert Settings(metrics_address="[::1]:9464").metrics_address == "[::1]:9464"
