"""Abort at several points and an agent killed mid-deploy, on a simulator whose clones take time."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from domain.lifecycle import ClusterState, ClusterStatus, Timing
from plumbing.settings import Settings
from starters.client import KubegateClient
from tests.conftest import GATEWAY
from tests.integration.test_cluster import (
    datastore_files,
    make_pool,
    owned_vms,
    static_spec,
)
from tests.support import (
    INVENTORY,
    Vcsim,
    agent_policy,
    configure_system_gateway,
    ensure_account,
    record_history,
    system_gateway,
)
from workers.gateway_agent import load_key, policy_path

pytestmark = pytest.mark.integration

CLONE_MS = 2500
#: gateway 'crash' shows its agent gone after this silence
SILENCE = 5
CRASH_TIMING = Timing(heartbeat_seconds=3, agent_silence_seconds=SILENCE)


@pytest.fixture(scope="module")
def slow(workdir: Path) -> Iterator[Vcsim]:
    """Clones take 2.5 s and powering on the joining nodes 1.5 s; both can be cancelled."""
    sim = Vcsim(
        workdir,
        args=[*INVENTORY, "-task-delay", f"CloneVM_Task={CLONE_MS},PowerOnMultiVM_Task=1500"],
    ).start()
    yield sim
    sim.stop()


async def deploy(
    kubegate: KubegateClient, sim: Vcsim, name: str, pool: str, gateway: str = GATEWAY
) -> None:
    spec = static_spec(name, pool)
    spec.cloud_account = await ensure_account(kubegate, sim, gateway)
    await kubegate.deploy_cluster(spec, timing=Timing(heartbeat_seconds=3))


async def wait_for(kubegate: KubegateClient, name: str, what: str, check: object) -> ClusterState:
    return await kubegate.wait_cluster(name, check, timeout=120, interval=0.1)  # type: ignore[arg-type]


async def assert_nothing_left(kubegate: KubegateClient, sim: Vcsim, name: str, pool: str) -> None:
    state = await kubegate.wait_cluster(
        name, lambda s: s.status is ClusterStatus.DELETED, timeout=120
    )
    assert state.reason == "aborted"
    # a clone still running in vCenter would land after the abort: wait past its delay
    await asyncio.sleep(CLONE_MS / 1000 + 1)
    assert owned_vms(sim, f"cluster/{name}") == []
    assert datastore_files(sim, f"{name}-") == []
    si = sim.connect()
    try:
        assert si.content.searchIndex.FindByInventoryPath(f"/DC0/vm/{name}") is None
    finally:
        Vcsim.disconnect(si)
    assert await kubegate.pool_allocations(GATEWAY, pool, owner=f"cluster/{name}") == []


async def test_abort_before_vm_creation(slow: Vcsim, kubegate: KubegateClient) -> None:
    pool = await make_pool(kubegate, "ab-before", 71)
    await deploy(kubegate, slow, "ab-before", pool.name)
    await kubegate.abort_cluster("ab-before")
    await assert_nothing_left(kubegate, slow, "ab-before", pool.name)


async def test_abort_during_first_clone(
    slow: Vcsim, kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    pool = await make_pool(kubegate, "ab-during", 72)
    await deploy(kubegate, slow, "ab-during", pool.name)
    await wait_for(
        kubegate,
        "ab-during",
        "cp-0 cloning",
        lambda s: any(n.name == "ab-during-cp-0" and n.phase == "creating" for n in s.nodes),
    )
    await asyncio.sleep(0.5)  # the clone task is in flight in vCenter
    # what it waits on, as `cluster describe` shows it: the create, its stage and vCenter task
    for _ in range(50):
        flying = [f for f in await kubegate.in_flight("ab-during") if f.activity == "vm_create"]
        if any((f.heartbeat or {}).get("task") for f in flying):
            break
        await asyncio.sleep(0.1)
    beat = next(f for f in flying if (f.heartbeat or {}).get("task"))
    assert beat.heartbeat is not None and str(beat.heartbeat["task"]).startswith("Task:")
    assert "stage=" in beat.said() and beat.attempt >= 1
    await kubegate.abort_cluster("ab-during")
    await assert_nothing_left(kubegate, slow, "ab-during", pool.name)
    state = await kubegate.cluster_state("ab-during")
    create = next(s for s in state.steps if s.name == "create-vms")
    assert create.state.value == "cancelled"
    await record_history(temporal.client, "cluster/ab-during", "cluster_aborted")


async def test_abort_after_vm_creation_while_nodes_start(
    slow: Vcsim, kubegate: KubegateClient
) -> None:
    pool = await make_pool(kubegate, "ab-after", 73)
    await deploy(kubegate, slow, "ab-after", pool.name)
    await wait_for(
        kubegate,
        "ab-after",
        "joining nodes starting",
        lambda s: any(st.name == "readiness" and st.state.value == "running" for st in s.steps),
    )
    assert len(owned_vms(slow, "cluster/ab-after")) == 6  # every VM exists
    await kubegate.abort_cluster("ab-after")
    await assert_nothing_left(kubegate, slow, "ab-after", pool.name)


# -- the gateway agent killed with SIGKILL in the middle of a deployment --------------------


class AgentProcess:
    """A gateway agent in its own process, so it can be killed like a crashed one. Its first
    start may get a pairing code, in a 0600 file of its own (KUBEGATE_PAIRING_CODE_FILE)."""

    def __init__(self, settings: Settings, gateway: str, code: str | None) -> None:
        self.settings, self.gateway = settings, gateway
        self.code_file: Path | None = None
        if code is not None:
            self.code_file = settings.agent_dir(gateway) / "pairing-code"
            fd = os.open(self.code_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(code + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    def paired(self) -> None:
        """The code is used up: remove its file; later starts pair from the key alone."""
        if self.code_file is not None:
            self.code_file.unlink(missing_ok=True)
            self.code_file = None

    def start(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("KUBEGATE_PAIRING_CODE", "KUBEGATE_PAIRING_CODE_FILE")
        }
        env["KUBEGATE_HOME"] = str(self.settings.home)
        env["KUBEGATE_TEMPORAL_ADDRESS"] = self.settings.temporal_address
        # a stopping agent gets no grace: whatever still waits on vCenter stops at once
        env["KUBEGATE_AGENT_SHUTDOWN_GRACE"] = "0"
        if self.code_file is not None:
            env["KUBEGATE_PAIRING_CODE_FILE"] = str(self.code_file)
        log = open(self.settings.home / f"agent-{self.gateway}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "starters.cli", "gateway", "agent", self.gateway],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest_asyncio.fixture
async def crash_agent(
    settings: Settings, kubegate: KubegateClient, slow: Vcsim
) -> AsyncIterator[AgentProcess]:
    """A system gateway 'crash' whose agent (paired with the code at its first start) runs in
    its own process: its key made first and the gateway created with its fingerprint (so it is
    approved as it pairs), its policy allowing the test simulators."""
    settings.home.mkdir(parents=True, exist_ok=True)
    key = load_key(settings, "crash")
    agent_policy(policy_path(settings, "crash"), "crash")
    code = await system_gateway(
        kubegate, "crash", slow, fingerprint=key.fingerprint, timing=CRASH_TIMING
    )
    agent = AgentProcess(settings, "crash", code)
    agent.start()
    assert await kubegate.agent_is_polling("crash", wait=30)
    agent.paired()
    state = await kubegate.gateway_state("crash")
    assert state.agent is not None and state.agent.approved
    assert state.agent.fingerprint == key.fingerprint
    if code is not None:
        await configure_system_gateway(kubegate, "crash", slow)
    yield agent
    agent.stop()


async def test_agent_killed_mid_deploy_resumes_without_duplicates(
    slow: Vcsim, kubegate: KubegateClient, crash_agent: AgentProcess
) -> None:
    pool = await make_pool(kubegate, "crash-pool", 74, gateway="crash")
    await deploy_until_cloning(kubegate, slow, "crashy", pool.name)
    crash_agent.kill()
    await asyncio.sleep(1)
    crash_agent.start()

    state = await settled_running(kubegate, "crashy")
    vms = owned_vms(slow, "cluster/crashy")
    names = sorted(vm["name"] for vm in vms)
    assert names == sorted(n.name for n in state.nodes)  # each node exactly once
    assert len({vm["uuid"] for vm in vms}) == len(vms)
    create = next(s for s in state.steps if s.name == "create-vms")
    assert create.attempts >= 2  # the retry after the crash is visible in the step history

    await kubegate.delete_cluster("crashy")
    await kubegate.wait_cluster("crashy", lambda s: s.status is ClusterStatus.DELETED, timeout=120)
    assert owned_vms(slow, "cluster/crashy") == []
    assert await kubegate.pool_allocations("crash", pool.name) == []


async def test_agent_stopped_with_sigterm_mid_clone_leaves_the_clones_running(
    slow: Vcsim, kubegate: KubegateClient, crash_agent: AgentProcess
) -> None:
    """SIGTERM is not a cancel: the agent stops waiting, vCenter's clones go on (none is
    cancelled), the next agent takes them up, and each node is made exactly once."""
    pool = await make_pool(kubegate, "term-pool", 75, gateway="crash")
    started = datetime.now(UTC)
    await deploy_until_cloning(kubegate, slow, "termy", pool.name)
    crash_agent.stop()  # SIGTERM, waits for the process to end
    crash_agent.start()

    state = await settled_running(kubegate, "termy")
    vms = owned_vms(slow, "cluster/termy")
    assert sorted(vm["name"] for vm in vms) == sorted(n.name for n in state.nodes)
    clones = clone_tasks_since(slow, started)
    assert len(clones) == len(state.nodes), clones  # each clone issued once ...
    assert all(state_ == "success" for state_, _ in clones), clones  # ... and none cancelled

    await kubegate.delete_cluster("termy")
    await kubegate.wait_cluster("termy", lambda s: s.status is ClusterStatus.DELETED, timeout=120)
    assert owned_vms(slow, "cluster/termy") == []


async def deploy_until_cloning(kubegate: KubegateClient, sim: Vcsim, name: str, pool: str) -> None:
    """Deploy a cluster through gateway 'crash' and return while its joiners' clones run in
    vCenter."""
    spec = static_spec(name, pool)
    spec.cloud_account = await ensure_account(kubegate, sim, "crash")
    await kubegate.deploy_cluster(spec, timing=Timing(heartbeat_seconds=3))
    await wait_for(
        kubegate,
        name,
        "second phase cloning",
        lambda s: sum(n.phase == "creating" for n in s.nodes) >= 3,
    )
    await asyncio.sleep(0.8)  # clones in flight in vCenter


async def settled_running(kubegate: KubegateClient, name: str) -> Any:
    """The cluster once Running (or Failed: the assertion shows why)."""
    state = await kubegate.wait_cluster(
        name, lambda s: s.status in (ClusterStatus.RUNNING, ClusterStatus.FAILED), timeout=180
    )
    assert state.status is ClusterStatus.RUNNING, state.error
    return state


def clone_tasks_since(sim: Vcsim, since: datetime) -> list[tuple[str, str]]:
    """(state, error) of every clone task vCenter queued since `since`."""
    si = sim.connect()
    try:
        found = []
        for task in si.RetrieveContent().taskManager.recentTask:
            try:
                info = task.info
            except TypeError:  # vcsim's tasks on a VirtualDiskManager name it as their entity
                continue
            # vcsim names it VirtualMachine.cloneVm, vCenter VirtualMachine.clone
            clone = str(info.descriptionId).startswith("VirtualMachine.clone")
            if clone and info.queueTime >= since:
                found.append((str(info.state), type(info.error).__name__ if info.error else ""))
        return found
    finally:
        Vcsim.disconnect(si)


async def test_agent_killed_mid_rollout_finishes_it_without_duplicates(
    slow: Vcsim, kubegate: KubegateClient, crash_agent: AgentProcess
) -> None:
    """The agent killed while a replacing node's clone runs in vCenter: the rollout goes on
    when it is back, each node made once, each old node removed once, every address kept
    or given back."""
    from tests.integration.test_rollout import spec_of

    pool = await make_pool(kubegate, "crashroll-pool", 76, gateway="crash")
    spec = spec_of("crashroll", pool.name, cp=1, workers=2)
    spec.cloud_account = await ensure_account(kubegate, slow, "crash")
    await kubegate.deploy_cluster(spec, timing=Timing(heartbeat_seconds=3))
    await settled_running(kubegate, "crashroll")
    accepted = await kubegate.upgrade_cluster("crashroll", kubernetes="1.31.0", wait=False)
    await wait_for(
        kubegate,
        "crashroll",
        "a replacing node cloning",
        lambda s: any(n.name.endswith("-r1") and n.phase == "creating" for n in s.nodes),
    )
    await asyncio.sleep(0.8)  # its clone in flight in vCenter
    crash_agent.kill()
    await asyncio.sleep(1)
    crash_agent.start()

    result = await kubegate.wait_change("crashroll", accepted.operation, timeout=240)
    assert sorted(result.removed) == ["crashroll-cp-0", "crashroll-w-0", "crashroll-w-1"]
    state = await kubegate.cluster_state("crashroll")
    vms = owned_vms(slow, "cluster/crashroll")
    assert sorted(vm["name"] for vm in vms) == sorted(n.name for n in state.nodes)
    assert all(vm["name"].endswith("-r1") for vm in vms) and len(vms) == 3
    assert len({vm["uuid"] for vm in vms}) == 3
    assert len(await kubegate.pool_allocations("crash", pool.name)) == 4  # VIP and 3 nodes
    await kubegate.delete_cluster("crashroll")
    await kubegate.wait_cluster(
        "crashroll", lambda s: s.status is ClusterStatus.DELETED, timeout=120
    )
    assert owned_vms(slow, "cluster/crashroll") == []
    assert await kubegate.pool_allocations("crash", pool.name) == []


async def test_a_dead_agent_shows_disconnected_and_a_deploy_waits_for_it_visibly(
    slow: Vcsim, kubegate: KubegateClient, crash_agent: AgentProcess, settings: Settings
) -> None:
    """The agent killed: the gateway shows Disconnected within its silence (get, list and
    the Web UI's status); a deploy meanwhile is taken, and its step says it waits for the
    agent; the agent back, the gateway is Running again and the cluster deploys."""
    from tests.integration.test_rollout import spec_of
    from tests.support import run_cli

    await kubegate.wait_gateway("crash", lambda s: s.agent_connected is True, timeout=60)
    pool = await make_pool(kubegate, "gone-pool", 77, gateway="crash")
    account = await ensure_account(kubegate, slow, "crash")  # (checked on the agent)
    crash_agent.kill()
    killed = time.monotonic()
    state = await kubegate.wait_gateway(
        "crash", lambda s: s.shown_status == "Disconnected", timeout=60
    )
    assert time.monotonic() - killed < SILENCE + 10
    assert state.status.value == "Running" and state.agent_seen_at is not None
    code, output = await run_cli(settings, "gateway", "get", "crash")
    assert code == 0 and "Disconnected" in output and "last seen" in output, output
    listed = [
        e.id
        async for e in kubegate.client.list_workflows(
            "KubegateKind = 'gateway' AND KubegateStatus = 'Disconnected'"
        )
    ]
    assert "gateway/crash" in listed

    spec = spec_of("waits", pool.name, cp=1, workers=1)
    spec.cloud_account = account
    await kubegate.deploy_cluster(spec, timing=Timing(heartbeat_seconds=3))
    waiting = await kubegate.wait_cluster(
        "waits",
        lambda s: any(
            st.state.value == "running" and "waiting for the agent of gateway crash" in st.detail
            for st in s.steps
        ),
        timeout=60,
        interval=0.2,
    )
    assert waiting.status is ClusterStatus.PROVISIONING
    code, output = await run_cli(settings, "cluster", "get", "waits")
    assert "waiting for the agent of gateway crash" in output, output

    crash_agent.start()
    await kubegate.wait_gateway("crash", lambda s: s.shown_status == "Running", timeout=60)
    state = await settled_running(kubegate, "waits")
    assert not any("waiting for the agent" in st.detail for st in state.steps)
    await kubegate.delete_cluster("waits")
    await kubegate.wait_cluster("waits", lambda s: s.status is ClusterStatus.DELETED, timeout=120)
    assert await kubegate.pool_allocations("crash", pool.name) == []
