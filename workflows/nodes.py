"""A node set: the nodes of a cluster or of a gateway, and the steps that make and unmake them.

Not a workflow itself: `ClusterWorkflow` and `GatewayWorkflow` each keep one as a field
(`self.nodes`) and keep their own status, handlers and Web UI details. Everything here runs
inside a workflow (deterministic).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    FailureError,
    RetryState,
    TimeoutError,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, TypeAdapter, ValidationError

    from domain import errors, names
    from domain.account import Placement, SealedSecret, VCenterCredentials
    from domain.bootstrap import (
        NodeBootstrap,
        NodeNetwork,
        RenderRequest,
        RenderResult,
        SecretsRequest,
    )
    from domain.cluster import (
        Healing,
        NodeLayout,
        NodePlan,
        NodeSpec,
        distinct_domains,
        node_build,
        template_of,
    )
    from domain.gateway import layout_placements
    from domain.health import (
        Assessment,
        ClusterHealth,
        ExpectedVm,
        InspectRequest,
        InspectResult,
        NodeFacts,
        PoolHealth,
        Repair,
        RepairRecord,
        assess,
        backoff,
    )
    from domain.ipam import (
        AllocateAddresses,
        AllocateResult,
        AllocationsPage,
        ListAddresses,
        PoolRef,
        PoolStatus,
        ReleaseAddresses,
        ReleaseResult,
    )
    from domain.kube import NodeLeaveRequest, NodeLeaveResult, NodesStatus, NodesStatusRequest
    from domain.kubeconfig import API_PORT
    from domain.lifecycle import (
        ClusterAccount,
        Node,
        NodeSetState,
        Step,
        StepState,
        Timing,
        trim_steps,
    )
    from domain.preflight import CheckStatus, PreflightReport, PreflightRequest
    from domain.tags import (
        CATEGORY,
        FIELD_OWNER,
        REGION_CATEGORY,
        SPEC_CATEGORY,
        ZONE_CATEGORY,
        TagRequest,
        TagResult,
        TagSpec,
        UntagRequest,
        UntagResult,
        gateway_tag,
        owner_tag,
        pool_tag,
    )
    from domain.trust import (
        ReleaseIntent,
        SignedResult,
        canonical_json,
        compact_request,
        released_request,
        result_statement,
        verified_body,
    )
    from domain.version import version_key
    from domain.vm import (
        CreateVmRequest,
        DestroyResult,
        DestroyVmRequest,
        DomainRefs,
        FolderRequest,
        FolderResult,
        KeepApartRequest,
        KeepApartResult,
        OwnerMark,
        PlacementRefs,
        PlacementRequest,
        PowerOnRequest,
        ReadinessRequest,
        ReadinessResult,
        ResolvedPlacement,
        SweepRequest,
        SweepResult,
        VmInfo,
        instance_uuid,
    )
    from workflows.metrics import record_step

T = TypeVar("T")

#: patch: agent results are signed and verified (recorded once per run)
SIGNED_RESULTS = "signed-agent-results"
#: continue as new when an operation ends (Running, Failed), not only when Temporal suggests;
#: one marker per settle point ("<this>-<operation number>"): a run begun before settle
#: points replays without them and settles from its first operation under this release on
SETTLE_POINTS = "continue-at-settle-points"
#: patch: bootstrap data is rendered once, by vm_create (before: also by bootstrap_render,
#: for digests); the bootstrap step only generates the cluster's secrets
RENDER_AT_CREATION = "render-bootstrap-at-creation"
#: patch: a node of a cluster with readiness `kubernetes` leaves it before its VM goes
#: (drained, its Node deleted, a control-plane member's etcd membership removed)
NODES_LEAVE = "nodes-leave-the-cluster"
#: patch: readiness `kubernetes` checks every node Ready through the API (and the API server
#: against the cluster's CA), not only /readyz
NODES_READY = "readiness-checks-nodes-ready"

#: patch: the first control-plane member of a newer Kubernetes version runs `kubeadm upgrade
#: apply` once joined (its bootstrap data says so)
UPGRADE_BY_JOINER = "first-newer-member-upgrades-kubeadm"

#: patch: a cluster's control-plane VMs are kept on distinct hosts by a DRS rule
KEEP_APART = "control-plane-anti-affinity"
#: patch: where DRS is off, control-plane VMs are placed on distinct hosts when made
PLACE_APART = "control-plane-on-distinct-hosts"
#: the first agent release that drains nodes and checks them Ready through the API
LEAVES_SINCE = "0.3.0"
#: the first agent release that can look for a reconcile (vm_inspect, cluster_nodes_status)
INSPECT_SINCE = "0.3.0"
#: patch: a cluster's VMs carry vSphere tags and a custom attribute, its placement domains'
#: compute clusters their region/zone tags; its own tag is deleted after its VMs
MARKS = "vsphere-tags-and-attributes"
#: the first agent release that tags (vm_tag, vm_untag, vm_sweep by tag)
TAGS_SINCE = "0.3.0"

#: a node slot: (pool, index); its node is named by the slot's revision
Slot = tuple[str, int]


def verify_result(
    raw: Any,
    arg: Any,
    activity: str,
    signing_key: str | None,
    result_type: type[T],
    activity_id: str,
) -> T | None:
    """The result when the approved agent signed it for this request in this run, else None
    (also for anything that is not a signed result at all)."""
    try:
        signed = SignedResult.model_validate(raw)
    except ValidationError:
        return None
    info = workflow.info()
    call = (info.workflow_id, info.run_id, activity_id, activity)
    body = verified_body(
        signed,
        signing_key,
        lambda: result_statement(*call, canonical_json([arg]), signed.body),
        lambda: result_statement(*call, compact_request([arg]), signed.body, compact=True),
        lambda: result_statement(*call, released_request([arg]), signed.body),
    )
    if body is None:
        return None
    try:
        value: T = TypeAdapter(result_type).validate_json(body)
    except ValidationError:
        return None  # signed, but not the result this activity gives
    return value


#: a result payload that could not be decoded at all
UNREADABLE = object()


def decoded(raw: RawValue) -> Any:
    """The result's JSON value, or UNREADABLE: a worker that is not the agent may send
    anything, and an undecodable payload must not fail the workflow task."""
    try:
        return workflow.payload_converter().from_payload(raw.payload)
    except Exception:
        return UNREADABLE


def unsigned_result(value: Any, activity: str, result_type: type[T]) -> T:
    """A result as a run from before signed results takes it (unwrapping a signed one, which
    today's agent sends): it cannot be verified in such a run."""
    if isinstance(value, dict) and {"body", "key_id", "signature"} <= value.keys():
        value = value["body"]
        reader: Callable[[Any], T] = TypeAdapter(result_type).validate_json
    else:
        reader = TypeAdapter(result_type).validate_python
    try:
        if value is UNREADABLE:
            raise ValueError("undecodable payload")
        return reader(value)
    except ValueError:
        raise ApplicationError(
            f"{activity}: an unreadable result", type=errors.FORGED_RESULT, non_retryable=True
        ) from None


def _with_credentials(arg: Any, credentials: VCenterCredentials) -> Any:
    """The same request with other credentials (after a rotation)."""
    if isinstance(arg, BaseModel) and "credentials" in type(arg).model_fields:
        return arg.model_copy(update={"credentials": credentials})
    return arg


#: attempts an activity gets before its step fails
RETRY_ATTEMPTS = 8

_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=RETRY_ATTEMPTS,
    non_retryable_error_types=errors.NON_RETRYABLE,
)

#: activities that wait for guests: a guest that did not come up in its time is not retried
_RETRY_WAITING = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=8,
    non_retryable_error_types=[*errors.NON_RETRYABLE, errors.NOT_READY],
)


class StepFailed(Exception):
    """A step ended in error; the workflow goes to Failed with this message."""


#: a reconcile's read: a few quick attempts (the next reconcile tries again)
_RETRY_INSPECT = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=3,
    non_retryable_error_types=errors.NON_RETRYABLE,
)

#: the step the running task belongs to (each concurrent step runs in its own task)
_CURRENT: contextvars.ContextVar[Step | None] = contextvars.ContextVar("step", default=None)


