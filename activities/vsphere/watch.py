"""Shared task waits: one property collector per session watches every recent task.

`wait_for_task` (tasks.py) costs four requests per task (a private collector, its filter,
one WaitForUpdatesEx, the collector's destruction). A `TaskWatcher` pays that once per
session: a single filter on `TaskManager.recentTask` that traverses to each task's
`info.state/error/result` (what ends a task: not `info.progress`, whose every step would end
a WaitForUpdatesEx), and one background thread that loops WaitForUpdatesEx and wakes the
threads waiting on those tasks. Waiters heartbeat every `beat_every` seconds on their own
clock; WaitOptions.maxWaitSeconds bounds each long poll so the loop notices idleness. A task
wait therefore costs no request of its own, and concurrent activities of one session share the
same long poll.

The watcher stops after `idle_stop` seconds without waiters, and dies with its session
(e.g. `NotAuthenticated`): its waiters get the error, and the next wait starts a new
watcher. A task the watcher never sees (not in `recentTask`, e.g. started by an earlier
session on a real vCenter) is read once and, if still running, waited on with
`wait_for_task`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, cast

from pyVmomi import vim, vmodl

from activities.vsphere.inventory import from_ref, retrieve
from activities.vsphere.session import VSphereSession
from activities.vsphere.tasks import TaskTimeout, wait_for_task

#: What ends a task; progress is left out on purpose (see the module docstring).
TASK_PATHS = ["info.state", "info.error", "info.result"]
_TERMINAL = (vim.TaskInfo.State.success, vim.TaskInfo.State.error)
#: a verdict: the task is still running
_PENDING = object()

PC = vmodl.query.PropertyCollector


class CancelRequested(Exception):
    """The caller's `cancelled()` turned true while it waited; the task still runs."""


