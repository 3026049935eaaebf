"""IpPoolWorkflow: the state of record of one IP pool and every allocation from it."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain import errors, names
    from domain.ipam import (
        MAX_BATCH,
        AllocateBatch,
        AllocateBatchResult,
        AllocateOutcome,
        AllocateRequest,
        AllocateResult,
        AllocationsPage,
        AllocationsQuery,
        IpPoolInput,
        IpPoolSpec,
        OutOfAddresses,
        PoolAllocator,
        PoolClaimed,
        PoolStatus,
        ReleaseRequest,
        ReleaseResult,
    )
    from domain.trust import ConfirmRelease, ReleaseConfirmation


#: patch: releases of a lifecycle's addresses are confirmed with the lifecycle first
CONFIRMED_RELEASES = "confirmed-releases"

#: continue as new well before the server's per-run update limit (2,000 by default)
MAX_UPDATES_PER_RUN = 1_000


@workflow.defn(name="IpPoolWorkflow")
class IpPoolWorkflow:
    """An entity: lives until deleted, continues as new before its history grows large.

    Update handlers are synchronous, so each runs to completion before the next starts:
    no two requests ever see the same free address.
    """

    @workflow.init
    def __init__(self, input: IpPoolInput) -> None:
        self.input = input
        self.pool = PoolAllocator.restore(input.spec, input.snapshot)
        self.created_at = input.created_at or workflow.now()
        self.deleting = False
        self.updates = 0  # handled in this run; the server caps updates per run (2,000)

    @workflow.run
    async def run(self, input: IpPoolInput) -> PoolStatus:
        workflow.upsert_search_attributes(
            [
                names.KIND.value_set("ippool"),
                names.GATEWAY.value_set(input.spec.gateway),
                names.STATUS.value_set("Active"),
            ]
        )
        self._publish()
        await workflow.wait_condition(lambda: self.deleting or self._history_large())
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self.deleting:
            workflow.upsert_search_attributes([names.STATUS.value_set("Deleted")])
            return self.status()
        workflow.continue_as_new(
            IpPoolInput(
                spec=self.input.spec,
                snapshot=self.pool.snapshot(),
                created_at=self.created_at,
                continue_as_new_after=self.input.continue_as_new_after,
            )
        )

    def _history_large(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self.input.continue_as_new_after
            or self.updates >= MAX_UPDATES_PER_RUN
        )

    # -- allocate ---------------------------------------------------------------------------

    @workflow.update
    def allocate(self, request: AllocateRequest) -> AllocateResult:
        """Addresses for the owner's slots; the same owner and slot always get the same one."""
        self.updates += 1
        result = self._allocate(request)
        self._publish()
        return result

    @allocate.validator
    def _validate_allocate(self, request: AllocateRequest) -> None:
        self._refuse_if_deleting()
        self._check(request)

    @workflow.update
    def allocate_batch(self, batch: AllocateBatch) -> AllocateBatchResult:
        """Several callers' requests in one update; each gets its own result or error."""
        self.updates += 1
        outcomes = []
        for request in batch.requests:
            try:
                self._check(request)
                outcomes.append(AllocateOutcome(result=self._allocate(request)))
            except ApplicationError as exc:
                outcomes.append(AllocateOutcome(error_type=exc.type, error=exc.message))
        self._publish()
        return AllocateBatchResult(outcomes=outcomes)

    @allocate_batch.validator
    def _validate_batch(self, batch: AllocateBatch) -> None:
        self._refuse_if_deleting()
        if not 1 <= len(batch.requests) <= MAX_BATCH:
            raise ApplicationError(
                f"requests: between 1 and {MAX_BATCH} per batch",
                type=errors.INVALID_SPEC,
                non_retryable=True,
            )

    def _allocate(self, request: AllocateRequest) -> AllocateResult:
        addresses = self.pool.allocate(request.owner, request.slots, workflow.now())
        spec = self.pool.spec
        return AllocateResult(
            pool=spec.name,
            addresses=addresses,
            prefix=spec.prefix_length,
            network_gateway=spec.network_gateway,
            nameservers=spec.nameservers,
            search_domains=spec.search_domains,
        )

    def _check(self, request: AllocateRequest) -> None:
        """What allocate would refuse, as the ApplicationError callers see."""
        try:
            self.pool.check_allocate(request.owner, request.slots)
        except OutOfAddresses as exc:
            raise ApplicationError(
                str(exc), type=errors.OUT_OF_ADDRESSES, non_retryable=True
            ) from None
        except PoolClaimed as exc:
            raise ApplicationError(
                str(exc), type=errors.POOL_RESTRICTED, non_retryable=True
            ) from None
        except ValueError as exc:
            raise ApplicationError(str(exc), type=errors.INVALID_SPEC, non_retryable=True) from None

    # -- release ----------------------------------------------------------------------------

    @workflow.update
    async def release(self, request: ReleaseRequest) -> ReleaseResult:
        """Give back the owner's addresses (all, or the named slots); repeating it is a no-op.

        Anyone can send this Update, so a lifecycle's addresses are released only when
        Temporal shows the lifecycle has ended or its own state says it is giving them back.
        """
        self.updates += 1
        if request.owner.startswith(names.LIFECYCLE_PREFIXES) and workflow.patched(
            CONFIRMED_RELEASES
        ):
            confirmation: ReleaseConfirmation = await workflow.execute_activity(
                "confirm_release",
                ConfirmRelease(
                    owner=request.owner,
                    pool=self.pool.spec.name,
                    slots=request.slots,
                    gateway=self.pool.spec.gateway,
                ),
                result_type=ReleaseConfirmation,
                task_queue=names.CONTROL_TASK_QUEUE,
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=RetryPolicy(maximum_attempts=5),
                summary=f"Confirm {request.owner} gives its addresses back",
            )
            if not confirmation.confirmed:
                raise ApplicationError(
                    f"release refused: {confirmation.reason}; addresses of a lifecycle are "
                    "released only by it or once it has ended",
                    type=errors.NOT_AUTHORIZED,
                    non_retryable=True,
                )
        released = self.pool.release(request.owner, request.slots)
        self._publish()
        return ReleaseResult(released=released)

    @release.validator
    def _validate_release(self, request: ReleaseRequest) -> None:
        if not request.owner:
            raise ApplicationError("owner: required", type=errors.INVALID_SPEC, non_retryable=True)

    # -- delete -----------------------------------------------------------------------------

    @workflow.update
    def delete(self) -> PoolStatus:
        """End the pool. Refused while any address is allocated."""
        self.deleting = True
        return self.status()

    @delete.validator
    def _validate_delete(self) -> None:
        if self.pool.used:
            owners = ", ".join(self.pool.owners()[:5])
            more = (
                "" if len(self.pool.owners()) <= 5 else f" and {len(self.pool.owners()) - 5} more"
            )
            raise ApplicationError(
                f"pool {self.pool.spec.name} still has {self.pool.used} allocated address(es), "
                f"held by {owners}{more}; release them first",
                type=errors.POOL_IN_USE,
                non_retryable=True,
            )

    # -- queries ----------------------------------------------------------------------------

    @workflow.query
    def definition(self) -> IpPoolSpec:
        return self.pool.spec

    @workflow.query
    def status(self) -> PoolStatus:
        return PoolStatus(
            spec=self.pool.spec,
            capacity=self.pool.capacity,
            used=self.pool.used,
            free=self.pool.free,
            owners=self.pool.owners(),
            claimed_by=self.pool.claimed_by,
            created_at=self.created_at,
            deleting=self.deleting,
        )

    @workflow.query
    def allocations(self, query: AllocationsQuery) -> AllocationsPage:
        every = self.pool.allocations(query.owner)
        return AllocationsPage(
            allocations=every[query.offset : query.offset + query.limit], total=len(every)
        )

    def _refuse_if_deleting(self) -> None:
        if self.deleting:
            raise ApplicationError(
                f"pool {self.pool.spec.name} is being deleted",
                type=errors.POOL_NOT_FOUND,
                non_retryable=True,
            )

    def _publish(self) -> None:
        """A one-line state for the Web UI (search attributes are set once, at start)."""
        spec = self.pool.spec
        workflow.set_current_details(
            f"## IP pool `{spec.name}` ({spec.describe_range()})\n\n"
            f"{self.pool.used} of {self.pool.capacity} addresses allocated, "
            f"{self.pool.free} free; {len(self.pool.owners())} owner(s)"
            + (f"; restricted to {self.pool.claimed_by}" if self.pool.claimed_by else "")
        )