class NodeHost(Protocol):
    """What a workflow that owns a node set gives it (ClusterWorkflow, GatewayWorkflow)."""

    #: the workflow is aborting: a step that fails or is cancelled now says "aborted"
    aborting: bool

    def publish(self) -> None:
        """Write the Web UI details (and search attributes): the node set changed."""
        ...

    def current_operation(self) -> tuple[str, int]:
        """The operation new steps belong to (deploy, a change, delete, ...) and its number."""
        ...

    async def refreshed_account(self, account: ClusterAccount) -> ClusterAccount | None:
        """The account with its current credentials; None when the workflow cannot tell."""
        ...

    def agent_signing_key(self, account: ClusterAccount) -> str | None:
        """The approved agent's signing key (each workflow says where it keeps it)."""
        ...


class NodeSet:
    """A set of nodes and the steps that make vCenter match its spec (converge, roll), and take
    it all down again (teardown); also the step and activity runner the owner's own steps use.

    The owning workflow keeps it as a field and passes what differs between owners: `host` (its
    Web UI, operation numbering, abort flag, account refresh and agent key), `record` (the state
    the nodes are kept in, with the spec they are built from: a ClusterState with its
    ClusterSpec, or the gateway's GatewayNodes with its GatewayNodeSpec), `owner` (who owns
    addresses and VM marks: 'cluster/x', 'gateway/y') and the account, timing, readiness mode
    and the nodes' sealed secrets.
    """

    def __init__(
        self,
        host: NodeHost,
        record: NodeSetState,
        owner: str,
        account: ClusterAccount,
        timing: Timing,
        readiness: str,
        secrets: SealedSecret | None,
    ) -> None:
        self.host = host
        self.record = record
        self.owner = owner
        self.account = account
        self.timing = timing
        self.readiness = readiness
        #: the nodes' CA and tokens, sealed to the agent (made by the first bootstrap render)
        self.secrets = secrets
        #: addresses this node set is giving back right now (pools confirm releases with it)
        self.releasing = ReleaseIntent()
        #: the placement domains as vCenter objects (None: to be resolved)
        self.placement: ResolvedPlacement | None = None
        self.plans: dict[str, NodePlan] = {}  # the current spec's node plans, by name
        #: bound on an agent activity's whole life, queue time included (None: unbounded); set
        #: while an Update waits on the agent, so a missing agent cannot hold it forever
        self.agent_deadline: timedelta | None = None
        #: the last failed step's activity ran out of retries (Temporal's record of it)
        self.retries_ran_out = False
        #: nodes leave the Kubernetes cluster before their VMs go (a cluster's, readiness
        #: `kubernetes`: the agent reaches its API)
        self.leaves = False
        #: the template path `placement` was resolved for
        self.placement_template: str | None = None
        #: control-plane VMs are kept on distinct hosts (a cluster's: a DRS rule)
        self.apart = False
        #: VMs get vSphere tags and custom attributes (a cluster's)
        self.marks = False
        #: the slots the converge in progress changes (None: every slot)
        self.scope: Collection[Slot] | None = None
        self._layout: tuple[NodeSpec, NodeLayout] | None = None

    @property
    def layout(self) -> NodeLayout:
        """The current spec's layout (made again when the record's spec is another one)."""
        spec = self.record.node_spec()
        if self._layout is None or self._layout[0] is not spec:
            self._layout = (spec, spec.layout())
        return self._layout[1]

    def trim_steps(self) -> None:
        """Keep the step history bounded: the newest operations' steps (trim_steps)."""
        self.record.steps, dropped = trim_steps(self.record.steps)
        self.record.trimmed_operations += dropped

    def spec_changed(self) -> None:
        """The spec was replaced: placement refs resolved for other domains (or another
        template) are dropped."""
        if self.placement is not None and not self.placement.covers(self._distinct_domains()):
            self.placement = None
        if self.placement_template not in (None, self.template):
            self.placement = None

    @property
    def template(self) -> str:
        """The nodes' VM template: the one the spec's os pack names, else the account's."""
        return template_of(self.layout.profile) or self.account.template

    def api_server(self) -> str | None:
        """The API server's URL: the VIP, else (DHCP without one) the first control-plane
        node's address."""
        host = self.record.vip or next(
            (n.address for n in self.record.nodes if n.control_plane and n.address), None
        )
        if host is None:
            return None
        return f"https://[{host}]:{API_PORT}" if ":" in host else f"https://{host}:{API_PORT}"

    async def step(self, name: str, title: str, body: Callable[[Step], Awaitable[None]]) -> None:
        """Run `body` as a step of the current operation, recorded in the node set's steps."""
        operation, number = self.host.current_operation()
        step = Step(
            name=name,
            title=title,
            started=workflow.now(),
            operation=operation,
            operation_number=number,
        )
        self.record.steps.append(step)
        _CURRENT.set(step)  # this task's step: its activities' attempts count here
        self.host.publish()
        try:
            if self.account.credentials is None:  # not carried in inputs: fetch current ones
                await self._refresh_account()
            if self.account.credentials is None:  # (a workflow no gateway started)
                raise ApplicationError(
                    f"no credentials for cloud account {self.account.name}: only the gateway "
                    "that keeps it can give them, and this lifecycle has no gateway",
                    type=errors.NOT_AUTHORIZED,
                    non_retryable=True,
                )
            await body(step)
            if step.state is StepState.RUNNING:  # a body may have said SKIPPED
                step.state = StepState.DONE
        except asyncio.CancelledError:
            step.state = StepState.CANCELLED
            step.error = "aborted" if self.host.aborting else "stopped: another step failed"
            raise
        except (FailureError, StepFailed) as exc:
            if self.host.aborting:
                step.state, step.error = StepState.CANCELLED, "aborted"
                raise StepFailed("aborted") from None
            step.state = StepState.FAILED
            step.error = _message(exc)
            self.retries_ran_out = _attempts_of(exc) >= RETRY_ATTEMPTS
            step.attempts = max(step.attempts, _attempts_of(exc))
            raise StepFailed(f"{title}: {step.error}") from None
        finally:
            step.ended = workflow.now()
            record_step(step)
            self.host.publish()

    async def validate(self, step: Step) -> None:
        try:
            self.record.node_spec().check()
            layout = self.layout
        except (ValidationError, ValueError) as exc:
            raise ApplicationError(str(exc), type=errors.INVALID_SPEC, non_retryable=True) from None
        self._plan(self._wanted())
        needed: dict[str, int] = {}
        for node in self.record.nodes:
            if node.ip_pool is not None:
                needed[node.ip_pool] = needed.get(node.ip_pool, 0) + 1
        vip_pool = layout.vip_pool
        if vip_pool is not None:
            needed[vip_pool] = needed.get(vip_pool, 0) + 1
        statuses = await run_all(
            [
                self.control(
                    "describe_pool",
                    PoolRef(gateway=self.record.gateway, pool=pool),
                    PoolStatus,
                    f"Check IP pool {pool}",
                )
                for pool in sorted(needed)
            ]
        )
        owner = self.owner
        for pool, status in zip(sorted(needed), statuses, strict=True):
            held = needed[pool] if owner in status.owners else 0
            if status.free + held < needed[pool]:
                raise ApplicationError(
                    f"IP pool {pool} has {status.free} free addresses; the cluster needs "
                    f"{needed[pool]}",
                    type=errors.OUT_OF_ADDRESSES,
                    non_retryable=True,
                )
        step.detail = f"{len(self.record.nodes)} nodes planned"
        step.objects = [f"ippool/{self.record.gateway}/{pool}" for pool in sorted(needed)]

    async def preflight(self, step: Step) -> None:
        account = self.account
        placements = self._placements()
        request = PreflightRequest(
            account=account.name,
            gateway=account.gateway,
            credentials=account.current,
            placement=placements[0],
            more_placements=placements[1:],
            fresh_login=False,
        )
        report = await self.agent(
            "preflight_all",
            request,
            PreflightReport,
            f"Preflight of {len(placements)} placement domain(s) as {account.current.username}",
            timeout=timedelta(minutes=2),
        )
        step.objects = sorted(set(report.refs.values()))
        failed = [r for r in report.results if r.status is CheckStatus.FAIL]
        if failed:
            raise ApplicationError(
                "; ".join(f"{r.title} ({r.object}): {r.detail}" for r in failed[:5]),
                type=errors.INVALID_SPEC,
                non_retryable=True,
            )
        refs = self._refs_from(report.refs, placements)
        self.placement = (
            None if refs is None else ResolvedPlacement(domains=self._distinct_domains(), refs=refs)
        )
        self.placement_template = self.template
        step.detail = f"{len(report.results)} checks passed"

    async def _folder(self, step: Step) -> None:
        layout = self.layout
        result = await self.agent(
            "vm_ensure_folder",
            self._folder_request(),
            FolderResult,
            f"Create folder {layout.name} in {layout.placement.datacenter}",
        )
        self.record.folder, self.record.folder_ref = result.path, result.ref
        step.objects = [result.ref]
        step.detail = result.path

    def wanted_names(self) -> set[str]:
        """The names of the nodes the spec wants (by their revision)."""
        return {p.name for p in self._wanted()}

    def _wanted(self) -> list[NodePlan]:
        """The spec's node plans, named by their revision (a replaced node gets a new name)."""
        plans = list(self.layout.plans)
        if not self.record.revisions:
            return plans
        return [
            p.model_copy(update={"name": f"{p.name}-r{rev}"})
            if (rev := self.record.revisions.get(p.name, 0))
            else p
            for p in plans
        ]

    async def converge(
        self,
        folder: bool = False,
        surge: bool = False,
        only: Collection[Slot] | None = None,
        remove_first: Collection[str] = (),
        label: str = "",
    ) -> None:
        """Make vCenter match the spec: remove extra nodes, then add and start missing ones.

        A node replaced by another of its slot (an earlier revision) stays until the new
        one is ready, unless named in `remove_first`; with `surge` every extra node does.
        `only` limits the change to those slots (pool, index); `label` begins the steps'
        titles.
        """
        wanted = self._wanted()
        names_wanted = {plan.name for plan in wanted}
        slots_wanted = {(plan.pool, plan.index) for plan in wanted}
        extra = [
            n
            for n in self.record.nodes
            if n.name not in names_wanted and (only is None or (n.pool, n.index) in only)
        ]
        extra.sort(key=lambda n: (n.pool, -n.index))  # newest first
        first = [
            n
            for n in extra
            if n.name in remove_first
            or not (surge or ((n.pool, n.index) in slots_wanted and n.phase == "ready"))
        ]
        last = [n for n in extra if n not in first]
        self.scope = only

        async def remove(nodes: list[Node]) -> None:
            if nodes:
                await self.step(
                    "remove-nodes",
                    f"{label}Remove {', '.join(n.name for n in nodes)}"
                    if label and len(nodes) <= 3
                    else f"{label}Remove {len(nodes)} node(s)",
                    lambda step: self._remove_nodes(step, nodes),
                )

        await remove(first)
        self._plan(wanted, only)
        addresses = self.step("addresses", f"{label}Allocate addresses", self._addresses)
        if folder:  # independent of each other: run them at the same time
            await run_all([self.step("folder", "Create the folder", self._folder), addresses])
        else:
            await addresses
        await self.step("bootstrap", f"{label}Render bootstrap data", self._bootstrap)
        await self.step("create-vms", f"{label}Create VMs", self._create_vms)
        ready = self.step("readiness", f"{label}Start nodes, wait ({self.readiness})", self._ready)
        if not last and self._keep_apart_due():  # (off the critical path: beside readiness)
            beside = [self._keep_apart_step()]
            if self._marks_due():
                beside.append(self._marks_step(label))
            await run_all([ready, *beside])
        elif not last and self._marks_due():
            await run_all([ready, self._marks_step(label)])
        else:
            await ready
            await remove(last)
            if self._keep_apart_due():
                await self._keep_apart_step()
            if self._marks_due():
                await self._marks_step(label)
        self.scope = None

    async def roll(self) -> None:
        """Replace every node not built from the spec's profile version, one at a time: a new
        node joins, then the old one goes. Repeating it after a failure resumes."""
        target = self.layout.profile.version
        for plan in self.layout.plans:
            slot = plan.name
            if self.record.slot_versions.get(slot) != target:
                self.record.revisions[slot] = self.record.revisions.get(slot, 0) + 1
                self.record.slot_versions[slot] = target
            wanted = {p.name for p in self._wanted()}
            names = {n.name for n in self.record.nodes if n.phase == "ready"}
            if names == wanted:
                continue  # this slot (and every other) is in place
            await self.converge(surge=True)

    async def _addresses(self, step: Step) -> None:
        owner = self.owner
        slots: dict[str, list[str]] = {}
        cp_pool = self.layout.vip_pool
        if cp_pool is not None:
            slots.setdefault(cp_pool, []).append("vip")
        for node in self.record.nodes:
            if node.ip_pool is not None:
                slots.setdefault(node.ip_pool, []).append(node.name)
        if not slots:
            self.record.vip = self.layout.vip
            step.state = StepState.SKIPPED
            step.detail = "DHCP: nodes get their addresses from the network"
            return
        pools = sorted(slots)
        results = await run_all(
            [
                self.control(
                    "allocate_addresses",
                    AllocateAddresses(
                        gateway=self.record.gateway, pool=pool, owner=owner, slots=slots[pool]
                    ),
                    AllocateResult,
                    f"Allocate {len(slots[pool])} address(es) from {pool}",
                    cancellation=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                )
                for pool in pools
            ]
        )
        for pool, result in zip(pools, results, strict=True):
            self.record.networks[pool] = NodeNetwork(
                mode="static",
                prefix=result.prefix,
                gateway=result.network_gateway,
                nameservers=result.nameservers,
                search_domains=result.search_domains,
            )
            if "vip" in result.addresses:
                self.record.vip = result.addresses["vip"]
        addresses = {slot: a for r in results for slot, a in r.addresses.items()}
        for node in self.record.nodes:
            node.address = addresses.get(node.name, node.address)
        step.objects = [f"ippool/{self.record.gateway}/{pool}" for pool in pools]
        step.detail = (f"VIP {self.record.vip}, " if self.record.vip else "") + ", ".join(
            f"{n.name} {n.address}" for n in self.record.nodes if n.address
        )

    async def _bootstrap(self, step: Step) -> None:
        if workflow.patched(RENDER_AT_CREATION):
            await self._secrets(step)
            return
        pending = [n for n in self.record.nodes if n.phase in ("planned", "failed")]
        renderable = [self._bootstrap_of(n) for n in pending]
        inputs = [b for b in renderable if b is not None]
        if inputs or self.secrets is None:
            result = await self.agent(
                "bootstrap_render",
                RenderRequest(nodes=inputs, secrets=self.secrets),
                RenderResult,
                f"Render cloud-init for {len(inputs)} node(s)"
                + ("" if self.secrets else "; generate the cluster's CA and tokens"),
            )
            self.secrets = self.secrets or result.secrets
            step.objects = [f"{d.hostname} sha256:{d.digest[:12]}" for d in result.nodes]
        later = len(renderable) - len(inputs)
        step.detail = f"{len(inputs)} rendered (secrets sealed to the agent)" + (
            f"; {later} rendered at creation (join endpoint known once the first node is ready)"
            if later
            else ""
        )

    async def _secrets(self, step: Step) -> None:
        """The cluster's CA and tokens, generated and sealed by the agent once; each node's
        cloud-init is rendered by the agent as its VM is created (vm_create), once."""
        rendered_then = "each node's cloud-init is rendered on the agent as its VM is created"
        if self.secrets is not None:
            step.state = StepState.SKIPPED
            step.detail = f"secrets known; {rendered_then}"
            return
        self.secrets = await self.agent(
            "bootstrap_secrets",
            SecretsRequest(cluster=self.layout.name),
            SealedSecret,
            "Generate the cluster's CA and tokens (sealed to the agent)",
        )
        step.detail = f"CA and tokens generated, sealed to the agent; {rendered_then}"

    async def _create_vms(self, step: Step) -> None:
        """Clone every node; start the first control-plane node and wait until it runs.

        When the join endpoint is known before the first node runs (a VIP), the other nodes
        are cloned at the same time and left off until the readiness step; otherwise (DHCP
        without a VIP) they are created and started once the first node reports its address.
        """
        pending = [
            n
            for n in self.record.nodes
            if n.phase not in ("created", "ready")
            and n.name in self.plans
            and (self.scope is None or (n.pool, n.index) in self.scope)
        ]
        first = (
            None
            if self.record.provisioned  # every new node joins a running control plane
            else next((n for n in pending if n.control_plane and n.index == 0), None)
        )
        if first is None:  # the control plane runs (day 2, or a retry): start them as they come
            await run_all([self._create_node(n, start=True) for n in pending])
        elif self.record.vip is not None:
            others = [n for n in pending if n is not first]
            step.detail = f"cloning {len(pending)} node(s); starting {first.name} first"
            self.host.publish()
            await run_all(
                [self._create_node(first, start=True)]
                + [self._create_node(n, start=False) for n in others]
            )
        else:
            step.detail = f"creating {first.name}, the first control-plane node"
            self.host.publish()
            await self._create_node(first, start=True)
            others = [n for n in pending if n is not first]
            await run_all([self._create_node(n, start=True) for n in others])
        step.objects = [n.vm for n in pending if n.vm]  # (what this step made, not all)
        step.detail = f"{len(step.objects)} VM(s) made"

    async def _ready(self, step: Step) -> None:
        """Start the nodes that wait for the first one, then wait until every node is ready."""
        stopped = [n for n in self.record.nodes if n.phase == "created"]
        first = next((n for n in self.record.nodes if n.control_plane and n.index == 0), None)
        if stopped and first is not None and self.readiness == "kubernetes":
            await self._wait_ready([first])  # the API answers before anyone joins
        if stopped:
            result = await self.agent(
                "vm_power_on",
                PowerOnRequest(
                    credentials=self.account.current,
                    nodes=[(n.vm or "", n.name, n.address) for n in stopped],
                    wait_guest=True,
                    timeout_seconds=self.timing.readiness_minutes * 60,
                ),
                ReadinessResult,
                f"Start {len(stopped)} joining node(s) and wait for their guests",
                timeout=timedelta(minutes=self.timing.readiness_minutes + 1),
                retry=_RETRY_WAITING,
            )
            self._mark_ready(stopped, result)
        if self.readiness == "kubernetes":
            # a change waits for the nodes it made (one NotReady node elsewhere does not
            # hold every replacement); a whole converge for every node
            if self.scope is None:
                await self._wait_ready(self.record.nodes)
            else:
                scoped = [n for n in self.record.nodes if (n.pool, n.index) in self.scope]
                if scoped:
                    await self._wait_ready(scoped)
        step.detail = f"{len(self.record.nodes)} nodes ready"
        step.objects = [n.vm for n in self.record.nodes if n.vm]

    # -- nodes ----------------------------------------------------------------------------

    def _plan(self, plan: Sequence[NodePlan], only: Collection[Slot] | None = None) -> None:
        """Add planned nodes that are not known yet (existing nodes keep their state); with
        `only`, those of these slots."""
        self.plans = {p.name: p for p in plan}
        known = {n.name for n in self.record.nodes}
        for p in plan:
            if p.name in known or (only is not None and (p.pool, p.index) not in only):
                continue
            self.record.nodes.append(
                Node(
                    name=p.name,
                    pool=p.pool,
                    index=p.index,
                    control_plane=p.control_plane,
                    domain_index=p.domain_index,
                    compute_cluster=p.domain.compute_cluster,
                    ip_pool=p.domain.ip_pool,
                    instance_uuid=instance_uuid(self.owner, p.name),
                )
            )

    def _bootstrap_of(self, node: Node) -> NodeBootstrap | None:
        layout = self.layout
        plan = self.plans.get(node.name)
        profile = layout.profile
        kube = profile.pack("kubernetes")
        values = kube.values if kube else {}
        first = next((n for n in self.record.nodes if n.control_plane and n.index == 0), None)
        first_address = first.address if first else None
        if node.control_plane and node.index == 0 and not self.record.provisioned:
            role = "init"
        elif node.control_plane:
            role = "join-control-plane"
        else:
            role = "worker"
        if role != "init" and self.record.vip is None and first_address is None:
            return None  # DHCP: the join endpoint is the first node's address, not known yet
        network = (
            self.record.networks[node.ip_pool].model_copy(update={"address": node.address})
            if node.ip_pool is not None
            else NodeNetwork(mode="dhcp")
        )
        return NodeBootstrap(
            cluster=layout.name,
            hostname=node.name,
            instance_id=node.instance_uuid,
            role=role,
            network=network,
            ssh_keys=layout.placement.ssh_keys,
            ntp_servers=layout.placement.ntp_servers,
            vip=self.record.vip,
            first_control_plane=first_address,
            kubernetes_version=kube.version if kube else "",
            pod_cidr=str(values.get("pod_cidr", "192.168.0.0/16")),
            service_cidr=str(values.get("service_cidr", "10.96.0.0/12")),
            allow_worker_capability=layout.allow_worker_capability,
            packs=[(layer.layer, layer.pack) for layer in profile.layers],
            labels=plan.labels if plan else {},
            taints=plan.taints if plan else [],
            upgrade_control_plane=role == "join-control-plane"
            and self._upgrades(node)
            and workflow.patched(UPGRADE_BY_JOINER),
        )

    def _upgrades(self, node: Node) -> bool:
        """Whether the node is the first control-plane member of a newer Kubernetes version
        than the running members': it moves the cluster's kubeadm configuration to its own."""
        running = [
            key
            for n in self.record.nodes
            if n.control_plane and n.phase == "ready" and n.name != node.name
            if (key := version_key(n.kubernetes)) is not None
        ]
        mine = version_key(node.kubernetes)
        return mine is not None and bool(running) and max(running) < mine

    async def _create_node(self, node: Node, start: bool) -> None:
        plan = self.plans[node.name]
        placement = await self._placement()
        # what it is built from now (a node planned by an earlier change is made from this
        # spec, as its cloud-init is rendered now)
        node.build, node.kubernetes = node_build(plan, self.layout), self.layout.kubernetes
        bootstrap = self._bootstrap_of(node)
        node.phase = "creating"
        self.host.publish()
        request = CreateVmRequest(
            credentials=self.account.current,
            name=node.name,
            instance_uuid=node.instance_uuid,
            owner=OwnerMark(cluster_id=self.owner, pool=node.pool, node=node.name),
            template=placement.refs.template,
            folder=self.record.folder_ref or "",
            domain=placement.of(plan.domain.names),
            cpu=plan.cpu,
            memory_mb=plan.memory_gb * 1024,
            disk_gb=plan.disk_gb,
            network=bootstrap.network if bootstrap else NodeNetwork(mode="dhcp"),
            bootstrap=bootstrap,
            secrets=self.secrets,
            power_on=start,
            wait_guest=start,
            guest_timeout_seconds=self.timing.readiness_minutes * 60,
            # DRS off: the members go on distinct hosts by their index (the rule needs DRS)
            host_slot=node.index
            if node.control_plane and self.apart and workflow.patched(PLACE_APART)
            else None,
        )
        try:
            info = await self.agent(
                "vm_create",
                request,
                VmInfo,
                f"Create VM {node.name} in {node.compute_cluster}"
                + (f" ({node.address})" if node.address else ""),
                timeout=timedelta(minutes=self.timing.create_vm_minutes),
                retry=_RETRY_WAITING,
            )
        except ActivityError as exc:
            node.tasks = sorted(set(node.tasks) | set(_task_refs(exc)))
            node.phase = "failed"
            raise
        except asyncio.CancelledError:
            node.phase = "failed"
            raise
        node.vm, node.host, node.power_state = info.ref, info.host, info.power_state
        node.bootstrap_digest = info.bootstrap_digest or node.bootstrap_digest
        if start:
            node.address = node.address or info.address
            node.phase = "ready"
        else:
            node.phase = "created"
        self.host.publish()

    async def _wait_ready(self, nodes: Sequence[Node]) -> None:
        # with the cluster's secrets the agent checks the API server against the cluster's
        # CA and waits for every node Ready (a cluster's nodes only: the gateway's own do not
        # leave through the API either)
        nodes_ready = (
            self.leaves
            and self.secrets is not None
            and self.account.agent_runs(LEAVES_SINCE)
            and workflow.patched(NODES_READY)
        )
        result = await self.agent(
            "vm_wait_ready",
            ReadinessRequest(
                credentials=self.account.current,
                mode=self.readiness,
                nodes=[(n.vm or "", n.name, n.address) for n in nodes],
                vip=self.record.vip,
                timeout_seconds=self.timing.readiness_minutes * 60,
                secrets=self.secrets if nodes_ready else None,
                kubernetes_version=self.layout.kubernetes if nodes_ready else "",
            ),
            ReadinessResult,
            f"Wait for {', '.join(n.name for n in nodes)} ({self.readiness})"
            if len(nodes) <= 3
            else f"Wait for {len(nodes)} nodes ({self.readiness})",
            timeout=timedelta(minutes=self.timing.readiness_minutes + 1),
            retry=_RETRY_WAITING,
        )
        self._mark_ready(nodes, result)

    def _mark_ready(self, nodes: Sequence[Node], result: ReadinessResult) -> None:
        by_ref = {info.ref: info for info in result.nodes}
        for node in nodes:
            info = by_ref.get(node.vm or "")
            if info is not None:
                node.address = node.address or info.address
                node.power_state = info.power_state
                node.host = info.host or node.host
            node.phase = "ready"
        self.host.publish()

    async def _remove_nodes(self, step: Step, nodes: Sequence[Node]) -> None:
        if self.leaves and workflow.patched(NODES_LEAVE):
            joined = [n for n in nodes if n.phase in ("created", "ready") and n.vm]
            await self._leave(step, joined, drain=True)
            await self._destroy_nodes(nodes)
            await self._leave(step, joined, drain=False)
        else:
            await self._destroy_nodes(nodes)
        slots: dict[str, list[str]] = {}
        for node in nodes:
            if node.ip_pool is not None:
                slots.setdefault(node.ip_pool, []).append(node.name)
        for pool, names_ in slots.items():
            self.releasing.pools[pool] = sorted(names_)
        try:
            await run_all(
                [
                    self.control(
                        "release_addresses",
                        ReleaseAddresses(
                            gateway=self.record.gateway, pool=pool, owner=self.owner, slots=names_
                        ),
                        ReleaseResult,
                        f"Release {len(names_)} address(es) to {pool}",
                    )
                    for pool, names_ in sorted(slots.items())
                ]
            )
        finally:
            for pool in slots:
                self.releasing.pools.pop(pool, None)
        removed = {n.name for n in nodes}
        step.objects = [n.vm for n in nodes if n.vm]
        step.detail = ", ".join(sorted(removed))
        self.record.nodes = [n for n in self.record.nodes if n.name not in removed]

    async def _leave(
        self, step: Step, joined: Sequence[Node], drain: bool, drain_timeout: int | None = None
    ) -> None:
        """Nodes leave the Kubernetes cluster: before their VMs go (`drain`) each is cordoned
        and drained and (control plane) its etcd member removed, one member at a time; once
        the VMs are gone, their Node objects are deleted (no kubelet left to register them
        again), as Cluster API orders it."""
        server = self.api_server()
        if server is None or self.secrets is None or not joined:
            return
        leaving = {n.name for n in joined}

        async def leave(node: Node) -> str:
            members = [
                n.address
                for n in self.record.nodes
                if n.control_plane and n.address and n.phase == "ready" and n.name not in leaving
            ]
            result = await self.agent(
                "cluster_node_leave",
                NodeLeaveRequest(
                    cluster=self.layout.name,
                    server=server,
                    secrets=self.secrets,
                    node=node.name,
                    control_plane=node.control_plane,
                    address=node.address,
                    etcd_endpoints=members if drain else [],
                    kubernetes_version=self.layout.kubernetes,
                    drain=drain,
                    delete_node=not drain,
                    **({} if drain_timeout is None else {"drain_timeout_seconds": drain_timeout}),
                ),
                NodeLeaveResult,
                (
                    f"Drain {node.name}"
                    + (", remove its etcd member" if node.control_plane else "")
                    if drain
                    else f"Delete the Node {node.name}"
                ),
                timeout=timedelta(minutes=15),
            )
            return f"{node.name}: {result.detail}"

        if drain:  # one control-plane member at a time
            details = [await leave(n) for n in joined if n.control_plane]
            details += await run_all([leave(n) for n in joined if not n.control_plane])
        else:
            details = await run_all([leave(n) for n in joined])
        step.detail = "; ".join(filter(None, [step.detail, *details]))
        self.host.publish()

    def _apart(self) -> list[str]:
        """The control-plane VMs to keep apart (none when fewer than two)."""
        vms = sorted(
            n.vm
            for n in self.record.nodes
            if n.control_plane and n.vm and n.phase in ("created", "ready")
        )
        return vms if len(vms) >= 2 else []

    def _keep_apart_due(self) -> bool:
        return (
            self.apart and self._apart() != self.record.kept_apart and workflow.patched(KEEP_APART)
        )

    async def _keep_apart_step(self) -> None:
        await self.step("keep-apart", "Keep the control plane on distinct hosts", self._keep_apart)

    def _apart_rule(self) -> str:
        return f"kubegate-{self.layout.name}-control-plane"

    async def _keep_apart(self, step: Step, vms: list[str] | None = None) -> None:
        """A DRS VM-VM anti-affinity rule in the control plane's compute cluster holding its
        VMs (removed when fewer than two); DRS off: said, not enforced."""
        domain = self.layout.domains[0]
        cluster = self.record.kept_apart_in  # (where the rule is: no lookup to remove it)
        if not cluster or vms is None:
            cluster = (await self._placement()).of(domain.names).compute_cluster
        wanted = self._apart() if vms is None else vms
        try:
            result = await self.agent(
                "vm_keep_apart",
                KeepApartRequest(
                    credentials=self.account.current,
                    compute_cluster=cluster,
                    rule=self._apart_rule(),
                    vms=wanted,
                ),
                KeepApartResult,
                f"Anti-affinity rule {self._apart_rule()} in {domain.compute_cluster}",
            )
        except (ActivityError, ApplicationError) as exc:
            # best effort: the cluster serves without it (the next change tries again)
            step.objects = [cluster]
            step.detail = (
                f"not kept apart: {_message(exc)} (the rule needs Host.Inventory.EditCluster "
                f"on {domain.compute_cluster})"
            )
            return
        self.record.kept_apart = list(result.vms)
        self.record.kept_apart_in = cluster if result.vms else None
        step.objects = [cluster]
        if not result.vms:
            step.detail = f"rule {result.rule} removed" if result.changed else "no rule needed"
        else:
            step.detail = f"rule {result.rule}: {len(result.vms)} VMs on distinct hosts" + (
                ""
                if result.drs
                else f" (DRS is off in {domain.compute_cluster}: the rule is not enforced; "
                "the members were put on distinct hosts when made)"
            )

    async def _unkeep(self, step: Step) -> None:
        await self._keep_apart(step, vms=[])

    # -- vSphere tags and custom attributes ------------------------------------------------

    def _marked_vms(self) -> list[Node]:
        """The nodes whose VMs exist (those that carry marks)."""
        return [n for n in self.record.nodes if n.vm and n.phase in ("created", "ready")]

    def _spec_tags(self) -> list[str]:
        return sorted(set(getattr(self.record.node_spec(), "tags", None) or []))

    def _topology(self) -> list[tuple[tuple[str, str, str, str], str | None, str | None]]:
        """(domain names, region, zone) of the placement domains that name either."""
        seen: list[tuple[tuple[str, str, str, str], str | None, str | None]] = []
        for domain in self.layout.domains:
            entry = (domain.names, domain.region, domain.zone)
            if (domain.region or domain.zone) and entry not in seen:
                seen.append(entry)
        return seen

    def _zones_wanted(self) -> list[str]:
        """'compute cluster=region/zone' of every compute cluster given either."""
        return sorted(
            {f"{names[0]}={region or ''}/{zone or ''}" for names, region, zone in self._topology()}
        )

    def _marks_due(self) -> bool:
        if not self.marks:
            return False
        vms = self._marked_vms()
        marked = set(self.record.marked)
        due = any(n.vm not in marked for n in vms)
        due = due or (bool(vms) and self.record.marked_tags != self._spec_tags())
        due = due or self.record.zones_marked != self._zones_wanted()
        return due and workflow.patched(MARKS)

    def _marks_step(self, label: str = "") -> Coroutine[Any, Any, None]:
        return self.step("tags", f"{label}Tag the VMs", self._mark)

    async def _mark(self, step: Step) -> None:
        """Tags (category kubegate: owner, pool, gateway; kubegate-tags: the spec's) and the
        owner custom attribute on the VMs not marked yet (all of them when the spec's tags
        changed); region/zone tags on the placement domains' compute clusters. Best effort:
        what could not be done is said in the step and in `marks_problem`."""
        if not self.account.agent_runs(TAGS_SINCE):
            step.state = StepState.SKIPPED
            step.detail = self.record.marks_problem = (
                f"not tagged: the agent ({self.account.agent_release or 'unknown release'}) "
                f"tags from {TAGS_SINCE} on"
            )
            return
        nodes = self._marked_vms()
        spec_tags = self._spec_tags()
        marked = set(self.record.marked)
        todo = (
            nodes
            if self.record.marked_tags != spec_tags
            else [n for n in nodes if n.vm not in marked]
        )
        vms = [n.vm or "" for n in todo]
        tags: list[TagSpec] = []
        if vms:
            tags.append(TagSpec(category=CATEGORY, name=owner_tag(self.owner), objects=vms))
            tags.append(
                TagSpec(category=CATEGORY, name=gateway_tag(self.record.gateway), objects=vms)
            )
            for pool in sorted({n.pool for n in todo}):
                members = [n.vm or "" for n in todo if n.pool == pool]
                tags.append(TagSpec(category=CATEGORY, name=pool_tag(pool), objects=members))
            tags += [TagSpec(category=SPEC_CATEGORY, name=t, objects=vms) for t in spec_tags]
        vm_tags = len(tags)
        zones = self._zones_wanted()
        if zones != self.record.zones_marked:
            placement = await self._placement()
            by_tag: dict[tuple[str, str], list[str]] = {}
            for names, region, zone in self._topology():
                cluster = placement.of(names).compute_cluster
                if region:
                    by_tag.setdefault((REGION_CATEGORY, region), []).append(cluster)
                if zone:
                    by_tag.setdefault((ZONE_CATEGORY, zone), []).append(cluster)
            tags += [
                TagSpec.model_validate(
                    {"category": category, "name": name, "objects": sorted(set(objects))}
                )
                for (category, name), objects in sorted(by_tag.items())
            ]
        else:
            zones = []
        fields = {n.vm or "": {FIELD_OWNER: self.owner} for n in todo if n.vm not in marked}
        step.objects = sorted({o for t in tags for o in t.objects})
        try:
            result = await self.agent(
                "vm_tag",
                TagRequest(credentials=self.account.current, tags=tags, fields=fields),
                TagResult,
                f"Tag {len(vms)} VM(s)"
                + (f" and {len(zones)} compute cluster(s)" if zones else ""),
            )
        except (ActivityError, ApplicationError) as exc:
            # best effort: the cluster serves without them (the next change tries again)
            step.detail = self.record.marks_problem = f"not tagged: {_message(exc)}"
            return
        owned = result.ids.get(f"{CATEGORY}/{owner_tag(self.owner)}")
        if owned:
            self.record.owner_tag = owned
        if result.problems:
            step.detail = self.record.marks_problem = (
                "not fully tagged: "
                + "; ".join(result.problems)
                + " (tags need the InventoryService.Tagging privileges on the VMs' folder, "
                "custom attributes Global.SetCustomField; see docs/vsphere-errors.md)"
            )
            return
        self.record.marks_problem = None
        self.record.marked = sorted({n.vm or "" for n in nodes})
        self.record.marked_tags = spec_tags
        if zones:
            self.record.zones_marked = zones
        step.detail = f"{len(vms)} VM(s): {vm_tags} tag(s), {result.fields_set} custom attribute(s)"
        if zones:
            step.detail += f"; region/zone tags on {len(zones)} compute cluster(s)"

    async def _unmark(self, step: Step) -> None:
        """Delete the owner's tag (its VMs are gone; shared tags and categories stay)."""
        tag = self.record.owner_tag or ""
        try:
            result = await self.agent(
                "vm_untag",
                UntagRequest(credentials=self.account.current, tag_ids=[tag]),
                UntagResult,
                f"Delete the tag {owner_tag(self.owner)}",
            )
        except (ActivityError, ApplicationError) as exc:
            step.detail = self.record.marks_problem = f"tag not deleted: {_message(exc)}"
            return
        step.objects = [tag]
        step.detail = f"tag {owner_tag(self.owner)} " + (
            "deleted" if result.deleted else "was gone already"
        )
        self.record.owner_tag = None
        self.record.marked = []

    async def _destroy_nodes(self, nodes: Sequence[Node]) -> list[str]:
        for node in nodes:
            node.phase = "deleting"
        self.host.publish()
        results = await run_all(
            [
                self.agent(
                    "vm_destroy",
                    DestroyVmRequest(
                        credentials=self.account.current,
                        name=node.name,
                        instance_uuid=node.instance_uuid,
                        folder=self.record.folder_ref,
                        tasks=node.tasks,
                    ),
                    DestroyResult,
                    f"Power off and destroy {node.name}",
                )
                for node in nodes
            ]
        )
        for node in nodes:
            node.phase = "deleted"
            node.power_state = ""
        return [ref for r in results for ref in r.destroyed]

    # -- reconcile ------------------------------------------------------------------------

    async def look(
        self,
        health: ClusterHealth,
        healing: Healing,
        pools: dict[str, PoolHealth],
        control_plane_size: int,
        held: dict[str, str] | None = None,
    ) -> Assessment | None:
        """A reconcile's look: the agent's signed read of the VMs (and, readiness
        `kubernetes`, of the Nodes), then `assess`; the findings go into `health`. None when
        vCenter could not be read (`health.error` says why; the next look backs off).
        `held`: nodes that may be powered on but not rebuilt now, and why."""
        _CURRENT.set(None)  # (no step: attempts and notes go nowhere)
        deadline = timedelta(seconds=min(max(healing.reconcile_seconds, 60), 600))
        problem = ""
        if not self.account.agent_runs(INSPECT_SINCE):
            problem = (
                f"the agent ({self.account.agent_release or 'release unknown'}) cannot look: "
                f"reconciles need an agent of {INSPECT_SINCE} or later"
            )
        else:
            try:
                seen = await self.inspect(deadline=deadline)
            except (ActivityError, ApplicationError) as exc:
                problem = f"could not read vCenter: {_message(exc)}"
        if problem:  # the next look backs off (a failing login is not repeated every second)
            now = workflow.now()
            health.error, health.checked_at = problem, now
            health.checks += 1
            health.failed_reads += 1
            health.next_due = now + backoff(healing.reconcile_seconds, health.failed_reads)
            return None
        health.error, health.failed_reads = "", 0
        try:
            kube = await self.kubernetes_not_ready(deadline=deadline)
        except (ActivityError, ApplicationError) as exc:
            kube, health.error = None, f"could not ask the cluster's API: {_message(exc)}"
        if kube is not None and not kube.answered:
            health.error = f"the cluster's API did not answer: {kube.detail}"
        wanted = self.wanted_names()
        for node in self.record.nodes:  # what vCenter says of a node it found
            found = seen.nodes.get(node.name)
            if found is not None and node.phase in ("ready", "failed"):
                node.vm, node.power_state = found.ref, found.power_state
                if node.ip_pool is None and found.address:  # (DHCP: its lease may change)
                    node.address = found.address
        now = workflow.now()
        held = held or {}
        result = assess(
            [
                NodeFacts(
                    name=n.name,
                    pool=n.pool,
                    control_plane=n.control_plane,
                    vm=n.vm,
                    phase=n.phase,
                    instance_uuid=n.instance_uuid,
                    wanted=n.name in wanted,
                    hold=held.get(n.name, ""),
                )
                for n in self.record.nodes
            ],
            seen,
            health,
            pools,
            now,
            healing.powered_off,
            control_plane_size,
            kube.not_ready if kube is not None and kube.answered else None,
            healing.repair_attempts,
        )
        for node in self.record.nodes:
            if node.name in result.recovered:
                node.phase = "ready"
        health.findings = result.findings
        health.checked_at, health.next_due = now, result.next_due
        health.checks += 1
        return result

    async def repair_all(
        self, health: ClusterHealth, healing: Healing, repairs: Sequence[Repair]
    ) -> None:
        """Carry out the repairs at once, each a step; a failure is counted on its node (the
        next attempt backs off; after `healing.repair_attempts` it is given up)."""

        async def one(repair: Repair) -> None:
            record = health.failed.setdefault(repair.node, RepairRecord())
            record.attempts += 1
            record.healthy_since = None
            try:
                await self.repair(repair)
            except StepFailed as exc:
                record.failures += 1
                record.last_error = str(exc)
                if record.attempts >= healing.repair_attempts:
                    record.given_up, record.next_at = True, None
                    return
                record.next_at = workflow.now() + backoff(
                    healing.reconcile_seconds, record.attempts
                )
                due = health.next_due
                health.next_due = record.next_at if due is None else min(due, record.next_at)
                return
            # done: kept until the node stays healthy its timeout (then forgotten), so a
            # node that goes bad again soon counts on towards the limit
            record.next_at = None
            health.unhealthy_since.pop(repair.node, None)
            health.repairs_made += 1

        await asyncio.gather(*[one(r) for r in repairs])
        if self._marks_due():  # new VMs: their tags and custom attribute (best effort)
            with contextlib.suppress(StepFailed):
                await self._marks_step()

    async def inspect(self, deadline: timedelta) -> InspectResult:
        """The nodes' VMs as vCenter has them: a reconcile's read (no step; signed)."""
        if self.account.credentials is None:
            await self._refresh_account()
        if self.account.credentials is None:
            raise ApplicationError(
                f"no credentials for cloud account {self.account.name}",
                type=errors.NOT_AUTHORIZED,
                non_retryable=True,
            )
        return await self.agent(
            "vm_inspect",
            InspectRequest(
                credentials=self.account.current,
                folder=self.record.folder_ref or "",
                owner=self.owner,
                nodes=[  # (every node that may have a VM: none of them is foreign)
                    ExpectedVm(name=n.name, instance_uuid=n.instance_uuid)
                    for n in self.record.nodes
                    if n.phase not in ("planned", "deleted")
                ],
            ),
            InspectResult,
            "Compare the cluster's VMs in vCenter with its record",
            timeout=timedelta(minutes=2),
            retry=_RETRY_INSPECT,
            deadline=deadline,
        )

    async def kubernetes_not_ready(self, deadline: timedelta) -> NodesStatus | None:
        """Which ready nodes the cluster's API does not show Ready (readiness `kubernetes`,
        an agent that can tell); None when it cannot be asked."""
        server = self.api_server()
        if (
            not self.leaves
            or self.secrets is None
            or server is None
            or not self.account.agent_runs(LEAVES_SINCE)
        ):
            return None
        return await self.agent(
            "cluster_nodes_status",
            NodesStatusRequest(
                cluster=self.layout.name,
                server=server,
                secrets=self.secrets,
                nodes=[n.name for n in self.record.nodes if n.phase in ("ready", "failed")],
                kubernetes_version=self.layout.kubernetes,
            ),
            NodesStatus,
            "Ask the cluster's API which nodes are not Ready",
            timeout=timedelta(minutes=1),
            retry=_RETRY_INSPECT,
            deadline=deadline,
        )

    async def repair(self, repair: Repair) -> None:
        """Carry out one repair as a step of its own: power a node's VM on, or make it anew
        under the same name, instance UUID and address (`replace` destroys the old VM first;
        with readiness `kubernetes` the node leaves the cluster first, its etcd member
        removed through the members that stay, and its Node deleted)."""
        node = next(n for n in self.record.nodes if n.name == repair.node)
        verb = {"recreate": "Recreate", "replace": "Replace", "power-on": "Power on"}
        title = f"{verb[repair.action]} {node.name}: {repair.reason}"

        async def body(step: Step) -> None:
            step.detail = repair.reason
            try:
                await self._repair(step, node, repair)
            except BaseException:
                if node.phase != "ready":
                    node.phase = "failed"
                raise
            step.objects = [node.vm] if node.vm else []

        await self.step("repair", title, body)
        if node.control_plane and self._keep_apart_due():
            await self._keep_apart_step()  # (best effort: it never fails its step)

    async def _repair(self, step: Step, node: Node, repair: Repair) -> None:
        if repair.action == "power-on":
            result = await self.agent(
                "vm_power_on",
                PowerOnRequest(
                    credentials=self.account.current,
                    # (DHCP: the guest may come back with another lease)
                    nodes=[(node.vm or "", node.name, node.address if node.ip_pool else None)],
                    wait_guest=True,
                    timeout_seconds=self.timing.readiness_minutes * 60,
                ),
                ReadinessResult,
                f"Power on {node.name} and wait for its guest",
                timeout=timedelta(minutes=self.timing.readiness_minutes + 1),
                retry=_RETRY_WAITING,
            )
            self._mark_ready([node], result)
            return
        leaving = self.leaves and self.account.agent_runs(LEAVES_SINCE)
        if leaving:  # out of the cluster first: its pods evicted at once, its etcd member
            await self._leave(step, [node], drain=True, drain_timeout=0)
        if repair.action == "replace":
            await self._destroy_nodes([node])
        if leaving:
            await self._leave(step, [node], drain=False)
        node.vm, node.power_state, node.phase = None, "", "planned"
        if node.ip_pool is None:
            node.address = None  # DHCP: the new VM gets a lease of its own
        self.plans = {p.name: p for p in self._wanted()}
        if node.name not in self.plans:
            raise ApplicationError(
                f"node {node.name} is not in the spec any more", type=errors.INVALID_STATE
            )
        await self._create_node(node, start=True)
        if self.readiness == "kubernetes":
            await self._wait_ready([node])
        step.detail = f"{repair.reason}; {node.vm} made"

    async def teardown(self) -> None:
        """Destroy every VM, release every address, remove the folder (each a step)."""
        nodes = list(self.record.nodes)
        await self.step(
            "delete-vms",
            "Destroy the VMs",
            lambda step: self._delete_vms(step, nodes),
        )
        if self.record.kept_apart and workflow.patched(KEEP_APART):
            await self.step(
                "keep-apart", "Remove the control plane's anti-affinity rule", self._unkeep
            )
        if self.record.owner_tag and workflow.patched(MARKS):
            await self.step("tags", "Delete the cluster's tag", self._unmark)
        await self.step("release", "Release addresses", self._release_all)
        await self.step("remove-folder", "Remove the folder", self._remove_folder)

    async def _delete_vms(self, step: Step, nodes: Sequence[Node]) -> None:
        destroyed = await self._destroy_nodes(nodes)
        sweep = await self.agent(
            "vm_sweep",
            SweepRequest(
                credentials=self.account.current,
                datacenter=self.layout.placement.datacenter,
                cluster_id=self.owner,
                tag_id=self.record.owner_tag or "",
            ),
            SweepResult,
            "Find and destroy any VM still marked as this cluster's",
        )
        destroyed += sweep.destroyed
        step.objects = destroyed
        step.detail = f"{len(destroyed)} VM(s) destroyed"

    async def _release_all(self, step: Step) -> None:
        pools = sorted(
            {d.ip_pool for d in self.layout.domains if d.ip_pool is not None}
            | {n.ip_pool for n in self.record.nodes if n.ip_pool is not None}
            | set(self.record.networks)
        )
        if not pools:
            step.state = StepState.SKIPPED
            step.detail = "DHCP: no addresses held"
            return
        owner = self.owner
        for pool in pools:
            self.releasing.pools[pool] = None
        try:
            await run_all(
                [
                    self.control(
                        "release_addresses",
                        ReleaseAddresses(gateway=self.record.gateway, pool=pool, owner=owner),
                        ReleaseResult,
                        f"Release every address of {owner} in {pool}",
                    )
                    for pool in pools
                ]
            )
        finally:
            for pool in pools:
                self.releasing.pools.pop(pool, None)
        left = await run_all(
            [
                self.control(
                    "list_addresses",
                    ListAddresses(gateway=self.record.gateway, pool=pool, owner=owner, limit=10),
                    AllocationsPage,
                    f"Confirm {pool} holds nothing for {owner}",
                    not_found_ok=True,
                )
                for pool in pools
            ]
        )
        held = [a.address for page in left if page is not None for a in page.allocations]
        if held:
            raise ApplicationError(f"addresses still held after release: {', '.join(held)}")
        step.objects = [f"ippool/{self.record.gateway}/{pool}" for pool in pools]
        step.detail = f"released in {len(pools)} pool(s); none left"
        self.record.vip = None
        for node in self.record.nodes:
            node.address = None

    async def _remove_folder(self, step: Step) -> None:
        await self.agent(
            "vm_remove_folder",
            self._folder_request(),
            FolderResult,
            f"Remove folder {self.layout.name}",
        )
        step.objects = [self.record.folder_ref] if self.record.folder_ref else []

    def _folder_request(self) -> FolderRequest:
        layout = self.layout
        return FolderRequest(
            credentials=self.account.current,
            datacenter=layout.placement.datacenter,
            parent=layout.placement.folder,
            name=layout.name,
        )

    def _placements(self) -> list[Placement]:
        return layout_placements(self.layout, self.template)

    def _distinct_domains(self) -> list[tuple[str, str, str, str]]:
        return distinct_domains(self.layout)

    def _refs_from(self, refs: dict[str, str], placements: list[Placement]) -> PlacementRefs | None:
        """Placement refs from the preflight's findings; None if any is missing."""
        domains: list[DomainRefs] = []
        template = ""
        for placement in placements:
            paths = placement.inventory_paths()
            try:
                domains.append(
                    DomainRefs(
                        compute_cluster=refs[paths["compute_cluster"]],
                        resource_pool=refs[paths["resource_pool"]],
                        datastore=refs[paths["datastore"]],
                        network=refs[paths["network"]],
                    )
                )
                template = refs[paths["template"]]
            except KeyError:
                return None
        return PlacementRefs(template=template, domains=domains)

    async def _placement(self) -> ResolvedPlacement:
        """The placement, resolved now if the preflight did not (or the domains changed)."""
        domains = self._distinct_domains()
        if (
            self.placement is None
            or not self.placement.covers(domains)
            or self.placement_template not in (None, self.template)
        ):
            refs = await self.agent(
                "vm_resolve_placement",
                PlacementRequest(
                    credentials=self.account.current,
                    datacenter=self.layout.placement.datacenter,
                    template=self.template,
                    domains=domains,
                ),
                PlacementRefs,
                "Find the template and placement objects",
            )
            self.placement = ResolvedPlacement(domains=domains, refs=refs)
            self.placement_template = self.template
        return self.placement

    async def agent(
        self,
        activity: str,
        arg: Any,
        result_type: type[T],
        summary: str,
        timeout: timedelta = timedelta(minutes=5),
        retry: RetryPolicy = _RETRY,
        deadline: timedelta | None = None,
    ) -> T:
        """Run an agent activity; its result counts only when the approved agent signed it.
        `deadline` bounds its whole life, queue time included (default `agent_deadline`)."""
        signed = workflow.patched(SIGNED_RESULTS)
        forged = 0
        refreshed = rekeyed = False
        while True:
            # a fresh id per call: a signed result cannot stand in for another call's
            activity_id = str(workflow.uuid4()) if signed else None
            try:
                raw = await workflow.execute_activity(
                    activity,
                    arg,
                    activity_id=activity_id,
                    # taken raw and decoded below: a payload of any shape or encoding is
                    # refused there instead of failing the workflow task
                    result_type=RawValue,
                    task_queue=names.gateway_task_queue(self.record.gateway),
                    start_to_close_timeout=timeout,
                    schedule_to_close_timeout=deadline or self.agent_deadline,
                    # every agent task heartbeats (the agent's guard keeps it alive): a dead
                    # agent's tasks go to the next agent within the heartbeat timeout
                    heartbeat_timeout=timedelta(seconds=self.timing.heartbeat_seconds),
                    retry_policy=retry,
                    cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    summary=summary,
                )
            except ActivityError as exc:
                cause = exc.cause
                stale = isinstance(cause, ApplicationError) and (
                    cause.type == errors.STALE_CREDENTIALS
                )
                if signed and stale and not refreshed and await self._refresh_account():
                    refreshed = True  # rotated meanwhile: the same request, current credentials
                    arg = _with_credentials(arg, self.account.current)
                    continue
                raise
            value = decoded(raw)
            if not signed:  # a run from before signed results: as it did then
                result: T = unsigned_result(value, activity, result_type)
                break
            call = activity_id or ""
            verified = verify_result(value, arg, activity, self._signing_key(), result_type, call)
            if verified is None and not rekeyed and await self._refresh_account():
                rekeyed = True  # the agent may have been re-keyed: check with its current key
                verified = verify_result(
                    value, arg, activity, self._signing_key(), result_type, call
                )
            if verified is not None:
                result = verified
                if isinstance(value, dict):  # how many attempts it took (the agent says)
                    self._attempts(int(value.get("attempt", 1) or 1))
                break
            forged += 1
            step = _CURRENT.get()
            note = f"forged result from a worker that is not the gateway's agent ({forged})"
            workflow.logger.warning("%s: %s", activity, note)
            if step is not None:
                step.detail = note
                self.host.publish()
            if forged >= RETRY_ATTEMPTS:
                raise ApplicationError(
                    f"{activity}: {note}: refusing it",
                    type=errors.FORGED_RESULT,
                    non_retryable=True,
                )
        self.record.vcenter_requests += int(getattr(result, "vcenter_requests", 0) or 0)
        self._attempted(result)
        return result

    def _signing_key(self) -> str | None:
        return self.host.agent_signing_key(self.account)

    async def refresh_account(self) -> bool:
        """Take the account's current credentials, agent key and agent release (False when
        the owner cannot tell them)."""
        return await self._refresh_account()

    async def _refresh_account(self) -> bool:
        """Take the account's current credentials; False when the owner cannot tell them."""
        fresh = await self.host.refreshed_account(self.account)
        if fresh is None:
            return False
        self.account = fresh
        return True

    async def control(
        self,
        activity: str,
        arg: Any,
        result_type: type[T],
        summary: str,
        cancellation: ActivityCancellationType = ActivityCancellationType.TRY_CANCEL,
        not_found_ok: bool = False,
    ) -> T:
        try:
            result: T = await workflow.execute_activity(
                activity,
                arg,
                result_type=result_type,
                task_queue=names.CONTROL_TASK_QUEUE,
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=_RETRY,
                cancellation_type=cancellation,
                summary=summary,
            )
            self._attempted(result)
            return result
        except ActivityError as exc:
            cause = exc.cause
            if (
                not_found_ok
                and isinstance(cause, ApplicationError)
                and cause.type == errors.POOL_NOT_FOUND
            ):
                return None  # type: ignore[return-value]
            raise

    def _attempted(self, result: Any) -> None:
        """Count the attempts the step's activities took (results carry `attempt`)."""
        self._attempts(int(getattr(result, "attempt", 1) or 1))

    def _attempts(self, attempt: int) -> None:
        step = _CURRENT.get()
        if step is not None:
            step.attempts = max(step.attempts, attempt)


