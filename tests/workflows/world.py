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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.guard import AgentGuard, GuardInterceptor, PolicyFile
from domain import names
from domain.account import VCenterCredentials, VCenterEndpoint, password_binding
from domain.bootstrap import RenderedNode, RenderRequest, RenderResult
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
from domain.lifecycle import ClusterAccount
from domain.preflight import CheckResult, CheckStatus, PreflightReport, PreflightRequest
from domain.sealing import AgentKey, seal
from domain.trust import AccountRef
from domain.vm import (
    CreateVmRequest,
    DestroyResult,
    DestroyVmRequest,
    DomainRefs,
    FolderRequest,
    FolderResult,
    GuestsRequest,
    PlacementRefs,
    PlacementRequest,
    PowerOnRequest,
    ReadinessRequest,
    ReadinessResult,
    SweepRequest,
    SweepResult,
    VmInfo,
)
from workers.control import WORKFLOWS, workflow_runner

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
    vms: dict[str, VmInfo] = field(default_factory=dict)  # instance uuid -> VM
    allocations: dict[tuple[str, str], str] = field(default_factory=dict)  # (owner, slot)
    hooks: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

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
        )

    def _public(self) -> bytes:
        return base64.b64decode(self.key.public_key_b64)

    async def _called(self, name: str, request: Any) -> Any:
        self.calls.append(name)
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

        @activity.defn(name="vm_destroy")
        async def vm_destroy(request: DestroyVmRequest) -> DestroyResult:
            await world._called("vm_destroy", request)
            gone = [u for u, vm in world.vms.items() if vm.instance_uuid == request.instance_uuid]
            refs = [world.vms.pop(u).ref for u in gone]
            return DestroyResult(destroyed=refs)

        @activity.defn(name="vm_sweep")
        async def vm_sweep(request: SweepRequest) -> SweepResult:
            await world._called("vm_sweep", request)
            return SweepResult()

        return [
            preflight_all,
            vm_resolve_placement,
            vm_ensure_folder,
            vm_remove_folder,
            bootstrap_render,
            vm_create,
            vm_power_on,
            vm_wait_ready,
            vm_destroy,
            vm_sweep,
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

    def workers(self, client: Client, queue: str) -> list[Worker]:
        """The workflows on `queue`, the control stand-ins on the control queue, the agent's
        on the gateway's queue (the workflows send their activities there)."""
        guard = Unchecked(client, self.gateway, self.key, PolicyFile(Path("/nonexistent")))
        return [
            Worker(
                client, task_queue=queue, workflows=WORKFLOWS, workflow_runner=workflow_runner()
            ),
            Worker(
                client, task_queue=names.CONTROL_TASK_QUEUE, activities=self.control_activities()
            ),
            Worker(
                client,
                task_queue=names.gateway_task_queue(self.gateway),
                activities=self.agent_activities(),
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
