"""VM activities against real simulators: through Temporal (a tiny workflow on the test agent)
and, for heartbeat details and cancellation, through temporalio's ActivityEnvironment."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.bootstrap import generate_secrets
from activities.secrets import secrets_binding
from activities.vsphere.session import SessionPool
from activities.vsphere.vm import VmActivities
from activities.vsphere.watch import watcher_for, watcher_requests
from domain.account import VCenterCredentials, VCenterEndpoint, password_binding
from domain.bootstrap import NodeBootstrap, NodeNetwork, decode
from domain.sealing import AgentKey, seal
from domain.vm import (
    MARK_CLUSTER,
    MARK_NODE,
    MARK_POOL,
    CreateVmRequest,
    DestroyResult,
    DestroyVmRequest,
    FolderRequest,
    FolderResult,
    OwnerMark,
    PlacementRefs,
    PlacementRequest,
    PowerOnRequest,
    ReadinessRequest,
    ReadinessResult,
    SweepRequest,
    SweepResult,
    VmInfo,
    instance_uuid,
)
from plumbing.settings import Settings
from tests.conftest import GATEWAY
from tests.support import TEMPLATE, Vcsim
from workers.gateway_agent import load_key

pytestmark = pytest.mark.integration

#: vCenter requests one vm_create may cost (find, read, clone, reconfigure, power on, and the
#: template facts on the first clone); task waits cost none (shared watcher).
CREATE_BUDGET = 8

#: ... and one with wait_guest: one read of the guest after power-on (ready at once in vcsim).
CREATE_WAIT_BUDGET = CREATE_BUDGET + 1

#: vm_power_on: one read of the VMs and their datacenter, the power-on(s), one read after.
POWER_ON_BUDGET = 4

DHCP = "VM Network=10.20.0.100-10.20.0.199,DC0_DVPG0=10.21.0.100-10.21.0.199"


@workflow.defn(sandboxed=False)
class CallVmActivity:
    """Runs one VM activity on a test agent's queue (a real Temporal run). The activities
    run as the agent runs them, without its guard: the guard refuses work for any workflow
    that is not its gateway's lifecycle (tests/integration/test_trust.py)."""

    @workflow.run
    async def run(self, name: str, request: Any, queue: str) -> Any:
        return await workflow.execute_activity(
            name,
            request,
            task_queue=queue,
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=2),
        )


