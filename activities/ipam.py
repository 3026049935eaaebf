"""IPAM activities: the narrow interface cluster and gateway workflows use to reach IP pools.

They call the pool's workflow by Update; the built-in backend is IpPoolWorkflow, and the same
three activities could speak to NetBox or Infoblox instead. They run on the control worker.
"""

from __future__ import annotations

from typing import Any, NoReturn

from temporalio import activity
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from domain import errors
from domain.ipam import (
    AllocateAddresses,
    AllocateRequest,
    AllocateResult,
    AllocationsPage,
    AllocationsQuery,
    ListAddresses,
    PoolRef,
    PoolStatus,
    ReleaseAddresses,
    ReleaseRequest,
    ReleaseResult,
)
from domain.names import ippool_workflow_id
from plumbing.updates import AllocationBatcher, send_update
from workflows.ip_pool import IpPoolWorkflow


class IpamActivities:
    def __init__(self, client: Client) -> None:
        self.client = client

    def _pool(self, ref: PoolRef) -> Any:
        return self.client.get_workflow_handle(ippool_workflow_id(ref.gateway, ref.pool))

    @activity.defn(name="allocate_addresses")
    async def allocate_addresses(self, request: AllocateAddresses) -> AllocateResult:
        """Addresses for an owner's slots; repeating the call returns the same addresses."""
        try:
            update = AllocateRequest(owner=request.owner, slots=request.slots)
            result = await AllocationBatcher.of(self._pool(request)).allocate(update)
        except (WorkflowUpdateFailedError, RPCError) as exc:
            _reraise(exc, request)
        return result

    @activity.defn(name="release_addresses")
    async def release_addresses(self, request: ReleaseAddresses) -> ReleaseResult:
        """Give back an owner's addresses (all, or some slots); releasing twice is harmless."""
        try:
            update = ReleaseRequest(owner=request.owner, slots=request.slots)
            handle = self._pool(request)
            result: ReleaseResult = await send_update(
                handle.id,
                lambda: handle.execute_update(IpPoolWorkflow.release, update),
                client=self.client,
            )
        except RPCError as exc:
            if _pool_gone(exc):  # delete treats "not found" as done (DESIGN §5)
                return ReleaseResult(released=[])
            _reraise(exc, request)
        except WorkflowUpdateFailedError as exc:
            _reraise(exc, request)
        return result

    @activity.defn(name="describe_pool")
    async def describe_pool(self, request: PoolRef) -> PoolStatus:
        """The pool's definition and usage; a missing pool is a permanent error."""
        try:
            status: PoolStatus = await self._pool(request).query(IpPoolWorkflow.status)
        except RPCError as exc:
            _reraise(exc, request)
        return status

    @activity.defn(name="list_addresses")
    async def list_addresses(self, request: ListAddresses) -> AllocationsPage:
        try:
            page: AllocationsPage = await self._pool(request).query(
                IpPoolWorkflow.allocations,
                AllocationsQuery(owner=request.owner, offset=request.offset, limit=request.limit),
            )
        except RPCError as exc:
            _reraise(exc, request)
        return page


def _pool_gone(exc: RPCError) -> bool:
    return exc.status == RPCStatusCode.NOT_FOUND or "already completed" in str(exc)


def _reraise(exc: Exception, ref: PoolRef) -> NoReturn:
    """Carry the pool's own error type to the caller; a missing pool is permanent."""
    if isinstance(exc, WorkflowUpdateFailedError) and isinstance(exc.cause, ApplicationError):
        cause = exc.cause
        raise ApplicationError(
            cause.message, type=cause.type, non_retryable=cause.non_retryable
        ) from None
    if isinstance(exc, RPCError) and _pool_gone(exc):
        raise ApplicationError(
            f"IP pool {ref.pool} of gateway {ref.gateway} does not exist",
            type=errors.POOL_NOT_FOUND,
            non_retryable=True,
        ) from None
    raise exc
