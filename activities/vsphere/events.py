"""Recent vCenter events and tasks of a gateway's objects, for the logs bundle (`vm_events`).

Only reads, so retrying is always safe. Cost on vCenter: one lookup of the folder path, one
property read (the objects and every VM below a folder, missing objects skipped), one
`QueryEvents` per entity, one read of the recent tasks; a heartbeat after each query.

Events come from `EventManager.QueryEvents` with one filter per entity and recursion
`self`: a folder is expanded to its VMs here instead of asking vCenter for recursion `all`,
because govmomi 0.24's simulator never matches children (its `eventFilterChildren` walks
nothing). It also ignores the filter's time, and a `maxCount` below the number of matches
returns the newest event and then the oldest ones: so each query asks for the most vCenter
returns (1000) and `since`, the order and `limit` are applied here.

Tasks come from `TaskManager.recentTask` (vCenter keeps about the last 10 minutes there).
A task belongs to the objects if it ran on one of them or returned one (a clone runs on
its template and returns the new VM). There is no TaskHistoryCollector read: the simulator
has no `CreateCollectorForTasks`; on a real vCenter older tasks still show as events.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pyVmomi import vim, vmodl
from pyVmomi.VmomiSupport import ManagedObject
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.vsphere.calls import call_vcenter
from activities.vsphere.inventory import find_by_path, from_ref, ref, retrieve_spec
from activities.vsphere.session import SessionPool, VSphereSession, request_meter
from domain import errors
from domain.account import VCenterCredentials
from domain.events import MAX_EVENTS_PER_QUERY, EventRecord, EventsRequest, EventsResult, TaskRecord
from domain.sealing import AgentKey

T = TypeVar("T")
PC = vmodl.query.PropertyCollector

#: An event's entity arguments, most specific first: (event property, argument's ref property).
_ARGUMENTS = [
    ("vm", "vm"),
    ("host", "host"),
    ("computeResource", "computeResource"),
    ("ds", "datastore"),
    ("net", "network"),
    ("dvs", "dvs"),
    ("datacenter", "datacenter"),
]


class EventActivities:
    """The event activities of one gateway agent (its key opens sealed passwords)."""

    def __init__(self, key: AgentKey, sessions: SessionPool) -> None:
        self.key = key
        self.sessions = sessions

    def _call(
        self, credentials: VCenterCredentials, context: str, call: Callable[[VSphereSession], T]
    ) -> T:
        """Run call with a live session; classify whatever vCenter raises."""
        return call_vcenter(self.key, self.sessions, credentials, context, call)

    @activity.defn(name="vm_events")
    def vm_events(self, request: EventsRequest) -> EventsResult:
        """Recent events and tasks of the objects and of the VMs below the folder, newest
        first, at most `limit` of each; objects that no longer exist are listed in `missing`."""
        with request_meter() as meter:
            result = self._call(
                request.credentials,
                f"read events in {request.datacenter}",
                lambda s: _collect(s, request),
            )
        result.vcenter_requests = meter[0]
        result.attempt = activity.info().attempt
        return result

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for the agent's worker."""
        return [self.vm_events]


def _beat(stage: str, done: int = 0, of: int = 0) -> None:
    activity.heartbeat({"stage": stage, "done": done, "of": of})
    if activity.is_cancelled():
        raise CancelledError(f"cancelled while reading {stage}")


def _collect(session: VSphereSession, request: EventsRequest) -> EventsResult:
    result = EventsResult()
    asked: list[Any] = []
    for value in request.objects:
        try:
            obj = from_ref(session, value)
        except KeyError:
            obj = None
        if not isinstance(obj, vim.ManagedEntity):
            raise ApplicationError(
                f"{value}: not a vSphere inventory object (VirtualMachine:…, Folder:…, …)",
                type=errors.INVALID_SPEC,
                non_retryable=True,
            )
        asked.append(obj)
    path = request.folder_path()
    if path is not None:
        folder = find_by_path(session, path)
        if folder is None:
            result.missing.append(path)
        elif ref(folder) not in request.objects:
            asked.append(folder)
    _beat("objects")
    entities, names = _entities(session, asked)
    result.missing += [ref(o) for o in asked if ref(o) not in names]
    since = _utc(request.since) if request.since else None
    events: dict[int, EventRecord] = {}
    for i, entity in enumerate(entities):
        try:
            found = _query_events(session, entity, since)
        except vmodl.fault.ManagedObjectNotFound:
            result.missing.append(ref(entity))  # removed since it was read
            continue
        for event in found:
            record = _event_record(event, ref(entity), names.get(ref(entity), ""))
            if since is None or record.time >= since:
                events.setdefault(record.key, record)
        _beat("events", i + 1, len(entities))
    result.events = sorted(events.values(), key=lambda e: (e.time, e.key), reverse=True)
    result.events = result.events[: request.limit]
    # tasks of objects gone since still say what happened to them (a destroy, say)
    wanted = {ref(e) for e in entities} | set(request.objects)
    tasks = [t for t in _recent_tasks(session) if t.object in wanted or t.result in wanted]
    for task in tasks:  # vcsim says the moid as the entity's name
        task.object_name = names.get(task.object) or task.object_name
    result.tasks = [t for t in tasks if since is None or t.time >= since]
    result.tasks = sorted(result.tasks, key=lambda t: (t.time, t.key), reverse=True)
    result.tasks = result.tasks[: request.limit]
    _beat("tasks")
    return result


