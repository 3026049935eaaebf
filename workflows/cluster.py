"""ClusterWorkflow: one cluster's whole life, from deploy to delete (an entity workflow)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from domain import errors, names
    from domain.bootstrap import SHARED_SECRETS_PURPOSE as SHARED
    from domain.cluster import ClusterSpec, NodeHealth, WorkerPool, plan_nodes
    from domain.details import steps_table, text_table, trouble
    from domain.events import EventsRequest, EventsResult
    from domain.gateway import ClusterChanged
    from domain.health import (
        CHECKS_PER_RUN,
        ClusterHealth,
        PoolHealth,
        ReconcileRequest,
        Repair,
    )
    from domain.ipam import PoolRef, PoolStatus
    from domain.kubeconfig import (
        ISSUES_KEPT,
        KubeconfigRequest,
        KubeconfigResult,
        MintKubeconfig,
    )
    from domain.lifecycle import (
        CHANGES_KEPT,
        AddPoolRequest,
        ApplyRequest,
        ChangeResult,
        ClusterAccount,
        ClusterInput,
        ClusterState,
        ClusterStatus,
        ClusterUpgradeRequest,
        DeleteRequest,
        Node,
        RemovePoolRequest,
        Rollout,
        ScaleRequest,
        note_waiting,
    )
    from domain.plan import ChangePlan, node_builds, outdated, plan_apply
    from domain.presence import AgentPresence
    from domain.trust import AccountRef, ReleaseIntent
    from workflows.nodes import (
        LEAVES_SINCE,
        NODES_LEAVE,
        SETTLE_POINTS,
        NodeSet,
        Slot,
        StepFailed,
        invalid_spec,
        invalid_state,
    )

PROVISIONING_STATES = (ClusterStatus.QUEUED, ClusterStatus.PROVISIONING)
#: patches (kept forever: histories of earlier releases take the old branches)
#: a cluster that was never queued is Provisioning from its first moment, not Queued
NOT_QUEUED = "not-queued-unless-queued"


#: patch: an aborted cluster is Deleting (reason "aborting") from the moment abort is accepted,
#: not once the cancelled steps have ended
ABORTING_AT_ONCE = "aborting-shown-at-once"

#: patch: a day-2 change's Update returns its operation number once accepted; the change runs
#: in the main loop (before it, the Update ran the whole change)
CHANGES_ARE_OPERATIONS = "changes-are-operations"


#: patch: a Running cluster reconciles (on its schedule and on demand): drift is repaired or
#: reported, unhealthy nodes replaced. One name per loop pass ("<this>-<pass>"), so a run
#: begun before it (replayed without the marker) takes it up at its next pass
RECONCILE = "reconcile-running-clusters"
#: statuses in which a cluster serves, and reconciles
SERVING = (ClusterStatus.RUNNING, ClusterStatus.DEGRADED)


#: a kubeconfig: how long the caller may wait on the agent, and its attempts (an agent of a
#: release without the activity answers NotFoundError: no use retrying)
_KUBECONFIG_DEADLINE = timedelta(minutes=2)
_KUBECONFIG_RETRY = RetryPolicy(
    maximum_attempts=3, non_retryable_error_types=[*errors.NON_RETRYABLE, "NotFoundError"]
)


@dataclass
class _Change:
    """An accepted day-2 change waiting for the main loop."""

    spec: ClusterSpec
    #: the spec a failed change leaves (None: the changed one stays)
    undo_to: ClusterSpec | None
    title: str
    before: set[str]
    #: nodes are replaced or control-plane members come and go: a rollout (one at a time)
    rolling: bool = False


class _RolloutAborted(Exception):
    """The rollout was aborted: it stopped between two replacements."""


@workflow.defn(name="ClusterWorkflow")
class ClusterWorkflow:
    """Provision, change and delete one cluster; every step recorded in its state."""

    @workflow.init
    def __init__(self, input: ClusterInput) -> None:
        self.input = input
        spec = input.spec
        self.state = input.state or ClusterState(
            name=spec.name,
            spec=spec,
            account=input.account.name,
            gateway=input.account.gateway,
            readiness=input.readiness,
        )
        self.nodes = NodeSet(
            self,
            record=self.state,
            owner=names.cluster_workflow_id(self.state.name),
            account=input.account,
            timing=input.timing,
            readiness=input.readiness,
            secrets=input.secrets,
        )
        self.nodes.leaves = input.readiness == "kubernetes"
        self.nodes.apart = True
        self.nodes.marks = True
        self.operation = ""  # the operation new steps belong to (see `_begin`)
        self.lock = asyncio.Lock()
        self.deleting: DeleteRequest | None = None
        self.retrying = False
        #: an accepted change the main loop carries out next
        self.change: _Change | None = None
        #: the running rollout was asked to stop (after the replacement in progress)
        self.rollout_aborting = False
        #: kubeconfig requests taken in this run (a signed request is answered once)
        self.kubeconfig_requests: set[str] = {k.request_id for k in self.state.kubeconfigs}
        self.aborting = False
        self.provisioning: asyncio.Task[None] | None = None
        self.published: ClusterStatus | None = None  # status last written to search attributes
        #: waiting for the gateway's `proceed` signal (requested during a gateway upgrade)
        self.queued = input.queued and input.state is None
        self.notices: list[asyncio.Task[None]] = []  # signals to the gateway, in order
        #: an operation ended in this run (continue as new at the next quiet moment)
        self.settled = False
        #: this run reconciles (RECONCILE taken), its loop passes, its quiet reconciles
        self.reconciling = False
        self.passes = 0
        self.quiet_checks = 0
        #: reconciles asked for on demand (`reconcile` Update) and those carried out
        self.reconcile_asked = 0
        self.reconcile_served = 0
        #: the next reconcile gives repairs given up their attempts again (asked for)
        self.retry_given_up = False
        #: the gateway woke this run (a new kubegate release: a pass of the loop under it)
        self.woken = False

    # -- run ------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: ClusterInput) -> ClusterState:
        state = await self._life()
        await self._notices_sent()
        return state

    async def _life(self) -> ClusterState:
        if self.state.created_at is None:
            self.state.created_at = workflow.now()
            if (
                not self.queued
                and self.state.status is ClusterStatus.QUEUED
                and workflow.patched(NOT_QUEUED)
            ):
                self.state.status = ClusterStatus.PROVISIONING  # never shown Queued
            self._notify_gateway()
        self.publish()
        if self.queued:
            self.state.reason = f"waiting for gateway {self.state.gateway} to finish its upgrade"
            self.publish()
            await workflow.wait_condition(lambda: not self.queued or self.aborting)
            if self.aborting:  # nothing was made yet
                self.state.reason = "aborted while queued"
                self._set_status(ClusterStatus.DELETED)
                return self.state
            self.state.reason = ""
        if self.state.status in PROVISIONING_STATES and not await self._provision():
            return self.state
        while True:
            timeout = self._until_reconcile()
            with contextlib.suppress(asyncio.TimeoutError):  # (timed out: a reconcile is due)
                await workflow.wait_condition(
                    lambda: (
                        self.deleting is not None
                        or self.retrying
                        or self.change is not None
                        or self.reconcile_asked > self.reconcile_served
                        or self.woken
                        or (
                            (workflow.info().is_continue_as_new_suggested() or self.settled)
                            and not self.lock.locked()
                        )
                    ),
                    timeout=timeout,
                )
            self.woken = False
            if self._reconcile_due():
                await self._reconcile()  # (the lock only while it repairs: changes go first)
                continue
            # (a replayed run from before settle points wakes here where it did not then: no
            # command follows, so it replays; this wait must stay without a timeout)
            if (
                self.deleting is None
                and not self.retrying
                and self.change is None
                and not self._settle_now()
            ):
                self.settled = False  # (a run from before settle points: as it did then)
                continue
            if self.change is not None:  # (only a run with CHANGES_ARE_OPERATIONS sets it)
                change, self.change = self.change, None
                async with self.lock:
                    await self._carry_out(change)
                continue
            if self.deleting is not None:
                async with self.lock:
                    if await self._teardown(self.deleting.reason):
                        break
                self.deleting = None  # failed: Failed with the step's error; delete again
                continue
            if self.retrying:
                self.retrying = False
                if not await self._provision("retry"):
                    return self.state
                continue
            await self._notices_sent()
            # an accepted change need not wait for other handlers (one may be checking a
            # change of its own); `change` is never set in runs from before it existed
            await workflow.wait_condition(
                lambda: (
                    workflow.all_handlers_finished()
                    or self.change is not None
                    or self.reconcile_asked > self.reconcile_served  # (its handler waits)
                )
            )
            if (
                self.deleting is not None
                or self.retrying
                or self.change
                or self.notices
                or self.reconcile_asked > self.reconcile_served
            ):
                continue  # accepted while handlers finished: do it in this run
            workflow.continue_as_new(
                ClusterInput(
                    spec=self.state.spec,
                    # credentials are not carried: the next work fetches the current ones
                    account=self.nodes.account.model_copy(update={"credentials": None}),
                    readiness=self.input.readiness,
                    timing=self.input.timing,
                    gateway_workflow=self.input.gateway_workflow,
                    state=self.state,
                    secrets=self.nodes.secrets,
                )
            )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.state

    def _settle_now(self) -> bool:
        """Whether to continue as new now: Temporal suggests it, or a settle point that this
        release reached live (its patch marker; a replayed older run has none there)."""
        if workflow.info().is_continue_as_new_suggested():
            return True
        if not self.settled:
            return False
        return workflow.patched(f"{SETTLE_POINTS}-{self.state.operations_run}")

    def _begin(self, operation: str) -> None:
        """Steps from now on belong to a new run of `operation` (deploy, a change, delete)."""
        self.state.operations_run += 1
        self.operation = operation

    async def _provision(self, operation: str = "deploy") -> bool:
        """Deploy (or retry a failed deploy); False when it was aborted (the cluster is gone)."""
        self._begin(operation)
        self._set_status(ClusterStatus.PROVISIONING)
        self.provisioning = asyncio.create_task(self._deploy_steps())
        if self.aborting:  # accepted before provisioning began
            self.provisioning.cancel()
        try:
            await self.provisioning
        except (asyncio.CancelledError, StepFailed) as exc:
            if self.aborting or isinstance(exc, asyncio.CancelledError):
                # abort, or the workflow itself was cancelled: remove everything made so far
                # (a cancelled child or activity may surface as a failed step)
                self.aborting = True
                return not await self._teardown("aborted")
            self.state.error = str(exc)
            self._set_status(ClusterStatus.FAILED)
            return True
        finally:
            self.provisioning = None
        if self.aborting:  # accepted while the last step was finishing: abort all the same
            return not await self._teardown("aborted")
        self.state.error = None
        self.state.provisioned = True
        self._set_status(ClusterStatus.RUNNING)
        return True

    async def _deploy_steps(self) -> None:
        await self.nodes.step("validate", "Validate the spec, plan nodes", self.nodes.validate)
        await self.nodes.step("preflight", "Preflight checks", self.nodes.preflight)
        await self.nodes.converge(folder=True)

    # -- reconcile ------------------------------------------------------------------------

    def _until_reconcile(self) -> timedelta | None:
        """How long the main loop may wait before the next reconcile (None: none scheduled)."""
        if (
            self.state.status not in SERVING
            or not self.state.provisioned
            or self.deleting is not None
        ):
            return None
        if not self.reconciling:
            self.passes += 1
            self.reconciling = workflow.patched(f"{RECONCILE}-{self.passes}")
            if not self.reconciling:
                return None
        due = self._next_reconcile()
        if due is None:
            return None
        return max(due - workflow.now(), timedelta(seconds=1))

    def _next_reconcile(self) -> datetime | None:
        """When the next scheduled reconcile is due (domain/health.py)."""
        return self.state.health.next_reconcile(
            self.state.spec.healing.reconcile_seconds, self.state.updated_at or workflow.now()
        )

    def _reconcile_due(self) -> bool:
        if self.reconcile_asked > self.reconcile_served:
            return True
        if not self.reconciling or self.state.status not in SERVING or self.deleting:
            return False
        due = self._next_reconcile()
        return due is not None and workflow.now() >= due

    async def _reconcile(self) -> None:
        """Compare the VMs with the record (one signed read by the agent), then repair what
        the healing policy repairs, each repair a step (docs/clusters.md, Self-healing)."""
        asked = self.reconcile_asked
        health = self.state.health
        try:
            if self.state.status not in SERVING or self.deleting is not None:
                return
            if self.retry_given_up:  # asked for: given-up repairs get their attempts again
                self.retry_given_up = False
                health.rearm_given_up()
            spec = self.state.spec
            pools = {"cp": _pool_health(spec.control_plane.health)} | {
                p.name: _pool_health(p.health) for p in spec.workers
            }
            outdated = "its build is outdated (a rollout stopped half way): finish the rollout"
            result = await self.nodes.look(
                health,
                spec.healing,
                pools,
                spec.control_plane.size,
                held={n.name: outdated for n in self._outdated()},
            )
            if self.state.status not in SERVING or self.deleting is not None:
                return  # deleted (or failed) while it looked: nothing to repair
            if result is None:
                self._quiet()
                return  # vCenter could not be read (health.error says why)
            if result.repairs and (self.change is not None or self.retrying):
                return  # a change asked for while it looked goes first; the next look sees
            if result.repairs:
                self.quiet_checks = 0
                async with self.lock:
                    await self._repairs(result.repairs)
            else:
                self._quiet()
            self._health_status()
        finally:
            self.reconcile_served = max(self.reconcile_served, asked)
            self.publish()

    def _quiet(self) -> None:
        """A reconcile that repaired nothing: after CHECKS_PER_RUN of them the run continues
        as new (its history stays short)."""
        self.quiet_checks += 1
        if self.quiet_checks >= CHECKS_PER_RUN:
            self.settled = True

    async def _repairs(self, repairs: list[Repair]) -> None:
        self._begin("repair")
        self._set_status(
            ClusterStatus.UPDATING,
            "repairing " + "; ".join(f"{r.node} ({r.reason})" for r in repairs),
        )
        await self.nodes.repair_all(self.state.health, self.state.spec.healing, repairs)

    def _health_status(self) -> None:
        """Degraded while a repair is given up; Running otherwise (after repairs too)."""
        if self.deleting is not None:
            return
        if self.state.status not in (*SERVING, ClusterStatus.UPDATING):
            return
        degraded = self.state.health.degraded
        if degraded:
            self.state.reason = degraded
            self._set_status(ClusterStatus.DEGRADED)
        else:
            if self.state.status is not ClusterStatus.RUNNING:
                self.state.reason = ""
            self._set_status(ClusterStatus.RUNNING)

    # -- teardown (abort and delete) ------------------------------------------------------

    async def _teardown(self, reason: str) -> bool:
        """Remove everything; True when done (Deleted), False when a step failed (Failed)."""
        self._begin("abort" if reason == "aborted" else "delete")
        self._set_status(ClusterStatus.DELETING)
        try:
            await self.nodes.teardown()
        except StepFailed as exc:
            self.aborting = False
            self.state.error = f"{reason} incomplete: {exc}; fix it and delete again"
            self._set_status(ClusterStatus.FAILED)
            return False
        self.state.reason = reason
        self.state.error = None
        self._set_status(ClusterStatus.DELETED)
        return True

    # -- facts for others -----------------------------------------------------------------

    @workflow.query(name="releasing")
    def releasing_query(self) -> ReleaseIntent:
        """The addresses this cluster is giving back right now (pools confirm with it)."""
        return self.nodes.releasing

    # -- the node set's host --------------------------------------------------------------

    def current_operation(self) -> tuple[str, int]:
        return self.operation, self.state.operations_run

    def agent_signing_key(self, account: ClusterAccount) -> str | None:
        """The gateway's approved agent's key, as the gateway gave it with the credentials."""
        return account.agent_signing_key

    async def refreshed_account(self, account: ClusterAccount) -> ClusterAccount | None:
        """The account's current credentials and agent key, from the gateway."""
        if self.input.gateway_workflow is None:
            return None
        fresh: ClusterAccount = await workflow.execute_activity(
            "gateway_account",
            AccountRef(gateway=self.state.gateway, account=self.state.account),
            result_type=ClusterAccount,
            task_queue=names.CONTROL_TASK_QUEUE,
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=RetryPolicy(
                maximum_attempts=5, non_retryable_error_types=errors.NON_RETRYABLE
            ),
            summary=f"Current credentials of cloud account {self.state.account}",
        )
        return account.model_copy(
            update={
                "credentials": fresh.credentials,
                "agent_signing_key": fresh.agent_signing_key,
                "agent_release": fresh.agent_release,
            }
        )

    # -- updates --------------------------------------------------------------------------

    @workflow.update
    async def abort(self) -> ClusterState:
        """Stop provisioning and remove everything created so far; returns at once, the
        cluster `Deleting` (reason `aborting`) from that moment."""
        self.aborting = True
        if self.provisioning is not None:
            self.provisioning.cancel()
        if not self.queued and workflow.patched(ABORTING_AT_ONCE):
            self._set_status(ClusterStatus.DELETING, "aborting")
        return self.state

    @abort.validator
    def _abort_allowed(self) -> None:
        if self.state.status not in PROVISIONING_STATES or self.aborting:
            hint = "use delete" if self.state.status in _DELETABLE else "nothing to abort"
            raise invalid_state(f"cluster {self.state.name} is {self.state.status}: {hint}")

    @workflow.update
    async def delete(self, request: DeleteRequest) -> ClusterState:
        """Start deleting a running or failed cluster; returns at once."""
        self.deleting = request
        self._set_status(ClusterStatus.DELETING)
        return self.state

    @delete.validator
    def _delete_allowed(self, request: DeleteRequest) -> None:
        status = self.state.status
        if status in PROVISIONING_STATES:
            raise invalid_state(f"cluster {self.state.name} is {status}: use abort")
        if status not in _DELETABLE or self.deleting is not None:
            raise invalid_state(f"cluster {self.state.name} is {status}: cannot delete now")

    @workflow.update
    async def retry(self) -> ClusterState:
        """Run a failed cluster's steps again (each is idempotent); returns at once."""
        self.retrying = True
        self._set_status(ClusterStatus.PROVISIONING)
        return self.state

    @retry.validator
    def _retry_allowed(self) -> None:
        if (
            self.state.status is not ClusterStatus.FAILED
            or self.retrying
            or self.deleting is not None
        ):
            raise invalid_state(
                f"cluster {self.state.name} is {self.state.status}: only a "
                "Failed cluster can be retried"
            )
        unsettled = self._unsettled() if self.state.provisioned else None
        if unsettled:
            raise invalid_state(
                f"cluster {self.state.name}: {unsettled} (a rollout stopped): run the same "
                "upgrade or apply again to go on"
            )

    @workflow.update
    async def scale(self, request: ScaleRequest) -> ChangeResult:
        """Resize a worker pool (down removes the newest nodes first), or the control plane
        (1, 3 or 5 members: added or removed one at a time, as a rollout)."""
        spec = self._changed_spec(scale=request)
        rolling = request.pool == "cp"
        return await self._change(spec, f"Scale {request.pool} to {request.size}", rolling=rolling)

    @scale.validator
    def _scale_ok(self, request: ScaleRequest) -> None:
        self._require_running()
        if request.pool != "cp":
            self._require_settled()
        spec = self._changed_spec(scale=request)
        if request.pool == "cp":
            if spec.control_plane.size == self.state.spec.control_plane.size:
                raise invalid_state(
                    f"cluster {self.state.name}: the control plane has {request.size} members "
                    "already"
                )
            self._plan_apply(ApplyRequest(spec=spec))  # (refuses what cannot change)

    @workflow.update
    async def upgrade(self, request: ClusterUpgradeRequest) -> ChangeResult:
        """Move the nodes to another Kubernetes version and/or VM template by rolling
        replacement: the control plane first, one member at a time (the new one joins before
        the old one leaves), then each worker pool by its max_surge / max_unavailable."""
        spec = self._upgraded_spec(request)
        self._plan_apply(ApplyRequest(spec=spec), allow_same=True)
        return await self._change(spec, _upgrade_title(request), rolling=True)

    @upgrade.validator
    def _upgrade_ok(self, request: ClusterUpgradeRequest) -> None:
        self._require_running()
        plan = self._plan_apply(ApplyRequest(spec=self._upgraded_spec(request)), allow_same=True)
        if not plan.replace and not plan.create:
            raise invalid_state(
                f"cluster {self.state.name}: every node runs that already (nothing to replace)"
            )

    def _upgraded_spec(self, request: ClusterUpgradeRequest) -> ClusterSpec:
        try:
            return self.state.spec.upgraded(request.kubernetes, request.template)
        except ValidationError as exc:
            raise invalid_spec("; ".join(errors.field_errors(exc))) from None
        except ValueError as exc:
            raise invalid_spec(str(exc)) from None

    @workflow.update
    def pause_rollout(self) -> Rollout:
        """Hold the rollout after the replacement in progress (the cluster keeps serving)."""
        rollout = self._rollout_in_progress()
        rollout.state = "paused"
        self.publish()
        return rollout

    @pause_rollout.validator
    def _pause_ok(self) -> None:
        if self._rollout_in_progress().state != "running":
            raise invalid_state(f"cluster {self.state.name}: the rollout is paused already")

    @workflow.update
    def resume_rollout(self) -> Rollout:
        """Go on with a paused rollout."""
        rollout = self._rollout_in_progress()
        rollout.state = "running"
        self.publish()
        return rollout

    @resume_rollout.validator
    def _resume_ok(self) -> None:
        if self._rollout_in_progress().state != "paused":
            raise invalid_state(f"cluster {self.state.name}: the rollout is not paused")

    @workflow.update
    def abort_rollout(self) -> Rollout:
        """Stop the rollout once the replacement in progress is done: every node serves,
        some on the old build (upgrade or apply again to finish)."""
        self.rollout_aborting = True
        return self._rollout_in_progress()

    @abort_rollout.validator
    def _abort_rollout_ok(self) -> None:
        self._rollout_in_progress()
        if self.rollout_aborting:
            raise invalid_state(f"cluster {self.state.name}: the rollout is being aborted")

    def _rollout_in_progress(self) -> Rollout:
        rollout = self.state.rollout
        if (
            rollout is None
            or rollout.state not in ("running", "paused")
            or self.state.status is not ClusterStatus.UPDATING
        ):
            raise invalid_state(f"cluster {self.state.name}: no rollout in progress")
        return rollout

    @workflow.update
    async def add_pool(self, request: AddPoolRequest) -> ChangeResult:
        spec = self._changed_spec(add=request.pool)
        return await self._change(
            spec, f"Add worker pool {request.pool.name}", undo_on_failure=True
        )

    @add_pool.validator
    def _add_ok(self, request: AddPoolRequest) -> None:
        self._require_running()
        self._require_settled()
        self._changed_spec(add=request.pool)

    @workflow.update
    async def remove_pool(self, request: RemovePoolRequest) -> ChangeResult:
        spec = self._changed_spec(remove=request.pool)
        return await self._change(spec, f"Remove worker pool {request.pool}")

    @remove_pool.validator
    def _remove_ok(self, request: RemovePoolRequest) -> None:
        self._require_running()
        self._require_settled()
        self._changed_spec(remove=request.pool)

    @workflow.update
    async def apply(self, request: ApplyRequest) -> ChangeResult:
        """Make the cluster match an edited spec as one operation: the plan `plan_apply`
        gives (pools added, removed, resized); refused whole if a field cannot change."""
        plan = self._plan_apply(request)
        title = "Apply: " + "; ".join(plan.changes or ["replace outdated nodes"])
        # a failed apply keeps what it removed and resized; pools it added go back out
        added = {p.name for p in request.spec.workers} - {p.name for p in self.state.spec.workers}
        undo = request.spec.model_copy(
            update={"workers": [p for p in request.spec.workers if p.name not in added]}
        )
        rolling = plan.rolling or self._unsettled() is not None
        return await self._change(request.spec, title[:200], undo_to=undo, rolling=rolling)

    @apply.validator
    def _apply_ok(self, request: ApplyRequest) -> None:
        self._require_running()
        self._plan_apply(request)

    def _plan_apply(self, request: ApplyRequest, allow_same: bool = False) -> ChangePlan:
        """The plan for the request's spec; InvalidSpec naming every field that cannot change
        in place, InvalidState when nothing would change or the cluster changed since the
        caller planned it."""
        spec = request.spec
        if request.based_on is not None and request.based_on != self.state.operations_run:
            raise invalid_state(
                f"cluster {self.state.name} changed since the plan was made (operation "
                f"{self.state.operations_run}, planned at {request.based_on}): plan again"
            )
        try:
            ClusterSpec.model_validate(spec.model_dump(mode="json"))
            spec.effective_profile()
        except (ValidationError, ValueError) as exc:
            raise invalid_spec(str(exc)) from None
        plan = plan_apply(self.state.spec, spec, self.state.nodes, self.state.revisions)
        if plan.refused:
            raise invalid_spec("; ".join(plan.refused))
        members_leave = [
            n for n in [*plan.replace, *plan.remove] if n.startswith(f"{self.state.name}-cp-")
        ]
        secrets = self.nodes.secrets
        if (
            members_leave
            and self.nodes.leaves
            and (secrets is None or secrets.binding is None or secrets.binding.purpose != SHARED)
        ):
            raise invalid_state(
                f"cluster {self.state.name} was made before 0.3.0: kubegate keeps no etcd CA "
                f"for it, so {', '.join(members_leave)} could not leave etcd; its control "
                "plane cannot be replaced or shrunk by kubegate"
            )
        if plan.empty and not allow_same:
            raise invalid_state(f"cluster {self.state.name}: the spec asks for no change")
        return plan

    @workflow.update
    async def kubeconfig(self, request: KubeconfigRequest) -> KubeconfigResult:
        """A kubeconfig for `request.user`: the agent mints a client certificate from the
        cluster's CA and seals the file to the requester's key; the issue is recorded."""
        secrets, server = self.nodes.secrets, self._api_server()
        if secrets is None or server is None:  # (the validator said so already)
            raise invalid_state(f"cluster {self.state.name} has no API server to reach yet")
        if request.request_id in self.kubeconfig_requests:  # (one sent twice at once)
            raise invalid_state(f"kubeconfig request {request.request_id} was answered already")
        self.kubeconfig_requests.add(request.request_id)
        kube = self.state.spec.effective_profile().pack("kubernetes")
        mint = MintKubeconfig(
            cluster=self.state.name,
            server=server,
            secrets=secrets,
            user=request.user,
            kubernetes_version=kube.version if kube else "",
            ttl_seconds=request.ttl_seconds,
            recipient_key=request.recipient_key,
            request_id=request.request_id,
            operator_key=request.operator_key,
            signature=request.signature,
        )
        try:
            result = await self.nodes.agent(
                "cluster_kubeconfig",
                mint,
                KubeconfigResult,
                f"Mint a kubeconfig for {request.user}",
                timeout=timedelta(minutes=1),
                retry=_KUBECONFIG_RETRY,
                deadline=_KUBECONFIG_DEADLINE,
            )
        except (ActivityError, ApplicationError) as exc:
            cause = exc.cause if isinstance(exc, ActivityError) else exc
            message = getattr(cause, "message", None) or str(exc)
            if getattr(cause, "type", None) == "NotFoundError":
                message = "the gateway's agent cannot mint kubeconfigs: upgrade it to 0.3 or later"
            raise ApplicationError(
                f"no kubeconfig for {request.user}: {message}",
                type="KubeconfigFailed",
                non_retryable=True,
            ) from None
        if result.issue.request_id != request.request_id or result.issue.user != request.user:
            raise ApplicationError(
                "the agent answered another kubeconfig request", type=errors.FORGED_RESULT
            )
        self.state.kubeconfigs = [*self.state.kubeconfigs, result.issue][-ISSUES_KEPT:]
        self.publish()
        return result

    @kubeconfig.validator
    def _kubeconfig_ok(self, request: KubeconfigRequest) -> None:
        serving = (ClusterStatus.RUNNING, ClusterStatus.UPDATING, ClusterStatus.DEGRADED)
        if self.state.status not in serving or self.deleting is not None:
            raise invalid_state(
                f"cluster {self.state.name} is {self.state.status}: a kubeconfig needs a "
                "Running cluster"
            )
        if self.nodes.secrets is None or self._api_server() is None:
            raise invalid_state(f"cluster {self.state.name} has no API server to reach yet")
        if request.request_id in self.kubeconfig_requests or any(
            k.request_id == request.request_id for k in self.state.kubeconfigs
        ):
            raise invalid_state(f"kubeconfig request {request.request_id} was answered already")

    def _api_server(self) -> str | None:
        """The API server's URL (see NodeSet.api_server)."""
        return self.nodes.api_server()

    @workflow.signal
    def agent_presence(self, news: AgentPresence) -> None:
        """The gateway's agent went away or came back: steps waiting on it say so."""
        self.state.agent_away = None if news.connected else news
        self.publish()

    @workflow.signal
    def wake(self) -> None:
        """Pass the main loop once more (the gateway sends it once per kubegate release, so
        a run begun under an earlier one takes up what this one added, e.g. reconciles)."""
        self.woken = True

    @workflow.signal
    def proceed(self) -> None:
        """The gateway is Running again: a queued cluster starts provisioning."""
        self.queued = False

    @workflow.update
    async def reconcile(self, request: ReconcileRequest) -> ClusterHealth:
        """Compare the cluster's VMs with its record now and repair what the healing policy
        repairs (with `retry_given_up`, repairs given up get their attempts again); returns
        what it saw and did."""
        self.retry_given_up = self.retry_given_up or request.retry_given_up
        self.reconcile_asked += 1
        ticket = self.reconcile_asked
        await workflow.wait_condition(
            lambda: (
                self.reconcile_served >= ticket
                or self.deleting is not None
                or self.state.status not in (*SERVING, ClusterStatus.UPDATING)
            )
        )
        return self.state.health

    @reconcile.validator
    def _reconcile_ok(self, request: ReconcileRequest) -> None:
        if self.state.status not in SERVING or self.deleting is not None:
            raise invalid_state(
                f"cluster {self.state.name} is {self.state.status}: only a Running or Degraded "
                "cluster reconciles"
            )

    @workflow.update
    async def collect_events(self) -> EventsResult:
        """Recent vCenter events and tasks of the cluster's VMs and folder (`cluster
        events`), read by the gateway's agent; changes nothing."""
        nodes = self.nodes
        if nodes.account.credentials is None:
            await nodes.refresh_account()
        if nodes.account.credentials is None:
            raise invalid_state(f"cluster {self.state.name}: no credentials to read vCenter")
        objects = [n.vm for n in self.state.nodes if n.vm]
        if self.state.folder_ref:
            objects.append(self.state.folder_ref)
        return await nodes.agent(
            "vm_events",
            EventsRequest(
                credentials=nodes.account.current,
                datacenter=self.state.spec.placement.datacenter,
                objects=objects,
                folder=self.state.folder,
                limit=500,
            ),
            EventsResult,
            f"Collect vCenter events of cluster {self.state.name}",
            deadline=_KUBECONFIG_DEADLINE,
        )

    @collect_events.validator
    def _events_ok(self) -> None:
        if self.state.status in (ClusterStatus.QUEUED, ClusterStatus.DELETED):
            raise invalid_state(
                f"cluster {self.state.name} is {self.state.status}: it has no VMs to ask about"
            )

    @workflow.update
    def pause_remediation(self) -> ClusterHealth:
        """Unhealthy nodes are reported, not replaced (drift is still repaired)."""
        self.state.health.remediation_paused = True
        self.publish()
        return self.state.health

    @pause_remediation.validator
    def _pause_remediation_ok(self) -> None:
        self._remediation_settable(paused=True)

    @workflow.update
    def resume_remediation(self) -> ClusterHealth:
        """Unhealthy nodes are replaced again."""
        self.state.health.remediation_paused = False
        self.publish()
        return self.state.health

    @resume_remediation.validator
    def _resume_remediation_ok(self) -> None:
        self._remediation_settable(paused=False)

    def _remediation_settable(self, paused: bool) -> None:
        if self.state.status in (ClusterStatus.DELETING, ClusterStatus.DELETED):
            raise invalid_state(f"cluster {self.state.name} is {self.state.status}")
        if self.state.health.remediation_paused is paused:
            word = "paused" if paused else "not paused"
            raise invalid_state(f"cluster {self.state.name}: remediation is {word} already")

    @workflow.query(name="state")
    def state_query(self) -> ClusterState:
        """Status, step history and nodes (what `cluster describe` shows)."""
        return self.state

    async def _change(
        self,
        spec: ClusterSpec,
        title: str,
        undo_on_failure: bool = False,
        undo_to: ClusterSpec | None = None,
        rolling: bool = False,
    ) -> ChangeResult:
        """Accept a changed spec and return its operation number; the main loop carries it
        out. Refused (OutOfAddresses) before anything changes when its IP pools lack the new
        nodes' addresses. With `undo_on_failure` a failed change leaves the previous spec (a
        failed add-pool is not kept; `retry` removes what it made)."""
        if not workflow.patched(CHANGES_ARE_OPERATIONS):
            return await self._change_in_update(spec, title, undo_on_failure)
        self._require_running()
        base = self.state.operations_run  # the spec this change was computed from
        await self._check_free(spec, rolling)
        await self._check_agent_can_drain(spec)
        self._require_running()
        if self.change is not None or self.lock.locked() or self.state.operations_run != base:
            raise invalid_state(
                f"cluster {self.state.name}: another change was accepted while this one was "
                "checked; send it again"
            )
        self.change = _Change(
            spec=spec,
            undo_to=undo_to or (self.state.spec if undo_on_failure else None),
            title=title,
            before={n.name for n in self.state.nodes},
            rolling=rolling,
        )
        if rolling:
            self._record_builds()
        self.state.spec = spec
        self._begin(title)
        if rolling:
            self.rollout_aborting = False
            members = spec.control_plane.size - self._members()
            self.state.rollout = Rollout(
                operation=self.state.operations_run,
                target=title,
                total=len(self._outdated()) + abs(members),
            )
        self._set_status(ClusterStatus.UPDATING, title)
        return ChangeResult(status=self.state.status, operation=self.state.operations_run)

    def _record_builds(self) -> None:
        """Nodes made before builds were recorded get the build of the spec they run."""
        builds = node_builds(self.state.spec, self.state.nodes)
        version = self.state.spec.kubernetes_version()
        for node in self.state.nodes:
            node.build = node.build or builds.get(node.name) or None
            node.kubernetes = node.kubernetes or version

    def _outdated(self) -> list[Node]:
        """Nodes the spec keeps whose build is not the one it gives them, in rollout order
        (a node made before builds were recorded counts as built from the current spec)."""
        builds = node_builds(self.state.spec, self.state.nodes)
        return outdated(self.state.spec, self.state.nodes, builds)

    async def _carry_out(self, change: _Change) -> None:
        """Make vCenter match an accepted change; Running or Failed, recorded in `changes`."""
        self.nodes.spec_changed()
        error: str | None = None
        aborted: str | None = None
        try:
            if change.rolling:
                await self._roll_out()
            else:
                await self.nodes.converge()
        except StepFailed as exc:
            if change.undo_to is not None and not change.rolling:
                self.state.spec = change.undo_to
            error = str(exc)
        except _RolloutAborted:
            aborted = "rollout aborted"
        rollout = self.state.rollout
        if change.rolling and rollout is not None:
            rollout.current = []
            rollout.outdated = [n.name for n in self._outdated()]
            rollout.state = "failed" if error else "aborted" if aborted else "done"
            if aborted:
                aborted = (
                    f"rollout aborted after {rollout.done} of {rollout.total} node "
                    f"change(s); {len(rollout.outdated)} node(s) on their old build "
                    "(upgrade or apply again to finish)"
                )
        after = {n.name for n in self.state.nodes}
        ended = ChangeResult(
            status=(ClusterStatus.FAILED if error else ClusterStatus.RUNNING).value,
            added=sorted(after - change.before),
            removed=sorted(change.before - after),
            operation=self.state.operations_run,
            error=error or aborted,
        )
        self.state.changes = [*self.state.changes, ended][-CHANGES_KEPT:]
        self.state.error = error
        self._set_status(
            ClusterStatus.FAILED if error else ClusterStatus.RUNNING, aborted or change.title
        )

    # -- rollouts -------------------------------------------------------------------------

    async def _roll_out(self) -> None:
        """Carry out a change that replaces nodes or changes the control plane's size, one
        step at a time: workers the spec no longer has go; control-plane members are added
        or removed one at a time; the control plane's outdated members are replaced (a
        replacement an earlier attempt left half done finished first), one at a time, the new
        one ready before the old one leaves; then new workers come (after the control plane:
        a kubelet may not be newer than its API server); then each worker pool's outdated
        nodes are replaced in batches of max_surge + max_unavailable. Pause and abort take
        effect between steps, never with an even number of control-plane members."""
        nodes, spec = self.nodes, self.state.spec
        slots = {(p.pool, p.index) for p in plan_nodes(spec)}
        known = {(n.pool, n.index) for n in self.state.nodes}
        made = {(n.pool, n.index) for n in self.state.nodes if n.phase in ("created", "ready")}
        gone = {s for s in known if s[0] != "cp" and s not in slots}
        if gone:
            await self._gate()
            await nodes.converge(only=gone)
        for index in sorted(i for pool, i in slots if pool == "cp" and ("cp", i) not in made):
            await self._gate(self._members() % 2 == 1)
            await nodes.converge(only={("cp", index)}, label="Control plane, a member more: ")
            self._member_changed(f"+{self.state.name}-cp-{index}")
        for index in sorted((i for p, i in known if p == "cp" and ("cp", i) not in slots))[::-1]:
            await self._gate(self._members() % 2 == 1)
            await nodes.converge(only={("cp", index)}, label="Control plane, a member less: ")
            self._member_changed(f"-{self.state.name}-cp-{index}")
        await self._finish_half_done(control_plane=True)
        await self._replace_outdated(control_plane=True)
        missing = {s for s in slots if s[0] != "cp" and s not in made}
        if missing:
            await self._gate()
            await nodes.converge(only=missing)
        await self._finish_half_done(control_plane=False)
        await self._replace_outdated(control_plane=False)

    def _members(self) -> int:
        """Control-plane members there now (their VMs made)."""
        return sum(1 for n in self.state.nodes if n.control_plane and n.phase in _MADE)

    def _member_changed(self, change: str) -> None:
        if self.state.rollout is not None:
            self.state.rollout.members.append(change)
        self.publish()

    def _half_done(self) -> set[Slot]:
        """Slots holding a node of an earlier revision besides their current one (a
        replacement that failed or was stopped before the old node left)."""
        by_slot: dict[Slot, int] = {}
        for node in self.state.nodes:
            by_slot[(node.pool, node.index)] = by_slot.get((node.pool, node.index), 0) + 1
        return {slot for slot, count in by_slot.items() if count > 1}

    def _unsettled(self) -> str | None:
        """Why only a rollout may change the cluster now: nodes left on an old build or a
        replacement half done (an aborted or failed rollout); None when neither."""
        half = self._half_done()
        if half:
            return f"a replacement is half done ({len(half)} node slot(s))"
        stale = self._outdated()
        if stale:
            return f"{len(stale)} node(s) on an old build ({', '.join(n.name for n in stale[:5])})"
        return None

    async def _finish_half_done(self, control_plane: bool) -> None:
        """Finish replacements left half done: the new node is made, then the old goes."""
        half = {s for s in self._half_done() if (s[0] == "cp") is control_plane}
        for pool in sorted({slot[0] for slot in half}):
            await self._gate()
            mine = {slot for slot in half if slot[0] == pool}
            await self.nodes.converge(only=mine, surge=True, label="Finish replacing: ")

    async def _replace_outdated(self, control_plane: bool) -> None:
        """Replace every outdated node of the control plane, or of the worker pools pool by
        pool, in batches of the pool's rollout policy: the batch's first max_surge nodes stay
        until their successors are ready, the others (max_unavailable) go first."""
        rollout = self.state.rollout
        stale = [n for n in self._outdated() if n.control_plane is control_plane]
        pools = list(dict.fromkeys(n.pool for n in stale))
        for pool in pools:
            policy = self.state.spec.rollout_of(pool)
            queue = [n for n in stale if n.pool == pool]
            while queue:
                await self._gate()
                batch, queue = queue[: policy.batch], queue[policy.batch :]
                slots: set[Slot] = set()
                for node in batch:
                    slot = f"{self.state.name}-{node.pool}-{node.index}"
                    self.state.revisions[slot] = self.state.revisions.get(slot, 0) + 1
                    slots.add((node.pool, node.index))
                news = {n.name: n for n in self.state.nodes}
                if rollout is not None:
                    rollout.current = [n.name for n in batch]
                first = [n.name for n in batch[policy.max_surge :]]  # (max_unavailable)
                label = "Replace " + ", ".join(n.name for n in batch) + ": "
                if len(batch) > 3:
                    label = f"Replace {len(batch)} {pool} nodes: "
                await self.nodes.converge(only=slots, remove_first=first, label=label)
                made = [n for n in self.state.nodes if n.name not in news]
                if rollout is not None:
                    for old, new in zip(
                        sorted(batch, key=lambda n: n.index),
                        sorted(made, key=lambda n: n.index),
                        strict=False,
                    ):
                        rollout.replaced.append(f"{old.name} -> {new.name}")
                    rollout.current = []
                self.publish()

    async def _gate(self, allowed: bool = True) -> None:
        """Between two steps of a rollout: hold while paused; stop when aborted (not where
        it is not `allowed`: an even number of control-plane members)."""
        rollout = self.state.rollout
        if rollout is None or not allowed:
            return
        if rollout.state == "paused" and not self.rollout_aborting:
            done = f"{len(rollout.replaced)} of {rollout.total} replaced"
            self.state.reason = f"rollout paused ({done}): resume or abort it"
            self.publish()
            await workflow.wait_condition(
                lambda: rollout.state != "paused" or self.rollout_aborting
            )
            self.state.reason = rollout.target
            self.publish()
        if self.rollout_aborting:
            self.rollout_aborting = False
            raise _RolloutAborted

    async def _change_in_update(
        self, spec: ClusterSpec, title: str, undo_on_failure: bool
    ) -> ChangeResult:
        """The whole change inside its Update, as runs from before CHANGES_ARE_OPERATIONS
        did (kept so their histories replay)."""
        async with self.lock:
            self._require_running()
            if workflow.patched("check-free-addresses"):
                await self._check_free(spec)
            before = {n.name for n in self.state.nodes}
            previous = self.state.spec
            self.state.spec = spec
            self.nodes.spec_changed()
            self._begin(title)
            self._set_status(ClusterStatus.UPDATING, title)
            try:
                await self.nodes.converge()
            except StepFailed as exc:
                if undo_on_failure and workflow.patched("undo-failed-add-pool"):
                    self.state.spec = previous
                self.state.error = str(exc)
                self._set_status(ClusterStatus.FAILED)
                raise ApplicationError(str(exc), type="ChangeFailed") from None
            self.state.error = None
            self._set_status(ClusterStatus.RUNNING)
            after = {n.name for n in self.state.nodes}
            return ChangeResult(
                status=self.state.status,
                added=sorted(after - before),
                removed=sorted(before - after),
            )

    async def _check_agent_can_drain(self, spec: ClusterSpec) -> None:
        """Nodes of a cluster with readiness `kubernetes` leave it through the agent (drain,
        etcd): a change that removes or replaces nodes is refused while the gateway's agent
        runs a release without that (it would fail once the new nodes were made)."""
        if not self.nodes.leaves:
            return
        plan = plan_apply(self.state.spec, spec, self.state.nodes, self.state.revisions)
        if not (plan.remove or plan.replace) or not workflow.patched(NODES_LEAVE):
            return
        if await self.nodes.refresh_account():
            release = self.nodes.account.agent_release
            if release and not self.nodes.account.agent_runs(LEAVES_SINCE):
                raise invalid_state(
                    f"cluster {self.state.name}: the gateway's agent runs {release}; nodes of "
                    f"a cluster with readiness kubernetes leave it through agents of "
                    f"{LEAVES_SINCE} on (drained, out of etcd): upgrade the agent first"
                )

    async def _check_free(self, spec: ClusterSpec, rolling: bool = False) -> None:
        """Refuse a change whose new nodes need more addresses than their pools have free
        (a rollout: also its largest batch of nodes made before the old ones go)."""
        known = {n.name for n in self.state.nodes}
        needed: dict[str, int] = {}
        plans = plan_nodes(spec)
        for plan in plans:
            rev = self.state.revisions.get(plan.name, 0)
            name = f"{plan.name}-r{rev}" if rev else plan.name
            if plan.domain.ip_pool is not None and name not in known:
                needed[plan.domain.ip_pool] = needed.get(plan.domain.ip_pool, 0) + 1
        if rolling:
            surge: dict[str, int] = {}
            by_slot = {(p.pool, p.index): p for p in plans}
            stale = outdated(spec, self.state.nodes, node_builds(self.state.spec, self.state.nodes))
            for pool in {n.pool for n in stale}:
                counts: dict[str, int] = {}
                for node in stale:
                    ip_pool = by_slot[(node.pool, node.index)].domain.ip_pool
                    if node.pool == pool and ip_pool is not None:
                        counts[ip_pool] = counts.get(ip_pool, 0) + 1
                most = spec.rollout_of(pool).max_surge
                for ip_pool, count in counts.items():
                    surge[ip_pool] = max(surge.get(ip_pool, 0), min(most, count))
            for ip_pool, count in surge.items():
                needed[ip_pool] = needed.get(ip_pool, 0) + count
        for pool in sorted(needed):
            try:
                status = await self.nodes.control(
                    "describe_pool",
                    PoolRef(gateway=self.state.gateway, pool=pool),
                    PoolStatus,
                    f"Check IP pool {pool}",
                )
            except ActivityError as exc:
                raise ApplicationError(
                    f"IP pool {pool}: {getattr(exc.cause, 'message', None) or exc}",
                    type=errors.POOL_NOT_FOUND,
                    non_retryable=True,
                ) from None
            if status.free < needed[pool]:
                raise ApplicationError(
                    f"IP pool {pool} has {status.free} free address(es); the change needs "
                    f"{needed[pool]}; nothing was changed (add addresses to the pool, or ask "
                    "for fewer nodes)",
                    type=errors.OUT_OF_ADDRESSES,
                    non_retryable=True,
                )

    def _require_settled(self) -> None:
        """An imperative change would make nodes of the newest build beside a control plane
        a stopped rollout left, or remove a node a replacement still needs: refused."""
        unsettled = self._unsettled()
        if unsettled:
            raise invalid_state(
                f"cluster {self.state.name}: {unsettled}, left by a rollout that stopped: "
                "finish it first (the same `cluster upgrade`, or `cluster apply` with the "
                "change in the spec)"
            )

    def _require_running(self) -> None:
        """Changes need Running, or Failed after a change (so a failed change can be undone)."""
        changeable = self.state.status in SERVING or (
            self.state.status is ClusterStatus.FAILED and self.state.provisioned
        )
        if not changeable or self.deleting is not None or self.retrying:
            raise invalid_state(
                f"cluster {self.state.name} is {self.state.status}: changes need Running"
            )

    def _changed_spec(
        self,
        scale: ScaleRequest | None = None,
        add: WorkerPool | None = None,
        remove: str | None = None,
    ) -> ClusterSpec:
        """The spec after a change, validated; ApplicationError naming the field otherwise."""
        data = self.state.spec.model_dump(mode="json")
        pools: list[dict[str, Any]] = data["workers"]
        names_ = [p["name"] for p in pools]
        if scale is not None:
            if scale.pool == "cp":
                if scale.size not in (1, 3, 5):
                    raise invalid_spec(
                        f"size: a control plane has 1, 3 or 5 members (etcd quorum), not "
                        f"{scale.size}"
                    )
                data["control_plane"]["size"] = scale.size
            elif scale.pool not in names_:
                raise invalid_spec(f"pool: no worker pool named {scale.pool!r}")
            else:
                pools[names_.index(scale.pool)]["size"] = scale.size
        if add is not None:
            if add.name in names_:
                raise invalid_spec(f"pool.name: a worker pool named {add.name!r} exists")
            pools.append(add.model_dump(mode="json"))
        if remove is not None:
            if remove not in names_:
                raise invalid_spec(f"pool: no worker pool named {remove!r}")
            del pools[names_.index(remove)]
        try:
            return ClusterSpec.model_validate(data)
        except ValidationError as exc:
            raise invalid_spec("; ".join(errors.field_errors(exc))) from None

    # -- helpers --------------------------------------------------------------------------
    # -- status ---------------------------------------------------------------------------

    def _set_status(self, status: ClusterStatus, detail: str = "") -> None:
        changed = status is not self.state.status
        self.state.status = status
        self.state.updated_at = workflow.now()
        if detail:
            self.state.reason = detail
        if changed and status in (
            ClusterStatus.RUNNING,
            ClusterStatus.FAILED,
            ClusterStatus.DEGRADED,
        ):
            self.nodes.trim_steps()
            self.settled = True  # an operation ended: a settle point
        self.publish()
        if changed:
            self._notify_gateway()

    def _notify_gateway(self) -> None:
        """Tell the gateway (if it asked) the status; signals go in order, awaited at the end."""
        target = self.input.gateway_workflow
        if target is None:
            return
        change = ClusterChanged(
            name=self.state.name, account=self.state.account, status=self.state.status.value
        )

        previous = self.notices[-1] if self.notices else None

        async def send() -> None:
            if previous is not None:
                await previous  # one at a time: the gateway sees the changes in order
            try:
                await workflow.get_external_workflow_handle(target).signal(
                    "cluster_changed", change
                )
            except Exception as exc:  # the gateway is gone: nobody to tell
                workflow.logger.info("cluster %s: gateway not told (%s)", self.state.name, exc)

        self.notices.append(asyncio.create_task(send()))

    async def _notices_sent(self) -> None:
        """Wait until every signal to the gateway went out (also those added meanwhile)."""
        while self.notices:
            sent = list(self.notices)
            await asyncio.gather(*sent)
            self.notices = [t for t in self.notices if t not in sent]

    def publish(self) -> None:
        """The Web UI's current details; search attributes when the status changed."""
        note_waiting(self.state.steps, self.state.agent_away)
        if self.published != self.state.status:
            workflow.upsert_search_attributes(
                [
                    names.KIND.value_set("cluster"),
                    names.STATUS.value_set(self.state.status.value),
                    names.GATEWAY.value_set(self.state.gateway),
                ]
            )
            self.published = self.state.status
        workflow.set_current_details(render_details(self.state))


