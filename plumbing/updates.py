"""Sending Updates to entity workflows: bounded per workflow, retried while the server is
busy, a validator's refusal turned into `RequestRefused`, and the IP pool's allocations
batched. Used by the IPAM activities, the gateway agent and the SDK client."""

from __future__ import annotations

import asyncio
import contextlib
import random
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic_core
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from domain import errors
from domain.ipam import (
    MAX_BATCH,
    AllocateBatch,
    AllocateBatchResult,
    AllocateRequest,
    AllocateResult,
)
from plumbing.errors import KubegateError, RequestRefused

T = TypeVar("T")

#: the server refuses updates beyond its in-flight limit per workflow (default 10)
_BUSY = RPCStatusCode.RESOURCE_EXHAUSTED
#: updates this process keeps in flight per workflow, below the server's limit
UPDATES_IN_FLIGHT = 8
#: per event loop (weakly: a closed loop takes its state with it), per (client, workflow id)
_gates: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[int, str], asyncio.Semaphore]
] = weakref.WeakKeyDictionary()


async def send_update(
    workflow_id: str,
    call: Callable[[], Awaitable[T]],
    patience: float = 60.0,
    client: object = None,
) -> T:
    """Send an update to a workflow, at most UPDATES_IN_FLIGHT at a time from this process.

    If the server still refuses it for a passing reason (too many updates in flight from
    other processes, or the run closed under it by continue-as-new), back off (jittered,
    20 ms doubling to 1 s) and try again for up to `patience` seconds. Only for idempotent
    updates, as every IP pool update is.
    """
    loop = asyncio.get_running_loop()
    gates = _gates.setdefault(loop, {})
    gate = gates.setdefault((id(client), workflow_id), asyncio.Semaphore(UPDATES_IN_FLIGHT))
    deadline = loop.time() + patience
    delay = 0.02
    while True:
        async with gate:
            try:
                return await call()
            except RPCError as exc:
                passing = exc.status == _BUSY or "update was aborted" in str(exc)
                if not passing or loop.time() > deadline:
                    raise
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


#: largest argument of an Update the client sends (Temporal warns at 512 KiB, refuses at 2 MiB)
MAX_REQUEST_BYTES = 256 * 1024

#: error types of a validator's refusal (nothing started)
REFUSALS = (
    errors.INVALID_STATE,
    errors.INVALID_SPEC,
    errors.GATEWAY_NOT_READY,
    errors.PAIRING_REFUSED,
    errors.IN_USE,
    errors.OUT_OF_ADDRESSES,
    errors.POOL_NOT_FOUND,
)


async def request(handle: WorkflowHandle[Any, Any], what: str, update: Any, *args: Any) -> Any:
    """Send an Update for a caller who waits on it: a refusal by its validator (or an
    entity that does not exist) raises RequestRefused with the reason, any other failure
    KubegateError with the workflow's message."""
    size = sum(len(pydantic_core.to_json(arg)) for arg in args)
    if size > MAX_REQUEST_BYTES:
        raise RequestRefused(
            f"the request is {size} bytes as JSON; at most {MAX_REQUEST_BYTES} allowed"
        )
    try:
        return await send_update(
            handle.id, lambda: handle.execute_update(update, *args), client=handle._client
        )
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        if isinstance(cause, ApplicationError) and cause.type in REFUSALS:
            raise RequestRefused(cause.message) from None
        raise KubegateError(failure_message(exc)) from None
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND or "already completed" in str(exc):
            raise RequestRefused(f"{what} does not exist (or is deleted)") from None
        raise


def failure_message(exc: WorkflowUpdateFailedError) -> str:
    """The workflow's own message for a failed Update."""
    cause = exc.cause
    return str(getattr(cause, "message", None) or cause)


@dataclass(eq=False)
class _Waiting:
    request: AllocateRequest
    future: asyncio.Future[AllocateResult]


class AllocationBatcher:
    """Coalesces one process's concurrent allocations from a pool into batch updates.

    While a batch is in flight, new requests wait and go together in the next one; at most
    `senders_max` batches are in flight. Each caller gets its own result, or its own
    ApplicationError with the pool's error type.

    A caller cancelled before its request was sent withdraws it. One cancelled after it was
    sent waits (up to `settle_seconds`) until the batch lands before the cancellation
    completes, so a release the caller's workflow sends next cannot be overtaken by it.
    """

    senders_max = 2
    settle_seconds = 60.0

    def __init__(self, handle: WorkflowHandle[Any, Any]) -> None:
        self.handle = handle
        self.pending: list[_Waiting] = []
        self.senders = 0

    @classmethod
    def of(cls, handle: WorkflowHandle[Any, Any]) -> AllocationBatcher:
        batchers = _batchers.setdefault(asyncio.get_running_loop(), {})
        key = (id(handle._client), handle.id)
        batcher = batchers.get(key)
        if batcher is None:
            batcher = batchers[key] = cls(handle)
        return batcher

    async def allocate(self, request: AllocateRequest) -> AllocateResult:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(request, loop.create_future())
        self.pending.append(waiting)
        if self.senders < self.senders_max:
            self.senders += 1
            task = loop.create_task(self._drain())
            _background.add(task)
            task.add_done_callback(_background.discard)
        try:
            return await asyncio.shield(waiting.future)
        except asyncio.CancelledError:
            if waiting in self.pending:
                self.pending.remove(waiting)  # never sent
            elif not waiting.future.done():
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(waiting.future), self.settle_seconds)
            raise

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                update = AllocateBatch(requests=[w.request for w in batch])
                try:
                    result: AllocateBatchResult = await send_update(
                        self.handle.id,
                        lambda u=update: self.handle.execute_update(  # type: ignore[misc]
                            "allocate_batch", u, result_type=AllocateBatchResult
                        ),
                        client=self.handle._client,
                    )
                except Exception as exc:
                    for w in batch:
                        if not w.future.done():
                            w.future.set_exception(exc)
                    continue
                for w, outcome in zip(batch, result.outcomes, strict=True):
                    if w.future.done():
                        continue
                    if outcome.result is not None:
                        w.future.set_result(outcome.result)
                    else:
                        w.future.set_exception(
                            ApplicationError(
                                outcome.error or "allocation refused",
                                type=outcome.error_type,
                                non_retryable=True,
                            )
                        )
        finally:
            self.senders -= 1


_batchers: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[int, str], AllocationBatcher]
] = weakref.WeakKeyDictionary()
_background: set[asyncio.Task[None]] = set()