async def run_all(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and wait for them."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        if tasks:
            await workflow.wait(tasks)
        raise


def _task_refs(exc: BaseException) -> list[str]:
    """vCenter task refs from an activity failure's last heartbeat details."""
    found: list[str] = []
    cause = exc.cause if isinstance(exc, ActivityError) else None
    details: Sequence[Any] = ()
    if isinstance(cause, TimeoutError):
        details = cause.last_heartbeat_details
    elif isinstance(cause, CancelledError):
        details = cause.details
    for item in details:
        values = item.values() if isinstance(item, dict) else [item]
        for value in values:
            if isinstance(value, str) and value.startswith("Task:"):
                found.append(value)
    return found


def _attempts_of(exc: BaseException) -> int:
    """Attempts an activity failure took: all of them when it ran out, else at least one."""
    if isinstance(exc, ActivityError) and exc.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED:
        return _RETRY.maximum_attempts
    return 1


def _message(exc: BaseException) -> str:
    """The innermost useful message of a failure chain."""
    while isinstance(exc, ActivityError | ChildWorkflowError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, TimeoutError):
        return f"timed out ({exc.type.name.lower() if exc.type else 'timeout'})"
    return getattr(exc, "message", None) or str(exc)


def invalid_state(message: str) -> ApplicationError:
    return ApplicationError(message, type=errors.INVALID_STATE, non_retryable=True)


def invalid_spec(message: str) -> ApplicationError:
    return ApplicationError(message, type=errors.INVALID_SPEC, non_retryable=True)