class TaskWatcher:
    """One property collector and one thread watching the recent tasks of a session."""

    def __init__(
        self,
        session: VSphereSession,
        *,
        max_wait_seconds: int = 10,
        idle_stop: float = 60.0,
        settle: float = 0.025,
    ) -> None:
        self.session = session
        self.max_wait_seconds = max_wait_seconds
        #: after a change, the next long poll waits this long: the changes of a burst (a
        #: cluster's clones ending together) come in one answer, not one each
        self.settle = settle
        self.idle_stop = idle_stop
        self.requests = 0
        self.turns = 0
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._states: dict[str, dict[str, Any]] = {}
        self._gone: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._waiters = 0
        #: coroutines waiting on a task: task id -> (their loop, future, turn they began at)
        self._subscribers: dict[str, list[tuple[asyncio.AbstractEventLoop, Any, int]]] = {}
        self._idle_since = time.monotonic()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kubegate-task-watcher", daemon=True)

    @property
    def alive(self) -> bool:
        with self._cond:
            return not self._stopped

    def start(self) -> TaskWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        collector = None
        try:
            content = self.session.content
            collector = content.propertyCollector.CreatePropertyCollector()
            self.requests += 1
            collector.CreateFilter(
                PC.FilterSpec(
                    objectSet=[
                        PC.ObjectSpec(
                            obj=content.taskManager,
                            skip=True,
                            selectSet=[
                                PC.TraversalSpec(
                                    name="recentTask",
                                    type=vim.TaskManager,
                                    path="recentTask",
                                    skip=False,
                                )
                            ],
                        )
                    ],
                    propSet=[PC.PropertySpec(type=vim.Task, pathSet=TASK_PATHS)],
                ),
                partialUpdates=False,
            )
            self.requests += 1
            options = PC.WaitOptions(maxWaitSeconds=self.max_wait_seconds)
            version = ""
            while True:
                update = collector.WaitForUpdatesEx(version, options)
                self.requests += 1
                with self._cond:
                    if update is not None:
                        version = update.version
                        self._apply(update)
                    self.turns += 1
                    self._cond.notify_all()
                    self._notify()
                    idle = self._waiters == 0 and time.monotonic() - self._idle_since
                    if idle and idle > self.idle_stop:
                        self._stopped = True
                        return
                if update is not None and self.settle:
                    time.sleep(self.settle)
        except BaseException as exc:  # the session died or vCenter went away
            with self._cond:
                self.error = exc
                self._stopped = True
                self._cond.notify_all()
                self._notify()
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()
                self._notify()
            _forget(self)
            if collector is not None and self.error is None:
                with contextlib.suppress(Exception):
                    collector.DestroyPropertyCollector()
                    self.requests += 1

    def _apply(self, update: Any) -> None:
        for filter_set in update.filterSet or []:
            for obj_set in filter_set.objectSet or []:
                key = obj_set.obj._moId
                if obj_set.kind == "leave":
                    state = self._states.pop(key, None)
                    if state is not None:
                        self._gone[key] = state
                        while len(self._gone) > 1000:
                            self._gone.popitem(last=False)
                    continue
                state = self._states.setdefault(key, {})
                for change in obj_set.changeSet or []:
                    if change.op == "remove":
                        state.pop(change.name, None)
                    else:
                        state[change.name] = change.val

    def _state(self, key: str) -> dict[str, Any] | None:
        return self._states.get(key) or self._gone.get(key)

    def _verdict(self, task_id: str, first_turn: int) -> Any:
        """The task's final state, None (ask vCenter: see `wait`), or _PENDING; raises the
        watcher's error. Called with the condition held."""
        if self.error is not None:
            raise self.error
        state = self._state(task_id)
        if state is not None and state.get("info.state") in _TERMINAL:
            return dict(state)
        if self._stopped:  # (idle, just before this wait began): ask vCenter
            return None
        if task_id in self._gone:  # left recentTask unfinished: ask vCenter
            return None
        if state is None and self.turns - first_turn >= 2:
            return None
        return _PENDING

    def subscribe(self, task_id: str) -> asyncio.Future[dict[str, Any] | None]:
        """A future on the caller's loop, resolved (from the watcher's thread) as `wait`
        would return; the caller must `unsubscribe` it when done with it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        with self._cond:
            self._waiters += 1
            entry = (loop, future, self.turns)
            self._subscribers.setdefault(task_id, []).append(entry)
            self._settle(task_id, entry)
        return future

    def unsubscribe(self, task_id: str, future: asyncio.Future[Any]) -> None:
        with self._cond:
            entries = self._subscribers.get(task_id, [])
            for entry in entries:
                if entry[1] is future:
                    entries.remove(entry)
                    self._waiters -= 1
                    break
            if not entries:
                self._subscribers.pop(task_id, None)
            if self._waiters == 0:
                self._idle_since = time.monotonic()

    def _notify(self) -> None:
        """Resolve the futures whose tasks have a verdict (condition held)."""
        for task_id, entries in list(self._subscribers.items()):
            for entry in entries:
                self._settle(task_id, entry)

    def _settle(self, task_id: str, entry: tuple[asyncio.AbstractEventLoop, Any, int]) -> None:
        loop, future, first_turn = entry
        if future.done():
            return
        try:
            verdict = self._verdict(task_id, first_turn)
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle_future, future, None, exc)
            return
        if verdict is not _PENDING:
            loop.call_soon_threadsafe(_settle_future, future, verdict, None)

    def wait(
        self,
        task_id: str,
        on_turn: Callable[[int], None],
        *,
        cancelled: Callable[[], bool],
        beat_every: float,
        deadline: float | None,
    ) -> dict[str, Any] | None:
        """The task's final state, or None if this watcher did not see the task for two
        of its turns, saw it leave `recentTask` unfinished (vCenter keeps a bounded list:
        200 in vcsim) or has stopped (then the caller reads the task itself). A watcher that
        stopped for idleness just before this wait began may hold the task's state from
        before it ended: never wait on it."""
        with self._cond:
            self._waiters += 1
            first_turn = self.turns
        try:
            while True:
                with self._cond:
                    verdict = self._verdict(task_id, first_turn)
                    if verdict is not _PENDING:
                        return cast(dict[str, Any] | None, verdict)
                    self._cond.wait(timeout=beat_every)
                on_turn(0)  # progress is not watched
                if cancelled():
                    raise CancelRequested(task_id)
                if deadline is not None and time.monotonic() > deadline:
                    raise TaskTimeout(f"Task:{task_id} still running")
        finally:
            with self._cond:
                self._waiters -= 1
                if self._waiters == 0:
                    self._idle_since = time.monotonic()


def _settle_future(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


_guard = threading.Lock()
_watchers: dict[int, TaskWatcher] = {}
#: requests made by watchers that have ended (for cost reports)
_retired_requests = [0]


def _forget(watcher: TaskWatcher) -> None:
    with _guard:
        if _watchers.get(id(watcher.session)) is watcher:
            del _watchers[id(watcher.session)]
        _retired_requests[0] += watcher.requests


def watcher_for(session: VSphereSession) -> TaskWatcher:
    """The session's live watcher, started if there is none."""
    with _guard:
        watcher = _watchers.get(id(session))
        if watcher is not None and watcher.session is session and watcher.alive:
            return watcher
        watcher = TaskWatcher(session)
        _watchers[id(session)] = watcher
    return watcher.start()


