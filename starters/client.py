"""The typed client the CLI is built on (the SDK client); `connect` comes from plumbing.

Programmatic use: see docs/client.md and examples/validate_account.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from domain import errors, names
from domain.account import (
    CloudAccountSpec,
    SealedSecret,
    VCenterCredentials,
    VCenterEndpoint,
    password_binding,
)
from domain.audit import (
    AuditStart,
    AuditState,
    AuditStatus,
    CleanRequest,
    CleanResult,
    audit_workflow_id,
)
from domain.cluster import ClusterSpec, WorkerPool, plan_nodes
from domain.events import EventsResult
from domain.gateway import (
    PAIRING_CODE_LIFETIME,
    AccountCheckRequest,
    AccountRequest,
    AccountSummary,
    ApproveRequest,
    ClusterCheckRequest,
    ClusterRequest,
    GatewayConfig,
    GatewayFile,
    GatewayInput,
    GatewayState,
    GatewayStatus,
    PairingState,
    RegisterRequest,
    RekeyRequest,
    ResetRequest,
    ResizeRequest,
    RotateRequest,
    UpgradeRequest,
    default_account_name,
    new_pairing_code,
    pairing_proof,
    pairing_verifier,
)
from domain.health import ClusterHealth, ReconcileRequest
from domain.ipam import (
    AllocateRequest,
    AllocateResult,
    Allocation,
    AllocationsPage,
    AllocationsQuery,
    IpPoolInput,
    IpPoolSpec,
    PoolStatus,
    ReleaseRequest,
    ReleaseResult,
)
from domain.kubeconfig import (
    KubeconfigIssue,
    KubeconfigRequest,
    KubeconfigResult,
    issued_statement,
    kubeconfig_binding,
    kubeconfig_statement,
)
from domain.lifecycle import (
    AddPoolRequest,
    ApplyRequest,
    ChangeResult,
    ClusterState,
    ClusterStatus,
    ClusterSummary,
    ClusterUpgradeRequest,
    DeleteRequest,
    Node,
    RemovePoolRequest,
    Rollout,
    ScaleRequest,
    StepState,
    Timing,
)
from domain.plan import ChangePlan, plan_apply
from domain.preflight import PreflightReport
from domain.sealing import (
    AgentKey,
    SealError,
    fingerprint,
    normalize_fingerprint,
    seal,
    verify_signature,
)
from domain.version import VERSION
from plumbing.connect import connect
from plumbing.errors import KubegateError, RequestRefused
from plumbing.settings import Settings
from plumbing.updates import (
    AllocationBatcher,
    failure_message,
    request,
    send_update,
)
from workflows.audit import AuditWorkflow
from workflows.cluster import ClusterWorkflow
from workflows.gateway import GatewayWorkflow
from workflows.ip_pool import IpPoolWorkflow

__all__ = ["KubegateClient", "KubegateError", "RequestRefused", "connect"]

T = TypeVar("T")

_TRANSIENT_RPC = (
    RPCStatusCode.CANCELLED,
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
)


class KubegateClient:
    """Typed operations on kubegate; every CLI command goes through here."""

    def __init__(self, client: Client, settings: Settings | None = None) -> None:
        self.client = client
        self.settings = settings or Settings()

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> KubegateClient:
        settings = settings or Settings()
        return cls(await connect(settings), settings)

    async def gateway_public_key(self, gateway: str) -> bytes:
        """The public key the gateway's agent registered; secrets are sealed to it."""
        public, _ = await self.approved_agent_keys(gateway)
        return public

    async def approved_agent_keys(self, gateway: str) -> tuple[bytes, str]:
        """The approved agent's keys: its X25519 public key (secrets are sealed to it) and
        its signing key (base64: what it signs is checked with it), refused unless they are
        the ones approved from this machine (when it approved one)."""
        state = await self.gateway_state(gateway)
        if state.agent is None:
            raise RequestRefused(
                f"gateway {gateway} has no registered agent yet ({state.status}): deploy its "
                f"installer and start its agent (kubegate gateway agent {gateway})"
            )
        agent = state.agent
        if not agent.approved:
            raise RequestRefused(
                f"gateway {gateway}: its agent (fingerprint {agent.fingerprint}) is not "
                f"approved; no secret is sealed to it until you approve it (kubegate gateway "
                f"approve {gateway} FINGERPRINT)"
            )
        public = base64.b64decode(agent.public_key)
        actual = fingerprint(public, base64.b64decode(agent.signing_key or ""))
        approved = self._approved_fingerprint(gateway)
        if approved is not None and actual != approved:
            raise KubegateError(
                f"gateway {gateway}: its agent's keys (fingerprint {actual}) are not the ones "
                f"approved from this machine ({approved}); nothing sealed. If the agent was "
                f"re-keyed on purpose, approve it again; else someone replaced them"
            )
        return public, agent.signing_key or ""

    def _approved_path(self, gateway: str) -> Path:
        return self.settings.home / "gateways" / gateway / "approved-agent"

    def _approved_fingerprint(self, gateway: str) -> str | None:
        """The agent fingerprint approved from this machine, if it approved one."""
        path = self._approved_path(gateway)
        return path.read_text().strip() if path.exists() else None

    def _record_approval(self, gateway: str, value: str) -> None:
        path = self._approved_path(gateway)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(normalize_fingerprint(value) + "\n")
        path.chmod(0o600)

    async def require_agent(self, gateway: str) -> None:
        """Refuse (KubegateError) unless an agent of the gateway polls its task queue."""
        if not await self.agent_is_polling(gateway):
            raise KubegateError(
                f"no agent of gateway {gateway!r} is connected (task queue "
                f"{names.gateway_task_queue(gateway)} has no pollers): start it first"
            )

    async def agent_is_polling(self, gateway: str, wait: float = 5.0) -> bool:
        """True if an agent of the gateway polls its task queue (waits up to `wait` seconds)."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            try:
                response = await self.client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=self.client.namespace,
                        task_queue=TaskQueue(name=names.gateway_task_queue(gateway)),
                        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                    )
                )
                if response.pollers:
                    return True
            except RPCError as exc:
                # a busy server may cancel or drop the call: ask again until the deadline
                if exc.status not in _TRANSIENT_RPC:
                    raise
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.25)

    async def seal_credentials(
        self,
        gateway: str,
        endpoint: VCenterEndpoint,
        username: str,
        password: str,
        account: str | None = None,
    ) -> VCenterCredentials:
        """The password sealed to the gateway's approved agent, for this account, vCenter,
        user and trust only (default account: the gateway's own)."""
        use = password_binding(
            gateway, account or default_account_name(gateway), endpoint, username
        )
        sealed = seal(password, await self.gateway_public_key(gateway), use)
        return VCenterCredentials(endpoint=endpoint, username=username, password=sealed)

    async def validate_account(
        self,
        spec: CloudAccountSpec,
        password: str,
        *,
        timeout: timedelta = timedelta(minutes=5),
        workflow_id: str | None = None,
    ) -> PreflightReport:
        """Run the preflight of a cloud account (and its placement) on its gateway's agent;
        the gateway starts it (the agent works only for what its gateway started)."""
        endpoint = spec.vcenter.endpoint()
        credentials = await self.seal_credentials(
            spec.gateway, endpoint, spec.vcenter.username, password, spec.name
        )
        await self.require_agent(spec.gateway)
        request = AccountCheckRequest(
            name=spec.name,
            credentials=credentials,
            placement=spec.placement,
            workflow_id=workflow_id or names.preflight_workflow_id(str(uuid.uuid4())),
        )
        report: PreflightReport = await asyncio.wait_for(
            self._gateway_update(spec.gateway, GatewayWorkflow.validate_account, request),
            timeout.total_seconds(),
        )
        return report

    # -- clusters -------------------------------------------------------------------------------

    def cluster_handle(self, name: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(names.cluster_workflow_id(name))

    async def deploy_cluster(
        self,
        spec: ClusterSpec,
        *,
        readiness: str = "guest",
        timing: Timing | None = None,
        gateway: str | None = None,
    ) -> ClusterState:
        """Ask the gateway of the spec's cloud account to deploy the cluster.

        Refused (RequestRefused) unless that gateway is Running; while it upgrades the cluster
        is accepted and waits, Queued. `gateway` skips the search for the account's gateway.
        """
        gateway = gateway or await self.account_gateway(spec.cloud_account)
        state = await self.gateway_state(gateway)
        if state.status.value not in ("Running", "Upgrading"):
            raise RequestRefused(
                f"gateway {gateway} is {state.status.value}: clusters need a Running gateway"
            )
        await self.check_pools(gateway, spec)
        request = ClusterRequest(
            spec=spec,
            readiness=readiness,
            timing=timing or Timing(),
        )
        await self._gateway_update(gateway, GatewayWorkflow.request_cluster, request)
        return await self.cluster_state(spec.name)

    async def plan_deploy(
        self, spec: ClusterSpec, *, timeout: timedelta = timedelta(minutes=5)
    ) -> tuple[ChangePlan, PreflightReport, str]:
        """What deploying `spec` would do, creating nothing: the plan (every node, the
        addresses taken from each IP pool, refused up front as deploy would be) and the
        preflight of every placement domain with the cloud account's kept credentials, on the
        gateway's agent. Returns the plan, the report and the preflight's workflow id."""
        gateway = await self.account_gateway(spec.cloud_account)
        state = await self.gateway_state(gateway)
        if state.status not in (GatewayStatus.RUNNING, GatewayStatus.UPGRADING):
            raise RequestRefused(
                f"gateway {gateway} is {state.status.value}: clusters need a Running gateway"
            )
        await self.check_pools(gateway, spec)
        nodes = plan_nodes(spec)
        addresses: dict[str, int] = {}
        vip_pool = spec.control_plane.placement[0].ip_pool
        for pool in [vip_pool, *(n.domain.ip_pool for n in nodes)]:
            if pool is not None:
                addresses[pool] = addresses.get(pool, 0) + 1
        plan = ChangePlan(
            changes=[f"deploy cluster {spec.name} ({len(nodes)} nodes) on gateway {gateway}"],
            create=[n.name for n in nodes],
            addresses=addresses,
        )
        await self.require_agent(gateway)
        workflow_id = names.preflight_workflow_id(str(uuid.uuid4()))
        request = ClusterCheckRequest(spec=spec, workflow_id=workflow_id)
        report: PreflightReport = await asyncio.wait_for(
            self._gateway_update(gateway, GatewayWorkflow.check_cluster, request),
            timeout.total_seconds(),
        )
        return plan, report, workflow_id

    async def check_pools(self, gateway: str, spec: ClusterSpec) -> None:
        """Refuse (RequestRefused, naming the field) a spec whose IP pools the gateway lacks or
        that need more addresses than those pools have free."""
        needed: dict[str, int] = {}
        where: dict[str, str] = {}
        for plan in plan_nodes(spec):
            if plan.domain.ip_pool is not None:
                needed[plan.domain.ip_pool] = needed.get(plan.domain.ip_pool, 0) + 1
        vip_pool = spec.control_plane.placement[0].ip_pool
        if vip_pool is not None:
            needed[vip_pool] = needed.get(vip_pool, 0) + 1
        for path, domain in spec.domains():
            if domain.ip_pool is not None:
                where.setdefault(domain.ip_pool, f"{path}.ip_pool")
        if not needed:
            return
        pools = {s.spec.name: s for s in await self.list_pools(gateway, strict=True)}
        owner = names.cluster_workflow_id(spec.name)
        for pool in sorted(needed, key=lambda p: where.get(p, p)):
            status = pools.get(pool)
            if status is None:
                raise RequestRefused(
                    f"{where.get(pool, 'ip_pool')}: gateway {gateway} has no IP pool {pool!r} "
                    f"(kubegate ippool list -g {gateway})"
                )
            if owner not in status.owners and status.free < needed[pool]:
                raise RequestRefused(
                    f"{where.get(pool, 'ip_pool')}: IP pool {pool} has {status.free} free "
                    f"address(es); the cluster needs {needed[pool]}"
                )

    async def cluster_state(self, name: str) -> ClusterState:
        """The cluster's state (also of a deleted cluster, while its history is kept)."""
        if not names.is_dns_label(name):
            raise KubegateError(f"cluster {name!r}: must be a DNS label")
        try:
            state: ClusterState = await self.cluster_handle(name).query(ClusterWorkflow.state_query)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RequestRefused(f"cluster {name} does not exist") from None
            raise
        except WorkflowQueryFailedError as exc:
            raise KubegateError(
                f"cluster {name} did not answer ({exc.message}); is the control worker running "
                "this version of kubegate?"
            ) from None
        return state

    async def list_clusters(
        self, gateway: str | None = None, include_deleted: bool = False
    ) -> list[ClusterSummary]:
        query = "KubegateKind = 'cluster'"
        if not include_deleted:
            query += " AND ExecutionStatus = 'Running'"
        if gateway:
            if not names.is_dns_label(gateway):
                raise KubegateError(f"gateway {gateway!r}: must be a DNS label")
            query += f" AND KubegateGateway = '{gateway}'"
        ids = [e.id async for e in self.client.list_workflows(query)]
        states = await asyncio.gather(
            *(
                self.client.get_workflow_handle(i).query(
                    ClusterWorkflow.state_query, rpc_timeout=timedelta(seconds=10)
                )
                for i in dict.fromkeys(ids)
            ),
            return_exceptions=True,
        )
        out = []
        for state in states:
            if isinstance(state, ClusterState):
                step = state.current_step()
                out.append(
                    ClusterSummary(
                        name=state.name,
                        status=state.status.value,
                        gateway=state.gateway,
                        nodes=len(existing(state)),
                        step=step.title if step else "",
                        version=state.spec.kubernetes_version(),
                        created_at=state.created_at,
                        account=state.account,
                        vip=state.vip,
                        control_plane=state.spec.control_plane.size,
                        workers=sum(p.size for p in state.spec.workers),
                        reason=state.error or state.reason,
                    )
                )
        return sorted(out, key=lambda c: c.name)

    async def _cluster_update(self, name: str, update: Any, *args: Any) -> Any:
        return await self._update(self.cluster_handle(name), f"cluster {name}", update, *args)

    async def _update(
        self, handle: WorkflowHandle[Any, Any], what: str, update: Any, *args: Any
    ) -> Any:
        """Send an Update; a refusal by its validator raises RequestRefused with the reason."""
        return await request(handle, what, update, *args)

    async def abort_cluster(self, name: str) -> ClusterState:
        """Stop a provisioning cluster; it removes what it made and ends Deleted (aborted)."""
        state: ClusterState = await self._cluster_update(name, ClusterWorkflow.abort)
        return state

    async def delete_cluster(self, name: str) -> ClusterState:
        """Start deleting a Running or Failed cluster."""
        state: ClusterState = await self._cluster_update(
            name, ClusterWorkflow.delete, DeleteRequest()
        )
        return state

    async def retry_cluster(self, name: str) -> ClusterState:
        state: ClusterState = await self._cluster_update(name, ClusterWorkflow.retry)
        return state

    async def scale_pool(
        self, name: str, pool: str, size: int, *, wait: bool = True, timeout: float = 3600.0
    ) -> ChangeResult:
        """Resize a worker pool (down removes the newest nodes first). The change is an
        operation of the cluster: with `wait` (default) this returns what it did once it
        ended, else at once with its operation number (status Updating)."""
        return await self._day2(
            name, ClusterWorkflow.scale, ScaleRequest(pool=pool, size=size), wait, timeout
        )

    async def add_pool(
        self, name: str, pool: WorkerPool, *, wait: bool = True, timeout: float = 3600.0
    ) -> ChangeResult:
        """Add a worker pool; with `wait` returns once its nodes are ready (see scale_pool)."""
        return await self._day2(
            name, ClusterWorkflow.add_pool, AddPoolRequest(pool=pool), wait, timeout
        )

    async def remove_pool(
        self, name: str, pool: str, *, wait: bool = True, timeout: float = 3600.0
    ) -> ChangeResult:
        """Remove a worker pool: its VMs and addresses (see scale_pool)."""
        return await self._day2(
            name, ClusterWorkflow.remove_pool, RemovePoolRequest(pool=pool), wait, timeout
        )

    async def _day2(
        self, name: str, update: Any, request: Any, wait: bool, timeout: float
    ) -> ChangeResult:
        accepted: ChangeResult = await self._cluster_update(name, update, request)
        if not wait or not accepted.operation:  # (a release before operations: done already)
            return accepted
        return await self.wait_change(name, accepted.operation, timeout=timeout)

    async def wait_change(self, name: str, operation: int, timeout: float = 3600.0) -> ChangeResult:
        """What change `operation` of a cluster did, once it ended; KubegateError when it
        failed (the cluster is Failed; `retry` or another change goes on from there)."""

        def ended(state: ClusterState) -> bool:
            done = state.changes[-1].operation if state.changes else 0
            return done >= operation or state.status in (
                ClusterStatus.DELETING,
                ClusterStatus.DELETED,
            )

        state = await self.wait_cluster(name, ended, timeout=timeout)
        mine = next((c for c in state.changes if c.operation == operation), None)
        if mine is None:
            raise KubegateError(f"cluster {name}: change {operation} ended {state.status}")
        if mine.error:
            raise KubegateError(mine.error)
        return mine

    async def plan_apply(self, spec: ClusterSpec) -> ChangePlan:
        """What applying `spec` to its running cluster would do (nothing is sent)."""
        state = await self.cluster_state(spec.name)
        plan = plan_apply(state.spec, spec, state.nodes, state.revisions)
        plan.based_on = state.operations_run
        leaving = [*plan.remove, *plan.replace]
        if state.readiness != "kubernetes" and leaving:
            plan.warnings.append(
                f"readiness {state.readiness}: kubegate does not reach this cluster's API, so "
                "nodes that go are not drained and control-plane members that go stay in "
                "etcd (right for the simulator; a real cluster needs readiness kubernetes)"
            )
        return plan

    async def upgraded_spec(
        self, name: str, kubernetes: str | None = None, template: str | None = None
    ) -> ClusterSpec:
        """The running spec of cluster `name` with its Kubernetes version and/or template
        changed (what `upgrade_cluster` asks for; plan it with `plan_apply`)."""
        return (await self.cluster_state(name)).spec.upgraded(kubernetes, template)

    async def upgrade_cluster(
        self,
        name: str,
        *,
        kubernetes: str | None = None,
        template: str | None = None,
        wait: bool = True,
        timeout: float = 6 * 3600.0,
    ) -> ChangeResult:
        """Move every node to another Kubernetes version and/or template by rolling
        replacement (the control plane first, one member at a time; then each worker pool by
        its rollout policy). Refused when a minor version would be skipped. With `wait` this
        returns once the rollout ended (KubegateError if it failed or was aborted)."""
        request = ClusterUpgradeRequest(kubernetes=kubernetes, template=template)
        return await self._day2(name, ClusterWorkflow.upgrade, request, wait, timeout)

    async def pause_rollout(self, name: str) -> Rollout:
        """Hold a cluster's rollout once the replacement in progress is done."""
        rollout: Rollout = await self._cluster_update(name, ClusterWorkflow.pause_rollout)
        return rollout

    async def resume_rollout(self, name: str) -> Rollout:
        """Go on with a paused rollout."""
        rollout: Rollout = await self._cluster_update(name, ClusterWorkflow.resume_rollout)
        return rollout

    async def abort_rollout(self, name: str) -> Rollout:
        """Stop a rollout once the replacement in progress is done; every node keeps
        serving, some on their old build (upgrade or apply again to finish)."""
        rollout: Rollout = await self._cluster_update(name, ClusterWorkflow.abort_rollout)
        return rollout

    async def reconcile_cluster(self, name: str, retry_given_up: bool = False) -> ClusterHealth:
        """Compare a Running or Degraded cluster's VMs with its record now and repair what
        its healing policy repairs (`retry_given_up`: repairs given up get their attempts
        again); returns what it saw and did (waits for the repairs)."""
        health: ClusterHealth = await self._cluster_update(
            name, ClusterWorkflow.reconcile, ReconcileRequest(retry_given_up=retry_given_up)
        )
        return health

    async def pause_remediation(self, name: str) -> ClusterHealth:
        """Report a cluster's unhealthy nodes instead of replacing them."""
        health: ClusterHealth = await self._cluster_update(name, ClusterWorkflow.pause_remediation)
        return health

    async def resume_remediation(self, name: str) -> ClusterHealth:
        """Replace a cluster's unhealthy nodes again."""
        health: ClusterHealth = await self._cluster_update(name, ClusterWorkflow.resume_remediation)
        return health

    async def apply_cluster(
        self,
        spec: ClusterSpec,
        *,
        plan: ChangePlan | None = None,
        wait: bool = True,
        timeout: float = 3600.0,
    ) -> ChangeResult:
        """Make a running cluster match `spec` as one operation (see plan_apply); refused
        whole, naming the fields, when one cannot change in place, and (given the `plan`
        shown) when the cluster changed since it was made."""
        request = ApplyRequest(spec=spec, based_on=plan.based_on if plan else None)
        return await self._day2(spec.name, ClusterWorkflow.apply, request, wait, timeout)

    async def kubeconfig(
        self,
        name: str,
        user: str,
        ttl: timedelta = timedelta(hours=8),
        operator: AgentKey | None = None,
    ) -> tuple[str, KubeconfigIssue]:
        """A kubeconfig for `user` (cluster-admin, valid for `ttl`), asked for by `operator`
        (default: the operator key in the kubegate home, made if missing); the gateway's
        agent mints it only if its policy lists that operator, and seals it to a key made
        here for this request only. The cluster records the issue. Returns the file's text
        and the record."""
        operator = operator or self.operator_key()
        recipient = AgentKey.generate()
        request_id = uuid.uuid4().hex
        seconds = int(ttl.total_seconds())
        statement = kubeconfig_statement(name, user, seconds, recipient.public_key_b64, request_id)
        try:
            request = KubeconfigRequest(
                user=user,
                ttl_seconds=seconds,
                recipient_key=recipient.public_key_b64,
                request_id=request_id,
                operator_key=operator.signing_key_b64,
                signature=operator.sign(statement),
            )
        except ValidationError as exc:
            raise RequestRefused("; ".join(errors.field_errors(exc))) from None
        result: KubeconfigResult = await self._cluster_update(
            name, ClusterWorkflow.kubeconfig, request
        )
        if result.issue.request_id != request.request_id:
            raise KubegateError(f"cluster {name} answered another kubeconfig request")
        # the gateway's name comes through Temporal too: only an agent approved from this
        # machine (its keys pinned here) is believed
        gateway = (await self.cluster_state(name)).gateway
        if self._approved_fingerprint(gateway) is None:
            raise KubegateError(
                f"cluster {name} is on gateway {gateway}, whose agent was not approved from this "
                "machine: its kubeconfig cannot be checked (record the agent's fingerprint with "
                f"kubegate gateway approve {gateway} FINGERPRINT)"
            )
        _, signing_key = await self.approved_agent_keys(gateway)
        statement = issued_statement(
            gateway, name, recipient.public_key_b64, result.issue, result.sealed
        )
        if not verify_signature(signing_key, statement, result.signature):
            raise KubegateError(
                f"the kubeconfig of cluster {name} is not signed by gateway {gateway}'s "
                "approved agent: refused (something between you and the agent answered)"
            )
        try:
            text = recipient.open(result.sealed, kubeconfig_binding(name, request.request_id))
        except SealError as exc:
            problem = f"the kubeconfig of cluster {name} cannot be opened: {exc}"
            raise KubegateError(problem) from None
        return text, result.issue

    def operator_key(self) -> AgentKey:
        """This operator's key (`<home>/operator.key`, 0600, made on first use): it signs
        requests only an operator may make; agents list the operators they honour by its
        signing key (`kubegate operator key` prints it)."""
        return AgentKey.load_or_create(self.settings.home / "operator.key")

    async def cluster_events(self, name: str) -> EventsResult:
        """Recent vCenter events and tasks of a cluster's VMs and folder (by its agent)."""
        result: EventsResult = await self._cluster_update(name, ClusterWorkflow.collect_events)
        return result

    async def in_flight(self, name: str) -> list[InFlight]:
        """What a cluster's workflow is waiting on right now: each activity in flight, its
        attempt, its last heartbeat (the stage, the vCenter task, the VM, what it waits for)
        and its last failure, as Temporal has them."""
        described = await self.cluster_handle(name).describe()
        found = []
        for pending in described.raw_description.pending_activities:
            heartbeat: Any = None
            if pending.HasField("heartbeat_details") and pending.heartbeat_details.payloads:
                with contextlib.suppress(Exception):  # (an undecodable beat says nothing)
                    values = await self.client.data_converter.decode(
                        pending.heartbeat_details.payloads
                    )
                    heartbeat = values[0] if values else None
            seen = (
                pending.last_heartbeat_time.ToDatetime(tzinfo=UTC)
                if pending.HasField("last_heartbeat_time")
                else None
            )
            found.append(
                InFlight(
                    activity=pending.activity_type.name,
                    attempt=pending.attempt,
                    heartbeat=heartbeat if isinstance(heartbeat, dict) else None,
                    heartbeat_at=seen,
                    last_failure=pending.last_failure.message
                    if pending.HasField("last_failure")
                    else "",
                )
            )
        return found

    async def wait_cluster(
        self,
        name: str,
        done: Callable[[ClusterState], bool],
        on_change: Callable[[ClusterState], None] | None = None,
        timeout: float = 3600.0,
        interval: float = 0.5,
    ) -> ClusterState:
        """Poll the cluster's state until done(state); on_change sees every new step."""
        return await _poll(
            lambda: self.cluster_state(name), f"cluster {name}", done, on_change, timeout, interval
        )

    # -- gateways -------------------------------------------------------------------------------

    def gateway_handle(self, name: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(names.gateway_workflow_id(name))

    async def create_gateway(
        self,
        name: str,
        *,
        system: bool = False,
        timing: Timing | None = None,
        task_queue: str = names.CONTROL_TASK_QUEUE,
        fingerprint: str | None = None,
    ) -> tuple[GatewayState, str]:
        """Start the gateway (Pending); returns its state and the pairing code (shown once).
        With the agent's fingerprint, the agent that pairs with it is approved at once."""
        if not names.is_dns_label(name) or len(name) > 40:
            raise RequestRefused(f"NAME: {name!r} must be a DNS label of at most 40 characters")
        code, pairing = _new_pairing(fingerprint)
        try:
            handle = await self.client.start_workflow(
                GatewayWorkflow.run,
                GatewayInput(name=name, pairing=pairing, system=system, timing=timing or Timing()),
                id=names.gateway_workflow_id(name),
                task_queue=task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                static_summary=f"{'System gateway' if system else 'Private cloud gateway'} {name}",
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(names.KIND, "gateway"),
                        SearchAttributePair(names.STATUS, GatewayStatus.PENDING.value),
                        SearchAttributePair(names.GATEWAY, name),
                    ]
                ),
            )
        except WorkflowAlreadyStartedError:
            raise RequestRefused(f"gateway {name} already exists") from None
        # a gateway of the same name before this one: its approval is not this one's
        self._approved_path(name).unlink(missing_ok=True)
        if fingerprint is not None:
            self._record_approval(name, fingerprint)
        state: GatewayState = await handle.query(GatewayWorkflow.state_query)
        return state, code

    async def gateway_state(self, name: str) -> GatewayState:
        if not names.is_dns_label(name):
            raise KubegateError(f"gateway {name!r}: must be a DNS label")
        try:
            state: GatewayState = await self.gateway_handle(name).query(GatewayWorkflow.state_query)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise RequestRefused(f"gateway {name} does not exist") from None
            raise
        except WorkflowQueryFailedError as exc:
            raise KubegateError(f"gateway {name} did not answer ({exc.message})") from None
        return state

    async def list_gateways(self, include_deleted: bool = False) -> list[GatewayState]:
        query = "KubegateKind = 'gateway'"
        if not include_deleted:
            query += " AND ExecutionStatus = 'Running'"
        ids = [e.id async for e in self.client.list_workflows(query)]
        states = await asyncio.gather(
            *(
                self.client.get_workflow_handle(i).query(
                    GatewayWorkflow.state_query, rpc_timeout=timedelta(seconds=10)
                )
                for i in dict.fromkeys(ids)
            ),
            return_exceptions=True,
        )
        found = [s for s in states if isinstance(s, GatewayState)]
        return sorted(found, key=lambda s: s.name)

    async def register_agent(
        self,
        gateway: str,
        key: AgentKey,
        pairing_code: str | None,
        *,
        host: str = "",
        installer_vm: str | None = None,
        installer_address: str | None = None,
        version: str = VERSION,
    ) -> GatewayState:
        """Pair an agent with its gateway (once, with the code); a paired agent just checks."""
        state = await self.gateway_state(gateway)
        if state.agent is not None and state.agent.public_key == key.public_key_b64:
            # paired before signatures, or started from another release: say so (a deleted
            # gateway takes no more Updates: nothing to say)
            known = (state.agent.signing_key, state.agent.version)
            if (
                known != (key.signing_key_b64, version)
                and state.status is not GatewayStatus.DELETED
            ):
                request = RegisterRequest(
                    public_key=key.public_key_b64,
                    key_id=key.key_id,
                    signing_key=key.signing_key_b64,
                    host=host,
                    version=version,
                )
                again: GatewayState = await self._gateway_update(
                    gateway, GatewayWorkflow.register, request
                )
                return again
            return state
        if pairing_code is None:
            raise RequestRefused(
                f"gateway {gateway} is not paired with this agent: give the pairing code "
                "(--pairing-code-file, KUBEGATE_PAIRING_CODE_FILE, or --installer-vm to read it)"
            )
        salt = await self.gateway_handle(gateway).query(GatewayWorkflow.pairing_salt)
        request = RegisterRequest(
            pairing_proof=await asyncio.to_thread(pairing_proof, pairing_code, salt),
            public_key=key.public_key_b64,
            key_id=key.key_id,
            signing_key=key.signing_key_b64,
            version=version,
            host=host,
            installer_vm=installer_vm,
            installer_address=installer_address,
        )
        result: GatewayState = await self._gateway_update(
            gateway, GatewayWorkflow.register, request
        )
        return result

    async def gateway_config(self, gateway: str, file: GatewayFile, password: str) -> GatewayConfig:
        """The configuration with the password sealed to the gateway's agent."""
        endpoint = file.vcenter.endpoint()
        ip_pool = file.ip_pool
        if file.create_ip_pool is not None:
            ip_pool = ip_pool or file.create_ip_pool.get("name")
        credentials = await self.seal_credentials(
            gateway, endpoint, file.vcenter.username, password, default_account_name(gateway)
        )
        try:
            return GatewayConfig(
                credentials=credentials,
                placement=file.placement,
                ssh_keys=file.ssh_keys,
                ntp_servers=file.ntp_servers,
                ip_allocation=file.ip_allocation,
                ip_pool=ip_pool,
                vip=file.vip,
                size=file.size,
                healing=file.healing,
            )
        except ValidationError as exc:
            raise RequestRefused("; ".join(errors.field_errors(exc))) from None

    async def approve_agent(self, gateway: str, fingerprint: str) -> GatewayState:
        """Approve the gateway's paired agent by the fingerprint it showed on its console."""
        result: GatewayState = await self._gateway_update(
            gateway, GatewayWorkflow.approve, ApproveRequest(fingerprint=fingerprint)
        )
        self._record_approval(gateway, fingerprint)
        return result

    async def rekey_agent(self, gateway: str, old: AgentKey, new: AgentKey) -> GatewayState:
        """Re-seal what the gateway keeps to `new` (opening it with `old`, the agent's current
        key, on this machine) and have the gateway take the new keys, signed by the old."""
        state = await self.gateway_state(gateway)
        agent = state.agent
        if agent is None or agent.key_id != old.key_id:
            raise RequestRefused(
                f"gateway {gateway}: this machine's agent key ({old.key_id}) is not the "
                "gateway's agent key: run rekey where its agent runs"
            )

        resealed: dict[str, SealedSecret] = {}

        def reseal(credentials: VCenterCredentials) -> SealedSecret:
            """The same secret, sealed to the new key once (the gateway's configuration and
            its default account share one seal, and must go on sharing it)."""
            binding = credentials.password.binding
            if binding is None:
                raise RequestRefused(
                    "a password sealed without a binding: rotate it first (account rotate)"
                )
            digest = credentials.password.digest
            if digest not in resealed:
                password = old.open(credentials.password, binding)
                resealed[digest] = seal(password, new.public_bytes, binding)
            return resealed[digest]

        accounts = {a.name: reseal(a.credentials) for a in state.accounts}
        config = reseal(state.config.credentials) if state.config is not None else None
        request = RekeyRequest(
            public_key=new.public_key_b64,
            key_id=new.key_id,
            signing_key=new.signing_key_b64,
            accounts=accounts,
            config_password=config,
            signature="",
        )
        request.signature = old.sign(request.statement(gateway))
        result: GatewayState = await self._gateway_update(gateway, GatewayWorkflow.rekey, request)
        self._record_approval(gateway, new.fingerprint)
        return result

    async def configure_gateway(
        self, gateway: str, file: GatewayFile, password: str
    ) -> GatewayState:
        """Create the file's IP pool if asked, seal the password, configure: provisioning.

        A pool this call created is deleted again if the configuration is refused or fails.
        """
        config = await self.gateway_config(gateway, file, password)  # needs it paired
        await self.require_agent(gateway)
        created: IpPoolSpec | None = None
        if file.create_ip_pool is not None:
            try:
                pool = file.pool_to_create(gateway)
            except ValueError as exc:
                raise RequestRefused(str(exc)) from None
            existing = {p.spec.name for p in await self.list_pools(gateway, strict=True)}
            if pool.name not in existing:
                await self.create_pool(pool)
                created = pool
        try:
            state: GatewayState = await self._gateway_update(
                gateway, GatewayWorkflow.configure, config
            )
        except KubegateError:
            if created is not None:
                with contextlib.suppress(KubegateError, RPCError):
                    await self.delete_pool(gateway, created.name)
            raise
        return state

    async def reset_gateway(self, gateway: str) -> tuple[GatewayState, str | None]:
        """Reset a stuck or failed gateway; a new pairing code if its installer never paired."""
        state = await self.gateway_state(gateway)
        unpaired = state.agent is None or not state.agent.approved
        code, pairing = _new_pairing() if unpaired else (None, None)
        result: GatewayState = await self._gateway_update(
            gateway, GatewayWorkflow.reset, ResetRequest(pairing=pairing)
        )
        return result, code

    async def resize_gateway(self, gateway: str, size: int) -> GatewayState:
        result: GatewayState = await self._gateway_update(
            gateway,
            GatewayWorkflow.resize,
            ResizeRequest(size=size),
        )
        return result

    async def upgrade_gateway(self, gateway: str, version: str | None = None) -> GatewayState:
        result: GatewayState = await self._gateway_update(
            gateway, GatewayWorkflow.upgrade, UpgradeRequest(version=version)
        )
        return result

    async def delete_gateway(self, gateway: str) -> GatewayState:
        result: GatewayState = await self._gateway_update(gateway, GatewayWorkflow.delete)
        return result

    async def wait_gateway(
        self,
        name: str,
        done: Callable[[GatewayState], bool],
        on_change: Callable[[GatewayState], None] | None = None,
        timeout: float = 3600.0,
        interval: float = 0.5,
    ) -> GatewayState:
        """Poll the gateway's state until done(state); on_change sees every new step."""
        return await _poll(
            lambda: self.gateway_state(name), f"gateway {name}", done, on_change, timeout, interval
        )

    async def gateway_events(self, gateway: str) -> EventsResult:
        """Recent vCenter events and tasks of the gateway's VMs (run by its agent)."""
        result: EventsResult = await self._gateway_update(gateway, GatewayWorkflow.collect_events)
        return result

    async def reconcile_gateway(self, name: str, retry_given_up: bool = False) -> ClusterHealth:
        """Compare a Running gateway's own nodes with their record now and repair them;
        returns what it saw and did."""
        health: ClusterHealth = await self._gateway_update(
            name, GatewayWorkflow.reconcile, ReconcileRequest(retry_given_up=retry_given_up)
        )
        return health

    async def _gateway_update(self, gateway: str, update: Any, *args: Any) -> Any:
        return await self._update(self.gateway_handle(gateway), f"gateway {gateway}", update, *args)

    # -- orphan audits ----------------------------------------------------------------------

    async def start_audit(self, gateway: str) -> str:
        """Ask the gateway for an orphan audit (an AuditWorkflow it starts); its workflow id."""
        if not names.is_dns_label(gateway):
            raise RequestRefused(f"--gateway: {gateway!r} must be a DNS label")
        stamp = f"{datetime.now(UTC):%Y%m%dt%H%M%S}-{secrets.token_hex(3)}"
        started: AuditStart = await self._gateway_update(
            gateway,
            GatewayWorkflow.start_audit,
            AuditStart(workflow_id=audit_workflow_id(gateway, stamp)),
        )
        return started.workflow_id

    async def audit_state(self, workflow_id: str) -> AuditState:
        state: AuditState = await self.client.get_workflow_handle(workflow_id).query(
            AuditWorkflow.state_query
        )
        return state

    async def audit(
        self,
        gateway: str,
        timeout: float = 1800.0,
        on_change: Callable[[AuditState], None] | None = None,
    ) -> AuditState:
        """Start an audit of the gateway and wait until it has listed what is left over."""
        workflow_id = await self.start_audit(gateway)
        return await _poll(
            lambda: self.audit_state(workflow_id),
            f"audit {workflow_id}",
            lambda s: s.status is not AuditStatus.LISTING,
            on_change,
            timeout,
            0.3,
        )

    async def wait_audit(
        self, workflow_id: str, *statuses: AuditStatus, timeout: float = 300.0
    ) -> AuditState:
        """Poll an audit's state until it has one of these statuses."""
        return await _poll(
            lambda: self.audit_state(workflow_id),
            f"audit {workflow_id}",
            lambda s: s.status in statuses,
            None,
            timeout,
            0.3,
        )

    async def clean_audit(self, workflow_id: str, items: list[str]) -> CleanResult:
        """Remove exactly these items the audit listed (each checked again first)."""
        result: CleanResult = await self._update(
            self.client.get_workflow_handle(workflow_id),
            f"audit {workflow_id}",
            AuditWorkflow.clean,
            CleanRequest(items=items),
        )
        return result

    async def close_audit(self, workflow_id: str) -> None:
        """End an audit without cleaning."""
        with contextlib.suppress(RPCError):
            await self.client.get_workflow_handle(workflow_id).signal(AuditWorkflow.close)

    # -- cloud accounts ---------------------------------------------------------------------

    async def create_account(self, spec: CloudAccountSpec, password: str) -> AccountSummary:
        """Check the account on its gateway's agent (preflight) and keep it in the gateway."""
        for state in await self.list_gateways():
            if state.name != spec.gateway and state.account(spec.name) is not None:
                raise RequestRefused(
                    f"name: cloud account {spec.name} exists already (gateway {state.name})"
                )
        endpoint = spec.vcenter.endpoint()
        request = AccountRequest(
            name=spec.name,
            credentials=await self.seal_credentials(
                spec.gateway, endpoint, spec.vcenter.username, password, spec.name
            ),
            placement=spec.placement,
        )
        await self.require_agent(spec.gateway)
        result: AccountSummary = await self._gateway_update(
            spec.gateway, GatewayWorkflow.add_account, request
        )
        return result

    async def rotate_account(
        self, name: str, password: str, gateway: str | None = None
    ) -> AccountSummary:
        """New password for an account: sealed, checked by preflight on the agent, then kept."""
        gateway = gateway or await self.account_gateway(name)
        state = await self.gateway_state(gateway)
        account = state.account(name)
        if account is None:
            raise RequestRefused(f"NAME: gateway {gateway} has no cloud account {name!r}")
        current = account.credentials
        request = RotateRequest(
            name=name,
            credentials=await self.seal_credentials(
                gateway, current.endpoint, current.username, password, name
            ),
        )
        await self.require_agent(gateway)
        result: AccountSummary = await self._gateway_update(
            gateway, GatewayWorkflow.rotate_account, request
        )
        return result

    async def list_accounts(self, gateway: str | None = None) -> list[AccountSummary]:
        states = [await self.gateway_state(gateway)] if gateway else await self.list_gateways()
        out: list[AccountSummary] = []
        for state in states:
            out += await self.gateway_handle(state.name).query(GatewayWorkflow.accounts)
        return sorted(out, key=lambda a: (a.gateway, a.name))

    async def account_gateway(self, account: str) -> str:
        """The gateway that keeps the cloud account (names are unique across gateways)."""
        holders = [s.name for s in await self.list_gateways() if s.account(account) is not None]
        if not holders:
            raise RequestRefused(
                f"cloud_account: no gateway has a cloud account {account!r} "
                "(kubegate account list shows them)"
            )
        if len(holders) > 1:
            raise RequestRefused(
                f"cloud_account: {account!r} exists in gateways {', '.join(holders)}; name "
                "the gateway"
            )
        return holders[0]

    async def delete_account(self, name: str, gateway: str | None = None) -> None:
        gateway = gateway or await self.account_gateway(name)
        await self._gateway_update(gateway, GatewayWorkflow.delete_account, name)

    # -- IP pools -------------------------------------------------------------------------------

    def pool_handle(self, gateway: str, pool: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(names.ippool_workflow_id(gateway, pool))

    async def pool_gateway(self, pool: str, gateway: str | None, default: str) -> str:
        """The gateway of the pool named: `gateway` when given; else the one gateway that has
        a pool of that name, else `default`. Refused (RequestRefused) when several have one."""
        if gateway:
            return gateway
        query = "KubegateKind = 'ippool' AND ExecutionStatus = 'Running'"
        found = sorted(
            {
                execution.id.split("/")[1]
                async for execution in self.client.list_workflows(query)
                if execution.id.count("/") == 2 and execution.id.endswith(f"/{pool}")
            }
        )
        if len(found) > 1:
            raise RequestRefused(
                f"--gateway: IP pool {pool} exists on gateways {', '.join(found)}; say which"
            )
        return found[0] if found else default

    async def list_pools(
        self, gateway: str | None = None, strict: bool = False
    ) -> list[PoolStatus]:
        """Every live pool (of one gateway, or all), with free and used counts.

        A pool that does not answer is left out, or with strict=True raises KubegateError.
        """
        query = "KubegateKind = 'ippool' AND ExecutionStatus = 'Running'"
        if gateway:
            if not names.is_dns_label(gateway):
                raise KubegateError(f"gateway {gateway!r}: must be a DNS label")
            query += f" AND KubegateGateway = '{gateway}'"
        handles = [
            self.client.get_workflow_handle(execution.id)
            async for execution in self.client.list_workflows(query)
        ]
        statuses = await asyncio.gather(
            *(h.query(IpPoolWorkflow.status, rpc_timeout=timedelta(seconds=10)) for h in handles),
            return_exceptions=True,
        )
        found = [s for s in statuses if isinstance(s, PoolStatus)]
        if strict and len(found) < len(handles):
            silent = [
                h.id
                for h, s in zip(handles, statuses, strict=True)
                if not isinstance(s, PoolStatus)
            ]
            raise KubegateError(
                f"cannot read IP pool(s) {', '.join(silent)} (is the control worker running?); "
                "refusing to decide on overlaps without them"
            )
        return sorted(found, key=lambda s: (s.spec.gateway, s.spec.name))

    async def create_pool(
        self,
        spec: IpPoolSpec,
        *,
        task_queue: str = names.CONTROL_TASK_QUEUE,
        continue_as_new_after: int | None = None,
    ) -> PoolStatus:
        """Start the pool's workflow; refused if it exists or overlaps a pool of its gateway.

        The overlap check reads the gateway's live pools; two overlapping pools created at
        the same instant are not caught (the gateway workflow will own this list).
        """
        for other in await self.list_pools(spec.gateway, strict=True):
            if other.spec.name == spec.name:
                raise RequestRefused(
                    f"IP pool {spec.name} of gateway {spec.gateway} already exists"
                )
            if spec.overlaps(other.spec):
                raise RequestRefused(
                    f"IP pool {spec.name} ({spec.describe_range()}) overlaps pool "
                    f"{other.spec.name} ({other.spec.describe_range()}) of gateway {spec.gateway}"
                )
        try:
            handle = await self.client.start_workflow(
                IpPoolWorkflow.run,
                IpPoolInput(spec=spec)
                if continue_as_new_after is None
                else IpPoolInput(spec=spec, continue_as_new_after=continue_as_new_after),
                id=names.ippool_workflow_id(spec.gateway, spec.name),
                task_queue=task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                static_summary=f"IP pool {spec.name} ({spec.describe_range()}) of gateway "
                f"{spec.gateway}",
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(names.KIND, "ippool"),
                        SearchAttributePair(names.STATUS, "Active"),
                        SearchAttributePair(names.GATEWAY, spec.gateway),
                    ]
                ),
            )
        except WorkflowAlreadyStartedError:
            raise RequestRefused(
                f"IP pool {spec.name} of gateway {spec.gateway} already exists"
            ) from None
        status: PoolStatus = await handle.query(IpPoolWorkflow.status)
        return status

    async def pool_status(self, gateway: str, pool: str) -> PoolStatus:
        try:
            status: PoolStatus = await self.pool_handle(gateway, pool).query(IpPoolWorkflow.status)
        except RPCError as exc:
            raise self._pool_error(exc, gateway, pool) from None
        if status.deleting:  # a closed pool still answers queries by replay
            raise RequestRefused(f"IP pool {pool} of gateway {gateway} does not exist (deleted)")
        return status

    async def pool_allocations(
        self, gateway: str, pool: str, owner: str | None = None, limit: int = 100_000
    ) -> list[Allocation]:
        handle = self.pool_handle(gateway, pool)
        out: list[Allocation] = []
        try:
            while True:
                page: AllocationsPage = await handle.query(
                    IpPoolWorkflow.allocations,
                    AllocationsQuery(owner=owner, offset=len(out), limit=min(limit, 5_000)),
                )
                out += page.allocations
                if not page.allocations or len(out) >= min(page.total, limit):
                    return out
        except RPCError as exc:
            raise self._pool_error(exc, gateway, pool) from None

    async def allocate(
        self, gateway: str, pool: str, owner: str, slots: list[str]
    ) -> AllocateResult:
        """Allocate directly (tools, tests); workflows use the allocate_addresses activity."""
        try:
            request = AllocateRequest(owner=owner, slots=slots)
            batcher = AllocationBatcher.of(self.pool_handle(gateway, pool))
            result = await batcher.allocate(request)
        except ApplicationError as exc:
            raise KubegateError(exc.message) from None
        except WorkflowUpdateFailedError as exc:
            raise KubegateError(failure_message(exc)) from None
        except RPCError as exc:
            raise self._pool_error(exc, gateway, pool) from None
        return result

    async def release(
        self, gateway: str, pool: str, owner: str, slots: list[str] | None = None
    ) -> ReleaseResult:
        try:
            handle = self.pool_handle(gateway, pool)
            request = ReleaseRequest(owner=owner, slots=slots)
            result: ReleaseResult = await send_update(
                handle.id,
                lambda: handle.execute_update(IpPoolWorkflow.release, request),
                client=self.client,
            )
        except WorkflowUpdateFailedError as exc:
            raise KubegateError(failure_message(exc)) from None
        except RPCError as exc:
            raise self._pool_error(exc, gateway, pool) from None
        return result

    async def delete_pool(self, gateway: str, pool: str) -> PoolStatus:
        """End the pool; refused (with the owners named) while addresses are allocated."""
        handle = self.pool_handle(gateway, pool)
        try:
            await send_update(
                handle.id, lambda: handle.execute_update(IpPoolWorkflow.delete), client=self.client
            )
            status: PoolStatus = await handle.result()
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.type == errors.POOL_IN_USE:
                raise RequestRefused(cause.message) from None
            raise KubegateError(failure_message(exc)) from None
        except RPCError as exc:
            raise self._pool_error(exc, gateway, pool) from None
        return status

    @staticmethod
    def _pool_error(exc: RPCError, gateway: str, pool: str) -> Exception:
        if exc.status == RPCStatusCode.NOT_FOUND or "workflow execution already completed" in str(
            exc
        ):
            return RequestRefused(f"IP pool {pool} of gateway {gateway} does not exist")
        return exc