def _entities(session: VSphereSession, asked: list[Any]) -> tuple[list[Any], dict[str, str]]:
    """The objects that still exist and every VM below those that are folders, in one read
    (missing objects are left out, not a fault); and the names of all of them by ref."""
    if not asked:
        return [], {}
    down = PC.TraversalSpec(
        name="down",
        type=vim.Folder,
        path="childEntity",
        skip=False,
        selectSet=[PC.SelectionSpec(name="down")],
    )
    spec = PC.FilterSpec(
        objectSet=[
            PC.ObjectSpec(obj=o, skip=False, selectSet=[down] if isinstance(o, vim.Folder) else [])
            for o in asked
        ],
        propSet=[PC.PropertySpec(type=vim.ManagedEntity, pathSet=["name"])]
        + [
            PC.PropertySpec(type=t, pathSet=["name"])
            for t in {type(o) for o in asked} | {vim.Folder, vim.VirtualMachine}
        ],
        reportMissingObjectsInResults=True,
    )
    found = retrieve_spec(session, spec)
    names = {key: str(props.get("name") or "") for key, props in found.items()}
    entities = [o for o in asked if ref(o) in found]
    seen = {ref(o) for o in entities}
    for key in found:
        if key.startswith("VirtualMachine:") and key not in seen:
            entities.append(from_ref(session, key))
            seen.add(key)
    return entities, names


def _query_events(session: VSphereSession, entity: Any, since: datetime | None) -> list[Any]:
    """The entity's latest events (as many as one query returns), in no particular order."""
    spec = vim.event.EventFilterSpec(
        entity=vim.event.EventFilterSpec.ByEntity(
            entity=entity, recursion=vim.event.EventFilterSpec.RecursionOption.self
        ),
        maxCount=MAX_EVENTS_PER_QUERY,
    )
    if since is not None:
        spec.time = vim.event.EventFilterSpec.ByTime(beginTime=since)
    return list(session.content.eventManager.QueryEvents(spec) or [])


def _event_record(event: Any, entity: str, entity_name: str) -> EventRecord:
    """An event as a record; its object is the most specific entity it names (else the one
    it was queried for)."""
    obj, name = entity, entity_name
    for prop, inner in _ARGUMENTS:
        argument = getattr(event, prop, None)
        target = getattr(argument, inner, None)
        if argument is not None and target is not None:
            obj, name = ref(target), str(argument.name or "")
            break
    return EventRecord(
        key=int(event.key or 0),
        time=_utc(event.createdTime),
        type=str(getattr(event, "eventTypeId", None) or event._wsdlName),
        message=str(event.fullFormattedMessage or ""),
        object=obj,
        object_name=name,
        user=str(event.userName or ""),
    )


#: What is read of each recent task: single paths, not `info`, whose `entity` is typed
#: ManagedEntity (vcsim puts the VirtualDiskManager there for the disk deletes of a VM destroy,
#: which pyVmomi then refuses to decode).
_TASK_PATHS = [
    "info.descriptionId",
    "info.name",
    "info.entity",
    "info.entityName",
    "info.state",
    "info.error",
    "info.result",
    "info.queueTime",
    "info.startTime",
    "info.completeTime",
]


def _recent_tasks(session: VSphereSession) -> list[TaskRecord]:
    """Every task in TaskManager.recentTask, in one read (tasks vCenter dropped since are
    left out)."""
    spec = PC.FilterSpec(
        objectSet=[
            PC.ObjectSpec(
                obj=session.content.taskManager,
                skip=True,
                selectSet=[PC.TraversalSpec(type=vim.TaskManager, path="recentTask", skip=False)],
            )
        ],
        propSet=[PC.PropertySpec(type=vim.Task, pathSet=_TASK_PATHS)],
        reportMissingObjectsInResults=True,
    )
    found = retrieve_spec(session, spec)
    return [_task_record(key, info) for key, info in found.items() if "info.queueTime" in info]


def _task_record(key: str, info: dict[str, Any]) -> TaskRecord:
    entity = info.get("info.entity")
    result = info.get("info.result")
    error = info.get("info.error")
    completed = info.get("info.completeTime")
    return TaskRecord(
        key=key,
        time=_utc(info.get("info.startTime") or info["info.queueTime"]),
        completed=_utc(completed) if completed else None,
        name=str(info.get("info.descriptionId") or info.get("info.name") or ""),
        state=str(info.get("info.state") or ""),
        object=ref(entity) if isinstance(entity, ManagedObject) else "",
        object_name=str(info.get("info.entityName") or ""),
        result=ref(result) if isinstance(result, ManagedObject) else None,
        error=None if error is None else _fault_text(error),
    )


def _fault_text(fault: Any) -> str:
    text = getattr(fault, "msg", None) or getattr(fault, "localizedMessage", None) or ""
    return f"{type(fault).__name__.rsplit('.', 1)[-1]}: {text}".rstrip(": ")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
