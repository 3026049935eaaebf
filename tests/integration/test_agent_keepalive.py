"""Every task of the agent heartbeats, also one whose activity never does: a short heartbeat
timeout then finds a dead agent quickly, and a live one is never timed out (real Temporal)."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.guard import AgentGuard, GuardInterceptor, PolicyFile
from domain.sealing import AgentKey


class Unchecked(AgentGuard):
    """The guard's keepalive and signatures, without asking a gateway (none here)."""

    async def check(self, info: Any, args: Any) -> None:
        return None


@activity.defn(name="slow_silent")
def slow_silent(seconds: float) -> str:
    """Works for a while and never heartbeats itself."""
    time.sleep(seconds)
    return "done"


@activity.defn(name="slow_beating")
def slow_beating(seconds: float) -> str:
    """Attempt 1 heartbeats its own details (a vCenter task's ref), works silently, fails;
    attempt 2 fails silently after a while (a new agent that could not get going); attempt 3
    reads the details the first left (what a new agent re-attaches to)."""
    attempt = activity.info().attempt
    if attempt == 1:
        activity.heartbeat({"task": "Task:task-42"})
    if attempt < 3:
        time.sleep(seconds)
        raise RuntimeError("the agent went away")
    return json.dumps(list(activity.info().heartbeat_details))


@workflow.defn(sandboxed=False)
class RunOne:
    @workflow.run
    async def run(self, name: str, seconds: float, queue: str, attempts: int = 1) -> Any:
        return await workflow.execute_activity(
            name,
            seconds,
            task_queue=queue,
            start_to_close_timeout=timedelta(minutes=1),
            heartbeat_timeout=timedelta(seconds=2),
            retry_policy=RetryPolicy(
                maximum_attempts=attempts, initial_interval=timedelta(seconds=0.1)
            ),
        )


async def test_a_task_that_never_heartbeats_itself_is_kept_alive(
    temporal: WorkflowEnvironment,
) -> None:
    client = temporal.client
    queue = f"keepalive-{uuid.uuid4().hex[:8]}"
    key = AgentKey.generate()
    guard = Unchecked(client, "none", key, PolicyFile(Path("/nonexistent")))
    with ThreadPoolExecutor(max_workers=4) as executor:
        async with (
            Worker(client, task_queue=queue, workflows=[RunOne]),
            Worker(
                client,
                task_queue=queue + "-agent",
                activities=[slow_silent, slow_beating],
                activity_executor=executor,
                interceptors=[GuardInterceptor(guard)],
            ),
        ):
            # 5 s of silence against a 2 s heartbeat timeout: alive all along
            silent = await client.execute_workflow(
                RunOne.run,
                args=["slow_silent", 5.0, queue + "-agent"],
                id=f"keepalive/{uuid.uuid4()}",
                task_queue=queue,
            )
            assert silent["body"] == '"done"'
            beating = await client.execute_workflow(
                RunOne.run,
                args=["slow_beating", 3.0, queue + "-agent", 3],
                id=f"keepalive/{uuid.uuid4()}",
                task_queue=queue,
            )
            # the keepalive repeated the last details, also through an attempt that said
            # nothing: the third attempt still finds them
            assert json.loads(json.loads(beating["body"])) == [{"task": "Task:task-42"}]
