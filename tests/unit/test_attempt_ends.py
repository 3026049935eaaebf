"""Only a cancel the workflow asked for (an abort) cancels an activity's vCenter work; an
attempt Temporal ended otherwise (heartbeat timed out, gone, paused, reset) or an agent that
stops leaves it running for the next attempt, which re-attaches to it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from temporalio import activity
from temporalio.testing import ActivityEnvironment

from activities.vsphere.vm import _cancelled, _stopping

Details = activity.ActivityCancellationDetails


async def seen_after(cancel: Details | None) -> tuple[bool, bool]:
    env = ActivityEnvironment()

    async def body() -> tuple[bool, bool]:
        with contextlib.suppress(asyncio.CancelledError):  # (as the activities' shield does)
            for _ in range(200):
                if activity.is_cancelled() or activity.is_worker_shutdown():
                    break
                await asyncio.sleep(0.005)
        return _cancelled(), _stopping()

    async def run() -> tuple[bool, bool]:
        return await env.run(body)

    task = asyncio.ensure_future(run())
    await asyncio.sleep(0.02)
    if cancel is None:
        env.worker_shutdown()
    else:
        env.cancel(cancellation_details=cancel)
    return await task


@pytest.mark.parametrize(
    ("cancel", "cancelled", "stopping"),
    [
        (Details(cancel_requested=True), True, False),  # an abort: cancel vCenter's task
        (Details(timed_out=True), False, True),  # another attempt takes the task up
        (Details(not_found=True), False, True),
        (Details(paused=True), False, True),
        (Details(reset=True), False, True),
        (None, False, True),  # SIGTERM
    ],
)
async def test_only_an_abort_cancels_vcenter_work(
    cancel: Details | None, cancelled: bool, stopping: bool
) -> None:
    assert await seen_after(cancel) == (cancelled, stopping)
