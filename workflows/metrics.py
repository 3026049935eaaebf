"""What workflows record for Prometheus, through the SDK's workflow meter: it records
nothing while a workflow replays, and it is no command (histories stay as they are)."""

from __future__ import annotations

from temporalio import workflow

from domain.lifecycle import Step
from domain.names import STEP_DURATION_METRIC


def record_step(step: Step) -> None:
    """A step ended: its duration, by step name and how it ended (labelled by the SDK with
    the workflow type, namespace and task queue)."""
    seconds = step.seconds
    if seconds is None:
        return
    histogram = workflow.metric_meter().create_histogram_float(
        STEP_DURATION_METRIC, "Duration of lifecycle steps, by step and how it ended.", "s"
    )
    histogram.record(max(seconds, 0.0), {"step": step.name, "state": step.state.value})
