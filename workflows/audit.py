"""AuditWorkflow: one orphan audit of one gateway (`kubegate audit`), started by the gateway.

Its steps: `inventory` (the agent reads every kubegate-marked VM, installer VM and VM
directory of each of the gateway's vCenters, and their owner tags, best effort: nothing
changed), `owners` (Temporal says which of the lifecycles those marks and tags name are still
running), `addresses` (allocations of the
gateway's IP pools held by lifecycles that are gone). What is left over is listed in its
state (status Listed). A `clean` Update naming listed items (and only those: its validator
refuses anything else) removes them: `recheck` (their owners asked again), `remove` (the
agent removes each, reading it again first) and `release-addresses` (through each pool's own
release, which confirms the owner is gone). Without a clean the audit ends when told to
(`close`) or after `wait_minutes`.

The agent works for it because its gateway started it (and lists it in its authorization
until it ends); its results count only when signed by the gateway's approved agent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain import errors, names
    from domain.audit import (
        AuditAccount,
        AuditInput,
        AuditItem,
        AuditOwners,
        AuditState,
        AuditStatus,
        CleanRequest,
        CleanResult,
        InventoryRequest,
        InventoryResult,
        OwnerFacts,
        OwnerTag,
        PoolLeftovers,
        RemovalRequest,
        RemovalResult,
        item_sort_key,
        vm_owner,
    )
    from domain.ipam import ReleaseAddresses, ReleaseResult
    from domain.lifecycle import Step, StepState
    from domain.tags import CATEGORY
    from workflows.metrics import record_step
    from workflows.nodes import decoded, verify_result

T = TypeVar("T")

_AGENT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=errors.NON_RETRYABLE,
)
_CONTROL_RETRY = RetryPolicy(maximum_attempts=5, non_retryable_error_types=errors.NON_RETRYABLE)

#: statuses of a gateway whose installer should be off (it powers it off when provisioned)
_INSTALLER_DONE = ("Running", "Upgrading")
#: owner tags count (VMs found by them, orphan tags listed): histories before it had none
PATCH_TAGS = "audit-owner-tags"


class _StepFailed(Exception):
    pass


@workflow.defn(name="AuditWorkflow")
class AuditWorkflow:
    """List what kubegate left behind on one gateway; remove what a clean names."""

    @workflow.init
    def __init__(self, input: AuditInput) -> None:
        self.input = input
        self.state = AuditState(gateway=input.gateway, workflow_id=workflow.info().workflow_id)
        self.done = False
        self.operation = "audit"
        self.published = "Listing"  # the status the search attributes say (set at start)

    # -- run ------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: AuditInput) -> AuditState:
        self.state.created_at = self.state.updated_at = workflow.now()
        self.publish()
        try:
            await self._list()
        except _StepFailed as exc:
            self.state.status, self.state.error = AuditStatus.FAILED, str(exc)
            self.done = True
        else:
            self.state.status = AuditStatus.LISTED
        self.publish()
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(
                lambda: self.done, timeout=timedelta(minutes=input.wait_minutes)
            )
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self.state.status is AuditStatus.LISTED:
            self.state.status = AuditStatus.CLOSED
        self.publish()
        await self._tell_gateway()
        return self.state

    async def _tell_gateway(self) -> None:
        """The gateway stops authorizing this audit (a gateway gone: nobody to tell)."""
        handle = workflow.get_external_workflow_handle(
            names.gateway_workflow_id(self.input.gateway)
        )
        try:
            await handle.signal("audit_ended", workflow.info().workflow_id)
        except Exception as exc:
            workflow.logger.info("gateway %s not told: %s", self.input.gateway, exc)

    # -- listing --------------------------------------------------------------------------

    async def _list(self) -> None:
        inventories: list[tuple[AuditAccount, InventoryResult]] = []

        async def inventory(step: Step) -> None:
            for account in self._distinct_accounts():
                result = await self._agent(
                    "audit_inventory",
                    InventoryRequest(
                        credentials=account.credentials,
                        account=account.name,
                        datacenter=account.datacenter,
                    ),
                    InventoryResult,
                    f"Inventory of {account.datacenter} with cloud account {account.name}",
                )
                inventories.append((account, result))
            vms = sum(len(r.vms) for _, r in inventories)
            files = sum(len(r.directories) for _, r in inventories)
            step.detail = (
                f"{len(inventories)} datacenter(s): {vms} marked VM(s), {files} VM "
                "directory(ies) without a VM"
            )
            if workflow.patched(PATCH_TAGS):
                step.detail += self._tags_read(inventories)
            else:  # (an audit that began before: without tags, as it was)
                for _, result in inventories:
                    result.tags = []
                    for vm in result.vms:
                        vm.tags = {}

        await self._step("inventory", "Read kubegate's marks on the gateway's vCenters", inventory)

        owners: set[str] = set()
        for _, result in inventories:
            owners |= {v.owner for v in result.vms if v.owner}
            owners |= {o for v in result.vms if not v.owner for o in v.tags}
            owners |= {t.owner for t in result.tags}
            owners |= {f"gateway/{v.installer}" for v in result.vms if v.installer}
            owners |= {d.owner for d in result.directories}
        facts = OwnerFacts()

        async def ask(step: Step) -> None:
            nonlocal facts
            facts = await self._owners(sorted(owners))
            step.detail = (
                f"{len(owners)} owner(s): {len(facts.running)} running, "
                f"{len(owners) - len(facts.running)} not"
            )

        await self._step("owners", "Ask Temporal which owners are running", ask)

        items: dict[str, AuditItem] = {}
        for account, result in inventories:
            for found in self._leftovers(account, result, facts):
                items.setdefault(found.id, found)

        async def addresses(step: Step) -> None:
            held: list[AuditItem] = await workflow.execute_activity(
                "audit_allocations",
                PoolLeftovers(gateway=self.input.gateway),
                result_type=list[AuditItem],
                task_queue=names.CONTROL_TASK_QUEUE,
                start_to_close_timeout=timedelta(minutes=5),
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=_CONTROL_RETRY,
                summary=f"Allocations of gateway {self.input.gateway}'s pools held by no one",
            )
            for found in held:
                items.setdefault(found.id, found)
            step.detail = f"{len(held)} allocation(s) of lifecycles that are gone"

        await self._step("addresses", "Find addresses held by lifecycles that are gone", addresses)
        self.state.items = sorted(items.values(), key=item_sort_key)

    def _distinct_accounts(self) -> list[AuditAccount]:
        """One account per vCenter and datacenter (the same VMs seen once)."""
        seen: set[tuple[str, str]] = set()
        out = []
        for account in self.input.accounts:
            key = (account.credentials.endpoint.address.lower(), account.datacenter.strip("/"))
            if key not in seen:
                seen.add(key)
                out.append(account)
        return out

    def _tags_read(self, inventories: list[tuple[AuditAccount, InventoryResult]]) -> str:
        """The inventory's word on tags; a vCenter whose tags could not be read is a warning
        (the audit goes on by the extraConfig marks there)."""
        tags = {t.id for _, r in inventories for t in r.tags}
        for account, result in inventories:
            if not result.tags_read:
                self.state.warnings.append(
                    f"tags not read with cloud account {account.name} (the audit went by the "
                    f"extraConfig marks alone there): {result.tags_problem or 'agent too old'}"
                )
        unread = sum(1 for _, r in inventories if not r.tags_read)
        return f", {len(tags)} owner tag(s)" + (
            f"; tags not read in {unread} datacenter(s)" if unread else ""
        )

    def _leftovers(
        self, account: AuditAccount, result: InventoryResult, facts: OwnerFacts
    ) -> list[AuditItem]:
        running = set(facts.running)

        def why(owner: str) -> str:
            status = facts.ended.get(owner)
            return f"{owner} is not running ({status or 'never existed'})"

        found: list[AuditItem] = []
        orphans_in: dict[str, list[str]] = {}
        for vm in result.vms:
            owner, tag = vm_owner(vm, running)
            if owner and owner not in running:
                found.append(
                    AuditItem(
                        kind="vm",
                        id=vm.ref,
                        name=vm.name,
                        owner=owner,
                        account=account.name,
                        path=f"{vm.folder_path}/{vm.name}" if vm.folder_path else vm.name,
                        detail=vm.power_state,
                        reason=why(owner) if not tag else f"tagged {owner} (no mark); {why(owner)}",
                        parent=vm.folder,
                        tag=tag,
                    )
                )
                orphans_in.setdefault(vm.folder, []).append(vm.ref)
            elif vm.installer and vm.power_state == "poweredOn":
                owner = f"gateway/{vm.installer}"
                if owner not in running:
                    reason = f"installer of {why(owner)}, left powered on"
                elif vm.installer == self.input.gateway and (
                    self.input.gateway_status in _INSTALLER_DONE
                ):
                    reason = (
                        f"installer of gateway {vm.installer}, which is "
                        f"{self.input.gateway_status}: left powered on"
                    )
                else:
                    continue  # another live gateway's, or still in use
                found.append(
                    AuditItem(
                        kind="installer",
                        id=vm.ref,
                        name=vm.name,
                        owner=owner,
                        account=account.name,
                        detail=vm.power_state,
                        reason=reason,
                    )
                )
        # a folder named after an orphan's owner that holds nothing but its orphans
        for vm in result.vms:
            members = orphans_in.get(vm.folder)
            if not members or vm.ref != members[0] or not vm.folder_path:
                continue
            owner = vm_owner(vm, running)[0]
            short = owner.split("/", 1)[-1]
            if vm.folder_name not in (short, f"{short}-pcg") or vm.folder_children != len(members):
                continue
            found.append(
                AuditItem(
                    kind="folder",
                    id=vm.folder,
                    name=vm.folder_name,
                    owner=owner,
                    account=account.name,
                    path=vm.folder_path,
                    detail=f"holds only {len(members)} leftover VM(s)",
                    reason=why(owner),
                )
            )
        for directory in result.directories:
            if directory.owner in running:
                continue
            found.append(
                AuditItem(
                    kind="file",
                    id=directory.path,
                    name=directory.path.split("] ", 1)[-1],
                    owner=directory.owner,
                    account=account.name,
                    path=directory.path,
                    detail=", ".join(directory.files),
                    reason=f"no VM uses it; {why(directory.owner)}",
                    parent=directory.datastore,
                )
            )
        found += [_tag_item(account, tag, why(tag.owner)) for tag in result.tags]
        return [i for i in found if i.kind != "tag" or i.owner not in running]

    async def _owners(self, owners: list[str]) -> OwnerFacts:
        if not owners:
            return OwnerFacts()
        facts: OwnerFacts = await workflow.execute_activity(
            "audit_owners",
            AuditOwners(owners=owners),
            result_type=OwnerFacts,
            task_queue=names.CONTROL_TASK_QUEUE,
            start_to_close_timeout=timedelta(minutes=5),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=_CONTROL_RETRY,
            summary=f"Which of {len(owners)} lifecycle(s) are running",
        )
        return facts

    # -- cleaning -------------------------------------------------------------------------

    @workflow.update
    async def clean(self, request: CleanRequest) -> CleanResult:
        """Remove exactly these listed items, each checked again; then the audit ends."""
        self.state.status = AuditStatus.CLEANING
        self.operation = "clean"
        self.publish()
        chosen = [i for i in self.state.items if i.id in set(request.items)]
        result = CleanResult()
        try:
            await self._clean(chosen, result)
            self.state.status = AuditStatus.CLEANED
        except _StepFailed as exc:
            self.state.status, self.state.error = AuditStatus.FAILED, str(exc)
        finally:
            self.state.removed = list(result.removed)
            self.state.kept = dict(result.kept)
            self.done = True
            self.publish()
        if self.state.status is AuditStatus.FAILED:
            raise ApplicationError(
                f"clean of audit {workflow.info().workflow_id} failed: {self.state.error}",
                type=errors.INVALID_STATE,
                non_retryable=True,
            )
        return result

    @clean.validator
    def _clean_ok(self, request: CleanRequest) -> None:
        if self.state.status is not AuditStatus.LISTED:
            raise ApplicationError(
                f"audit {workflow.info().workflow_id} is {self.state.status.value}: only a "
                "Listed audit is cleaned, once",
                type=errors.INVALID_STATE,
                non_retryable=True,
            )
        listed = {i.id for i in self.state.items}
        unknown = [i for i in request.items if i not in listed]
        if unknown:
            raise ApplicationError(
                f"items: {', '.join(unknown[:5])} not listed by this audit (a clean removes "
                "only what the audit listed)",
                type=errors.INVALID_SPEC,
                non_retryable=True,
            )
        if len(set(request.items)) != len(request.items):
            raise ApplicationError(
                "items: listed twice", type=errors.INVALID_SPEC, non_retryable=True
            )

    async def _clean(self, chosen: list[AuditItem], result: CleanResult) -> None:
        still: list[AuditItem] = []

        async def recheck(step: Step) -> None:
            facts = await self._owners(sorted({i.owner for i in chosen if i.owner}))
            running = set(facts.running)
            for item in chosen:
                own_installer = item.kind == "installer" and item.owner == (
                    names.gateway_workflow_id(self.input.gateway)
                )
                if item.owner in running and not own_installer:
                    result.kept[item.id] = f"{item.owner} is running now: left alone"
                elif item.kind == "allocation" and item.owner not in facts.gone:
                    result.kept[item.id] = f"{item.owner} has not ended Deleted: left alone"
                else:
                    still.append(item)
            step.detail = f"{len(still)} of {len(chosen)} still left over"

        await self._step("recheck", "Check again that the owners are gone", recheck)

        async def remove(step: Step) -> None:
            accounts = {a.name: a for a in self.input.accounts}
            by_account: dict[str, list[AuditItem]] = {}
            for item in still:
                if item.kind != "allocation":
                    by_account.setdefault(item.account, []).append(item)
            for name, items in by_account.items():
                account = accounts[name]
                removed = await self._agent(
                    "audit_remove",
                    RemovalRequest(
                        credentials=account.credentials,
                        account=account.name,
                        datacenter=account.datacenter,
                        items=sorted(items, key=item_sort_key),
                    ),
                    RemovalResult,
                    f"Remove {len(items)} leftover(s) with cloud account {name}",
                )
                result.removed += removed.removed + removed.gone
                result.kept.update(removed.kept)
                step.objects += removed.removed
            step.detail = f"{len(step.objects)} removed"

        await self._step("remove", "Remove the leftover VMs, folders, files and tags", remove)

        async def release(step: Step) -> None:
            for item in still:
                if item.kind != "allocation":
                    continue
                try:
                    released: ReleaseResult = await workflow.execute_activity(
                        "release_addresses",
                        ReleaseAddresses(
                            gateway=self.input.gateway, pool=item.name, owner=item.owner
                        ),
                        result_type=ReleaseResult,
                        task_queue=names.CONTROL_TASK_QUEUE,
                        start_to_close_timeout=timedelta(minutes=2),
                        retry_policy=_CONTROL_RETRY,
                        summary=f"Release {item.owner}'s addresses in pool {item.name}",
                    )
                except ActivityError as exc:
                    result.kept[item.id] = f"the pool refused: {_message(exc)}"
                    continue
                result.removed.append(item.id)
                step.objects.append(f"{item.name}: {', '.join(released.released)}")
            step.detail = f"{len(step.objects)} owner(s) released"

        await self._step("release-addresses", "Release the leftover addresses", release)

    @workflow.signal
    def close(self) -> None:
        """End the audit without cleaning (the CLI sends it once it has printed the list)."""
        self.done = True

    @workflow.query
    def state_query(self) -> AuditState:
        return self.state

    # -- plumbing -------------------------------------------------------------------------

    async def _step(self, name: str, title: str, body: Callable[[Step], Awaitable[None]]) -> None:
        step = Step(name=name, title=title, started=workflow.now(), operation=self.operation)
        self.state.steps.append(step)
        self.publish()
        try:
            await body(step)
        except (ActivityError, ApplicationError) as exc:
            step.state, step.error, step.ended = StepState.FAILED, _message(exc), workflow.now()
            record_step(step)
            self.publish()
            raise _StepFailed(f"{name}: {step.error}") from None
        step.state, step.ended = StepState.DONE, workflow.now()
        record_step(step)
        self.publish()

    async def _agent(self, activity: str, arg: Any, result_type: type[T], summary: str) -> T:
        """An agent activity whose result counts only when the approved agent signed it."""
        activity_id = str(workflow.uuid4())
        raw = await workflow.execute_activity(
            activity,
            arg,
            activity_id=activity_id,
            result_type=RawValue,
            task_queue=names.gateway_task_queue(self.input.gateway),
            start_to_close_timeout=timedelta(minutes=30),
            schedule_to_close_timeout=timedelta(hours=1),
            heartbeat_timeout=timedelta(seconds=self.input.heartbeat_seconds),
            retry_policy=_AGENT_RETRY,
            summary=summary,
        )
        verified = verify_result(
            decoded(raw), arg, activity, self.input.agent_signing_key, result_type, activity_id
        )
        if verified is None:
            raise ApplicationError(
                f"{activity}: a result not signed by gateway {self.input.gateway}'s agent",
                type=errors.FORGED_RESULT,
                non_retryable=True,
            )
        return verified

    def publish(self) -> None:
        self.state.updated_at = workflow.now()
        lines = [f"## Audit of gateway `{self.input.gateway}`: {self.state.status.value}", ""]
        lines += [f"- {s.name}: {s.state.value} {s.detail}" for s in self.state.steps]
        lines += [f"- warning: {w}" for w in self.state.warnings]
        if self.state.items:
            lines += ["", f"{len(self.state.items)} leftover(s):"]
            lines += [f"- {i.kind} {i.name} ({i.reason})" for i in self.state.items[:50]]
        workflow.set_current_details("\n".join(lines))
        if self.state.status.value != self.published:
            self.published = self.state.status.value
            workflow.upsert_search_attributes([names.STATUS.value_set(self.published)])


def _tag_item(account: AuditAccount, tag: OwnerTag, reason: str) -> AuditItem:
    vms = sum(1 for o in tag.objects if o.startswith("VirtualMachine:"))
    return AuditItem(
        kind="tag",
        id=tag.id,
        name=tag.name,
        owner=tag.owner,
        account=account.name,
        path=f"{CATEGORY}/{tag.name}",
        detail=f"on {vms} VM(s)" if tag.objects else "on nothing",
        reason=reason,
    )


def _message(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or exc)
