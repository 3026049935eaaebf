"""An agent bounded by vCenter, not by threads (issue 14, item 5).

The waiting VM activities are coroutines: a wait on a vCenter task holds no thread, so an
agent with two threads clones six VMs at once; what bounds them is vCenter's per-host limit
(a host chosen by the agent), a compute cluster's share of it (DRS places the VM), and the
agent's global cap (the worker's concurrent tasks). Measured on real simulators whose clones
take 2 s, from each vm_create's own heartbeats (the clone task's start) and its return.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.vsphere.session import SessionPool
from activities.vsphere.vm import VmActivities
from domain.sealing import AgentKey
from domain.vm import CreateVmRequest, FolderRequest, PlacementRequest, SweepRequest, VmInfo
from plumbing.settings import Settings
from tests.conftest import GATEWAY
from tests.integration.test_vm import credentials, simple_request
from tests.support import TEMPLATE, Vcsim
from workers.gateway_agent import load_key

pytestmark = [
    pytest.mark.integration,
    # (a cap above the threads is the point: the SDK warns about it)
    pytest.mark.filterwarnings("ignore:Worker max_concurrent_activities is"),
]

CLONE_MS = 2000


@pytest.fixture(scope="module")
def slow_sim(workdir: Path) -> Iterator[Vcsim]:
    """Two compute clusters of three hosts: DRS off in DC0_C0 (the agent picks hosts), on in
    DC0_C1; clones take 2 s."""
    args = ["-clusters", "2", "-hosts", "3", "-no-drs", "DC0_C0"]
    s = Vcsim(workdir, args=[*args, "-task-delay", f"CloneVM_Task={CLONE_MS}"]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key(settings: Settings) -> AgentKey:
    return load_key(settings, GATEWAY)


class Agent:
    """VmActivities on `threads` threads, with each vm_create's clone interval recorded."""

    def __init__(self, sim: Vcsim, key: AgentKey, threads: int, **limits: int) -> None:
        self.pool = SessionPool()
        self.executor = ThreadPoolExecutor(threads)
        self.acts = VmActivities(key, self.pool, executor=self.executor, **limits)
        self.creds = credentials(sim, key.public_bytes)
        self.folder_name = f"conc-{uuid.uuid4().hex[:6]}"
        self.spans: dict[str, tuple[float, float]] = {}

    async def prepare(self, cluster: str) -> tuple[Any, str]:
        env = ActivityEnvironment()
        refs = await asyncio.to_thread(
            env.run,
            self.acts.resolve_placement,
            PlacementRequest(
                credentials=self.creds,
                datacenter="DC0",
                template=TEMPLATE,
                domains=[(cluster, "Resources", "LocalDS_0", "VM Network")],
            ),
        )
        folder = await asyncio.to_thread(
            env.run,
            self.acts.ensure_folder,
            FolderRequest(credentials=self.creds, datacenter="DC0", name=self.folder_name),
        )
        return refs, folder.ref

    async def create(self, request: CreateVmRequest) -> VmInfo:
        env = ActivityEnvironment()
        began: list[float] = []

        def beat(*details: Any) -> None:
            if details and details[0].get("stage") == "clone" and details[0].get("task"):
                began.append(time.monotonic())

        env.on_heartbeat = beat
        info: VmInfo = await env.run(self.acts.create, request)
        self.spans[request.name] = (began[0], time.monotonic())
        return info

    async def cleanup(self) -> None:
        env = ActivityEnvironment()
        await env.run(
            self.acts.sweep,
            SweepRequest(credentials=self.creds, datacenter="DC0", cluster_id="cluster/conc"),
        )
        self.pool.close_all()
        self.executor.shutdown()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one moment."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def requests(agent: Agent, refs: Any, folder: str, n: int, **fields: Any) -> list[CreateVmRequest]:
    return [
        simple_request(agent.creds, refs, folder, f"{agent.folder_name}-{i}", "conc").model_copy(
            update={k: (v(i) if callable(v) else v) for k, v in fields.items()}
        )
        for i in range(n)
    ]


async def test_waits_hold_no_thread(slow_sim: Vcsim, key: AgentKey) -> None:
    """Two threads, six clones on three hosts: all six run at once (one wave, not three)."""
    agent = Agent(slow_sim, key, threads=2)
    try:
        refs, folder = await agent.prepare("DC0_C0")
        started = time.monotonic()
        infos = await asyncio.gather(
            *(agent.create(r) for r in requests(agent, refs, folder, 6, host_slot=lambda i: i))
        )
        wall = time.monotonic() - started
        assert len({i.ref for i in infos}) == 6
        assert most_at_once(list(agent.spans.values())) == 6
        assert wall < 2 * CLONE_MS / 1000, wall  # with a thread per wait: 3 waves, 6 s
    finally:
        await agent.cleanup()


@pytest.mark.parametrize(
    ("cluster", "per_host", "host_slot", "at_once"),
    [
        # DRS off, every node to the same host, two operations per host: two by two
        ("DC0_C0", 2, 0, 2),
        # DRS on (it picks the host): one operation per host of the cluster's three
        ("DC0_C1", 1, None, 3),
    ],
    ids=["chosen-host", "drs-cluster"],
)
async def test_the_per_host_limit_bounds_clones(
    slow_sim: Vcsim, key: AgentKey, cluster: str, per_host: int, host_slot: Any, at_once: int
) -> None:
    agent = Agent(slow_sim, key, threads=8, max_ops_per_host=per_host)
    try:
        refs, folder = await agent.prepare(cluster)
        batch = requests(agent, refs, folder, 6, host_slot=host_slot)
        infos = await asyncio.gather(*(agent.create(r) for r in batch))
        if host_slot is not None:
            assert len({i.host for i in infos}) == 1
        assert most_at_once(list(agent.spans.values())) == at_once
    finally:
        await agent.cleanup()


@workflow.defn(sandboxed=False)
class CreateOne:
    @workflow.run
    async def run(self, request: CreateVmRequest, queue: str) -> VmInfo:
        return await workflow.execute_activity(
            "vm_create",
            request,
            result_type=VmInfo,
            task_queue=queue,
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )


async def test_the_global_cap_bounds_an_agent_with_fewer_threads(
    slow_sim: Vcsim, key: AgentKey, temporal: WorkflowEnvironment
) -> None:
    """Through Temporal: a worker with two threads and a cap of three tasks runs six creates
    in two waves of three (the cap, not the threads, decides)."""
    agent = Agent(slow_sim, key, threads=2)
    client: Client = temporal.client
    queue = f"conc-{uuid.uuid4().hex[:8]}"
    try:
        refs, folder = await agent.prepare("DC0_C0")
        batch = requests(agent, refs, folder, 6, host_slot=lambda i: i)
        async with (
            Worker(client, task_queue=queue, workflows=[CreateOne]),
            Worker(
                client,
                task_queue=queue + "-agent",
                activities=agent.acts.all(),
                activity_executor=agent.executor,
                max_concurrent_activities=3,
            ),
        ):
            started = time.monotonic()
            handles = [
                await client.start_workflow(
                    CreateOne.run,
                    args=[r, queue + "-agent"],
                    id=f"{queue}-{i}",
                    task_queue=queue,
                )
                for i, r in enumerate(batch)
            ]
            infos = [await h.result() for h in handles]
            wall = time.monotonic() - started
        assert len({i.ref for i in infos}) == 6
        # two waves of 2 s clones: more than one wave, less than three
        assert 2 * CLONE_MS / 1000 <= wall < 3 * CLONE_MS / 1000 + 1.5, wall
    finally:
        await agent.cleanup()
