"""Facts workflows decide on, taken from Temporal itself (control worker activities).

A workflow cannot tell a forged signal or Update from a real one; these activities let it
check what Temporal records instead: whether a lifecycle has really ended and how, which
credentials its gateway holds now, whether an address owner is really giving addresses back.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from domain import errors, names
from domain.audit import AuditItem, AuditOwners, OwnerFacts, PoolLeftovers
from domain.ipam import AllocationsPage, AllocationsQuery
from domain.lifecycle import ClusterAccount
from domain.trust import (
    AccountAnswer,
    AccountRef,
    ConfirmRelease,
    LifecycleFact,
    LifecycleRef,
    ReleaseConfirmation,
    ReleaseIntent,
)

#: how long one question to Temporal may take (then the activity fails and is retried)
ASK_TIMEOUT = timedelta(seconds=10)


class LifecycleActivities:
    def __init__(self, client: Client) -> None:
        self.client = client

    @activity.defn(name="gateway_account")
    async def gateway_account(self, ref: AccountRef) -> ClusterAccount:
        """The account's current credentials and the gateway's approved agent's signing key."""
        handle = self.client.get_workflow_handle(names.gateway_workflow_id(ref.gateway))
        answer: AccountAnswer = await handle.query(
            "cluster_account", ref.account, result_type=AccountAnswer, rpc_timeout=ASK_TIMEOUT
        )
        account = answer.account
        if account is None:
            raise ApplicationError(
                f"gateway {ref.gateway} has no live cloud account {ref.account}",
                type=errors.NOT_AUTHORIZED,
                non_retryable=True,
            )
        return account

    @activity.defn(name="lifecycle_fact")
    async def lifecycle_fact(self, ref: LifecycleRef) -> LifecycleFact:
        """Whether a lifecycle has ended (waiting a little for one that is about to), and
        whether it ended Deleted, as Temporal records it. A workflow under that id that is
        not the one meant (another parent or first run) means the one meant is gone."""
        handle = self.client.get_workflow_handle(ref.workflow_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ref.wait_seconds
        while True:
            try:
                described = await handle.describe(rpc_timeout=ASK_TIMEOUT)
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    return LifecycleFact(
                        workflow_id=ref.workflow_id, status="NOT_FOUND", closed=True
                    )
                raise
            first = described.raw_description.workflow_execution_info.first_run_id
            if (ref.parent and described.parent_id != ref.parent) or (
                ref.first_run and first != ref.first_run
            ):
                return LifecycleFact(
                    workflow_id=ref.workflow_id, status="REPLACED", closed=True, replaced=True
                )
            status = described.status
            if status is not None and status != WorkflowExecutionStatus.RUNNING:
                deleted = status == WorkflowExecutionStatus.COMPLETED and await self._deleted(
                    ref.workflow_id
                )
                return LifecycleFact(
                    workflow_id=ref.workflow_id, status=status.name, closed=True, deleted=deleted
                )
            if loop.time() >= deadline:
                return LifecycleFact(workflow_id=ref.workflow_id, status="RUNNING", closed=False)
            activity.heartbeat()
            await asyncio.sleep(0.5)

    async def _deleted(self, workflow_id: str) -> bool:
        """A completed cluster's or gateway's result says Deleted."""
        try:
            result = await self.client.get_workflow_handle(workflow_id, result_type=dict).result()
        except Exception:  # not a lifecycle's state: not Deleted
            return False
        return isinstance(result, dict) and result.get("status") == "Deleted"

    @activity.defn(name="confirm_release")
    async def confirm_release(self, request: ConfirmRelease) -> ReleaseConfirmation:
        """True when the owner has been deleted (or never existed), or its own state says it
        is giving these addresses back. A cluster must be its gateway's child."""
        if not request.owner.startswith(names.LIFECYCLE_PREFIXES):
            return ReleaseConfirmation(confirmed=True, reason="not a lifecycle's addresses")
        parent = (
            names.gateway_workflow_id(request.gateway)
            if request.owner.startswith("cluster/") and request.gateway
            else ""
        )
        fact = await self.lifecycle_fact(
            LifecycleRef(workflow_id=request.owner, wait_seconds=0, parent=parent)
        )
        if fact.status == "NOT_FOUND" or fact.deleted:
            return ReleaseConfirmation(confirmed=True, reason=f"{request.owner} is gone")
        if fact.replaced:
            return ReleaseConfirmation(
                confirmed=False,
                reason=f"{request.owner} is not a lifecycle of gateway {request.gateway}",
            )
        if fact.closed:
            return ReleaseConfirmation(
                confirmed=False,
                reason=f"{request.owner} ended ({fact.status}) without being deleted: its "
                "nodes may still hold these addresses",
            )
        handle = self.client.get_workflow_handle(request.owner)
        try:
            intent: ReleaseIntent = await handle.query(
                "releasing", result_type=ReleaseIntent, rpc_timeout=ASK_TIMEOUT
            )
        except Exception as exc:
            return ReleaseConfirmation(confirmed=False, reason=f"{request.owner}: {exc}")
        if request.pool not in intent.pools:
            return ReleaseConfirmation(
                confirmed=False, reason=f"{request.owner} is not releasing from {request.pool}"
            )
        releasing = intent.pools[request.pool]
        if releasing is None:
            return ReleaseConfirmation(confirmed=True, reason="the owner releases all")
        if request.slots is None or not set(request.slots) <= set(releasing):
            return ReleaseConfirmation(
                confirmed=False,
                reason=f"{request.owner} releases only {', '.join(sorted(releasing)) or 'none'}",
            )
        return ReleaseConfirmation(confirmed=True, reason="the owner releases these")

    # -- the orphan audit's facts ------------------------------------------------------------

    @activity.defn(name="audit_owners")
    async def audit_owners(self, request: AuditOwners) -> OwnerFacts:
        """Which of these lifecycles run now; of the others, which are gone for good (never
        existed, or ended Deleted) and how the rest ended. An owner that is not a lifecycle's
        id cannot be verified and counts as running (nothing of it is listed)."""
        facts = OwnerFacts()
        for owner in request.owners:
            activity.heartbeat(owner)
            if not owner.startswith(names.LIFECYCLE_PREFIXES):
                facts.running.append(owner)
                continue
            fact = await self.lifecycle_fact(LifecycleRef(workflow_id=owner, wait_seconds=0))
            if not fact.closed:
                facts.running.append(owner)
                continue
            facts.ended[owner] = "never existed" if fact.status == "NOT_FOUND" else fact.status
            if fact.status == "NOT_FOUND" or fact.deleted:
                facts.gone.append(owner)
        return facts

    @activity.defn(name="audit_allocations")
    async def audit_allocations(self, request: PoolLeftovers) -> list[AuditItem]:
        """Allocations of the gateway's pools held by a lifecycle that is gone for good: what
        each pool's own release gives back (confirm_release)."""
        query = (
            f"KubegateKind = 'ippool' AND KubegateGateway = '{request.gateway}' "
            "AND ExecutionStatus = 'Running'"
        )
        prefix = f"ippool/{request.gateway}/"
        pools = sorted(
            {e.id async for e in self.client.list_workflows(query) if e.id.startswith(prefix)}
        )
        held: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for pool_id in pools:
            activity.heartbeat(pool_id)
            handle = self.client.get_workflow_handle(pool_id)
            offset = 0
            while True:
                page: AllocationsPage = await handle.query(
                    "allocations",
                    AllocationsQuery(offset=offset, limit=1000),
                    result_type=AllocationsPage,
                    rpc_timeout=ASK_TIMEOUT,
                )
                for allocation in page.allocations:
                    if allocation.owner.startswith(names.LIFECYCLE_PREFIXES):
                        key = (pool_id.removeprefix(prefix), allocation.owner)
                        held.setdefault(key, []).append((allocation.slot, allocation.address))
                offset += len(page.allocations)
                if not page.allocations or offset >= page.total:
                    break
        owners = sorted({owner for _, owner in held})
        facts = await self.audit_owners(AuditOwners(owners=owners)) if owners else OwnerFacts()
        items = []
        for (pool, owner), slots in sorted(held.items()):
            if owner not in facts.gone:
                continue
            items.append(
                AuditItem(
                    kind="allocation",
                    id=f"{pool}:{owner}",
                    name=pool,
                    owner=owner,
                    path=f"ippool/{request.gateway}/{pool}",
                    detail=", ".join(f"{slot}={address}" for slot, address in sorted(slots)),
                    reason=f"{owner} is gone ({facts.ended.get(owner, 'ended')})",
                    slots=sorted(slot for slot, _ in slots),
                )
            )
        return items
