"""A stand-in world for workflow tests: activities registered under the real names, answering
from memory as vCenter, the agent and the IP pools would, recording every call in order.

The agent's stand-ins run behind the agent's real guard interceptor with its gateway check
left out, so their results are signed with a real agent key exactly as the agent signs them,
and the workflows verify them as in production. Nothing here talks to vCenter.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import ipaddress
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowHistory,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.guard import AgentGuard, GuardInterceptor, PolicyFile
from activities.secrets import secrets_binding
from domain import names
from domain.account import (
    Placement,
    SealedSecret,
    VCenterCredentials,
    VCenterEndpoint,
    password_binding,
)
from domain.bootstrap import RenderedNode, RenderRequest, RenderResult, SecretsRequest
from domain.gateway import GatewayConfig, GatewayState, GatewayStatus, default_account_name
from domain.health import TOOLS_RUNNING, InspectRequest, InspectResult, VmSeen
from domain.ipam import (
    AllocateAddresses,
    AllocateResult,
    AllocationsPage,
    IpPoolSpec,
    ListAddresses,
    PoolRef,
    PoolStatus,
    ReleaseAddresses,
    ReleaseResult,
)
from domain.kube import NodeLeaveRequest, NodeLeaveResult, NodesStatus, NodesStatusRequest
from domain.lifecycle import ClusterAccount, Timing
from domain.names import SEARCH_ATTRIBUTES
from domain.preflight import CheckResult, CheckStatus, PreflightReport, PreflightRequest
from domain.presence import PresenceAnswer, PresenceRequest
from domain.sealing import AgentKey, seal
from domain.tags import TagRequest, TagResult, UntagRequest, UntagResult
from domain.trust import AccountRef
from domain.version import VERSION
from domain.vm import (
    CreateVmRequest,
    DestroyResult,
    DestroyVmRequest,
    DomainRefs,
    FolderRequest,
    FolderResult,
    GuestsRequest,
    InstallerVmRequest,
    InstallerVmResult,
    KeepApartRequest,
    KeepApartResult,
    PlacementRefs,
    PlacementRequest,
    PowerOnRequest,
    ReadinessRequest,
    ReadinessResult,
    SweepRequest,
    SweepResult,
    VmInfo,
)
from plumbing.codec import ReadableMetadata, data_converter
from plumbing.settings import Settings, tool_path
from plumbing.updates import send_update
from starters.client import KubegateClient
from tests.support import pending_work
from workers.control import WORKFLOWS, build_worker, workflow_runner
from workflows.gateway import GatewayWorkflow

T = TypeVar("T")

SERVER = "vcenter.example.test"
TEMPLATE = "templates/ubuntu-2204-kube-v1.30"


class Unchecked(AgentGuard):
    """The agent's guard (keepalive heartbeats, signatures) without asking a gateway."""

    async def check(self, info: Any, args: Any) -> None:
        return None


