"""GatewayWorkflow: one private cloud gateway's whole life (an entity workflow).

Pairing, configuration, its own nodes (a node set, as a cluster's), cloud
accounts, the clusters deployed through it and their queue during an upgrade, reset, resize,
upgrade and delete. The gateway agent is the only process that talks to its vCenter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
from datetime import datetime, timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)
from temporalio.workflow import ActivityCancellationType, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from domain import errors, names
    from domain.account import Placement, SealedSecret, VCenterCredentials
    from domain.audit import (
        AUDIT_LIFETIME_HOURS,
        AuditAccount,
        AuditInput,
        AuditRecord,
        AuditStart,
        is_audit_id,
    )
    from domain.cluster import Healing
    from domain.details import steps_table, text_table, trouble
    from domain.events import EventsRequest, EventsResult
    from domain.gateway import (
        GATEWAY_NODES_SUFFIX,
        TROUBLESHOOTING_HINTS,
        AccountCheckRequest,
        AccountRequest,
        AccountSummary,
        AgentInfo,
        ApproveRequest,
        CloudAccount,
        ClusterAdmission,
        ClusterChanged,
        ClusterCheckRequest,
        ClusterRecord,
        ClusterRequest,
        GatewayConfig,
        GatewayInput,
        GatewayNodes,
        GatewayNodeSpec,
        GatewayState,
        GatewayStatus,
        RegisterRequest,
        RekeyRequest,
        ResetRequest,
        ResizeRequest,
        RotateRequest,
        UpgradeRequest,
        can_resize,
        can_upgrade,
        cluster_placements,
        cluster_template,
        default_account_name,
        gateway_node_spec,
        newest_release_after,
        nodes_config_problem,
        pairing_proof,
    )
    from domain.gateway import (
        REGISTRATION_OVERDUE_AFTER as OVERDUE_AFTER,
    )
    from domain.health import (
        CHECKS_PER_RUN,
        ClusterHealth,
        PoolHealth,
        ReconcileRequest,
    )
    from domain.lifecycle import (
        ClusterAccount,
        ClusterInput,
        ClusterStatus,
        Step,
        StepState,
        note_waiting,
    )
    from domain.preflight import CheckStatus, PreflightReport, PreflightRequest
    from domain.presence import (
        PRESENCE_ROUND,
        AgentPresence,
        PresenceAnswer,
        PresenceRequest,
    )
    from domain.sealing import fingerprint, key_id, normalize_fingerprint, verify_signature
    from domain.trust import (
        AccountAnswer,
        AccountCheck,
        AgentAuthorization,
        LifecycleFact,
        LifecycleRef,
        ReleaseIntent,
    )
    from domain.version import VERSION, agent_version_problem, version_at_least
    from domain.vm import InstallerVmRequest, InstallerVmResult
    from workflows.nodes import (
        LEAVES_SINCE,
        SETTLE_POINTS,
        NodeSet,
        StepFailed,
        decoded,
        invalid_spec,
        invalid_state,
        verify_result,
    )

Operation = Literal["provision", "reset", "resize", "upgrade", "delete"]

#: statuses in which a gateway takes cluster requests (Upgrading: they wait in its queue)
_ADMITTING = (GatewayStatus.RUNNING, GatewayStatus.UPGRADING)

#: how long an Update waits for the agent to take and finish its checks
_AGENT_DEADLINE = timedelta(minutes=3)

#: patch: a cluster's "Deleted" is believed only once Temporal shows it ended so
VERIFIED_DELETES = "verified-cluster-deletes"

#: patch: a Running gateway watches whether its agent is there (agent_presence)
AGENT_PRESENCE = "watch-agent-presence"

#: patch: a gateway starts orphan audits (AuditWorkflow) and its agent works for them
ORPHAN_AUDITS = "orphan-audits"

#: patch: a Running gateway reconciles its own nodes (one name per loop pass, "<this>-<pass>",
#: so a run begun before it takes it up at its next pass)
RECONCILE = "gateway-reconciles-its-nodes"
#: patch: a Running gateway wakes its clusters' runs once per kubegate release
WAKE_CLUSTERS = "wake-clusters-once-per-release"
#: a gateway's nodes: its configuration's healing (a cluster's defaults), each node's health
GATEWAY_NODE_HEALTH = PoolHealth(unhealthy_after_seconds=300, max_unhealthy=1)

#: the first agent release with the audit's activities
AUDITS_SINCE = "0.3.0"

#: orphan audits of one gateway running at once, at most
_AUDITS_AT_ONCE = 5

#: steps of earlier attempts kept after a reset (the oldest go first)
_HISTORY_KEPT = 200


@workflow.defn(name="GatewayWorkflow")
class GatewayWorkflow:
    """Pair, configure, provision, change and delete one gateway; every step recorded."""

    @workflow.init
    def __init__(self, input: GatewayInput) -> None:
        self.input = input
        self.gw = input.state or GatewayState(
            name=input.name, pairing=input.pairing, system=input.system
        )
        self.timing = input.timing
        self.aborting = False
        self.operation = ""  # the operation new steps belong to (see `_begin`)
        self.op: Operation | None = None
        self.op_arg: Any = None
        self.busy = 0  # Update handlers running checks on the agent (configure, add account)
        self.starting = 0  # cluster workflows being started by request_cluster
        self.provisioning: asyncio.Task[None] | None = None
        self.published: str | None = None  # the status last written to search attributes
        #: credentials being checked before they are kept (the agent may use these too)
        self.checks: list[AccountCheck] = []
        self.verifying = 0  # cluster "Deleted" signals being confirmed
        self.confirming: set[str] = set()  # the clusters they are about
        #: an operation ended in this run (continue as new at the next quiet moment)
        self.settled = False
        #: the task watching whether the agent is there (domain/presence.py)
        self.presence: asyncio.Task[None] | None = None
        #: a run from before presence was watched (it replays without it)
        self.presence_declined = False
        #: signals to clusters about the agent, sent before the run continues as new
        self.telling: list[asyncio.Task[None]] = []
        #: its nodes reconcile in this run (RECONCILE taken), loop passes, quiet reconciles
        self.reconciling = False
        self.passes = 0
        self.quiet_checks = 0
        #: reconciles asked for on demand (`reconcile` Update) and those carried out
        self.reconcile_asked = 0
        self.reconcile_served = 0
        self.retry_given_up = False
        self.wake_passes = 0  # loop passes that considered waking its clusters
        #: the gateway's own nodes, once configured (with `gw.nodes` and `gw.config`)
        self.nodes: NodeSet | None = None
        if self.gw.nodes is not None and self.gw.config is not None:
            self.nodes = self._node_set(self.gw.nodes, self.gw.config, input.secrets)

    # -- run ------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: GatewayInput) -> GatewayState:
        if self.gw.created_at is None:
            self.gw.created_at = self.gw.pairing_issued_at = workflow.now()
            self.gw.updated_at = workflow.now()
        self.publish()
        while True:
            self._wake_clusters()
            overdue = self._overdue_in()
            reconcile = self._until_reconcile()
            timeout = overdue if reconcile is None else min(overdue or reconcile, reconcile)
            try:
                await workflow.wait_condition(
                    functools.partial(self._wake, overdue is not None), timeout=timeout
                )
            except TimeoutError:
                if overdue is None:
                    pass  # a reconcile is due (below)
                elif self._overdue_in() is None:
                    continue  # paired (or reset) meanwhile: not overdue
                self.gw.overdue = True
                self.gw.hints = list(TROUBLESHOOTING_HINTS)
                self.gw.reason = (
                    f"the installer has not registered {int(OVERDUE_AFTER.total_seconds() // 60)}"
                    " minutes after the gateway was created; still waiting"
                )
                self.publish()
                continue
            op, arg = self.op, self.op_arg
            if op is None and self._presence_due():
                self._start_presence()
                continue
            if op is None and self._reconcile_due():
                await self._reconcile()
                continue
            if op is None:
                if not self._may_continue_as_new():
                    continue
                await workflow.wait_condition(workflow.all_handlers_finished)
                if self.op is None and (self.presence is not None or self.telling):
                    # (a run watching its agent: stop it and tell what was to be told; the
                    # next run watches again)
                    await self._stop_presence()
                    await asyncio.gather(*self.telling)
                    self.telling = []
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    if self.telling:  # (a cluster started meanwhile was told too)
                        await asyncio.gather(*self.telling)
                        self.telling = []
                if self.op is None:
                    workflow.continue_as_new(
                        GatewayInput(
                            name=self.gw.name,
                            pairing=self.gw.pairing,
                            system=self.gw.system,
                            timing=self.timing,
                            state=self.gw,
                            secrets=self.nodes.secrets if self.nodes is not None else None,
                        )
                    )
                continue
            if op != "provision":  # (a configure began in its Update, with its checks)
                self._begin(op)
            if op == "provision":
                await self._provision()
            elif op == "reset":
                await self._reset()
            elif op == "resize":
                await self._resize(arg)
            elif op == "upgrade":
                await self._upgrade(arg)
            elif op == "delete" and await self._delete():
                break
            if self.op == op:
                self.op, self.op_arg = None, None
            if self.nodes is not None:
                self.nodes.trim_steps()
            # an operation ended: a settle point, when this release reached it live. Decided
            # here, not when the loop wakes: a replayed run from before settle points must
            # wake exactly as it did then (an extra wake restarts the overdue timer and shifts
            # every later timer's id)
            self.settled = workflow.patched(f"{SETTLE_POINTS}-{self.gw.operations_run}")
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.gw

    # -- reconcile (its own nodes, as a cluster does: docs/gateways.md) --------------------

    def _reconciles(self) -> bool:
        """A Running gateway with nodes of its own (a system gateway has none)."""
        return (
            self.gw.status is GatewayStatus.RUNNING
            and self.nodes is not None
            and self.gw.nodes is not None
            and bool(self.gw.nodes.nodes)
        )

    def _until_reconcile(self) -> timedelta | None:
        """How long the loop may wait before its nodes' next reconcile (None: none)."""
        if not self._reconciles() or self.op is not None:
            return None
        if not self.reconciling:
            self.passes += 1
            self.reconciling = workflow.patched(f"{RECONCILE}-{self.passes}")
            if not self.reconciling:
                return None
        due = self._next_reconcile()
        return None if due is None else max(due - workflow.now(), timedelta(seconds=1))

    def _healing(self) -> Healing:
        return self.gw.config.healing if self.gw.config is not None else Healing()

    def _next_reconcile(self) -> datetime | None:
        """When its nodes' next scheduled reconcile is due (domain/health.py)."""
        return self.gw.health.next_reconcile(
            self._healing().reconcile_seconds, self.gw.updated_at or workflow.now()
        )

    def _reconcile_due(self) -> bool:
        if self.reconcile_asked > self.reconcile_served:
            return True
        due = self._next_reconcile() if self.reconciling and self._reconciles() else None
        return due is not None and workflow.now() >= due

    async def _reconcile(self) -> None:
        """Compare its nodes' VMs with their record and repair as a cluster with the default
        healing policy would (docs/clusters.md, Self-healing)."""
        asked = self.reconcile_asked
        health = self.gw.health
        try:
            nodes, record = self.nodes, self.gw.nodes
            if not self._reconciles() or nodes is None or record is None:
                return
            if self.retry_given_up:  # asked for: given-up repairs get their attempts again
                self.retry_given_up = False
                health.rearm_given_up()
            agent = self.gw.agent  # (what its agent can do: the release it registered with)
            nodes.account = nodes.account.model_copy(
                update={"agent_release": agent.version if agent is not None else None}
            )
            pools = {n.pool: GATEWAY_NODE_HEALTH for n in record.nodes}
            result = await nodes.look(health, self._healing(), pools, record.spec.size)
            if result is None or not result.repairs or not self._reconciles() or self.op:
                # (nothing to do, or vCenter not read, or an operation asked for meanwhile:
                # it goes first, and the next reconcile looks again)
                self.quiet_checks += 1
                if self.quiet_checks >= CHECKS_PER_RUN:
                    self.settled = True  # keep the run's history short: continue as new
                return
            self.quiet_checks = 0
            self._begin("repair")
            self.publish()
            await nodes.repair_all(health, self._healing(), result.repairs)
            nodes.trim_steps()
            self.settled = workflow.patched(f"{SETTLE_POINTS}-{self.gw.operations_run}")
        finally:
            self.reconcile_served = max(self.reconcile_served, asked)
            self.publish()

    def _wake(self, overdue_timer: bool) -> bool:
        """The main loop has work: an operation, continue-as-new, or a pairing that makes a
        running overdue timer moot."""
        return (
            self.op is not None
            or self._may_continue_as_new()
            or (overdue_timer and self._overdue_in() is None)
            or self._presence_due()
            or self.reconcile_asked > self.reconcile_served
        )

    def _begin(self, operation: str) -> None:
        """Steps from now on belong to a new run of `operation` (numbered on the gateway:
        its nodes' state comes and goes with resets)."""
        self.gw.operations_run += 1
        self.operation = operation

    def current_operation(self) -> tuple[str, int]:
        return self.operation, self.gw.operations_run

    def _may_continue_as_new(self) -> bool:
        return (
            (workflow.info().is_continue_as_new_suggested() or self.settled)
            and not self.busy
            and not self.verifying
            and self.provisioning is None
            and self.reconcile_asked <= self.reconcile_served  # (its handler waits for it)
        )

    def _overdue_in(self) -> timedelta | None:
        """Time left until an unregistered gateway is overdue; None when it cannot be."""
        if (
            self.gw.agent is not None
            or self.gw.overdue
            or self.gw.status is not GatewayStatus.PENDING
        ):
            return None
        issued = self.gw.pairing_issued_at or self.gw.created_at or workflow.now()
        left = issued + OVERDUE_AFTER - workflow.now()
        return max(left, timedelta(seconds=1))

    # -- is the agent there? (domain/presence.py) ----------------------------------------

    def _presence_due(self) -> bool:
        """A Running gateway with an approved agent that can answer, not watched yet."""
        agent = self.gw.agent
        return (
            self.presence is None
            and not self.presence_declined
            and self.gw.status is GatewayStatus.RUNNING
            and agent is not None
            and agent.approved
            and agent.signing_key is not None
            and version_at_least(agent.version, LEAVES_SINCE)
        )

    def _start_presence(self) -> None:
        if workflow.patched(AGENT_PRESENCE):
            self.presence = asyncio.create_task(self._watch_agent())
        else:  # (a run recorded before presence was watched)
            self.presence_declined = True

    async def _stop_presence(self) -> None:
        task, self.presence = self.presence, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch_agent(self) -> None:
        """One presence task at a time on the agent's queue: held for a round while the agent
        is there (its heartbeats keep it; silence times it out), answered at once while it is
        away (the next agent to poll takes it). History grows per round or change only."""
        silence = timedelta(seconds=self.timing.agent_silence_seconds)
        while (agent := self.gw.agent) is not None and agent.approved:
            # while it is there: a round held; first (not known yet) or while it is away: a
            # task answered at once (first: within the silence, else it is away)
            there = self.gw.agent_connected is not False
            hold = PRESENCE_ROUND if self.gw.agent_connected else timedelta(0)
            request = PresenceRequest(hold_seconds=int(hold.total_seconds()))
            call = str(workflow.uuid4())
            try:
                raw = await workflow.execute_activity(
                    "agent_presence",
                    request,
                    activity_id=call,
                    result_type=RawValue,
                    task_queue=names.presence_task_queue(self.gw.name),
                    start_to_close_timeout=hold + 2 * silence,
                    schedule_to_start_timeout=silence if there else None,
                    heartbeat_timeout=silence,
                    retry_policy=RetryPolicy(maximum_attempts=1),
                    cancellation_type=ActivityCancellationType.TRY_CANCEL,
                    summary="Is the agent there?" if there else "Waiting for the agent",
                )
            except ActivityError as exc:
                if isinstance(exc.cause, CancelledError):  # stopped (_stop_presence)
                    return
                stopping = getattr(exc.cause, "type", None) == "AgentStopping"
                self._agent_there(False, timedelta(0) if stopping else silence)
                if not there:  # it failed at once (not silence): do not spin
                    await workflow.sleep(silence)
                continue
            answer = verify_result(
                decoded(raw), request, "agent_presence", agent.signing_key, PresenceAnswer, call
            )
            if answer is None:  # not the approved agent's answer: nothing learned
                await workflow.sleep(silence)
                continue
            self._agent_there(True, silence)
        self.presence = None  # (no approved agent: watched again once there is one)

    def _agent_there(self, there: bool, silence: timedelta) -> None:
        """Record what the last presence task showed; tell the clusters when it changed."""
        now = workflow.now()
        changed = self.gw.agent_connected is not there
        if there:
            self.gw.agent_seen_at = now
        elif changed:  # its heartbeats stopped about `silence` ago
            self.gw.agent_seen_at = max(self.gw.agent_seen_at or now - silence, now - silence)
        self.gw.agent_connected = there
        if not changed:
            return
        self.publish()
        news = AgentPresence(gateway=self.gw.name, connected=there, seen_at=self.gw.agent_seen_at)
        for record in self.gw.clusters:
            if record.status != "Deleted":
                self.telling = [t for t in self.telling if not t.done()]
                self.telling.append(asyncio.create_task(self._tell(record.name, news)))

    def _note_waiting(self) -> None:
        """The gateway's own running steps say they wait for an absent agent."""
        away = (
            AgentPresence(gateway=self.gw.name, connected=False, seen_at=self.gw.agent_seen_at)
            if self.gw.agent_connected is False
            else None
        )
        note_waiting(self.gw.steps, away)

    def _wake_clusters(self) -> None:
        """Once per kubegate release: wake its clusters' runs, so that a run begun under an
        earlier release passes its main loop under this one and takes up what it added
        (reconciles, patch `reconcile-running-clusters-<pass>`)."""
        live = self.gw.live_clusters()
        if self.gw.status not in _ADMITTING or self.gw.woken_release == VERSION or not live:
            return
        # one name per pass: a run begun before this release (replayed without the marker)
        # wakes them at its first pass under it
        self.wake_passes += 1
        if not workflow.patched(f"{WAKE_CLUSTERS}-{self.wake_passes}"):
            return
        self.gw.woken_release = VERSION
        for cluster in live:
            self.telling.append(asyncio.create_task(self._wake_one(cluster)))

    async def _wake_one(self, cluster: str) -> None:
        handle = workflow.get_external_workflow_handle(names.cluster_workflow_id(cluster))
        try:
            await handle.signal("wake")
        except Exception as exc:  # gone meanwhile: nobody to wake
            workflow.logger.info("cluster %s: not woken (%s)", cluster, exc)

    async def _tell(self, cluster: str, news: AgentPresence) -> None:
        """Signal one cluster the agent's presence (a cluster gone meanwhile: nobody to tell)."""
        handle = workflow.get_external_workflow_handle(names.cluster_workflow_id(cluster))
        try:
            await handle.signal("agent_presence", news)
        except Exception as exc:
            workflow.logger.info("cluster %s: not told of the agent (%s)", cluster, exc)

    # -- operations -----------------------------------------------------------------------

    async def _provision(self) -> None:
        """Nodes (unless a system gateway), default account, installer off -> Running."""
        self.provisioning = asyncio.create_task(self._provision_steps())
        try:
            await self.provisioning
        except (asyncio.CancelledError, StepFailed) as exc:
            if self.op == "reset":
                return  # the main loop runs the reset next
            self.gw.error = str(exc)
            self._fail("provision")
            return
        finally:
            self.provisioning = None
        self.gw.error = None
        self._configured().record.provisioned = True
        self._set_status(GatewayStatus.RUNNING, "ready for cluster requests")

    async def _provision_steps(self) -> None:
        nodes = self._configured()
        if not self.gw.system:
            await nodes.converge(folder=True)
        await nodes.step("default-account", "Create the default cloud account", self._default)
        await nodes.step("installer", "Power off the installer VM", self._installer_off)

    async def _default(self, step: Step) -> None:
        if self.gw.config is None:  # a step body: this fails the step, not the workflow task
            raise invalid_state("the gateway lost its configuration meanwhile")
        name = default_account_name(self.gw.name)
        if self.gw.account(name) is None:
            self.gw.accounts.insert(
                0,
                CloudAccount(
                    name=name,
                    gateway=self.gw.name,
                    credentials=self.gw.config.credentials,
                    placement=self.gw.config.placement,
                    default=True,
                    created_at=workflow.now(),
                ),
            )
        step.objects = [f"account/{name}"]
        step.detail = f"{name}: {self.gw.config.credentials.username}"

    async def _installer_off(self, step: Step) -> None:
        await self._installer(step, "power_off")

    async def _installer(self, step: Step, action: Literal["power_off", "destroy"]) -> None:
        agent, config = self.gw.agent, self.gw.config
        if agent is None or agent.installer_vm is None or config is None:
            step.state = StepState.SKIPPED
            step.detail = "no installer VM known (the agent did not name one)"
            return
        result = await self._configured().agent(
            "vm_installer",
            InstallerVmRequest(
                credentials=config.credentials,
                vm=agent.installer_vm,
                action=action,
                installer_name=self.gw.name,
            ),
            InstallerVmResult,
            f"{'Power off' if action == 'power_off' else 'Destroy'} installer {agent.installer_vm}",
        )
        step.objects = [result.ref] if result.ref else []
        step.detail = (
            f"{agent.installer_vm}: {result.power_state or 'destroyed'}"
            if result.found
            else result.note or f"{agent.installer_vm}: not found (removed already)"
        )

    async def _reset(self) -> None:
        """Remove what the failed attempt made; back to Pending, agent kept, configure again."""
        request: ResetRequest = self.op_arg
        self.aborting = False
        await self._stop_presence()
        if self.gw.config is not None and self.gw.nodes is not None and not self.gw.system:
            self._set_status(GatewayStatus.DELETING, "reset: removing what the attempt created")
            try:
                await self._configured().teardown()
            except StepFailed as exc:
                self.gw.error = f"reset incomplete: {exc}; fix it and reset again"
                self._fail("reset")
                return
        if self.gw.nodes is not None:
            self.gw.history = (self.gw.history + self.gw.nodes.steps)[-_HISTORY_KEPT:]
        self.gw.nodes, self.gw.config, self.nodes = None, None, None
        self.gw.accounts = [a for a in self.gw.accounts if not a.default]
        self.gw.error = None
        if self.gw.agent is not None and not self.gw.agent.approved and self.gw.config is None:
            self.gw.agent = None  # paired by an agent nobody approved: drop it, pair anew
        if request is not None and request.pairing is not None and self.gw.agent is None:
            self.gw.pairing = request.pairing
            self.gw.pairing_issued_at = workflow.now()
            self.gw.overdue, self.gw.hints = False, []
        self._set_status(
            GatewayStatus.PENDING,
            "reset: configure it again"
            if self.gw.agent is not None
            else "reset: new pairing code issued; waiting for the installer",
        )

    async def _resize(self, request: ResizeRequest) -> None:
        nodes, record = self.nodes, self.gw.nodes
        if self.gw.config is None or nodes is None or record is None:  # validators make this
            self.gw.error = "resize: the gateway has no configuration"  # impossible; fail
            self._fail("resize")
            return
        config = self.gw.config.model_copy(update={"size": request.size})
        record.spec = gateway_node_spec(self.gw.name, config, self.gw.version)
        try:
            await nodes.converge()
        except StepFailed as exc:
            record.spec = gateway_node_spec(self.gw.name, self.gw.config, self.gw.version)
            self.gw.error = f"resize failed: {exc}"
            self._fail("resize")
            return
        self.gw.config = config
        await self._back_to_running(f"resized to {request.size} nodes")

    async def _upgrade(self, version: str) -> None:
        nodes, record = self.nodes, self.gw.nodes
        if self.gw.config is None or nodes is None or record is None:  # validators make this
            self.gw.error = "upgrade: the gateway has no configuration"  # impossible; fail
            self._fail("upgrade")
            return
        if not self.gw.system:
            record.spec = gateway_node_spec(self.gw.name, self.gw.config, version)
            try:
                await nodes.roll()
            except StepFailed as exc:
                self.gw.error = f"upgrade to {version} failed: {exc}; upgrade again to resume"
                self._fail("upgrade")
                return
        self.gw.version = version
        self.gw.target_version = None
        await self._back_to_running(f"upgraded to {version}")

    async def _back_to_running(self, reason: str) -> None:
        """Running again: queued clusters proceed, in the order they arrived."""
        self.gw.error = None
        self.gw.failed_operation = None
        self._set_status(GatewayStatus.RUNNING, reason)
        await workflow.wait_condition(lambda: self.starting == 0)  # every queued one started
        while self.gw.queue:
            name = self.gw.queue.pop(0)
            record = self.gw.cluster(name)
            if record is not None:
                record.queued = False
            try:
                await workflow.get_external_workflow_handle(names.cluster_workflow_id(name)).signal(
                    "proceed"
                )
            except Exception as exc:  # the cluster is gone (aborted while queued)
                workflow.logger.info("queued cluster %s not told to proceed: %s", name, exc)
            self.publish()

    async def _delete(self) -> bool:
        """Remove the gateway's VMs and addresses; True when it is gone."""
        self._set_status(GatewayStatus.DELETING, "deleting the gateway")
        await self._stop_presence()
        try:
            if self.gw.nodes is not None and self.gw.config is not None and not self.gw.system:
                await self._configured().teardown()
            if self.gw.config is not None and self.gw.nodes is not None:
                await self._configured().step(
                    "remove-installer",
                    "Destroy the installer VM",
                    lambda step: self._installer(step, "destroy"),
                )
        except StepFailed as exc:
            self.gw.error = f"delete incomplete: {exc}; fix it and delete again"
            self._fail("delete")
            return False
        self.gw.accounts = []
        self.gw.error = None
        left = (
            ""
            if self.gw.config is not None
            else f"; it held no vCenter credentials, so an installer VM (kubegate-installer-"
            f"{self.gw.name}) is left if one was installed: kubegate gateway delete "
            f"{self.gw.name} --vcenter install.yaml removes it"
        )
        self._set_status(GatewayStatus.DELETED, "deleted" + left)
        return True

    # -- pairing and configuration (Updates) ----------------------------------------------

    @workflow.update
    def register(self, request: RegisterRequest) -> GatewayState:
        """Pair the agent: its proof of the code is checked (wrong ones counted), the code is
        used up, and the agent's keys kept; it works once the operator approves it."""
        now = workflow.now()
        agent = self.gw.agent
        if agent is not None:  # the same agent again (a restart)
            if request.version and agent.version != request.version:
                agent.version = request.version  # the agent's release, as it starts
                self.publish()
            if (
                not agent.approved
                and request.signing_key
                and (agent.signing_key != request.signing_key)
            ):
                # not approved yet (an agent from before signatures, or a key presented anew):
                # whatever is presented, the operator approves only the fingerprint the real
                # agent shows; once approved, keys change only through rekey
                agent.signing_key = request.signing_key
                agent.fingerprint = _fingerprint(request)
                self.gw.reason = self._approval_hint(agent)
                self.publish()
            return self.gw
        proof = request.pairing_proof
        if request.pairing_code and not proof:  # recorded before proofs (validators refuse it now)
            proof = pairing_proof(request.pairing_code, self.gw.pairing.salt)
        if not self.gw.pairing.proof_matches(proof):
            self.gw.pairing.count_failure(now)
            self.publish()
            raise ApplicationError(
                f"gateway {self.gw.name}: wrong pairing code for this gateway (check for typos; "
                f"{self.gw.pairing.failures} wrong so far)",
                type=errors.PAIRING_REFUSED,
                non_retryable=True,
            )
        fingerprint = _fingerprint(request)
        expected = self.gw.pairing.fingerprint
        approved = expected is not None and normalize_fingerprint(expected) == fingerprint
        approved = approved or bool(request.pairing_code)  # recorded before approvals existed
        self.gw.agent = AgentInfo(
            public_key=request.public_key,
            key_id=request.key_id,
            signing_key=request.signing_key or None,
            fingerprint=fingerprint,
            approved=approved,
            approved_at=now if approved else None,
            host=request.host,
            installer_vm=request.installer_vm,
            installer_address=request.installer_address,
            registered_at=now,
            version=request.version,
        )
        self.gw.pairing.used = True
        self.gw.overdue, self.gw.hints = False, []
        if approved:
            self._set_status(GatewayStatus.REGISTERED, "paired and approved; configure it next")
        else:
            self._set_status(GatewayStatus.PENDING, self._approval_hint(self.gw.agent))
        return self.gw

    def _approval_hint(self, agent: AgentInfo) -> str:
        return (
            f"an agent on {agent.host or 'an unnamed host'} paired with key fingerprint "
            f"{agent.fingerprint}: if it is the fingerprint your agent shows, approve it "
            f"(kubegate gateway approve {self.gw.name} {agent.fingerprint}); if not, reset"
        )

    @register.validator
    def _register_ok(self, request: RegisterRequest) -> None:
        problem = _keys_problem(request.public_key, request.signing_key or None)
        if problem is None and request.key_id != key_id(base64.b64decode(request.public_key)):
            problem = "key_id: not the public key's"
        if problem:
            raise invalid_spec(problem)
        agent = self.gw.agent
        if agent is not None:
            if agent.public_key == request.public_key:
                if agent.approved and request.signing_key not in ("", agent.signing_key):
                    raise ApplicationError(
                        f"gateway {self.gw.name}: its approved agent's keys change only with "
                        "kubegate gateway rekey (on the agent's machine)",
                        type=errors.PAIRING_REFUSED,
                        non_retryable=True,
                    )
                return  # the same agent again (a restart): nothing to do
            raise ApplicationError(
                f"gateway {self.gw.name} is paired with another agent (key {agent.key_id}); "
                "a gateway pairs once: reset it (before approval) or delete and create it",
                type=errors.PAIRING_REFUSED,
                non_retryable=True,
            )
        if request.pairing_code:
            raise invalid_spec(
                "pairing_code: never sent; send pairing_proof (this agent is too old)"
            )
        if not request.pairing_proof or not request.signing_key:
            raise invalid_spec("pairing_proof and signing_key: required to pair")
        if self.gw.status is not GatewayStatus.PENDING:
            raise invalid_state(f"gateway {self.gw.name} is {self.gw.status}: cannot pair now")
        problem = self.gw.pairing.usable(workflow.now())
        if problem is not None:
            raise ApplicationError(
                f"gateway {self.gw.name}: {problem}",
                type=errors.PAIRING_REFUSED,
                non_retryable=True,
            )

    @workflow.update
    def approve(self, request: ApproveRequest) -> GatewayState:
        """The operator approves the paired agent: it may now get secrets and do work."""
        agent = self.gw.agent
        if agent is None:
            raise invalid_state(f"gateway {self.gw.name} has no paired agent to approve")
        agent.approved, agent.approved_at = True, workflow.now()
        if self.gw.status is GatewayStatus.PENDING:
            self._set_status(GatewayStatus.REGISTERED, "agent approved; configure it next")
        else:
            self._set_status(self.gw.status, "agent approved")
        return self.gw

    @workflow.update
    def rekey(self, request: RekeyRequest) -> GatewayState:
        """New agent keys (signed by the current ones); what the gateway keeps sealed is
        replaced by the same secrets sealed to the new key. Clusters' own secrets stay
        sealed to the old key, which the agent keeps for opening them."""
        agent = self.gw.agent
        if agent is None:
            raise invalid_state(f"gateway {self.gw.name} has no agent to re-key")
        for name, sealed in request.accounts.items():
            account = self.gw.account(name)
            if account is not None:
                account.credentials = account.credentials.model_copy(update={"password": sealed})
        if self.gw.config is not None and request.config_password is not None:
            credentials = self.gw.config.credentials.model_copy(
                update={"password": request.config_password}
            )
            self.gw.config = self.gw.config.model_copy(update={"credentials": credentials})
            if self.nodes is not None:
                self.nodes.account = self.nodes.account.model_copy(
                    update={"credentials": credentials}
                )
        agent.public_key, agent.key_id = request.public_key, request.key_id
        agent.signing_key = request.signing_key
        agent.fingerprint = fingerprint(
            base64.b64decode(request.public_key), base64.b64decode(request.signing_key)
        )
        agent.approved_at = workflow.now()
        self._set_status(self.gw.status, f"agent re-keyed (fingerprint {agent.fingerprint})")
        return self.gw

    @rekey.validator
    def _rekey_ok(self, request: RekeyRequest) -> None:
        agent = self.gw.agent
        if agent is None or not agent.approved or not agent.signing_key:
            raise invalid_state(f"gateway {self.gw.name} has no approved agent to re-key")
        if self.busy or self.op is not None:
            raise invalid_state(f"gateway {self.gw.name} is busy ({self.gw.status}): try later")
        problem = _keys_problem(request.public_key, request.signing_key)
        if problem is None and request.key_id != key_id(base64.b64decode(request.public_key)):
            problem = "key_id: not the public key's"
        if problem:
            raise invalid_spec(problem)
        if not verify_signature(
            agent.signing_key, request.statement(self.gw.name), request.signature
        ):
            raise ApplicationError(
                "signature: not made by the gateway's current agent key",
                type=errors.PAIRING_REFUSED,
                non_retryable=True,
            )
        names_kept = {a.name for a in self.gw.accounts}
        if set(request.accounts) != names_kept:
            raise invalid_spec(
                f"accounts: re-seal exactly {', '.join(sorted(names_kept)) or 'none'}"
            )
        for name, sealed in request.accounts.items():
            account = self.gw.account(name)
            if account is None:
                raise invalid_spec(f"accounts.{name}: no such account")
            if sealed.key_id != request.key_id or sealed.binding != (
                account.credentials.password.binding
            ):
                raise invalid_spec(f"accounts.{name}: not sealed to the new key for its use")
        if (self.gw.config is None) != (request.config_password is None):
            raise invalid_spec("config_password: give it exactly when the gateway is configured")
        if (
            self.gw.config is not None
            and request.config_password is not None
            and (
                request.config_password.key_id != request.key_id
                or request.config_password.binding != self.gw.config.credentials.password.binding
            )
        ):
            raise invalid_spec("config_password: not sealed to the new key for its use")

    @approve.validator
    def _approve_ok(self, request: ApproveRequest) -> None:
        agent = self.gw.agent
        if agent is None:
            raise invalid_state(f"gateway {self.gw.name} has no paired agent to approve yet")
        if agent.approved:
            raise invalid_state(f"gateway {self.gw.name}: agent {agent.fingerprint} is approved")
        if not agent.fingerprint or normalize_fingerprint(request.fingerprint) != agent.fingerprint:
            raise ApplicationError(
                f"fingerprint: {request.fingerprint} is not the paired agent's; compare with "
                "what the agent printed when it started (reset the gateway if it is not yours)",
                type=errors.PAIRING_REFUSED,
                non_retryable=True,
            )

    @workflow.update
    async def configure(self, config: GatewayConfig) -> GatewayState:
        """Check the configuration (validate, preflight) and start provisioning."""
        record = GatewayNodes(spec=self._node_spec(config), gateway=self.gw.name)
        nodes = self.nodes = self._node_set(record, config, None)
        self.busy += 1
        nodes.agent_deadline = _AGENT_DEADLINE
        try:
            self.gw.nodes = record
            self.gw.config = config
            self._begin("configure")  # its checks here, its provisioning in the main loop
            self._set_status(GatewayStatus.PROVISIONING, "checking the configuration")
            if not self.gw.system:
                await nodes.step(
                    "validate", "Validate the configuration, plan nodes", nodes.validate
                )
            await nodes.step("preflight", "Preflight checks", nodes.preflight)
        except StepFailed as exc:
            self.gw.history = (self.gw.history + record.steps)[-_HISTORY_KEPT:]
            self.gw.nodes, self.gw.config, self.nodes = None, None, None
            failed = record.steps[-1] if record.steps else None
            # decided on Temporal's own record of the failure (retries ran out, or a
            # timeout), never on the attempt count an agent reports
            passing = failed is not None and (
                nodes.retries_ran_out or (failed.error or "").startswith("timed out")
            )
            if passing:  # the checks could not run (agent or vCenter away): not a refusal
                self._set_status(GatewayStatus.REGISTERED, "configuration not checked; try again")
                raise ApplicationError(str(exc), type="ConfigureFailed") from None
            self._set_status(GatewayStatus.REGISTERED, "configuration refused; configure again")
            raise invalid_spec(str(exc)) from None
        finally:
            self.busy -= 1
            nodes.agent_deadline = None
        self.op, self.op_arg = "provision", None
        self.gw.reason = "provisioning"
        self.publish()
        return self.gw

    @configure.validator
    def _configure_ok(self, config: GatewayConfig) -> None:
        try:
            GatewayConfig.model_validate(config.model_dump(mode="json"))
        except ValidationError as exc:
            raise invalid_spec("; ".join(errors.field_errors(exc))) from None
        if not self.gw.system:
            problem = nodes_config_problem(config)
            if problem:
                raise invalid_spec(problem)
        if self.gw.agent is None:
            raise invalid_state(
                f"gateway {self.gw.name} is {self.gw.status}: its installer has not registered "
                "yet (deploy the installer OVA with the pairing code, start its agent)"
            )
        if (
            self.gw.status not in (GatewayStatus.REGISTERED, GatewayStatus.PENDING)
            or self.busy
            or self.op is not None
        ):
            raise invalid_state(
                f"gateway {self.gw.name} is {self.gw.status}: configure needs a registered "
                "gateway (reset a failed one first)"
            )
        self._require_sealed_for(config.credentials, default_account_name(self.gw.name))
        self._node_spec(config)

    def _require_sealed_for(self, credentials: VCenterCredentials, account: str) -> None:
        """Refuse credentials not sealed to the approved agent for this account and vCenter,
        and new work for an agent whose release this one does not accept."""
        self._require_current_agent()
        agent = self.gw.agent
        if agent is None or not agent.approved:
            raise invalid_state(
                f"gateway {self.gw.name}: its agent is not approved; approve it first "
                f"(kubegate gateway approve {self.gw.name} FINGERPRINT)"
            )
        if credentials.password.key_id != agent.key_id:
            raise invalid_spec(
                "credentials.password: sealed to another key than this gateway's agent "
                f"({agent.key_id})"
            )
        binding = credentials.password.binding
        wanted = credentials.binding(self.gw.name, account)
        if binding is None or binding != wanted:
            what = "; ".join(binding.differences(wanted)) if binding else "no binding"
            raise invalid_spec(f"credentials.password: sealed for another use ({what})")

    @workflow.update
    def reset(self, request: ResetRequest) -> GatewayState:
        """Stop a stuck provisioning or clear a failed one; back to Pending."""
        self.op, self.op_arg = "reset", request
        self.aborting = True
        if self.provisioning is not None:
            self.provisioning.cancel()
        return self.gw

    @reset.validator
    def _reset_ok(self, request: ResetRequest) -> None:
        status = self.gw.status
        unapproved = self.gw.agent is None or not self.gw.agent.approved
        resettable = status in (GatewayStatus.PROVISIONING, GatewayStatus.FAILED) or (
            status is GatewayStatus.PENDING and unapproved
        )
        if not resettable or self.busy or self.op in ("reset", "delete"):
            raise invalid_state(
                f"gateway {self.gw.name} is {status}: reset is for a gateway stuck in "
                "provisioning, a failed one, or one whose installer never registered"
            )
        if status is GatewayStatus.FAILED and self._provisioned():
            raise invalid_state(
                f"gateway {self.gw.name} failed after it ran ({self.gw.error}); its clusters "
                f"depend on it: fix the cause and repeat the {self.gw.failed_operation}"
            )

    def _provisioned(self) -> bool:
        return self.gw.nodes is not None and self.gw.nodes.provisioned

    @workflow.update
    def resize(self, request: ResizeRequest) -> GatewayState:
        """1 -> 3 nodes: two nodes added (with addresses from the gateway's pool)."""
        if self.gw.config is None:
            raise invalid_state(f"gateway {self.gw.name} is not configured: nothing to resize")
        self.op, self.op_arg = "resize", request
        self._set_status(
            GatewayStatus.UPGRADING, f"resizing from {self.gw.config.size} to {request.size} nodes"
        )
        return self.gw

    @resize.validator
    def _resize_ok(self, request: ResizeRequest) -> None:
        self._require_current_agent()
        self._require_running("resize")
        if self.gw.system:
            raise invalid_state(f"gateway {self.gw.name} is a system gateway: it has no nodes")
        if self.gw.config is None:
            raise invalid_state(f"gateway {self.gw.name} is not configured: nothing to resize")
        reason = can_resize(self.gw.config.size, request.size)
        if reason:
            raise invalid_spec(f"size: {reason}")

    @workflow.update
    def upgrade(self, request: UpgradeRequest) -> GatewayState:
        """Roll the gateway's nodes to a release, one at a time; clusters queue meanwhile."""
        version = request.version or self._newest()
        self.op, self.op_arg = "upgrade", version
        self.gw.target_version = version
        self._set_status(GatewayStatus.UPGRADING, f"upgrading {self.gw.version} -> {version}")
        return self.gw

    @upgrade.validator
    def _upgrade_ok(self, request: UpgradeRequest) -> None:
        self._require_running("upgrade")
        self._require_current_agent()
        version = request.version or self._newest()
        reason = can_upgrade(self.gw.version, version) if version else "version: none newer"
        if reason:
            raise invalid_spec(f"{reason}")

    def _newest(self) -> str:
        if self.gw.target_version is not None:
            return self.gw.target_version
        newer = newest_release_after(self.gw.version)
        return newer.version if newer else ""

    @workflow.update
    def delete(self) -> GatewayState:
        """Remove the gateway (refused while any of its clusters is not deleted)."""
        self.op, self.op_arg = "delete", None
        self._set_status(GatewayStatus.DELETING, "deleting the gateway")
        return self.gw

    @delete.validator
    def _delete_ok(self) -> None:
        live = self.gw.live_clusters()
        if live:
            raise ApplicationError(
                f"gateway {self.gw.name} still has clusters: {', '.join(sorted(live))}; delete "
                "them first",
                type=errors.IN_USE,
                non_retryable=True,
            )
        if (
            self.gw.status in (GatewayStatus.PROVISIONING, GatewayStatus.UPGRADING)
            or self.busy
            or self.starting
        ):
            raise invalid_state(
                f"gateway {self.gw.name} is {self.gw.status}: wait for it to finish (or reset a "
                "stuck provisioning) before deleting"
            )
        if self.op == "delete" or self.gw.status is GatewayStatus.DELETING:
            raise invalid_state(f"gateway {self.gw.name} is being deleted already")

    def _require_running(self, what: Operation) -> None:
        """Running, or Failed in this same operation after it ran (repeating it resumes)."""
        ok = self.gw.status is GatewayStatus.RUNNING or (
            self.gw.status is GatewayStatus.FAILED
            and self._provisioned()
            and self.gw.failed_operation == what
        )
        if not ok or self.op is not None or self.busy:
            raise invalid_state(f"gateway {self.gw.name} is {self.gw.status}: {what} needs Running")

    # -- cloud accounts -------------------------------------------------------------------

    @workflow.update
    async def add_account(self, request: AccountRequest) -> AccountSummary:
        """Check the account (preflight on the agent) and keep it."""
        await self._check_on_agent(
            request.name,
            request.credentials,
            request.placement,
            f"Preflight of cloud account {request.name} "
            f"({request.credentials.username}@{request.credentials.endpoint.server})",
            f"cloud account {request.name} failed its checks",
        )
        if self.gw.account(request.name) is not None:
            raise invalid_state(f"cloud account {request.name} exists already")
        account = CloudAccount(
            name=request.name,
            gateway=self.gw.name,
            credentials=request.credentials,
            placement=request.placement,
            created_at=workflow.now(),
        )
        self.gw.accounts.append(account)
        self.publish()
        return self._summary(account)

    async def _check_on_agent(
        self,
        account: str,
        credentials: VCenterCredentials,
        placement: Placement | None,
        summary: str,
        refusal: str,
    ) -> None:
        """Preflight credentials on the agent before they are kept (the agent may use them
        meanwhile: a check in progress); refused (InvalidSpec) naming what failed."""
        nodes = self._configured()
        self.busy += 1
        nodes.agent_deadline = _AGENT_DEADLINE
        check = AccountCheck(
            workflow_id=workflow.info().workflow_id,
            account=account,
            digest=credentials.password.digest,
        )
        self.checks.append(check)
        try:
            report = await nodes.agent(
                "preflight_all",
                PreflightRequest(
                    account=account,
                    gateway=self.gw.name,
                    credentials=credentials,
                    placement=placement,
                    fresh_login=True,
                ),
                PreflightReport,
                summary,
                timeout=timedelta(minutes=2),
            )
        finally:
            self.checks.remove(check)
            self.busy -= 1
            nodes.agent_deadline = None if not self.busy else _AGENT_DEADLINE
        failed = [r for r in report.results if r.status is CheckStatus.FAIL]
        if failed:
            raise invalid_spec(
                f"{refusal}: "
                + "; ".join(f"{r.title} ({r.object}): {r.detail}" for r in failed[:5])
            )

    @add_account.validator
    def _add_account_ok(self, request: AccountRequest) -> None:
        self._require_current_agent()
        if self.gw.status not in _ADMITTING or self.op == "delete":
            raise invalid_state(
                f"gateway {self.gw.name} is {self.gw.status}: cloud accounts need a Running gateway"
            )
        if self.gw.account(request.name) is not None:
            raise invalid_state(f"cloud account {request.name} exists already")
        self._require_sealed_for(request.credentials, request.name)

    @workflow.update
    def delete_account(self, name: str) -> list[AccountSummary]:
        self.gw.accounts = [a for a in self.gw.accounts if a.name != name]
        self.publish()
        return [self._summary(a) for a in self.gw.accounts]

    @delete_account.validator
    def _delete_account_ok(self, name: str) -> None:
        if self.gw.account(name) is None:
            raise invalid_spec(f"gateway {self.gw.name} has no cloud account {name!r}")
        users = self.gw.live_clusters(account=name)
        if users:
            raise ApplicationError(
                f"cloud account {name} is used by cluster(s) {', '.join(sorted(users))}; delete "
                "them first",
                type=errors.IN_USE,
                non_retryable=True,
            )

    @workflow.update
    async def collect_events(self) -> EventsResult:
        """Recent vCenter events and tasks of the gateway's VMs (for `gateway logs`)."""
        config = self.gw.config
        if config is None:
            raise invalid_state(f"gateway {self.gw.name} is not configured: no vCenter to ask")
        nodes = self.gw.nodes
        objects = [n.vm for n in nodes.nodes if n.vm] if nodes else []
        if nodes and nodes.folder_ref:
            objects.append(nodes.folder_ref)
        installer = self.gw.agent.installer_vm if self.gw.agent else None
        return await self._configured().agent(
            "vm_events",
            EventsRequest(
                credentials=config.credentials,
                datacenter=config.placement.datacenter,
                objects=objects,
                folder=nodes.folder if nodes and nodes.folder else None,
                limit=500,
            ),
            EventsResult,
            f"Collect vCenter events of gateway {self.gw.name}"
            + (f" (installer {installer})" if installer else ""),
        )

    @collect_events.validator
    def _events_ok(self) -> None:
        if self.gw.config is None:
            raise invalid_state(
                f"gateway {self.gw.name} is {self.gw.status}: not configured, no vCenter to ask"
            )

    @workflow.update
    async def validate_account(self, request: AccountCheckRequest) -> PreflightReport:
        """Check an account on the agent (a preflight child workflow) without keeping it."""
        check = AccountCheck(
            workflow_id=request.workflow_id,
            account=request.name,
            digest=request.credentials.password.digest,
        )
        self.checks.append(check)
        self.busy += 1
        try:
            return await self._preflight_child(
                PreflightRequest(
                    account=request.name,
                    gateway=self.gw.name,
                    credentials=request.credentials,
                    placement=request.placement,
                ),
                request.workflow_id,
                f"Preflight of cloud account {request.name} on gateway {self.gw.name}",
            )
        finally:
            self.checks.remove(check)
            self.busy -= 1

    async def _preflight_child(
        self, request: PreflightRequest, workflow_id: str, summary: str
    ) -> PreflightReport:
        """Run a preflight as a child workflow (the agent works only for what its gateway
        started), checking results with the approved agent's key."""
        agent = self.gw.agent
        request = request.model_copy(
            update={"agent_signing_key": agent.signing_key if agent else None}
        )
        try:
            report: PreflightReport = await workflow.execute_child_workflow(
                "PreflightWorkflow",
                request,
                id=workflow_id,
                task_queue=workflow.info().task_queue,
                result_type=PreflightReport,
                execution_timeout=_AGENT_DEADLINE * 2,
                static_summary=summary,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(names.KIND, "preflight"),
                        SearchAttributePair(names.STATUS, "Running"),
                        SearchAttributePair(names.GATEWAY, self.gw.name),
                    ]
                ),
            )
        except WorkflowAlreadyStartedError:
            raise invalid_state(f"workflow {workflow_id} exists already") from None
        except ChildWorkflowError as exc:
            raise ApplicationError(
                f"preflight of {request.account} did not finish: {exc.cause or exc}",
                type="PreflightFailed",
            ) from None
        return report

    @validate_account.validator
    def _validate_account_ok(self, request: AccountCheckRequest) -> None:
        if not request.workflow_id.startswith("preflight/"):
            raise invalid_spec("workflow_id: must start with preflight/")
        if self.gw.status is GatewayStatus.DELETED or self.op == "delete":
            raise invalid_state(f"gateway {self.gw.name} is {self.gw.status}")
        self._require_sealed_for(request.credentials, request.name)

    @workflow.update
    async def rotate_account(self, request: RotateRequest) -> AccountSummary:
        """New credentials for an account: checked by preflight on the agent, then kept;
        its clusters get them when their next work is scheduled."""
        kept = self.gw.account(request.name)
        if kept is None:
            raise invalid_state(f"cloud account {request.name} was deleted meanwhile")
        await self._check_on_agent(
            request.name,
            request.credentials,
            kept.placement,
            f"Preflight of new credentials of cloud account {request.name}",
            f"new credentials of {request.name} failed their checks (the old ones are kept)",
        )
        account = self.gw.account(request.name)
        if account is None:
            raise invalid_state(f"cloud account {request.name} was deleted meanwhile")
        account.credentials = request.credentials
        if account.default and self.gw.config is not None:
            self.gw.config = self.gw.config.model_copy(update={"credentials": request.credentials})
            if self.nodes is not None:
                self.nodes.account = self.nodes.account.model_copy(
                    update={"credentials": request.credentials}
                )
        self.publish()
        return self._summary(account)

    @rotate_account.validator
    def _rotate_ok(self, request: RotateRequest) -> None:
        account = self.gw.account(request.name)
        if account is None:
            raise invalid_spec(
                f"name: gateway {self.gw.name} has no cloud account {request.name!r}"
            )
        if self.gw.status not in _ADMITTING or self.op == "delete" or self.busy:
            raise invalid_state(
                f"gateway {self.gw.name} is {self.gw.status}: rotation needs a Running gateway"
            )
        current = account.credentials
        if (current.endpoint, current.username) != (
            request.credentials.endpoint,
            request.credentials.username,
        ):
            raise invalid_spec(
                "credentials: rotation changes the password only; the vCenter and user stay "
                f"{current.username}@{current.endpoint.address}"
            )
        self._require_sealed_for(request.credentials, request.name)

    @workflow.query
    def pairing_salt(self) -> str:
        """The salt an agent needs to prove it holds the pairing code (not a secret)."""
        return self.gw.pairing.salt

    @workflow.query
    def authorization(self) -> AgentAuthorization:
        """What the agent may work for: this gateway, its live clusters and running checks,
        with the live accounts' credentials (digests only) and the approved agent's key."""
        agent = self.gw.agent
        accounts = {a.name: a.credentials.password.digest for a in self.gw.accounts}
        if self.gw.config is not None:
            default = default_account_name(self.gw.name)
            accounts.setdefault(default, self.gw.config.credentials.password.digest)
        live = [
            names.cluster_workflow_id(c.name)
            for c in self.gw.clusters
            if c.status != ClusterStatus.DELETED.value
        ]
        checking = [c.workflow_id for c in self.checks]
        audits = (
            [a.workflow_id for a in self.gw.audits]
            if self.gw.status is not GatewayStatus.DELETED
            else []
        )
        return AgentAuthorization(
            gateway=self.gw.name,
            status=self.gw.status.value,
            agent_key_id=agent.key_id if agent is not None and agent.approved else None,
            agent_signing_key=agent.signing_key if agent is not None and agent.approved else None,
            lifecycles=[names.gateway_workflow_id(self.gw.name), *live, *checking, *audits],
            accounts=accounts if self.gw.status is not GatewayStatus.DELETED else {},
            checking=list(self.checks),
        )

    @workflow.query
    def cluster_account(self, name: str) -> AccountAnswer:
        """A live account's current credentials and the approved agent's signing key."""
        account = self.gw.account(name)
        agent = self.gw.agent
        if account is None or agent is None or not agent.approved:
            return AccountAnswer()
        return AccountAnswer(
            account=ClusterAccount(
                name=account.name,
                gateway=self.gw.name,
                credentials=account.credentials,
                template="",
                agent_signing_key=agent.signing_key,
                agent_release=agent.version or None,
            )
        )

    @workflow.query(name="releasing")
    def releasing_query(self) -> ReleaseIntent:
        """The addresses this gateway is giving back right now (pools confirm with it)."""
        return self.nodes.releasing if self.nodes is not None else ReleaseIntent()

    @workflow.query
    def accounts(self) -> list[AccountSummary]:
        return [self._summary(a) for a in self.gw.accounts]

    def _summary(self, account: CloudAccount) -> AccountSummary:
        return AccountSummary(
            name=account.name,
            gateway=account.gateway,
            server=account.credentials.endpoint.address,
            username=account.credentials.username,
            default=account.default,
            clusters=self.gw.live_clusters(account=account.name),
        )

    # -- clusters -------------------------------------------------------------------------

    @workflow.update
    async def check_cluster(self, request: ClusterCheckRequest) -> PreflightReport:
        """Preflight a cluster's placement domains with its cloud account's credentials, on
        the agent, creating nothing (`cluster deploy --dry-run`)."""
        spec = request.spec
        account = self.gw.account(spec.cloud_account)
        if account is None:  # deleted between the validator and now
            raise invalid_spec(f"cloud_account: no cloud account {spec.cloud_account!r}")
        placements = cluster_placements(spec, cluster_template(spec, account))
        # the agent works for this preflight only while it is listed (authorization query)
        check = AccountCheck(
            workflow_id=request.workflow_id,
            account=account.name,
            digest=account.credentials.password.digest,
        )
        self.checks.append(check)
        try:
            return await self._preflight_child(
                PreflightRequest(
                    account=account.name,
                    gateway=self.gw.name,
                    credentials=account.credentials,
                    placement=placements[0],
                    more_placements=placements[1:],
                ),
                request.workflow_id,
                f"Preflight of cluster {spec.name} on gateway {self.gw.name}",
            )
        finally:
            self.checks.remove(check)

    @check_cluster.validator
    def _check_cluster_ok(self, request: ClusterCheckRequest) -> None:
        spec = request.spec
        self._require_current_agent()
        if not request.workflow_id.startswith("preflight/"):
            raise invalid_spec("workflow_id: must start with preflight/")
        if self.gw.status not in _ADMITTING or self.op == "delete":
            raise invalid_state(
                f"gateway {self.gw.name} is {self.gw.status}: it checks clusters when Running"
            )
        account = self.gw.account(spec.cloud_account)
        if account is None:
            raise invalid_spec(
                f"cloud_account: gateway {self.gw.name} has no cloud account {spec.cloud_account!r}"
            )
        try:
            cluster_template(spec, account)
            spec.layout()
        except ValueError as exc:
            raise invalid_spec(str(exc)) from None

    @workflow.update
    async def request_cluster(self, request: ClusterRequest) -> ClusterAdmission:
        """Start the cluster's workflow; during an upgrade it waits, Queued, in order."""
        spec = request.spec
        account = self.gw.account(spec.cloud_account)
        if account is None:  # deleted between the validator and now
            raise invalid_spec(f"cloud_account: no cloud account {spec.cloud_account!r}")
        # behind an upgrade, or behind clusters still waiting from one: keep the order
        queued = self.gw.status is GatewayStatus.UPGRADING or bool(self.gw.queue)
        workflow_id = names.cluster_workflow_id(spec.name)
        record = ClusterRecord(
            name=spec.name,
            account=account.name,
            status=(ClusterStatus.QUEUED if queued else ClusterStatus.PROVISIONING).value,
            queued=queued,
        )
        self.gw.clusters = [c for c in self.gw.clusters if c.name != spec.name] + [record]
        if queued:
            self.gw.queue.append(spec.name)
        self.starting += 1
        try:
            child = await workflow.start_child_workflow(
                "ClusterWorkflow",
                ClusterInput(
                    spec=spec,
                    account=ClusterAccount(
                        name=account.name,
                        gateway=self.gw.name,
                        template=cluster_template(spec, account),
                    ),
                    readiness=request.readiness,
                    timing=request.timing,
                    gateway_workflow=workflow.info().workflow_id,
                    queued=queued,
                ),
                id=workflow_id,
                task_queue=workflow.info().task_queue,
                parent_close_policy=ParentClosePolicy.ABANDON,
                static_summary=f"Cluster {spec.name} on gateway {self.gw.name}",
                static_details=spec.description,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(names.KIND, "cluster"),
                        SearchAttributePair(names.STATUS, record.status),
                        SearchAttributePair(names.GATEWAY, self.gw.name),
                    ]
                ),
            )
            record.first_run = child.first_execution_run_id or ""
        except BaseException as exc:
            self.gw.clusters = [c for c in self.gw.clusters if c is not record]
            self.gw.queue = [n for n in self.gw.queue if n != spec.name]
            self.publish()
            if isinstance(exc, WorkflowAlreadyStartedError):
                raise invalid_state(f"cluster {spec.name} already exists") from None
            raise
        finally:
            self.starting -= 1
        self.publish()
        if self.gw.agent_connected is False:  # (only runs that watch the agent know this)
            news = AgentPresence(
                gateway=self.gw.name, connected=False, seen_at=self.gw.agent_seen_at
            )
            self.telling = [t for t in self.telling if not t.done()]
            self.telling.append(asyncio.create_task(self._tell(spec.name, news)))
        return ClusterAdmission(cluster=spec.name, workflow_id=workflow_id, queued=queued)

    @request_cluster.validator
    def _request_ok(self, request: ClusterRequest) -> None:
        spec = request.spec
        self._require_current_agent()
        if self.gw.status not in _ADMITTING or self.op == "delete":
            raise ApplicationError(
                f"gateway {self.gw.name} is {self.gw.status}: clusters need a Running gateway",
                type=errors.GATEWAY_NOT_READY,
                non_retryable=True,
            )
        account = self.gw.account(spec.cloud_account)
        if account is None:
            known = ", ".join(a.name for a in self.gw.accounts) or "none"
            raise invalid_spec(
                f"cloud_account: gateway {self.gw.name} has no cloud account "
                f"{spec.cloud_account!r} (it has: {known})"
            )
        if spec.name.endswith(GATEWAY_NODES_SUFFIX):
            raise invalid_spec(
                f"name: names ending in {GATEWAY_NODES_SUFFIX!r} are kept for gateways' own nodes"
            )
        try:
            cluster_template(spec, account)
        except ValueError as exc:
            raise invalid_spec(str(exc)) from None
        record = self.gw.cluster(spec.name)
        if record is not None and record.status != ClusterStatus.DELETED.value:
            raise invalid_state(f"cluster {spec.name} already exists ({record.status})")

    @workflow.signal
    async def cluster_changed(self, change: ClusterChanged) -> None:
        """A cluster of this gateway says its new status. Anyone can send this signal, so a
        "Deleted" is believed only once Temporal shows the cluster's workflow ended Deleted."""
        record = self.gw.cluster(change.name)
        if record is None:
            return  # not started through this gateway, or deleted already
        if change.status != ClusterStatus.DELETED.value:
            record.status = change.status
            self.publish()
            return
        if workflow.patched(VERIFIED_DELETES):
            if change.name in self.confirming:
                return  # being confirmed already: one check answers every such signal
            self.confirming.add(change.name)
            self.verifying += 1
            try:
                fact: LifecycleFact = await workflow.execute_activity(
                    "lifecycle_fact",
                    LifecycleRef(
                        workflow_id=names.cluster_workflow_id(change.name),
                        parent=workflow.info().workflow_id,
                        first_run=record.first_run,
                    ),
                    result_type=LifecycleFact,
                    task_queue=names.CONTROL_TASK_QUEUE,
                    start_to_close_timeout=timedelta(minutes=2),
                    heartbeat_timeout=timedelta(seconds=15),
                    retry_policy=RetryPolicy(maximum_attempts=5),
                    summary=f"Confirm cluster {change.name} has ended",
                )
            except ActivityError as exc:
                workflow.logger.warning(
                    "could not confirm cluster %s has ended: %s", change.name, exc.cause
                )
                return
            finally:
                self.verifying -= 1
                self.confirming.discard(change.name)
            record = self.gw.cluster(change.name)
            if record is None:
                return
            if not fact.closed:
                workflow.logger.warning(
                    "ignored a 'Deleted' for cluster %s: its workflow still runs", change.name
                )
                return
            if not fact.deleted:
                record.status = "Lost"  # ended without removing its VMs: still counts as used
                self.publish()
                return
        self.gw.clusters = [c for c in self.gw.clusters if c.name != change.name]
        self.gw.queue = [n for n in self.gw.queue if n != change.name]
        self.publish()

    # -- orphan audits ----------------------------------------------------------------------

    @workflow.update
    async def start_audit(self, request: AuditStart) -> AuditStart:
        """Start an orphan audit of this gateway (AuditWorkflow, its child: the agent works
        only for what its gateway started) and authorize the agent for it until it ends."""
        if not workflow.patched(ORPHAN_AUDITS):  # (a new Update: no earlier run took it)
            raise invalid_state("this gateway's run cannot start audits")
        config, agent = self.gw.config, self.gw.agent
        accounts = []
        for account in self.gw.accounts:
            placement = account.placement or (config.placement if config else None)
            if placement is not None:
                accounts.append(
                    AuditAccount(
                        name=account.name,
                        credentials=account.credentials,
                        datacenter=placement.datacenter,
                    )
                )
        lifetime = timedelta(hours=AUDIT_LIFETIME_HOURS)
        # (an audit that never said it ended has ended by its execution timeout)
        self.gw.audits = [a for a in self.gw.audits if a.started_at > workflow.now() - lifetime]
        self.gw.audits.append(
            AuditRecord(workflow_id=request.workflow_id, started_at=workflow.now())
        )
        try:
            await workflow.start_child_workflow(
                "AuditWorkflow",
                AuditInput(
                    gateway=self.gw.name,
                    gateway_status=self.gw.status.value,
                    accounts=accounts,
                    agent_signing_key=agent.signing_key if agent and agent.approved else None,
                    heartbeat_seconds=self.timing.heartbeat_seconds,
                ),
                id=request.workflow_id,
                task_queue=workflow.info().task_queue,
                parent_close_policy=ParentClosePolicy.ABANDON,
                execution_timeout=lifetime,
                static_summary=f"Orphan audit of gateway {self.gw.name}",
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(names.KIND, "audit"),
                        SearchAttributePair(names.STATUS, "Listing"),
                        SearchAttributePair(names.GATEWAY, self.gw.name),
                    ]
                ),
            )
        except BaseException as exc:
            self.gw.audits = [a for a in self.gw.audits if a.workflow_id != request.workflow_id]
            if isinstance(exc, WorkflowAlreadyStartedError):
                raise invalid_state(f"workflow {request.workflow_id} exists already") from None
            raise
        return request

    @start_audit.validator
    def _audit_ok(self, request: AuditStart) -> None:
        if not is_audit_id(request.workflow_id, self.gw.name):
            raise invalid_spec(f"workflow_id: must be audit/{self.gw.name}/<stamp>")
        self._require_current_agent()
        if self.gw.status not in _ADMITTING or self.op == "delete":
            raise ApplicationError(
                f"gateway {self.gw.name} is {self.gw.status}: audits need a Running gateway",
                type=errors.GATEWAY_NOT_READY,
                non_retryable=True,
            )
        if self.gw.agent is None or not self.gw.agent.approved:
            raise invalid_state(f"gateway {self.gw.name} has no approved agent")
        if not version_at_least(self.gw.agent.version, AUDITS_SINCE):
            raise invalid_state(
                f"gateway {self.gw.name}'s agent ({self.gw.agent.version or 'unknown release'}) "
                f"cannot audit: upgrade it to {AUDITS_SINCE} or later"
            )
        lifetime = timedelta(hours=AUDIT_LIFETIME_HOURS)
        running = [a for a in self.gw.audits if a.started_at > workflow.now() - lifetime]
        if len(running) >= _AUDITS_AT_ONCE:
            raise invalid_state(
                f"gateway {self.gw.name} runs {len(running)} audits already: "
                f"{', '.join(a.workflow_id for a in running)}"
            )

    @workflow.signal
    def audit_ended(self, workflow_id: str) -> None:
        """An audit ended: the agent no longer works for it. (Anyone may send this; a false
        one only stops an audit's agent work early.)"""
        self.gw.audits = [a for a in self.gw.audits if a.workflow_id != workflow_id]

    @workflow.update
    async def reconcile(self, request: ReconcileRequest) -> ClusterHealth:
        """Compare the gateway's nodes' VMs with their record now and repair them (with
        `retry_given_up`, repairs given up get their attempts again); returns what it saw and
        did."""
        self.retry_given_up = self.retry_given_up or request.retry_given_up
        self.reconcile_asked += 1
        ticket = self.reconcile_asked
        await workflow.wait_condition(
            lambda: self.reconcile_served >= ticket or not self._reconciles()
        )
        return self.gw.health

    @reconcile.validator
    def _reconcile_ok(self, request: ReconcileRequest) -> None:
        if not self._reconciles():
            raise invalid_state(
                f"gateway {self.gw.name} is {self.gw.status.value}: only a Running gateway with "
                "nodes of its own reconciles"
            )

    @workflow.query(name="state")
    def state_query(self) -> GatewayState:
        """Status, pairing (without its hash), agent, configuration, steps, nodes, accounts,
        clusters, queue."""
        hidden = self.gw.pairing.model_copy(update={"code_hash": "", "salt": "", "verifier": ""})
        return self.gw.model_copy(update={"pairing": hidden, "agent_problem": self._skew()})

    def _skew(self) -> str | None:
        """Why the agent's release cannot take new work (validators and queries only: never a
        decision that is replayed)."""
        agent = self.gw.agent
        if agent is None:
            return None
        return agent_version_problem(agent.version)

    def _require_current_agent(self) -> None:
        problem = self._skew()
        if problem:
            raise ApplicationError(
                f"gateway {self.gw.name}: {problem}",
                type=errors.GATEWAY_NOT_READY,
                non_retryable=True,
            )

    # -- helpers --------------------------------------------------------------------------

    def _node_spec(self, config: GatewayConfig) -> GatewayNodeSpec:
        """The gateway's nodes as `config` says; refused (InvalidSpec) when they cannot be."""
        try:
            return gateway_node_spec(self.gw.name, config, self.gw.version)
        except ValidationError as exc:
            raise invalid_spec("; ".join(errors.field_errors(exc))) from None

    def _node_set(
        self, record: GatewayNodes, config: GatewayConfig, secrets: SealedSecret | None
    ) -> NodeSet:
        """The node set of the gateway's nodes, on its default account's credentials."""
        return NodeSet(
            self,
            record=record,
            owner=names.gateway_workflow_id(self.gw.name),
            account=ClusterAccount(
                name=default_account_name(self.gw.name),
                gateway=self.gw.name,
                credentials=config.credentials,
                template=config.placement.template or "",  # required by GatewayConfig
            ),
            timing=self.timing,
            readiness="guest",
            secrets=secrets,
        )

    def _configured(self) -> NodeSet:
        """The gateway's node set (and agent runner): configured gateways only."""
        if self.nodes is None:
            raise invalid_state(f"gateway {self.gw.name} is not configured")
        return self.nodes

    # -- the node set's host --------------------------------------------------------------

    def agent_signing_key(self, account: ClusterAccount) -> str | None:
        agent = self.gw.agent
        return agent.signing_key if agent is not None and agent.approved else None

    async def refreshed_account(self, account: ClusterAccount) -> ClusterAccount | None:
        """The gateway keeps its credentials itself: take the configuration's current ones."""
        if self.gw.config is None:
            return None
        return account.model_copy(update={"credentials": self.gw.config.credentials})

    def _fail(self, operation: Operation) -> None:
        """Failed in `operation` (its error is set); queued clusters keep waiting."""
        self.gw.failed_operation = operation
        if self.gw.queue:
            self.gw.error = (
                f"{self.gw.error}; {len(self.gw.queue)} cluster request(s) wait in the queue "
                "until the gateway runs again"
            )
        self._set_status(GatewayStatus.FAILED)

    def _set_status(self, status: GatewayStatus, reason: str = "") -> None:
        self.gw.status = status
        self.gw.updated_at = workflow.now()
        if reason:
            self.gw.reason = reason
        self.publish()

    def publish(self) -> None:
        """The Web UI's current details; search attributes when the status shown changed
        (`Disconnected` while Running with the agent away)."""
        self._note_waiting()
        shown = self.gw.shown_status
        if self.published != shown:
            workflow.upsert_search_attributes(
                [
                    names.KIND.value_set("gateway"),
                    names.STATUS.value_set(shown),
                    names.GATEWAY.value_set(self.gw.name),
                ]
            )
            self.published = shown
        workflow.set_current_details(render_details(self.gw))