@pytest.fixture(scope="module")
def sim(workdir: Path) -> Iterator[Vcsim]:
    """A simulator with DHCP ranges, synchronous tasks."""
    s = Vcsim(workdir, args=["-dhcp", DHCP]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow_sim(workdir: Path) -> Iterator[Vcsim]:
    """A simulator whose clones take 4 s and can be cancelled."""
    s = Vcsim(workdir, args=["-dhcp", DHCP, "-task-delay", "CloneVM_Task=4000"]).start()
    yield s
    s.stop()


#: the workflow id every call() runs under (one at a time): cluster secrets are bound to it
LIFECYCLE = "vm-test/lifecycle"


def credentials(sim: Vcsim, key_public: bytes) -> VCenterCredentials:
    endpoint = VCenterEndpoint(server="127.0.0.1", port=sim.info["port"], thumbprint=sim.thumbprint)
    user = "administrator@vsphere.local"
    use = password_binding(GATEWAY, "vm-test", endpoint, user)
    return VCenterCredentials(
        endpoint=endpoint, username=user, password=seal(sim.password, key_public, use)
    )


def sealed_secrets(key: AgentKey, lifecycle: str = LIFECYCLE) -> Any:
    """Fresh cluster secrets sealed to the agent for one lifecycle (ActivityEnvironment's
    workflow id is 'test')."""
    use = secrets_binding(key.gateway, lifecycle)
    return seal(generate_secrets().model_dump_json(), key.public_bytes, use)


AGENT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def agent_key(settings: Settings, sessions: SessionPool) -> Iterator[AgentKey]:
    key = load_key(settings, GATEWAY)
    with ThreadPoolExecutor(max_workers=8) as executor:
        AGENT.update(activities=VmActivities(key, sessions), executor=executor)
        yield key
    AGENT.clear()


async def call(client: Client, name: str, request: Any, result: type[Any]) -> Any:
    """Run one activity through Temporal on a test agent (the test gateway's key)."""
    queue = f"vm-test-{uuid.uuid4().hex[:8]}"
    agent = AGENT["activities"]
    async with (
        Worker(client, task_queue=queue, workflows=[CallVmActivity]),
        Worker(
            client,
            task_queue=queue + "-agent",
            activities=agent.all(),
            activity_executor=AGENT["executor"],
        ),
    ):
        out = await client.execute_workflow(
            CallVmActivity.run,
            args=[name, request, queue + "-agent"],
            id=LIFECYCLE,
            task_queue=queue,
        )
    return result.model_validate(out)


def bootstrap(name: str, uid: str, network: NodeNetwork) -> NodeBootstrap:
    return NodeBootstrap(
        cluster="vmtest",
        hostname=name,
        instance_id=uid,
        role="worker",
        network=network,
        vip="10.20.0.5",
        first_control_plane="10.20.0.6",
        kubernetes_version="1.30.4",
    )


def vm_by_uuid(si: Any, uid: str) -> Any:
    return si.RetrieveContent().searchIndex.FindByUuid(None, uid, True, True)


def datastore_dirs(si: Any, datastore: str) -> list[str]:
    ds = si.RetrieveContent().searchIndex.FindByInventoryPath(f"/DC0/datastore/{datastore}")
    task = ds.browser.SearchDatastoreSubFolders_Task(
        f"[{datastore}]", vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"])
    )
    WaitForTask(task)
    return [f.path for r in task.info.result for f in r.file or []]


async def test_create_wait_recreate_destroy(
    sim: Vcsim, temporal: WorkflowEnvironment, sessions: SessionPool, agent_key: AgentKey
) -> None:
    client = temporal.client
    creds = credentials(sim, agent_key.public_bytes)
    placement = await call(
        client,
        "vm_resolve_placement",
        PlacementRequest(
            credentials=creds,
            datacenter="DC0",
            template=TEMPLATE,
            domains=[
                ("DC0_C0", "", "LocalDS_0", "VM Network"),
                ("DC0_C1", "DC0_C1_RP1", "LocalDS_1", "DC0_DVPG0"),
            ],
        ),
        PlacementRefs,
    )
    assert placement.vcenter_requests <= 3 + 3  # the login (3) and the resolution (3)
    assert placement.domains[1].network.startswith("DistributedVirtualPortgroup:")
    folder = await call(
        client,
        "vm_ensure_folder",
        FolderRequest(credentials=creds, datacenter="DC0", name="vmtest"),
        FolderResult,
    )
    again = await call(
        client,
        "vm_ensure_folder",
        FolderRequest(credentials=creds, datacenter="DC0", name="vmtest"),
        FolderResult,
    )
    assert folder.created and not again.created and again.ref == folder.ref
    assert again.vcenter_requests == 1

    secrets = sealed_secrets(agent_key)
    static = NodeNetwork(
        mode="static",
        address="10.30.0.11",
        prefix=24,
        gateway="10.30.0.1",
        nameservers=["10.30.0.2"],
        search_domains=["lab.local"],
    )
    nodes = {
        "vmtest-cp-0": (static, placement.domains[0], "cp"),
        "vmtest-w-0": (NodeNetwork(mode="dhcp"), placement.domains[1], "workers"),
    }
    requests = {}
    for name, (network, domain, pool) in nodes.items():
        uid = instance_uuid("cluster/vmtest", name)
        requests[name] = CreateVmRequest(
            credentials=creds,
            name=name,
            instance_uuid=uid,
            owner=OwnerMark(cluster_id="cluster/vmtest", pool=pool, node=name),
            template=placement.template,
            folder=folder.ref,
            domain=domain,
            cpu=4,
            memory_mb=6144,
            disk_gb=40,
            network=network,
            bootstrap=bootstrap(name, uid, network),
            secrets=secrets,
        )
    watcher_before = watcher_requests()
    created = {n: await call(client, "vm_create", r, VmInfo) for n, r in requests.items()}
    costs = {n: info.vcenter_requests for n, info in created.items()}
    print(f"\nvm_create requests: {costs}; shared watcher: {watcher_requests() - watcher_before}")
    assert all(c <= CREATE_BUDGET for c in costs.values()), costs

    ready = await call(
        client,
        "vm_wait_ready",
        ReadinessRequest(
            credentials=creds,
            nodes=[
                (created["vmtest-cp-0"].ref, "vmtest-cp-0", "10.30.0.11"),
                (created["vmtest-w-0"].ref, "vmtest-w-0", None),
            ],
            timeout_seconds=30,
        ),
        ReadinessResult,
    )
    by_name = {n.name: n for n in ready.nodes}
    assert by_name["vmtest-cp-0"].address == "10.30.0.11"
    assert by_name["vmtest-w-0"].address is not None
    assert by_name["vmtest-w-0"].address.startswith("10.21.0.")
    assert by_name["vmtest-w-0"].hostname == "vmtest-w-0"

    # independent check with pyvmomi
    si = sim.connect()
    try:
        for name, (_network, domain, pool) in nodes.items():
            vm = vm_by_uuid(si, requests[name].instance_uuid)
            assert vm is not None and vm.name == name
            hw = vm.config.hardware
            assert (hw.numCPU, hw.memoryMB) == (4, 6144)
            disk = next(d for d in hw.device if isinstance(d, vim.vm.device.VirtualDisk))
            assert disk.capacityInKB == 40 * 1024 * 1024
            assert disk.backing.fileName.startswith(f"[{vm.datastore[0].name}] {name}/")
            nic = next(d for d in hw.device if isinstance(d, vim.vm.device.VirtualEthernetCard))
            if domain.network.startswith("DistributedVirtualPortgroup:"):
                assert nic.backing.port.portgroupKey == domain.network.split(":")[1]
            else:
                assert nic.backing.network._moId == domain.network.split(":")[1]
            assert f"Folder:{vm.parent._moId}" == folder.ref
            assert f"ResourcePool:{vm.resourcePool._moId}" == domain.resource_pool
            assert [f"Datastore:{d._moId}" for d in vm.datastore] == [domain.datastore]
            assert vm.config.instanceUuid == requests[name].instance_uuid
            extra = {o.key: o.value for o in vm.config.extraConfig}
            assert extra[MARK_CLUSTER] == "cluster/vmtest" and extra[MARK_NODE] == name
            assert extra[MARK_POOL] == pool
            assert f"{MARK_NODE}={name}" in vm.config.annotation
            metadata = json.loads(decode(extra["guestinfo.metadata"]))
            assert metadata["local-hostname"] == name
            assert vm.guest.hostName == name
            assert vm.runtime.powerState == "poweredOn"
    finally:
        sim.disconnect(si)

    # a second run finds the same VM, finished: one VM, two requests
    second = await call(client, "vm_create", requests["vmtest-cp-0"], VmInfo)
    assert second.ref == created["vmtest-cp-0"].ref
    assert second.vcenter_requests <= 2

    for name, request in requests.items():
        result = await call(
            client,
            "vm_destroy",
            DestroyVmRequest(
                credentials=creds,
                name=name,
                instance_uuid=request.instance_uuid,
                folder=folder.ref,
            ),
            DestroyResult,
        )
        assert result.destroyed == [created[name].ref]
    gone = await call(
        client,
        "vm_destroy",
        DestroyVmRequest(
            credentials=creds,
            name="vmtest-cp-0",
            instance_uuid=requests["vmtest-cp-0"].instance_uuid,
            folder=folder.ref,
        ),
        DestroyResult,
    )
    assert gone.destroyed == []
    si = sim.connect()
    try:
        for name in nodes:
            assert vm_by_uuid(si, requests[name].instance_uuid) is None
        for ds in ("LocalDS_0", "LocalDS_1"):
            left = [p for p in datastore_dirs(si, ds) if "vmtest" in p]
            assert left == [], left
    finally:
        sim.disconnect(si)
    removed = await call(
        client,
        "vm_remove_folder",
        FolderRequest(credentials=creds, datacenter="DC0", name="vmtest"),
        FolderResult,
    )
    assert removed.ref == folder.ref
    missing = await call(
        client,
        "vm_remove_folder",
        FolderRequest(credentials=creds, datacenter="DC0", name="vmtest"),
        FolderResult,
    )
    assert missing.ref == ""


def simple_request(
    creds: VCenterCredentials, refs: PlacementRefs, folder: str, name: str, cluster: str
) -> CreateVmRequest:
    return CreateVmRequest(
        credentials=creds,
        name=name,
        instance_uuid=instance_uuid(f"cluster/{cluster}", name),
        owner=OwnerMark(cluster_id=f"cluster/{cluster}", pool="workers", node=name),
        template=refs.template,
        folder=folder,
        domain=refs.domains[0],
        cpu=2,
        memory_mb=4096,
        disk_gb=20,
        network=NodeNetwork(mode="dhcp"),
        power_on=False,
    )


def run_activity(env: ActivityEnvironment, fn: Any, *args: Any) -> Any:
    """Run an activity, sync or async (then on a loop of its own), in the environment."""
    out = env.run(fn, *args)
    return asyncio.run(out) if inspect.iscoroutine(out) else out


def setup(sim: Vcsim, key: AgentKey, pool: SessionPool, folder_name: str) -> tuple[Any, Any, Any]:
    acts = VmActivities(key, pool)
    creds = credentials(sim, key.public_bytes)
    env = ActivityEnvironment()
    refs = run_activity(
        env,
        acts.resolve_placement,
        PlacementRequest(
            credentials=creds,
            datacenter="DC0",
            template=TEMPLATE,
            domains=[("DC0_C0", "Resources", "LocalDS_0", "VM Network")],
        ),
    )
    folder = run_activity(
        env,
        acts.ensure_folder,
        FolderRequest(credentials=creds, datacenter="DC0", name=folder_name),
    )
    return acts, creds, (refs, folder.ref)


def test_sweep_finds_marked_vms_only(sim: Vcsim, agent_key: AgentKey) -> None:
    pool = SessionPool()
    acts, creds, (refs, folder) = setup(sim, agent_key, pool, "sweeptest")
    env = ActivityEnvironment()
    try:
        ours = [
            run_activity(env, acts.create, simple_request(creds, refs, folder, f"sw-{i}", "sweep"))
            for i in range(2)
        ]
        theirs = run_activity(
            env, acts.create, simple_request(creds, refs, folder, "other-0", "other")
        )
        dry = run_activity(
            env,
            acts.sweep,
            SweepRequest(
                credentials=creds, datacenter="DC0", cluster_id="cluster/sweep", dry_run=True
            ),
        )
        assert sorted(v.ref for v in dry.vms) == sorted(v.ref for v in ours)
        assert dry.destroyed == [] and dry.vcenter_requests <= 6
        swept: SweepResult = run_activity(
            env,
            acts.sweep,
            SweepRequest(credentials=creds, datacenter="DC0", cluster_id="cluster/sweep"),
        )
        assert sorted(swept.destroyed) == sorted(v.ref for v in ours)
        si = sim.connect()
        try:
            for v in ours:
                assert vm_by_uuid(si, v.instance_uuid) is None
            assert vm_by_uuid(si, theirs.instance_uuid) is not None
        finally:
            sim.disconnect(si)
        # the folder still holds the other cluster's VM: not removed, and says what is left
        with pytest.raises(Exception, match="other-0"):
            run_activity(
                env,
                acts.remove_folder,
                FolderRequest(credentials=creds, datacenter="DC0", name="sweeptest"),
            )
    finally:
        pool.close_all()


class Crash(BaseException):
    """Stands in for kill -9 of the worker: nothing in the activity may catch it."""


def test_retry_reattaches_to_the_clone_in_flight(slow_sim: Vcsim, agent_key: AgentKey) -> None:
    pool = SessionPool()
    acts, creds, (refs, folder) = setup(slow_sim, agent_key, pool, "reattach")
    request = simple_request(creds, refs, folder, "ra-0", "reattach")
    first = ActivityEnvironment()
    beats: list[dict[str, Any]] = []

    def crash_once_cloning(*details: Any) -> None:
        beats.append(details[0])
        if details[0].get("task"):
            raise Crash

    first.on_heartbeat = crash_once_cloning
    try:
        with pytest.raises(Crash):
            run_activity(first, acts.create, request)
        task = beats[-1]["task"]
        assert beats[-1]["stage"] == "clone" and task.startswith("Task:")

        second = ActivityEnvironment()
        second.info = dataclasses.replace(second.info, heartbeat_details=[beats[-1]])
        second_beats: list[dict[str, Any]] = []
        second.on_heartbeat = lambda *d: second_beats.append(d[0])
        info = run_activity(second, acts.create, request)

        assert second_beats[0]["task"] == task  # re-attached, no second clone
        si = slow_sim.connect()
        try:
            content = si.RetrieveContent()
            clones = [
                t
                for t in content.taskManager.recentTask
                if t.info.descriptionId.endswith("cloneVm") and t.info.entityName
            ]
            assert vm_by_uuid(si, request.instance_uuid)._moId == info.ref.split(":")[1]
            named = [
                c
                for c in content.viewManager.CreateContainerView(
                    content.rootFolder, [vim.VirtualMachine], True
                ).view
                if c.name == "ra-0"
            ]
            assert len(named) == 1, clones
        finally:
            slow_sim.disconnect(si)
        env = ActivityEnvironment()
        run_activity(
            env,
            acts.destroy,
            DestroyVmRequest(
                credentials=creds, name="ra-0", instance_uuid=request.instance_uuid, folder=folder
            ),
        )
    finally:
        pool.close_all()


def test_cancel_mid_clone_cancels_the_vcenter_task(slow_sim: Vcsim, agent_key: AgentKey) -> None:
    pool = SessionPool()
    acts, creds, (refs, folder) = setup(slow_sim, agent_key, pool, "cancel")
    request = simple_request(creds, refs, folder, "cx-0", "cancel")
    env = ActivityEnvironment()
    beats: list[dict[str, Any]] = []
    cloning = threading.Event()

    def beat(*details: Any) -> None:
        beats.append(details[0])
        if details[0].get("task"):
            cloning.set()

    env.on_heartbeat = beat
    try:
        loop = asyncio.new_event_loop()
        with ThreadPoolExecutor(1) as executor:
            future = executor.submit(loop.run_until_complete, env.run(acts.create, request))
            assert cloning.wait(10)
            started = time.monotonic()
            loop.call_soon_threadsafe(env.cancel)  # (the activity is a coroutine on that loop)
            with pytest.raises(CancelledError):
                future.result(timeout=20)
            assert time.monotonic() - started < 3.5  # did not sit out the 4 s clone
        loop.close()
        task = next(b["task"] for b in beats if b.get("task"))
        si = slow_sim.connect()
        try:
            task_obj = vim.Task(task.split(":")[1], si._stub)
            assert task_obj.info.state == "error" and task_obj.info.cancelled
        finally:
            slow_sim.disconnect(si)
        result = run_activity(
            ActivityEnvironment(),
            acts.destroy,
            DestroyVmRequest(
                credentials=creds,
                name="cx-0",
                instance_uuid=request.instance_uuid,
                folder=folder,
                tasks=[task],
            ),
        )
        assert result.destroyed == []
        si = slow_sim.connect()
        try:
            assert vm_by_uuid(si, request.instance_uuid) is None
            assert (
                si.RetrieveContent().searchIndex.FindByInventoryPath("/DC0/vm/cancel/cx-0") is None
            )
        finally:
            slow_sim.disconnect(si)
    finally:
        pool.close_all()


def test_watcher_dies_with_its_session_and_a_new_one_serves(
    sim: Vcsim, agent_key: AgentKey
) -> None:
    pool = SessionPool(check_after=3600.0)  # never checks proactively
    acts, creds, (refs, folder) = setup(sim, agent_key, pool, "watchdeath")
    env = ActivityEnvironment()
    try:
        run_activity(env, acts.create, simple_request(creds, refs, folder, "wd-0", "watchdeath"))
        session = pool.get(creds.endpoint, creds.username, sim.password)
        old = watcher_for(session)
        admin = sim.connect()
        admin.content.sessionManager.TerminateSession([session.key])
        sim.disconnect(admin)

        second = run_activity(
            env, acts.create, simple_request(creds, refs, folder, "wd-1", "watchdeath")
        )
        assert second.ref.startswith("VirtualMachine:") and pool.logins == 2
        deadline = time.monotonic() + 15
        while old.alive and time.monotonic() < deadline:
            time.sleep(0.2)
        assert isinstance(old.error, vim.fault.NotAuthenticated), old.error
        fresh = pool.get(creds.endpoint, creds.username, sim.password)
        assert fresh is not session and watcher_for(fresh) is not old
        swept = run_activity(
            env,
            acts.sweep,
            SweepRequest(credentials=creds, datacenter="DC0", cluster_id="cluster/watchdeath"),
        )
        assert len(swept.destroyed) == 2
    finally:
        pool.close_all()


def guest_request(
    creds: VCenterCredentials,
    refs: PlacementRefs,
    folder: str,
    name: str,
    secrets: Any,
    address: str | None = None,
    *,
    hostname: str | None = None,
) -> CreateVmRequest:
    """A node whose cloud-init metadata names `hostname` (default: the node's name)."""
    network = (
        NodeNetwork(mode="static", address=address, prefix=24, gateway="10.30.0.1")
        if address
        else NodeNetwork(mode="dhcp")
    )
    request = simple_request(creds, refs, folder, name, "guests")
    boot = bootstrap(hostname or name, request.instance_uuid, network)
    return request.model_copy(
        update={"network": network, "bootstrap": boot, "secrets": secrets, "power_on": True}
    )


def task_description(task: Any) -> str:
    """The task's descriptionId ('' where pyVmomi cannot read vcsim's info)."""
    try:
        return str(task.info.descriptionId)
    except TypeError:  # vcsim's tasks on a VirtualDiskManager name it as their entity
        return ""


def test_create_waits_for_the_guest_static_and_dhcp(sim: Vcsim, agent_key: AgentKey) -> None:
    pool = SessionPool()
    acts, creds, (refs, folder) = setup(sim, agent_key, pool, "guestwait")
    secrets = sealed_secrets(agent_key, "test")
    env = ActivityEnvironment()
    beats: list[dict[str, Any]] = []
    env.on_heartbeat = lambda *d: beats.append(d[0])
    try:
        static = guest_request(creds, refs, folder, "gw-0", secrets, "10.30.0.21")
        dhcp = guest_request(creds, refs, folder, "gw-1", secrets)
        infos: dict[str, VmInfo] = {}
        for request in (static, dhcp):
            infos[request.name] = run_activity(
                env, acts.create, request.model_copy(update={"wait_guest": True})
            )
        costs = {n: i.vcenter_requests for n, i in infos.items()}
        print(f"\nvm_create(wait_guest) requests: {costs}")
        assert infos["gw-0"].address == "10.30.0.21"
        assert (infos["gw-1"].address or "").startswith("10.20.0.")
        for name, info in infos.items():
            assert info.hostname == name and info.power_state == "poweredOn"
            assert info.host.startswith("HostSystem:") and info.instance_uuid
            assert info.vcenter_requests <= CREATE_WAIT_BUDGET
        assert any(b.get("stage") == "guest" for b in beats)

        # found on again: what the first read shows is enough (find + read)
        again = run_activity(env, acts.create, static.model_copy(update={"wait_guest": True}))
        assert again.ref == infos["gw-0"].ref and again.vcenter_requests <= 2

        # the guest never reports the node's hostname: retryable NotReady naming what it says
        wrong = guest_request(creds, refs, folder, "gw-2", secrets, hostname="someone-else")
        started = time.monotonic()
        with pytest.raises(ApplicationError) as caught:
            run_activity(
                env,
                acts.create,
                wrong.model_copy(update={"wait_guest": True, "guest_timeout_seconds": 1}),
            )
        assert time.monotonic() - started < 10
        assert caught.value.type == "NotReady" and not caught.value.non_retryable
        assert "gw-2 reports address 10.20.0." in str(caught.value)
        assert "hostname someone-else, power poweredOn" in str(caught.value)
    finally:
        run_activity(
            env,
            acts.sweep,
            SweepRequest(credentials=creds, datacenter="DC0", cluster_id="cluster/guests"),
        )
        pool.close_all()


async def test_power_on_several_vms_and_wait_for_their_guests(
    sim: Vcsim, temporal: WorkflowEnvironment, sessions: SessionPool, agent_key: AgentKey
) -> None:
    pool = SessionPool()
    acts, creds, (refs, folder) = setup(sim, agent_key, pool, "poweron")
    secrets = sealed_secrets(agent_key, "test")
    env = ActivityEnvironment()
    try:
        requests = [
            guest_request(creds, refs, folder, "po-0", secrets, "10.30.0.31"),
            guest_request(creds, refs, folder, "po-1", secrets),
            guest_request(creds, refs, folder, "po-2", secrets, "10.30.0.33"),
        ]
        created = [
            await env.run(acts.create, r.model_copy(update={"power_on": i == 0}))
            for i, r in enumerate(requests)
        ]
        assert [c.power_state for c in created] == ["poweredOn", "poweredOff", "poweredOff"]
        nodes = [
            (created[0].ref, "po-0", "10.30.0.31"),
            (created[1].ref, "po-1", None),
            (created[2].ref, "po-2", "10.30.0.33"),
        ]
        # through Temporal: the agent registers vm_power_on; one on already, two by one
        # PowerOnMultiVM_Task
        result = await call(
            temporal.client,
            "vm_power_on",
            PowerOnRequest(credentials=creds, nodes=nodes, timeout_seconds=30),
            ReadinessResult,
        )
        by_name = {n.name: n for n in result.nodes}
        assert [n.ref for n in result.nodes] == [c.ref for c in created]
        assert by_name["po-0"].address == "10.30.0.31"
        assert (by_name["po-1"].address or "").startswith("10.20.0.")
        assert by_name["po-2"].address == "10.30.0.33"
        for name, info in by_name.items():
            assert info.hostname == name and info.power_state == "poweredOn"
            assert info.host.startswith("HostSystem:")

        # all on already: one read; one off: its own PowerOnVM_Task
        again = await env.run(acts.power_on, PowerOnRequest(credentials=creds, nodes=nodes))
        si = sim.connect()
        try:
            assert any(
                "powerOnMultiVM" in task_description(t)
                for t in si.RetrieveContent().taskManager.recentTask
            )
            WaitForTask(vm_by_uuid(si, requests[1].instance_uuid).PowerOffVM_Task())
        finally:
            sim.disconnect(si)
        one = await env.run(acts.power_on, PowerOnRequest(credentials=creds, nodes=nodes[:2]))
        assert [n.power_state for n in one.nodes] == ["poweredOn", "poweredOn"]
        print(
            f"\nvm_power_on requests: 1 on + 2 off {result.vcenter_requests}, "
            f"all on {again.vcenter_requests}, 1 on + 1 off {one.vcenter_requests}"
        )
        assert again.vcenter_requests == 1
        assert one.vcenter_requests <= 3
        assert result.vcenter_requests <= POWER_ON_BUDGET + 3  # the agent may log in first
    finally:
        await env.run(
            acts.sweep,
            SweepRequest(credentials=creds, datacenter="DC0", cluster_id="cluster/guests"),
        )
        pool.close_all()