@dataclass
class World:
    """What the stand-ins know and did. `hooks[activity]` may replace an answer: called with
    the request, it returns a result or raises (e.g. to fail an attempt)."""

    gateway: str
    key: AgentKey = field(default_factory=AgentKey.generate)
    calls: list[str] = field(default_factory=list)
    requests: list[tuple[str, Any]] = field(default_factory=list)  # (activity, request)
    vms: dict[str, VmInfo] = field(default_factory=dict)  # instance uuid -> VM
    allocations: dict[tuple[str, str], str] = field(default_factory=dict)  # (owner, slot)
    hooks: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    #: node -> why the stand-in API does not show it Ready
    not_ready: dict[str, str] = field(default_factory=dict)

    def account(self, name: str = "acct") -> ClusterAccount:
        endpoint = VCenterEndpoint(server=SERVER, insecure=True)
        binding = password_binding(self.gateway, name, endpoint, "kubegate@vsphere.local")
        return ClusterAccount(
            name=name,
            gateway=self.gateway,
            credentials=VCenterCredentials(
                endpoint=endpoint,
                username="kubegate@vsphere.local",
                password=seal(
                    "not-a-real-password", base64.b64decode(self.key.public_key_b64), binding
                ),
            ),
            template=TEMPLATE,
            agent_signing_key=self.key.signing_key_b64,
            agent_release=VERSION,
        )

    def _public(self) -> bytes:
        return base64.b64decode(self.key.public_key_b64)

    async def _called(self, name: str, request: Any) -> Any:
        self.calls.append(name)
        self.requests.append((name, request))
        self.attempts[name] = activity.info().attempt
        hook = self.hooks.get(name)
        answer = hook(request) if hook is not None else None
        if inspect.isawaitable(answer):
            answer = await answer
        return answer

    # -- the agent ------------------------------------------------------------------------

    def agent_activities(self) -> list[Callable[..., Any]]:
        world = self

        @activity.defn(name="preflight_all")
        async def preflight_all(request: PreflightRequest) -> PreflightReport:
            answer = await world._called("preflight_all", request)
            return answer or PreflightReport(
                account=request.account,
                gateway=request.gateway,
                server=SERVER,
                username=request.credentials.username,
                results=[
                    CheckResult(check="vcenter.login", title="Login", status=CheckStatus.PASS)
                ],
                vcenter_requests=1,
            )

        @activity.defn(name="vm_resolve_placement")
        async def vm_resolve_placement(request: PlacementRequest) -> PlacementRefs:
            await world._called("vm_resolve_placement", request)
            return PlacementRefs(
                template="VirtualMachine:vm-template",
                domains=[
                    DomainRefs(
                        compute_cluster=f"ClusterComputeResource:{d[0]}",
                        resource_pool=f"ResourcePool:{d[0]}",
                        datastore=f"Datastore:{d[1]}",
                        network=f"Network:{d[2]}",
                    )
                    for d in request.domains
                ],
            )

        @activity.defn(name="vm_ensure_folder")
        async def vm_ensure_folder(request: FolderRequest) -> FolderResult:
            await world._called("vm_ensure_folder", request)
            return FolderResult(ref="Folder:group-v9", path=f"/DC0/vm/{request.name}")

        @activity.defn(name="vm_remove_folder")
        async def vm_remove_folder(request: FolderRequest) -> FolderResult:
            await world._called("vm_remove_folder", request)
            return FolderResult(ref="Folder:group-v9", path=f"/DC0/vm/{request.name}")

        @activity.defn(name="bootstrap_secrets")
        async def bootstrap_secrets(request: SecretsRequest) -> SealedSecret:
            await world._called("bootstrap_secrets", request)
            # bound as the agent binds them: this gateway, this lifecycle, shared keys
            use = secrets_binding(world.gateway, activity.info().workflow_id or "", shared=True)
            return seal("{}", world._public(), use)

        @activity.defn(name="bootstrap_render")
        async def bootstrap_render(request: RenderRequest) -> RenderResult:
            await world._called("bootstrap_render", request)
            secrets = None
            if request.secrets is None:
                secrets = seal("{}", world._public(), "cluster-secrets")
            return RenderResult(
                nodes=[
                    RenderedNode(
                        hostname=n.hostname,
                        role=n.role,
                        digest="0" * 64,
                        userdata_bytes=1,
                        metadata_bytes=1,
                        extra_config_bytes=1,
                    )
                    for n in request.nodes
                ],
                secrets=secrets,
            )

        @activity.defn(name="vm_create")
        async def vm_create(request: CreateVmRequest) -> VmInfo:
            answer = await world._called("vm_create", request)
            if answer is not None:
                return answer  # type: ignore[no-any-return]
            vm = world.vms.get(request.instance_uuid)
            if vm is None:
                vm = VmInfo(
                    ref=f"VirtualMachine:vm-{len(world.vms) + 100}",
                    name=request.name,
                    instance_uuid=request.instance_uuid,
                    host="HostSystem:host-1",
                    power_state="poweredOff",
                    bootstrap_digest="0" * 64 if request.bootstrap is not None else None,
                )
                world.vms[request.instance_uuid] = vm
            if request.power_on:
                vm.power_state = "poweredOn"
                vm.address = request.network.address if request.network else None
            return vm

        async def ready(request: GuestsRequest) -> ReadinessResult:
            by_ref = {vm.ref: vm for vm in world.vms.values()}
            out = []
            for ref, _name, address in request.nodes:
                vm = by_ref[ref]
                vm.power_state, vm.address = "poweredOn", address or vm.address
                out.append(vm)
            return ReadinessResult(nodes=out)

        @activity.defn(name="vm_power_on")
        async def vm_power_on(request: PowerOnRequest) -> ReadinessResult:
            answer = await world._called("vm_power_on", request)
            return answer or await ready(request)

        @activity.defn(name="vm_wait_ready")
        async def vm_wait_ready(request: ReadinessRequest) -> ReadinessResult:
            answer = await world._called("vm_wait_ready", request)
            return answer or await ready(request)

        @activity.defn(name="vm_keep_apart")
        async def vm_keep_apart(request: KeepApartRequest) -> KeepApartResult:
            answer = await world._called("vm_keep_apart", request)
            vms = sorted(request.vms) if len(request.vms) >= 2 else []
            return answer or KeepApartResult(rule=request.rule, vms=vms, drs=True, changed=True)

        @activity.defn(name="vm_tag")
        async def vm_tag(request: TagRequest) -> TagResult:
            answer = await world._called("vm_tag", request)
            ids = {f"{t.category}/{t.name}": f"urn:tag:{t.category}/{t.name}" for t in request.tags}
            return answer or TagResult(
                ids=ids,
                attached=sum(len(t.objects) for t in request.tags),
                fields_set=sum(len(v) for v in request.fields.values()),
            )

        @activity.defn(name="vm_untag")
        async def vm_untag(request: UntagRequest) -> UntagResult:
            answer = await world._called("vm_untag", request)
            return answer or UntagResult(deleted=list(request.tag_ids))

        @activity.defn(name="agent_presence")
        async def agent_presence(request: PresenceRequest) -> PresenceAnswer:
            answer = await world._called("agent_presence", request)
            if answer is None:
                await asyncio.sleep(request.hold_seconds)
            return answer or PresenceAnswer(release=VERSION, host="stand-in")

        @activity.defn(name="cluster_node_leave")
        async def cluster_node_leave(request: NodeLeaveRequest) -> NodeLeaveResult:
            answer = await world._called("cluster_node_leave", request)
            return answer or NodeLeaveResult(
                cordoned=request.drain,
                evicted=0,
                node_deleted=request.delete_node,
                etcd_member_removed=request.control_plane and request.drain,
                detail="drained" if request.drain else "Node deleted",
            )

        @activity.defn(name="vm_destroy")
        async def vm_destroy(request: DestroyVmRequest) -> DestroyResult:
            await world._called("vm_destroy", request)
            gone = [u for u, vm in world.vms.items() if vm.instance_uuid == request.instance_uuid]
            refs = [world.vms.pop(u).ref for u in gone]
            return DestroyResult(destroyed=refs)

        @activity.defn(name="vm_inspect")
        async def vm_inspect(request: InspectRequest) -> InspectResult:
            answer = await world._called("vm_inspect", request)
            if answer is not None:
                return answer  # type: ignore[no-any-return]
            found = {}
            for node in request.nodes:
                vm = world.vms.get(node.instance_uuid)
                if vm is not None:
                    found[node.name] = VmSeen(
                        ref=vm.ref,
                        name=vm.name,
                        instance_uuid=vm.instance_uuid,
                        power_state=vm.power_state,
                        connection="connected",
                        tools=TOOLS_RUNNING if vm.power_state == "poweredOn" else "",
                        address=vm.address or "10.99.0.1",
                    )
            return InspectResult(nodes=found)

        @activity.defn(name="cluster_nodes_status")
        async def cluster_nodes_status(request: NodesStatusRequest) -> NodesStatus:
            answer = await world._called("cluster_nodes_status", request)
            return answer or NodesStatus(
                answered=True,
                not_ready={n: why for n, why in world.not_ready.items() if n in request.nodes},
            )

        @activity.defn(name="vm_sweep")
        async def vm_sweep(request: SweepRequest) -> SweepResult:
            await world._called("vm_sweep", request)
            return SweepResult()

        @activity.defn(name="vm_installer")
        async def vm_installer(request: InstallerVmRequest) -> InstallerVmResult:
            answer = await world._called("vm_installer", request)
            off = request.action == "power_off"
            return answer or InstallerVmResult(
                found=True, ref="VirtualMachine:vm-42", power_state="poweredOff" if off else ""
            )

        return [
            preflight_all,
            vm_resolve_placement,
            vm_ensure_folder,
            vm_remove_folder,
            bootstrap_render,
            bootstrap_secrets,
            vm_create,
            vm_power_on,
            vm_wait_ready,
            cluster_node_leave,
            agent_presence,
            vm_keep_apart,
            vm_tag,
            vm_untag,
            vm_destroy,
            vm_sweep,
            vm_installer,
            vm_inspect,
            cluster_nodes_status,
        ]

    # -- the control side: IP pools --------------------------------------------------------

    def control_activities(self) -> list[Callable[..., Any]]:
        """The IP pools, and the gateway's answer for current credentials."""
        world = self

        def spec(ref: PoolRef) -> IpPoolSpec:
            return IpPoolSpec(
                name=ref.pool,
                gateway=ref.gateway,
                kind="range",
                first="10.9.0.10",
                last="10.9.0.250",
                prefix=24,
                network_gateway="10.9.0.1",
                nameservers=["10.9.0.2"],
            )

        @activity.defn(name="describe_pool")
        async def describe_pool(request: PoolRef) -> PoolStatus:
            await world._called("describe_pool", request)
            used = len(world.allocations)
            return PoolStatus(
                spec=spec(request),
                capacity=241,
                used=used,
                free=241 - used,
                owners=sorted({o for o, _ in world.allocations}),
                claimed_by=None,
                created_at=None,
            )

        @activity.defn(name="allocate_addresses")
        async def allocate_addresses(request: AllocateAddresses) -> AllocateResult:
            await world._called("allocate_addresses", request)
            out = {}
            for slot in request.slots:
                key = (request.owner, slot)
                if key not in world.allocations:
                    taken = set(world.allocations.values())
                    address = next(
                        str(a)
                        for a in ipaddress.ip_network("10.9.0.0/24").hosts()
                        if int(str(a).rsplit(".", 1)[1]) >= 10 and str(a) not in taken
                    )
                    world.allocations[key] = address
                out[slot] = world.allocations[key]
            return AllocateResult(
                pool=request.pool,
                addresses=out,
                prefix=24,
                network_gateway="10.9.0.1",
                nameservers=["10.9.0.2"],
                search_domains=[],
            )

        @activity.defn(name="release_addresses")
        async def release_addresses(request: ReleaseAddresses) -> ReleaseResult:
            await world._called("release_addresses", request)
            keys = [
                k
                for k in world.allocations
                if k[0] == request.owner and (request.slots is None or k[1] in request.slots)
            ]
            for k in keys:
                del world.allocations[k]
            return ReleaseResult(released=[k[1] for k in keys])

        @activity.defn(name="list_addresses")
        async def list_addresses(request: ListAddresses) -> AllocationsPage:
            await world._called("list_addresses", request)
            return AllocationsPage(allocations=[], total=0)

        @activity.defn(name="gateway_account")
        async def gateway_account(request: AccountRef) -> ClusterAccount:
            answer = await world._called("gateway_account", request)
            return answer or world.account(request.account)

        return [
            describe_pool,
            allocate_addresses,
            release_addresses,
            list_addresses,
            gateway_account,
        ]

    # -- workers -----------------------------------------------------------------------------

    def workers(self, client: Client, queue: str, real_control: bool = False) -> list[Worker]:
        """The workflows on `queue`, the control stand-ins on the control queue, the agent's
        on the gateway's queue (the workflows send their activities there).

        With `real_control`, the control queue has the real control worker instead: real
        IP pools (IpPoolWorkflow, by Update), and the facts a workflow checks with Temporal
        (a lifecycle's end, an owner's `releasing` query, a gateway's current credentials).
        """
        guard = Unchecked(client, self.gateway, self.key, PolicyFile(Path("/nonexistent")))
        agent = self.agent_activities()
        presence = next(a for a in agent if getattr(a, "__name__", "") == "agent_presence")
        control = (
            build_worker(client)
            if real_control
            else Worker(
                client, task_queue=names.CONTROL_TASK_QUEUE, activities=self.control_activities()
            )
        )
        return [
            Worker(
                client, task_queue=queue, workflows=WORKFLOWS, workflow_runner=workflow_runner()
            ),
            control,
            Worker(
                client,
                task_queue=names.gateway_task_queue(self.gateway),
                activities=[a for a in agent if a is not presence],
                interceptors=[GuardInterceptor(guard)],
            ),
            Worker(  # the agent's presence, on its own queue as the agent serves it
                client,
                task_queue=names.presence_task_queue(self.gateway),
                activities=[presence],
                interceptors=[GuardInterceptor(guard)],
            ),
        ]


