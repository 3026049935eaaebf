"""Process-wide slots per host and per datastore, taken by coroutines and threads alike.

vCenter's provisioning limits (REFERENCE.md) bound how many operations may run at once on an
ESXi host or a datastore. The agent's waiting activities are coroutines on the worker's event
loop; a few callers (the audit's removals) are threads. One `Slots` per (kind, vCenter,
object, limit) serves both, first come first served, so the limit holds whoever asks. A
waiting coroutine holds no thread; a slot is held across the vCenter task it guards.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    """One queued caller: a thread (event) or a coroutine (future on its loop)."""

    event: threading.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None
    granted: bool = field(default=False)


class Slots:
    """A counting semaphore for threads and coroutines on any loop (FIFO hand-over)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        #: the most ever held at once (benchmarks and tests read it)
        self.peak = 0
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()

    def _take(self) -> None:
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)

    def acquire(self, timeout: float) -> bool:
        """A thread: True once a slot is held, False after `timeout` seconds without one."""
        with self._lock:
            if self.in_use < self.limit and not self._queue:
                self._take()
                return True
            waiter = _Waiter(event=threading.Event())
            self._queue.append(waiter)
        assert waiter.event is not None
        waiter.event.wait(timeout)
        with self._lock:
            if waiter.granted:
                return True
            self._queue.remove(waiter)
            return False

    async def acquire_async(self) -> None:
        """A coroutine: returns once a slot is held; cancellable while queued."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.in_use < self.limit and not self._queue:
                self._take()
                return
            waiter = _Waiter(loop=loop, future=loop.create_future())
            self._queue.append(waiter)
        assert waiter.future is not None
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

    def release(self) -> None:
        """Give a slot back; the first queued caller gets it."""
        with self._lock:
            self.in_use -= 1
            if not self._queue:
                return
            waiter = self._queue.popleft()
            waiter.granted = True
            self._take()
        if waiter.event is not None:
            waiter.event.set()
        elif waiter.loop is not None and waiter.future is not None:
            waiter.loop.call_soon_threadsafe(_resolve, waiter.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # (a cancelled waiter passes the slot on itself)
        future.set_result(None)


_guard = threading.Lock()
_slots: dict[tuple[str, str, str, int], Slots] = {}


def slots(kind: str, server: str, obj: str, limit: int) -> Slots:
    """The process's slots for (kind, vCenter, object, limit)."""
    with _guard:
        key = (kind, server.lower(), obj, limit)
        if key not in _slots:
            _slots[key] = Slots(limit)
        return _slots[key]


def peaks(kind: str) -> dict[str, int]:
    """The most slots ever held at once, per object of a kind (for tests and benchmarks)."""
    with _guard:
        return {key[2]: s.peak for key, s in _slots.items() if key[0] == kind}
