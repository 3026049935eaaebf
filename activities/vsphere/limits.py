"""Process-wide slots per host, per compute cluster and per datastore.

vCenter's provisioning limits (REFERENCE.md) bound how many operations may run at once on an
ESXi host or a datastore. The agent's waiting activities are coroutines, most on the worker's
event loop, some on a private loop of their own (the audit's removals, `calls.run_blocking`).
One `Slots` per (kind, vCenter, object) serves them all, first come first served,
whatever their loop, so the limit holds in the whole process. A waiting coroutine holds no
thread; a slot is held across the vCenter task it guards.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(eq=False)
class _Waiter:
    """One queued coroutine: a future on its loop."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: bool = False


class Slots:
    """A counting semaphore for coroutines on any loop (FIFO hand-over)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()

    async def acquire(self) -> None:
        """Return once a slot is held; cancellable while queued."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.in_use < self.limit and not self._queue:
                self.in_use += 1
                return
            waiter = _Waiter(loop, loop.create_future())
            self._queue.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._queue.remove(waiter)
            if granted:  # handed over as the wait was cancelled: pass it on
                self.release()
            raise

    def resize(self, limit: int) -> None:
        """A new limit: holders keep their slots (fewer are given until below it); more
        slots go to the queued coroutines at once."""
        granted = []
        with self._lock:
            self.limit = limit
            while self._queue and self.in_use < self.limit:
                waiter = self._queue.popleft()
                waiter.granted = True
                self.in_use += 1
                granted.append(waiter)
        for waiter in granted:
            waiter.loop.call_soon_threadsafe(_resolve, waiter.future)

    def release(self) -> None:
        """Give a slot back; the first queued coroutine gets it."""
        with self._lock:
            if not self._queue or self.in_use > self.limit:  # (more held than a new limit)
                self.in_use -= 1
                return
            waiter = self._queue.popleft()
            waiter.granted = True  # (the slot passes on: in_use unchanged)
        waiter.loop.call_soon_threadsafe(_resolve, waiter.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # (a cancelled waiter passes the slot on itself)
        future.set_result(None)


_guard = threading.Lock()
_slots: dict[tuple[str, str, str], Slots] = {}


def slots(kind: str, server: str, obj: str, limit: int) -> Slots:
    """The process's slots for (kind, vCenter, object), with `limit` from now on (a compute
    cluster's limit follows its number of hosts: the same slots, resized)."""
    with _guard:
        key = (kind, server.lower(), obj)
        found = _slots.get(key)
        if found is None:
            found = _slots[key] = Slots(limit)
        elif found.limit != limit:
            found.resize(limit)
        return found