def fail(
    message: str, kind: str = "VCenterUnavailable", non_retryable: bool = False, times: int = 0
) -> Any:
    """A hook that fails with this error: every attempt, or the first `times` ones."""
    failed = [0]

    def hook(_: Any) -> Any:
        if times and failed[0] >= times:
            return None
        failed[0] += 1
        raise ApplicationError(message, type=kind, non_retryable=non_retryable)

    return hook


async def forever(_: Any) -> Any:
    """A hook that never answers: an activity still running (until cancelled)."""
    await asyncio.Event().wait()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class Stage:
    """One test's world and its workers: a gateway name and a task queue of its own."""

    def __init__(self, env: WorkflowEnvironment, real_control: bool = False) -> None:
        self.client = env.client
        self.world = World(gateway=unique("gw"))
        self.queue = unique("wf")
        self.real_control = real_control
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Stage:
        for worker in self.world.workers(self.client, self.queue, self.real_control):
            await self._stack.enter_async_context(worker)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.aclose()


FAST = Timing(heartbeat_seconds=5)
PLACEMENT = Placement(
    datacenter="DC0",
    compute_cluster="DC0_C0",
    datastore="LocalDS_0",
    network="VM Network",
    template=TEMPLATE,
)


class Entity:
    """An entity workflow of a stage (a gateway, an IP pool) and the Updates anyone may send
    it, as a client sends them."""

    def __init__(self, stage: Stage, workflow_id: str, result_type: type | None = None) -> None:
        self.stage = stage
        self.handle: WorkflowHandle[Any, Any] = stage.client.get_workflow_handle(
            workflow_id, result_type=result_type
        )

    async def update(self, update: Any, *args: Any) -> Any:
        """An Update (sent again if the run closed under it by continue-as-new)."""
        return await send_update(
            self.handle.id,
            lambda: self.handle.execute_update(update, *args),
            client=self.stage.client,
        )

    async def refused(self, update: Any, *args: Any) -> ApplicationError:
        """The error an Update is refused with (by its validator, or its handler)."""
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await self.update(update, *args)
        cause = refused.value.cause
        assert isinstance(cause, ApplicationError), cause
        return cause


