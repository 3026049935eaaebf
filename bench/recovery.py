"""Recovery after a crashed agent: how long after a new agent starts the work goes on.

    uv run python -m bench.recovery [--runs 2] [--json]

Starts the stack of bench/deploy.py (vcsim with task delays, the counting proxy, a Temporal
dev server, the control worker and the agent as processes; clones take 6 s here, so a kill
lands while they run). For each moment -- at the request, clones in flight, readiness -- it deploys
a 3+3 cluster, SIGKILLs the agent as the cluster reaches that moment, starts a new agent at
once and measures the time from the new agent's start until one of the cluster's agent tasks
runs on it (the workflow's pending activity names the new agent's identity, pid@host). The
cluster must then reach Running with each node's VM made once; it is deleted after.

The bound is the lifecycle's heartbeat timeout (`timing.heartbeat_seconds`, default 15 s) plus
the first retry interval (1 s): the killed agent's last heartbeat is at most 0.8 of the timeout
old when it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.deploy import GATEWAY, POOL, Stack, _spawn, cluster_spec, start_stack
from domain import names
from domain.lifecycle import ClusterState, ClusterStatus, Timing

DELAYS = {"CloneVM_Task": 6000, "PowerOnMultiVM_Task": 3000, "PowerOnVM_Task": 1500}


def _moments() -> dict[str, Any]:
    """When to kill: a predicate on the cluster's state."""

    def step_running(name: str) -> Any:
        return lambda s: any(x.name == name and x.state.value == "running" for x in s.steps)

    return {
        # no task of the cluster started yet: the next ones wait in the queue for an agent
        "at the request": lambda s: True,
        # clone tasks run in vCenter under the agent's activities: a heartbeat timeout
        "clones in flight": lambda s: sum(n.phase == "creating" for n in s.nodes) >= 3,
        # the joiners' power-on (PowerOnMultiVM_Task, 1.5 s here) under readiness
        "readiness": step_running("readiness"),
    }


async def _resumed_on(stack: Stack, workflow_id: str, pid: int, limit: float) -> float | None:
    """Seconds from now until an agent task of the workflow runs on the agent `pid`: seen
    running (the pending activity names its identity) or, for a task too short to be seen,
    by its start event in the history (Temporal's own time of the start)."""
    identity = f"{pid}@{socket.gethostname()}"
    handle = stack.client.client.get_workflow_handle(workflow_id)
    wall, started = time.time(), time.monotonic()
    while time.monotonic() - started < limit:
        described = await handle.describe()
        for act in described.raw_description.pending_activities:
            if act.last_worker_identity == identity and act.state == 2:  # STARTED
                return time.monotonic() - started
        async for event in handle.fetch_history_events():
            if event.HasField("activity_task_started_event_attributes"):
                attrs = event.activity_task_started_event_attributes
                if attrs.identity == identity:
                    return max(0.0, event.event_time.ToMicroseconds() / 1e6 - wall)
        await asyncio.sleep(0.1)
    return None


async def one(stack: Stack, moment: str, check: Any, n: int) -> dict[str, Any]:
    name = f"rec{n}"
    spec = cluster_spec(name)
    await stack.client.deploy_cluster(spec, timing=Timing())
    killed_at = await stack.client.wait_cluster(
        name, lambda s: check(s) or s.status.value != "Provisioning", interval=0.05
    )
    if killed_at.status.value != "Provisioning":
        raise RuntimeError(f"{name} was {killed_at.status.value} before the kill ({moment})")
    stack.agent.send_signal(signal.SIGKILL)
    await asyncio.to_thread(stack.agent.wait, 10)
    home = stack.work / "home"
    environ = {
        **os.environ,
        "KUBEGATE_HOME": str(home),
        "KUBEGATE_TEMPORAL_ADDRESS": stack.env.client.service_client.config.target_host,
    }
    stack.agent = _spawn(["gateway", "agent", GATEWAY], environ, stack.work / f"agent-{n}.log")
    waited = await _resumed_on(stack, names.cluster_workflow_id(name), stack.agent.pid, 120)
    state: ClusterState = await stack.client.wait_cluster(
        name, lambda s: s.status in (ClusterStatus.RUNNING, ClusterStatus.FAILED), timeout=300
    )
    made = [n.name for n in state.nodes]
    await stack.client.delete_cluster(name)
    await stack.client.wait_cluster(name, lambda s: s.status is ClusterStatus.DELETED, timeout=300)
    return {
        "moment": moment,
        "resumed_after_s": None if waited is None else round(waited, 2),
        "status": state.status.value,
        "nodes": len(made),
        "distinct": len(set(made)) == len(made),
    }


async def main(runs: int, as_json: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="kubegate-recovery-"))
    stack = await start_stack(work, DELAYS)
    results: list[dict[str, Any]] = []
    try:
        n = 0
        for _ in range(runs):
            for moment, check in _moments().items():
                n += 1
                results.append(await one(stack, moment, check, n))
                if not as_json:
                    print(json.dumps(results[-1]))
    finally:
        await stack.stop()
    waits = [r["resumed_after_s"] for r in results if r["resumed_after_s"] is not None]
    summary = {
        "pool": POOL,
        "runs": results,
        "max_s": max(waits) if waits else None,
        "median_s": statistics.median(waits) if waits else None,
        "all_running": all(r["status"] == "Running" and r["distinct"] for r in results),
    }
    print(json.dumps(summary, indent=None if as_json else 2))
    return 0 if summary["all_running"] and len(waits) == len(results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.runs, args.json)))
