"""Waiting on vCenter tasks with WaitForUpdatesEx: no polling, a heartbeat every turn."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from pyVmomi import vim, vmodl

from activities.vsphere.session import VSphereSession

_TASK_PATHS = ["info.state", "info.error", "info.result", "info.progress"]


class TaskTimeout(TimeoutError):
    """The task did not finish in the time given; it may still be running in vCenter."""


def wait_for_task(
    session: VSphereSession,
    task: Any,
    heartbeat: Callable[[str, int], None],
    *,
    max_wait_seconds: int = 10,
    timeout: float | None = None,
) -> Any:
    """Wait until the task ends; return its result or raise its fault.

    Each turn of WaitForUpdatesEx waits at most max_wait_seconds (keep it under half the
    activity's heartbeat timeout) and then calls heartbeat(task_ref, progress) so a retry
    can re-attach to the same task. A private property collector keeps concurrent waits
    on one session apart; destroying it also destroys its filter.
    """
    collector = session.content.propertyCollector.CreatePropertyCollector()
    task_ref = f"Task:{task._moId}"
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        collector.CreateFilter(
            vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task, skip=False)],
                propSet=[
                    vmodl.query.PropertyCollector.PropertySpec(type=vim.Task, pathSet=_TASK_PATHS)
                ],
            ),
            partialUpdates=False,
        )
        options = vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=max_wait_seconds)
        state: dict[str, Any] = {}
        version = ""
        while True:
            update = collector.WaitForUpdatesEx(version, options)
            if update is not None:
                version = update.version
                for filter_set in update.filterSet or []:
                    for obj_set in filter_set.objectSet or []:
                        for change in obj_set.changeSet or []:
                            state[change.name] = change.val
            heartbeat(task_ref, int(state.get("info.progress") or 0))
            if state.get("info.state") == vim.TaskInfo.State.success:
                return state.get("info.result")
            if state.get("info.state") == vim.TaskInfo.State.error:
                raise state["info.error"]
            if deadline is not None and time.monotonic() > deadline:
                raise TaskTimeout(f"{task_ref} still running after {timeout}s")
    finally:
        with contextlib.suppress(vmodl.fault.ManagedObjectNotFound):
            collector.DestroyPropertyCollector()