def watcher_requests() -> int:
    """vCenter requests made by every task watcher of this process so far."""
    with _guard:
        return _retired_requests[0] + sum(w.requests for w in _watchers.values())


def await_task(
    session: VSphereSession,
    task: Any,
    on_turn: Callable[[int], None],
    *,
    cancelled: Callable[[], bool] = lambda: False,
    beat_every: float = 2.0,
    timeout: float | None = None,
) -> Any:
    """Wait until the task ends: return its result or raise its fault.

    `task` is a vim.Task or a 'Task:id' string. `on_turn(progress)` runs at least every
    `beat_every` seconds (heartbeat there); progress is 0 unless the task is waited on with
    a private collector (a task the watcher did not see). If `cancelled()` turns true,
    CancelRequested is raised and the task is left running (the caller decides whether to
    cancel it).
    """
    if isinstance(task, str):
        task = from_ref(session, task)
    deadline = None if timeout is None else time.monotonic() + timeout
    state = watcher_for(session).wait(
        task._moId, on_turn, cancelled=cancelled, beat_every=beat_every, deadline=deadline
    )
    if state is None:
        return _ask_vcenter(session, task, on_turn, cancelled, beat_every, deadline)
    return _outcome(state)


def _outcome(state: dict[str, Any]) -> Any:
    """A finished task's result, or its fault raised."""
    if state.get("info.state") == vim.TaskInfo.State.error:
        raise state["info.error"]
    return state.get("info.result")


def _ask_vcenter(
    session: VSphereSession,
    task: Any,
    on_turn: Callable[[int], None],
    cancelled: Callable[[], bool],
    beat_every: float,
    deadline: float | None,
) -> Any:
    """A task the watcher did not see: read once and, if still running, waited on with a
    private collector (rare: one started by an earlier session on a real vCenter)."""
    state = retrieve(session, [task], TASK_PATHS).get(f"Task:{task._moId}", {})
    if state.get("info.state") in _TERMINAL:
        return _outcome(state)

    def turn(_: str, progress: int) -> None:
        on_turn(progress)
        if cancelled():
            raise CancelRequested(task._moId)

    remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
    return wait_for_task(
        session, task, turn, max_wait_seconds=max(1, int(beat_every)), timeout=remaining
    )


async def await_task_async(
    session: VSphereSession,
    task: Any,
    on_turn: Callable[[int], None],
    *,
    io: Callable[[Callable[[], Any]], Awaitable[Any]],
    cancelled: Callable[[], bool] = lambda: False,
    stop: asyncio.Future[None] | None = None,
    beat_every: float = 2.0,
    timeout: float | None = None,
) -> Any:
    """`await_task` for a coroutine: the wait is a future the session's watcher resolves, so
    it holds no thread. `io(call)` runs a blocking call (a request) off the loop; `stop`, once
    done, wakes the wait to check `cancelled()` at once.

    A task the watcher did not see is left to `_ask_vcenter`, in `io`."""
    if isinstance(task, str):
        task = from_ref(session, task)
    deadline = None if timeout is None else time.monotonic() + timeout
    watcher = watcher_for(session)
    future = watcher.subscribe(task._moId)
    try:
        while True:
            waits: set[asyncio.Future[Any]] = {future}
            if stop is not None:
                waits.add(stop)
            await asyncio.wait(waits, timeout=beat_every, return_when=asyncio.FIRST_COMPLETED)
            if future.done():
                state = future.result()
                break
            on_turn(0)  # progress is not watched
            if cancelled():
                raise CancelRequested(task._moId)
            if deadline is not None and time.monotonic() > deadline:
                raise TaskTimeout(f"Task:{task._moId} still running")
            if stop is not None and stop.done():
                stop = None  # (seen; `cancelled()` decides)
    finally:
        watcher.unsubscribe(task._moId, future)
    if state is None:  # (the private collector's turns hold a thread: rare, see above)
        return await io(
            lambda: _ask_vcenter(session, task, on_turn, cancelled, beat_every, deadline)
        )
    return _outcome(state)