class Gateway(Entity):
    """A stage's gateway, driven as its operator (the real client) and its agent would."""

    def __init__(self, stage: Stage, home: Path) -> None:
        super().__init__(stage, names.gateway_workflow_id(stage.world.gateway), GatewayState)
        self.world = stage.world
        self.name = stage.world.gateway
        self.key = stage.world.key  # the stand-in agent signs with it
        self.installer = f"/DC0/vm/kubegate-installer-{self.name}"
        self.kubegate = KubegateClient(stage.client, Settings(home=home))

    async def create(self, approved: bool = True) -> str:
        """Pending; returns the pairing code (its agent approved in advance if `approved`)."""
        _, code = await self.kubegate.create_gateway(
            self.name,
            timing=FAST,
            task_queue=self.stage.queue,
            fingerprint=self.key.fingerprint if approved else None,
        )
        return code

    async def pair(
        self, code: str | None, key: AgentKey | None = None, version: str = VERSION
    ) -> GatewayState:
        """The agent registers as it starts: pairs with the code, or (paired already, code
        None) says its release."""
        return await self.kubegate.register_agent(
            self.name,
            key or self.key,
            code,
            installer_vm=self.installer,
            host="installer",
            version=version,
        )

    def config(self, ip_pool: str | None = None) -> GatewayConfig:
        """One node, on DHCP behind a VIP or with its addresses from `ip_pool`; the password
        sealed to the agent for this use."""
        account = self.world.account(default_account_name(self.name))
        return GatewayConfig(
            credentials=account.credentials,
            placement=PLACEMENT,
            ip_allocation="static" if ip_pool else "dhcp",
            ip_pool=ip_pool,
            vip=None if ip_pool else "10.9.0.5",
        )

    async def registered(self) -> None:
        await self.pair(await self.create())

    async def running(self, ip_pool: str | None = None) -> GatewayState:
        await self.registered()
        await self.update(GatewayWorkflow.configure, self.config(ip_pool))
        return await self.until(GatewayStatus.RUNNING)

    async def failed(self) -> GatewayState:
        """Configured, its node made, then its installer VM cannot be powered off: Failed
        in provisioning (the hook is gone again once it failed)."""
        self.world.hooks["vm_installer"] = fail("the installer VM is locked", non_retryable=True)
        await self.registered()
        await self.update(GatewayWorkflow.configure, self.config())
        state = await self.until(GatewayStatus.FAILED)
        del self.world.hooks["vm_installer"]
        return state

    async def state(self) -> GatewayState:
        return await self.kubegate.gateway_state(self.name)

    async def until(self, *statuses: GatewayStatus) -> GatewayState:
        return await until(
            self.stage.client,
            self.state,
            lambda s: s.status in statuses,
            f"gateway {self.name} {'/'.join(statuses)}",
        )

    async def next_run(self, run_id: str) -> str:
        """The run after `run_id` (the gateway continued as new)."""
        described = await until(
            self.stage.client,
            self.handle.describe,
            lambda d: d.run_id != run_id,
            f"gateway {self.name}: a run after {run_id}",
        )
        return described.run_id

    def installer_calls(self) -> list[tuple[str, str]]:
        """(action, VM) of every installer request the agent got."""
        return [
            (r.action, r.vm)
            for name, r in self.world.requests
            if name == "vm_installer" and isinstance(r, InstallerVmRequest)
        ]


