"""One way for an agent activity to run a call on vCenter with sealed credentials."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from pyVmomi import vim
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.secrets import open_password
from activities.vsphere.faults import classify
from activities.vsphere.session import SessionPool, VSphereSession
from domain.account import VCenterCredentials
from domain.sealing import AgentKey

T = TypeVar("T")


def shielded() -> AbstractContextManager[None]:
    """Within an activity: a cancellation is raised only once the block is done."""
    try:
        return activity.shield_thread_cancel_exception()
    except RuntimeError:  # not in an activity (a direct call): nothing to shield from
        return contextlib.nullcontext()


def call_vcenter(
    key: AgentKey,
    sessions: SessionPool,
    credentials: VCenterCredentials,
    context: str,
    call: Callable[[VSphereSession], T],
) -> T:
    """Open the sealed password, run call with a live session, classify what vCenter raises."""
    password = open_password(key, credentials)
    try:
        # a cancellation waits for the call to return: never cut a SOAP exchange on a pooled
        # session in half (calls that wait on vCenter check for cancellation themselves)
        with shielded():
            return sessions.run(credentials.endpoint, credentials.username, password, call)
    except (ApplicationError, CancelledError):
        raise
    except Exception as exc:
        raise classify(exc, context) from None


# --- waiting activities: coroutines on the worker's loop ------------------------------------

#: set where a coroutine runs on a private loop in a thread of its own (`run_blocking`):
#: its calls run inline there
_inline: contextvars.ContextVar[bool] = contextvars.ContextVar("kubegate_inline", default=False)
#: the running activity's "stop waiting" signal (cancelled, or the agent stopping)
_stop: contextvars.ContextVar[asyncio.Future[None] | None] = contextvars.ContextVar(
    "kubegate_stop", default=None
)


async def in_thread(executor: Executor | None, call: Callable[[], T]) -> T:
    """Run a blocking call (a vCenter request, not a wait) on the executor, in this
    coroutine's context; a heartbeat from there reaches the activity through the loop.

    The call always runs to its end: a SOAP exchange on a pooled session is never cut in
    half (activities see cancellation where they wait, see `uninterrupted`)."""
    if _inline.get():
        return call()
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    with contextlib.suppress(RuntimeError):  # outside an activity: nothing to forward
        act = activity._Context.current()
        beat = act.heartbeat
        if beat is not None:

            def forward(*details: Any) -> None:
                loop.call_soon_threadsafe(lambda: beat(*details))

            context.run(activity._Context.set, dataclasses.replace(act, heartbeat=forward))
    result, cancelled = await _to_the_end(loop.run_in_executor(executor, context.run, call))
    if cancelled:
        raise asyncio.CancelledError
    return result


async def _to_the_end(
    future: asyncio.Future[T], on_cancel: Callable[[], None] = lambda: None
) -> tuple[T, bool]:
    """The future's result, awaited to its end even when the caller is cancelled meanwhile
    (then `on_cancel()` runs, and the second value is True)."""
    cancelled = False
    while True:
        try:
            return await asyncio.shield(future), cancelled
        except asyncio.CancelledError:
            if future.done():
                raise
            cancelled = True
            on_cancel()


def stop_signal() -> asyncio.Future[None] | None:
    """Done once the running activity should stop waiting (cancelled or agent stopping)."""
    return _stop.get()


async def uninterrupted(body: Coroutine[Any, Any, T]) -> T:
    """Run an async activity's body so that a cancellation reaches it only where it waits
    (it checks `activity.is_cancelled()` / `is_worker_shutdown()` there, woken by
    `stop_signal()`), as the shielded thread of a synchronous activity did."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    token = _stop.set(stop)
    try:
        inner = asyncio.ensure_future(body)
    finally:
        _stop.reset(token)

    async def on_shutdown() -> None:
        with contextlib.suppress(RuntimeError):  # outside an activity: no shutdown to see
            await activity.wait_for_worker_shutdown()
            stop_waiting()

    def stop_waiting() -> None:
        if not stop.done():
            stop.set_result(None)

    watch = asyncio.ensure_future(on_shutdown())
    try:
        result, absorbed = await _to_the_end(inner, stop_waiting)
    finally:
        watch.cancel()
    if absorbed and activity.is_cancelled() and not activity.is_worker_shutdown():
        raise CancelledError("cancelled")  # (a synchronous activity's shield did the same)
    return result


def run_blocking(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """From a thread (a synchronous activity): run a coroutine of the waiting activities on
    a private loop, its calls inline in this thread."""
    token = _inline.set(True)
    try:
        return asyncio.run(body())
    finally:
        _inline.reset(token)


async def call_vcenter_async(
    key: AgentKey,
    sessions: SessionPool,
    credentials: VCenterCredentials,
    context: str,
    call: Callable[[VSphereSession], Awaitable[T]],
    executor: Executor | None,
) -> T:
    """`call_vcenter` for coroutines: the session and the calls in the executor, the waits
    on the loop; a NotAuthenticated fault logs in again and runs `call` once more."""
    password = open_password(key, credentials)
    endpoint, user = credentials.endpoint, credentials.username
    try:
        session = await in_thread(executor, lambda: sessions.get(endpoint, user, password))
        try:
            return await call(session)
        except vim.fault.NotAuthenticated:
            sessions.forget(endpoint, user, password, session)
            session = await in_thread(executor, lambda: sessions.get(endpoint, user, password))
            return await call(session)
    except (ApplicationError, CancelledError):
        raise
    except Exception as exc:
        raise classify(exc, context) from None