_DELETABLE = (ClusterStatus.RUNNING, ClusterStatus.FAILED, ClusterStatus.DEGRADED)
#: node phases whose VM exists
_MADE = ("created", "ready")


def _upgrade_title(request: ClusterUpgradeRequest) -> str:
    parts = []
    if request.kubernetes is not None:
        parts.append(f"Kubernetes {request.kubernetes}")
    if request.template is not None:
        parts.append(f"template {request.template}")
    return "Upgrade to " + " and ".join(parts)


def render_details(state: ClusterState) -> str:
    """Markdown for the Web UI's first screen: status, what is wrong, the current step, then
    steps with durations, nodes and the last reconcile's findings as text tables."""
    step = state.current_step()
    troubled = state.status in (ClusterStatus.FAILED, ClusterStatus.DEGRADED)
    lines = [
        f"## Cluster `{state.name}` — {state.status.value}",
        "",
        *trouble(
            state.status is ClusterStatus.FAILED,
            state.steps,
            state.error,
            state.reason if troubled else "",
        ),
        f"Current step: **{step.title if step else '-'}**"
        + (f" — {step.detail}" if step and step.detail else ""),
    ]
    if state.error and state.status is not ClusterStatus.FAILED:
        lines += ["", f"Error: {state.error}"]
    lines += ["", "Steps", ""]
    lines += steps_table(state.steps)
    lines += ["", "Nodes", ""]
    lines += text_table(
        ["node", "pool", "VM", "address", "phase"],
        [[n.name, n.pool, n.vm or "", n.address or "", n.phase] for n in state.nodes],
    )
    health = state.health
    if health.findings or health.error:
        lines += ["", f"Reconcile ({health.checks} so far): {health.error or ''}", ""]
        lines += text_table(
            ["finding", "node", "detail"], [[f.kind, f.node, f.detail] for f in health.findings]
        )
    return "\n".join(lines)


def _pool_health(health: NodeHealth) -> PoolHealth:
    return PoolHealth(
        unhealthy_after_seconds=health.unhealthy_after_seconds,
        max_unhealthy=health.max_unhealthy,
    )