def render_details(gw: GatewayState) -> str:
    """Markdown for the Web UI's first screen: status, what is wrong, agent, version, then
    steps and nodes as text tables, accounts, clusters, queue."""
    shown = gw.shown_status
    lines = [f"## Gateway `{gw.name}` — {shown}", ""]
    lines += trouble(gw.status is GatewayStatus.FAILED, gw.steps, gw.error, "")
    if gw.reason:
        lines += [gw.reason, ""]
    if gw.overdue:
        lines += ["**Overdue**: the installer has not registered. Check:"]
        lines += [f"- {hint}" for hint in gw.hints]
        lines += [""]
    if gw.error and gw.status is not GatewayStatus.FAILED:
        lines += [f"Error: {gw.error}", ""]
    if gw.agent:
        lines += [f"Agent key {gw.agent.key_id} on {gw.agent.host or '?'}", ""]
    lines += [f"Version {gw.version}" + (f" → {gw.target_version}" if gw.target_version else "")]
    if gw.steps:
        lines += ["", "Steps", ""]
        lines += steps_table(gw.steps)
    if gw.nodes and gw.nodes.nodes:
        lines += ["", "Nodes", ""]
        lines += text_table(
            ["node", "VM", "address", "phase"],
            [[n.name, n.vm or "", n.address or "", n.phase] for n in gw.nodes.nodes],
        )
    if gw.accounts:
        lines += ["", "Cloud accounts: " + ", ".join(a.name for a in gw.accounts)]
    if gw.clusters:
        lines += ["", "Clusters: " + ", ".join(f"{c.name} ({c.status})" for c in gw.clusters)]
    if gw.queue:
        lines += ["", "Queued: " + ", ".join(gw.queue)]
    return "\n".join(lines)


def _fingerprint(request: RegisterRequest) -> str:
    """The fingerprint of the keys an agent presents (what the operator approves)."""
    try:
        public = base64.b64decode(request.public_key)
        signing = base64.b64decode(request.signing_key)
    except ValueError:
        return ""
    return fingerprint(public, signing)


def _keys_problem(public_key: str, signing_key: str | None) -> str | None:
    """Why an agent's public keys are not 32-byte keys in base64, or None."""
    for field, value in (("public_key", public_key), ("signing_key", signing_key)):
        if value is None:
            continue
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            return f"{field}: not base64"
        if len(raw) != 32:
            return f"{field}: a 32-byte key, not {len(raw)} bytes"
    return None