S = TypeVar("S", ClusterState, GatewayState, AuditState)


class InFlight(BaseModel):
    """An activity a lifecycle waits on right now (KubegateClient.in_flight)."""

    activity: str
    attempt: int
    heartbeat: dict[str, Any] | None = None
    heartbeat_at: datetime | None = None
    last_failure: str = ""

    def said(self) -> str:
        """Its last heartbeat in words: 'stage=guest task=Task:task-12 waiting=[...]'."""
        beat = self.heartbeat or {}
        return " ".join(f"{k}={v}" for k, v in beat.items() if v not in (None, "", 0, []))


def existing(state: ClusterState) -> list[Node]:
    """The nodes whose VM exists (a count shows what is, not what was planned)."""
    return [n for n in state.nodes if n.vm and n.phase not in ("deleted", "planned")]


async def _poll(
    read: Callable[[], Awaitable[S]],
    what: str,
    done: Callable[[S], bool],
    on_change: Callable[[S], None] | None,
    timeout: float,
    interval: float,
) -> S:
    """Read a state until done(state); on_change sees each new step, status or step state."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: tuple[Any, ...] = ()
    while True:
        state = await read()
        steps = state.steps
        running = [s for s in steps if s.state is StepState.RUNNING]
        step = running[-1] if running else (steps[-1] if steps else None)
        mark = (
            state.status,
            len(steps),
            step.state if step else None,
            step.detail if step else None,
            getattr(state, "overdue", None),
        )
        if on_change is not None and mark != last:
            on_change(state)
            last = mark
        if done(state):
            return state
        if loop.time() > deadline:
            at = ""
            if step is not None:
                detail = f": {step.detail}" if step.detail else ""
                at = f" (at {step.title}, {step.state.value}{detail})"
            raise KubegateError(f"{what} still {state.status} after {timeout:.0f}s{at}")
        await asyncio.sleep(interval)


def _new_pairing(fingerprint: str | None = None) -> tuple[str, PairingState]:
    """A fresh pairing code and what the gateway keeps of it: a hash of the agent's proof
    (never the code, nor what an agent presents), its expiry, the approved fingerprint."""
    code = new_pairing_code()
    salt = secrets.token_hex(8)
    return code, PairingState(
        salt=salt,
        verifier=pairing_verifier(pairing_proof(code, salt)),
        expires_at=datetime.now(UTC) + PAIRING_CODE_LIFETIME,
        fingerprint=normalize_fingerprint(fingerprint) if fingerprint else None,
    )