async def dev_server() -> WorkflowEnvironment:
    """A Temporal dev server of the tests' own, with kubegate's search attributes and codec."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(tool_path("temporal")),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(),
        interceptors=[ReadableMetadata()],
        dev_server_log_level="error",
    )


async def until(
    client: Client,
    read: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    what: str,
    seconds: float = 20.0,
) -> T:
    """Poll `read()` until `done` holds; past the deadline, fail with the last value read and
    every running workflow's pending activities (where it stopped, and why)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        value = await read()
        if done(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(
                f"{what}: not reached in {seconds:.0f} s; last: {value!r}\n"
                + await pending_work(client)
            )
        await asyncio.sleep(0.05)


async def runs(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """The history of every run under the id up to the current one, oldest first (followed
    back from the current run through each run's continued-from link)."""
    run_id = (await client.get_workflow_handle(workflow_id).describe()).run_id
    out: list[WorkflowHistory] = []
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        out.insert(0, history)
        started = history.events[0].workflow_execution_started_event_attributes
        run_id = started.continued_execution_run_id
    return out


async def accepted_updates(client: Client, workflow_id: str) -> list[str]:
    """The Updates the workflow accepted, in order, over all its runs (a validator's refusal
    leaves no event: a refused request never enters the history)."""
    return [
        event.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        for history in await runs(client, workflow_id)
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
