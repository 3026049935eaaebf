"""The VM activities of the cluster lifecycle: coroutines on the gateway agent's event loop.

Every activity is idempotent (DESIGN §5): a VM is found by its deterministic instance UUID
before anything is created, deletes treat "not found" as done, and power operations accept
the wanted state. `vm_create` heartbeats the stage and the vCenter task it waits on, so a
retry re-attaches to a clone in flight instead of starting a second one. Task waits go
through the session's shared TaskWatcher (watch.py): no request of their own, and no thread:
an activity that waits on vCenter is an `async def` whose requests run on the agent's executor
(`in_thread`) and whose waits are futures the watcher resolves. A thread is held for a
request, never for a wait, so the agent's concurrency is bounded by vCenter's limits and the
agent's cap (`KUBEGATE_AGENT_MAX_TASKS`), not by its threads.

Concurrency is bounded per datastore (around a clone) and per host (a clone to a chosen host,
and operations on a VM) by process-wide slots (limits.py): vCenter's provisioning limits are
8 (6.x) / 16 (7.x) cost units per host, a clone costing 1-4, and 128 per datastore
(REFERENCE.md, vCenter limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import ipaddress
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from pyVmomi import vim, vmodl
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.guard import beat_period
from activities.kube import wait_kubernetes_ready
from activities.secrets import open_cluster_secrets
from activities.vsphere.calls import (
    call_vcenter,
    call_vcenter_async,
    in_thread,
    stop_signal,
    uninterrupted,
)
from activities.vsphere.inventory import (
    find_by_path,
    from_ref,
    inventory_paths,
    ref,
    retrieve,
    retrieve_all_vms,
    retrieve_spec,
)
from activities.vsphere.limits import slots
from activities.vsphere.ovf import read_properties
from activities.vsphere.session import SessionPool, VSphereSession, request_meter
from activities.vsphere.tags import tagged_objects
from activities.vsphere.watch import CancelRequested, await_task_async
from domain import errors
from domain.account import Placement, VCenterCredentials
from domain.bootstrap import digest, rendered
from domain.sealing import AgentKey
from domain.vm import (
    MARK_CLUSTER,
    MARK_NODE,
    MARK_POOL,
    CreateVmRequest,
    DestroyResult,
    DestroyVmRequest,
    DomainRefs,
    FolderRequest,
    FolderResult,
    InstallerVmRequest,
    InstallerVmResult,
    KeepApartRequest,
    KeepApartResult,
    OwnerMark,
    PlacementRefs,
    PlacementRequest,
    PowerOnRequest,
    ReadinessRequest,
    ReadinessResult,
    SweepRequest,
    SweepResult,
    VmInfo,
    instance_uuid,
)
from plumbing import metrics

T = TypeVar("T")
PC = vmodl.query.PropertyCollector
ON = vim.VirtualMachine.PowerState.poweredOn

#: What vm_create reads of a VM to decide which steps are left.
_VM_PATHS = [
    "name",
    "config.instanceUuid",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.extraConfig",
    "runtime.powerState",
    "runtime.host",
    "guest.ipAddress",
    "guest.hostName",
]

#: What a guest wait reads and watches of each VM (and VmInfo reports).
_GUEST_PATHS = [
    "name",
    "config.instanceUuid",
    "guest.ipAddress",
    "guest.hostName",
    "runtime.powerState",
    "runtime.host",
]

#: (vm ref, expected hostname, expected address or None for DHCP)
Node = tuple[str, str, str | None]

#: How long template facts (devices, network backing) are reused across clones.
_FACTS_TTL = 300.0


def _annotation(owner: OwnerMark) -> str:
    return (
        "Managed by kubegate; do not edit.\n"
        f"{MARK_CLUSTER}={owner.cluster_id}\n{MARK_POOL}={owner.pool}\n{MARK_NODE}={owner.node}"
    )


def _marks(owner: OwnerMark) -> dict[str, str]:
    return {MARK_CLUSTER: owner.cluster_id, MARK_POOL: owner.pool, MARK_NODE: owner.node}


def _extra(options: Any) -> dict[str, str]:
    return {o.key: str(o.value) for o in options or []}


# --- heartbeats ------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Where vm_create is: sent with every heartbeat, read back by a retry."""

    stage: str = "start"
    task: str | None = None
    vm: str | None = None

    @classmethod
    def resume(cls) -> _Progress:
        details = activity.info().heartbeat_details
        last = details[-1] if details else None
        if isinstance(last, dict):
            return cls(
                stage=str(last.get("stage") or "start"), task=last.get("task"), vm=last.get("vm")
            )
        return cls()

    def beat(self, progress: int = 0) -> None:
        activity.heartbeat(
            {"stage": self.stage, "task": self.task, "vm": self.vm, "progress": progress}
        )


def _beat_every() -> float:
    """Seconds between a waiting activity's heartbeats (cancellation wakes it sooner)."""
    try:
        return max(2.0, beat_period(activity.info()))
    except RuntimeError:  # not in an activity
        return 2.0


def _cancelled() -> bool:
    """The workflow asked to cancel this activity (an abort): the only case in which its
    vCenter work is cancelled too. Not the agent stopping, nor an attempt that Temporal ended
    otherwise (see `_stopping`)."""
    if not activity.is_cancelled() or activity.is_worker_shutdown():
        return False
    details = activity.cancellation_details()
    return details is None or details.cancel_requested


def _stopping() -> bool:
    """Stop waiting and leave vCenter's work running for the next attempt: the agent is
    stopping (SIGTERM), or Temporal ended this attempt without the workflow asking (its
    heartbeat timed out, the task is gone, paused or reset), when another attempt — perhaps
    on another agent — re-attaches to the task its last heartbeat names; cancelling that task
    would make the other attempt clone again."""
    if activity.is_worker_shutdown():
        return True
    if not activity.is_cancelled():
        return False
    details = activity.cancellation_details()
    return details is not None and not details.cancel_requested


def _stopped(what: str) -> ApplicationError:
    """A retryable failure that leaves the vCenter task running: the next attempt, on the
    next agent, re-attaches to it (its ref is in the last heartbeat)."""
    return ApplicationError(
        f"this attempt stopped during {what} (the gateway agent is stopping, or Temporal gave "
        "the task to another attempt); vCenter's work goes on and the next attempt takes it up",
        type=errors.AGENT_STOPPING,
    )


class VmActivities:
    """The VM activities of one gateway agent (its key opens sealed passwords and secrets)."""

    def __init__(
        self,
        key: AgentKey,
        sessions: SessionPool,
        *,
        max_ops_per_host: int = 8,
        max_ops_per_datastore: int = 128,
        executor: Executor | None = None,
        max_waits: int = 256,
    ) -> None:
        self.key = key
        self.sessions = sessions
        #: where the waiting activities' requests run (None: the loop's default executor)
        self.executor = executor
        #: where the waits that hold a thread run — guest waits' long polls (≤ 5 s a turn),
        #: Kubernetes readiness (its HTTP polls) —: never on the requests' threads, which they
        #: would hold from every other activity's requests; one thread for each waiting task
        #: at most (threads are made as needed)
        self.long_polls: Executor = ThreadPoolExecutor(
            max_workers=max_waits, thread_name_prefix="kubegate-wait"
        )
        self.max_ops_per_host = max_ops_per_host
        self.max_ops_per_datastore = max_ops_per_datastore
        self._facts: dict[tuple[str, str, str, str], tuple[float, _TemplateFacts]] = {}
        self._facts_guard = threading.Lock()
        #: (vCenter, compute cluster, datastore) -> (read at, usable hosts by name; None: DRS)
        self._hosts: dict[tuple[str, str, str], tuple[float, list[str] | None]] = {}

    # --- plumbing ---------------------------------------------------------------------------

    def _call(
        self, credentials: VCenterCredentials, context: str, call: Callable[[VSphereSession], T]
    ) -> T:
        """Run call with a live session; classify whatever vCenter raises."""
        return call_vcenter(self.key, self.sessions, credentials, context, call)

    async def _call_async(
        self,
        credentials: VCenterCredentials,
        context: str,
        call: Callable[[VSphereSession], Awaitable[T]],
    ) -> T:
        """`_call` for the waiting activities: requests in the executor, waits on the loop."""
        return await call_vcenter_async(
            self.key, self.sessions, credentials, context, call, self.executor
        )

    async def _io(self, call: Callable[[], T]) -> T:
        """One blocking step (vCenter requests, no wait) on the executor."""
        return await in_thread(self.executor, call)

    @asynccontextmanager
    async def _slot(
        self,
        kind: str,
        server: str,
        obj: str | None,
        progress: _Progress,
        *,
        limit: int | None = None,
    ) -> AsyncIterator[None]:
        """Hold one of the per-host / per-datastore (/ per-cluster) slots, heartbeating while
        queued."""
        if obj is None:
            yield
            return
        if limit is None:
            limit = self.max_ops_per_host if kind == "host" else self.max_ops_per_datastore
        held = slots(kind, server, obj, limit)
        taking = asyncio.ensure_future(held.acquire())
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {taking}
                stop = stop_signal()
                if stop is not None and not stop.done():
                    waits.add(stop)
                await asyncio.wait(
                    waits, timeout=_beat_every(), return_when=asyncio.FIRST_COMPLETED
                )
                if taking.done():
                    taking.result()
                    break
                progress.beat()
                if _stopping():
                    raise _stopped(f"the wait for {obj}")
                if _cancelled():
                    raise CancelledError(f"cancelled while queued for {obj}")
        except BaseException:
            if taking.done() and not taking.cancelled() and taking.exception() is None:
                held.release()  # (taken as this wait ended: given back)
            else:
                taking.cancel()
                with contextlib.suppress(BaseException):
                    await taking  # (a slot handed over meanwhile is passed on)
            raise
        try:
            with metrics.task_in_flight(kind, server, obj, limit):
                yield
        finally:
            held.release()

    async def _await(self, session: VSphereSession, task: Any, progress: _Progress) -> Any:
        """Wait for a task with heartbeats; on cancellation cancel it, await it, re-raise."""
        progress.task = task if isinstance(task, str) else ref(task)
        progress.beat()
        try:
            result = await await_task_async(
                session,
                progress.task,
                progress.beat,
                io=self._io,
                cancelled=lambda: _cancelled() or _stopping(),
                stop=stop_signal(),
                beat_every=_beat_every(),
            )
        except CancelRequested:
            if _stopping():  # never cancel vCenter's work because the agent stops
                progress.beat()
                raise _stopped(progress.stage) from None
            await self._cancel_and_await(session, progress.task, progress.beat)
            progress.task = None
            raise CancelledError(f"cancelled during {progress.stage}") from None
        progress.task = None
        return result

    async def _cancel_and_await(
        self, session: VSphereSession, task: str, beat: Callable[[int], None]
    ) -> None:
        """Cancel a task (if it still runs) and wait until it has ended, whatever its outcome;
        an agent that stops meanwhile stops waiting (the cancel was sent; the abort's destroy
        cancels and awaits the node's tasks again)."""
        obj = from_ref(session, task)
        await self._io(lambda: _cancel_task(obj))
        # RequestCanceled, or the task's own fault, or it is gone: it has ended either way
        with contextlib.suppress(vmodl.MethodFault, CancelRequested):
            await await_task_async(
                session, obj, beat, io=self._io, cancelled=_stopping, beat_every=_beat_every()
            )

    def _guestinfo(self, request: CreateVmRequest) -> dict[str, str]:
        """guestinfo.* extraConfig entries (they hold secrets: never log them)."""
        if request.bootstrap is None:
            return {}
        secrets = (
            None if request.secrets is None else open_cluster_secrets(self.key, request.secrets)
        )
        if secrets is None:
            raise ApplicationError(
                f"node {request.name}: bootstrap data given without the sealed cluster secrets",
                type=errors.INVALID_SPEC,
                non_retryable=True,
            )
        try:
            entries, _ = rendered(request.bootstrap, secrets)
        except ValueError as exc:
            raise ApplicationError(
                f"node {request.name}: {exc}", type=errors.INVALID_SPEC, non_retryable=True
            ) from None
        return entries

    # --- placement and folders --------------------------------------------------------------

    @activity.defn(name="vm_resolve_placement")
    def resolve_placement(self, request: PlacementRequest) -> PlacementRefs:
        """Template and every domain's cluster, pool, datastore and network as refs (3 requests:
        the datacenter, the template, one traversal of the host/datastore/network folders)."""
        dc = request.datacenter.strip("/")
        with request_meter() as meter:
            refs = self._call(
                request.credentials,
                f"resolve placement in {dc}",
                lambda s: _resolve_placement(s, dc, request),
            )
        refs.vcenter_requests = meter[0]
        return refs

    @activity.defn(name="vm_ensure_folder")
    def ensure_folder(self, request: FolderRequest) -> FolderResult:
        """Find or create the cluster's VM folder (a DuplicateName race counts as found)."""
        path = _folder_path(request)

        def ensure(session: VSphereSession) -> FolderResult:
            found = find_by_path(session, path)
            if found is not None:
                return FolderResult(ref=ref(found), path=path)
            parent_path = path.rsplit("/", 1)[0]
            parent = find_by_path(session, parent_path)
            if parent is None:
                raise _not_found("parent folder", parent_path)
            try:
                folder = parent.CreateFolder(request.name)
            except vim.fault.DuplicateName:
                folder = find_by_path(session, path)
                if folder is None:
                    raise
                return FolderResult(ref=ref(folder), path=path)
            return FolderResult(ref=ref(folder), path=path, created=True)

        with request_meter() as meter:
            result = self._call(request.credentials, f"ensure folder {path}", ensure)
        result.vcenter_requests = meter[0]
        return result

    @activity.defn(name="vm_remove_folder")
    async def remove_folder(self, request: FolderRequest) -> FolderResult:
        """Destroy the cluster's folder if it is empty; not found = done."""
        path = _folder_path(request)
        progress = _Progress(stage="remove-folder")

        def look(session: VSphereSession) -> Any:
            folder = find_by_path(session, path)
            if folder is None:
                return None
            children = list(
                retrieve(session, [folder], ["childEntity"]).get(ref(folder), {}).get("childEntity")
                or []
            )
            if children:
                names = retrieve_names(session, children)
                raise ApplicationError(
                    f"folder {path} is not empty; it still holds: {', '.join(sorted(names))}",
                    type=errors.INVALID_STATE,
                    non_retryable=True,
                )
            return folder

        async def remove(session: VSphereSession) -> FolderResult:
            folder = await self._io(lambda: look(session))
            if folder is None:
                return FolderResult(ref="", path=path)
            await self._await(session, await self._io(folder.Destroy_Task), progress)
            return FolderResult(ref=ref(folder), path=path)

        with request_meter() as meter:
            result = await uninterrupted(
                self._call_async(request.credentials, f"remove folder {path}", remove)
            )
        result.vcenter_requests = meter[0]
        return result

    # --- create -----------------------------------------------------------------------------

    @activity.defn(name="vm_create")
    async def create(self, request: CreateVmRequest) -> VmInfo:
        """The node's VM: found by instance UUID or cloned (marked, placed, sized, customized
        in the clone spec), then the disk grown and anything else fixed by one reconfigure,
        then powered on and, with `wait_guest`, waited for until its guest reports the node's
        hostname and address (NotReady after `guest_timeout_seconds`). Every step is skipped
        when already done."""
        progress = _Progress.resume()
        with request_meter() as meter:
            extra = await self._io(lambda: self._guestinfo(request))
            info = await uninterrupted(
                self._call_async(
                    request.credentials,
                    f"create VM {request.name}",
                    lambda s: self._create(s, request, progress, extra),
                )
            )
        info.vcenter_requests = meter[0]
        info.attempt = activity.info().attempt
        info.bootstrap_digest = digest(extra) if extra else None
        return info

    async def _create(
        self,
        session: VSphereSession,
        request: CreateVmRequest,
        progress: _Progress,
        extra: dict[str, str],
    ) -> VmInfo:
        server = session.endpoint.server
        if progress.task:
            # an earlier attempt (or this one, before a re-login) left a task: re-attach
            # if it failed or is gone, look for the VM and clone again if needed
            with contextlib.suppress(vmodl.MethodFault):
                await self._await(session, progress.task, progress)
        search = session.content.searchIndex
        vm = await self._io(lambda: search.FindByUuid(None, request.instance_uuid, True, True))
        # A clone holds a slot through its reconfigure and power-on, so a host's operations go
        # in waves of whole nodes: its host's when the agent chooses the host, else (DRS
        # places it) one of its compute cluster's, max_ops_per_host per host of the cluster.
        async with AsyncExitStack() as cluster_slot, AsyncExitStack() as held:
            target: str | None = None
            if vm is None:
                facts = await self._io(lambda: self._template_facts(session, request))
                host_obj = await self._io(lambda: self._spread_host(session, request))
                target = ref(host_obj) if host_obj is not None else None
                if target is None and facts.cluster_hosts:
                    await cluster_slot.enter_async_context(
                        self._slot(
                            "cluster",
                            server,
                            request.domain.compute_cluster,
                            progress,
                            limit=self.max_ops_per_host * facts.cluster_hosts,
                        )
                    )
                await held.enter_async_context(self._slot("host", server, target, progress))
                vm = await self._clone(session, request, progress, extra, facts, host_obj)
            progress.vm = ref(vm)
            props = (await self._io(lambda: retrieve(session, [vm], _VM_PATHS)))[ref(vm)]
            _check_owner(props, request)
            host = props.get("runtime.host")
            state = props.get("runtime.powerState")
            on = ref(host) if host is not None else None
            if on != target:  # (placed elsewhere than asked: that host's slot instead)
                await held.aclose()
                await held.enter_async_context(self._slot("host", server, on, progress))
            if state != ON:
                spec = await self._io(lambda: self._fix_spec(session, request, props, extra))
                if spec is not None:
                    progress.stage = "reconfigure"
                    await self._await(
                        session, await self._io(lambda: vm.ReconfigVM_Task(spec)), progress
                    )
            if request.power_on and state != ON:
                progress.stage = "power-on"
                with contextlib.suppress(vim.fault.InvalidPowerState):  # already on
                    await self._await(session, await self._io(vm.PowerOnVM_Task), progress)
                state = ON
        if request.wait_guest and request.power_on:
            progress.stage = "guest"
            address = request.network.address if request.network.mode == "static" else None
            node = (ref(vm), request.name, address)
            # already on when read: what was read is current; else one read after power-on
            seen = {ref(vm): props} if props.get("runtime.powerState") == ON else None
            guest = await self._await_guests(
                session,
                [node],
                request.guest_timeout_seconds,
                lambda _: progress.beat(),
                seen=seen,
            )
            progress.stage = "done"
            info = _vm_info(ref(vm), guest[ref(vm)], request.name)
            info.instance_uuid = info.instance_uuid or request.instance_uuid
            return info
        progress.stage = "done"
        return VmInfo(
            ref=ref(vm),
            name=str(props.get("name") or request.name),
            instance_uuid=str(props.get("config.instanceUuid") or request.instance_uuid),
            host=ref(host) if host is not None else "",
            power_state=str(state or ""),
            address=props.get("guest.ipAddress") or None,
            hostname=props.get("guest.hostName") or None,
        )

    async def _clone(
        self,
        session: VSphereSession,
        request: CreateVmRequest,
        progress: _Progress,
        extra: dict[str, str],
        facts: _TemplateFacts,
        host: Any | None,
    ) -> Any:
        domain = request.domain
        config = vim.vm.ConfigSpec(
            instanceUuid=request.instance_uuid,
            annotation=_annotation(request.owner),
            numCPUs=request.cpu,
            memoryMB=request.memory_mb,
            extraConfig=[
                vim.option.OptionValue(key=k, value=v)
                for k, v in {**_marks(request.owner), **extra}.items()
            ],
            deviceChange=[
                vim.vm.device.VirtualDeviceSpec(operation="edit", device=facts.nic_for_clone())
            ]
            if facts.nic is not None
            else [],
        )
        spec = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(
                folder=from_ref(session, request.folder),
                pool=from_ref(session, domain.resource_pool),
                datastore=from_ref(session, domain.datastore),
                host=host,
            ),
            config=config,
            customization=_customization(request),
            powerOn=False,
            template=False,
        )
        template = from_ref(session, request.template)
        folder = from_ref(session, request.folder)
        async with self._slot("datastore", session.endpoint.server, domain.datastore, progress):
            progress.stage = "clone"
            task = await self._io(
                lambda: template.CloneVM_Task(folder=folder, name=request.name, spec=spec)
            )
            try:
                return await self._await(session, task, progress)
            except vim.fault.DuplicateName as fault:
                found = await self._io(
                    lambda: session.content.searchIndex.FindByUuid(
                        None, request.instance_uuid, True, True
                    )
                )
                if found is not None:
                    return found
                if isinstance(fault.object, vim.VirtualMachine):
                    raise ApplicationError(
                        f"a VM named {request.name} already exists in the cluster folder and is "
                        "not this node's (another instance UUID); rename or remove it",
                        type=errors.INVALID_SPEC,
                        non_retryable=True,
                    ) from None
                raise ApplicationError(
                    f"another clone named {request.name} is in progress in the cluster folder; "
                    "retrying",
                    type=errors.INVALID_STATE,
                ) from None
            except vmodl.MethodFault:
                self._forget_facts(session, request)
                raise

    def _spread_host(self, session: VSphereSession, request: CreateVmRequest) -> Any | None:
        """The host for `request.host_slot` where DRS is off in the VM's compute cluster (the
        usable hosts by name, modulo their number); None where DRS places VMs or no slot is
        asked. The cluster's DRS setting and hosts are read once per 5 minutes (2 requests)."""
        if request.host_slot is None or not request.domain.compute_cluster:
            return None
        key = (
            session.endpoint.server.lower(),
            request.domain.compute_cluster,
            request.domain.datastore,
        )
        now = time.monotonic()
        with self._facts_guard:
            cached = self._hosts.get(key)
        if cached is None or now - cached[0] >= _FACTS_TTL:
            cached = (now, _usable_hosts(session, *key[1:]))
            with self._facts_guard:
                self._hosts[key] = cached
        hosts = cached[1]
        if not hosts:
            return None  # DRS places it (or no usable host: vCenter picks, as before)
        return from_ref(session, hosts[request.host_slot % len(hosts)])

    def _template_facts(self, session: VSphereSession, request: CreateVmRequest) -> _TemplateFacts:
        key = _facts_key(session, request)
        now = time.monotonic()
        with self._facts_guard:
            cached = self._facts.get(key)
            if cached is not None and now - cached[0] < _FACTS_TTL:
                return cached[1]
        facts = _read_template_facts(
            session, request.template, request.domain.network, request.domain.compute_cluster
        )
        with self._facts_guard:
            self._facts[key] = (now, facts)
        return facts

    def _forget_facts(self, session: VSphereSession, request: CreateVmRequest) -> None:
        with self._facts_guard:
            self._facts.pop(_facts_key(session, request), None)

    def _fix_spec(
        self,
        session: VSphereSession,
        request: CreateVmRequest,
        props: dict[str, Any],
        extra: dict[str, str],
    ) -> Any | None:
        """A reconfigure spec for whatever differs from the request, or None."""
        fix: dict[str, Any] = {}
        if props.get("config.hardware.numCPU") != request.cpu:
            fix["numCPUs"] = request.cpu
        if props.get("config.hardware.memoryMB") != request.memory_mb:
            fix["memoryMB"] = request.memory_mb
        devices = list(props.get("config.hardware.device") or [])
        changes = []
        disk = next((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)), None)
        want_kb = request.disk_gb * 1024 * 1024
        if disk is not None and (disk.capacityInKB or 0) < want_kb:
            grown = _shallow_copy(disk)
            grown.capacityInKB = want_kb
            grown.capacityInBytes = want_kb * 1024
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=grown))
        nic = next((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), None)
        if nic is not None:
            facts = self._template_facts(session, request)
            if not facts.backs(nic):
                moved = _shallow_copy(nic)
                moved.backing = facts.backing()
                changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=moved))
        if changes:
            fix["deviceChange"] = changes
        have = _extra(props.get("config.extraConfig"))
        wanted = {**_marks(request.owner), **extra}
        stale = {k: v for k, v in wanted.items() if have.get(k) != v}
        if stale:
            fix["extraConfig"] = [vim.option.OptionValue(key=k, value=v) for k, v in stale.items()]
        return vim.vm.ConfigSpec(**fix) if fix else None

    # --- power-on and readiness -------------------------------------------------------------

    @activity.defn(name="vm_power_on")
    async def power_on(self, request: PowerOnRequest) -> ReadinessResult:
        """Power on every listed VM at once (already on = done) and, with `wait_guest`, wait
        until each guest reports its hostname and address. One read of the VMs (and of their
        datacenter), one PowerOnMultiVM_Task for several VMs of one datacenter (else one
        PowerOnVM_Task each), one read after; then, if a guest is not up yet, one private
        property collector until they all are."""
        with request_meter() as meter:
            result = await uninterrupted(
                self._call_async(
                    request.credentials,
                    f"power on {len(request.nodes)} VM(s)",
                    lambda s: self._power_on(s, request),
                )
            )
        result.vcenter_requests = meter[0]
        return result

    async def _power_on(self, session: VSphereSession, request: PowerOnRequest) -> ReadinessResult:
        progress = _Progress(stage="power-on")
        names = {vm_ref: hostname for vm_ref, hostname, _ in request.nodes}
        vms = [from_ref(session, vm_ref) for vm_ref in names]
        if not vms:
            return ReadinessResult(nodes=[])
        before, datacenter = await self._io(lambda: _read_with_datacenter(session, vms))
        off = [vm for vm in vms if before.get(ref(vm), {}).get("runtime.powerState") != ON]
        if off:
            hosts = {before.get(ref(vm), {}).get("runtime.host") for vm in off}
            server = session.endpoint.server
            async with AsyncExitStack() as held:
                # one slot per host, taken in a fixed order (no deadlock between callers)
                for host in sorted(ref(h) for h in hosts if h is not None):
                    await held.enter_async_context(self._slot("host", server, host, progress))
                await self._power_on_all(session, datacenter, off, progress)
        after = await self._io(lambda: retrieve(session, vms, _GUEST_PATHS)) if off else before
        if request.wait_guest:
            progress.stage = "guest"
            after = await self._await_guests(
                session,
                request.nodes,
                request.timeout_seconds,
                lambda waiting: activity.heartbeat({"stage": "guest", "waiting": waiting}),
                seen=after,
            )
        return ReadinessResult(
            nodes=[_vm_info(ref(vm), after.get(ref(vm), {}), names[ref(vm)]) for vm in vms]
        )

    async def _power_on_all(
        self, session: VSphereSession, datacenter: Any | None, vms: list[Any], progress: _Progress
    ) -> None:
        """Start every VM's power-on, then wait for them all (the tasks run concurrently)."""
        if datacenter is not None and len(vms) > 1:
            option = vim.option.OptionValue(key="OverrideAutomationLevel", value=True)
            multi = await self._io(lambda: datacenter.PowerOnMultiVM_Task(vm=vms, option=[option]))
            result = await self._await(session, multi, progress)
            # vCenter: the per-VM tasks it started, and the VMs it did not try (with why)
            for skipped in getattr(result, "notAttempted", None) or []:
                if not isinstance(skipped.fault, vim.fault.InvalidPowerState):
                    raise skipped.fault
            tasks = [a.task for a in getattr(result, "attempted", None) or [] if a.task]
        else:
            tasks = []
            for vm in vms:
                with contextlib.suppress(vim.fault.InvalidPowerState):  # already on
                    tasks.append(await self._io(vm.PowerOnVM_Task))
        for task in tasks:
            with contextlib.suppress(vim.fault.InvalidPowerState):
                await self._await(session, task, progress)

    @activity.defn(name="vm_wait_ready")
    async def wait_ready(self, request: ReadinessRequest) -> ReadinessResult:
        """mode guest: every VM reports its expected address and hostname (one property
        filter over all of them). mode kubernetes: the API server's /readyz answers 200 on
        the VIP; with the cluster's secrets, from a server of the cluster's CA, and then
        every listed node is Ready (activities/kube.py)."""
        with request_meter() as meter:
            if request.mode == "kubernetes" and request.secrets is not None and request.vip:
                secrets = open_cluster_secrets(self.key, request.secrets)
                # (HTTP to the cluster, not vCenter: it waits in a thread of the waits' pool)
                await uninterrupted(
                    in_thread(self.long_polls, lambda: wait_kubernetes_ready(request, secrets))
                )
                result = ReadinessResult(nodes=[])
            elif request.mode == "kubernetes":
                result = await uninterrupted(
                    in_thread(self.long_polls, lambda: _wait_kubernetes(request))
                )
            else:
                result = await uninterrupted(
                    self._call_async(
                        request.credentials,
                        "wait for guests",
                        lambda s: self._wait_guests(s, request),
                    )
                )
        result.vcenter_requests = meter[0]
        return result

    # --- destroy and sweep ------------------------------------------------------------------

    @activity.defn(name="vm_destroy")
    async def destroy(self, request: DestroyVmRequest) -> DestroyResult:
        """Cancel and await the listed tasks, then power off and destroy the node's VM (found
        by instance UUID, or by name in the folder if it carries our mark); not found = done."""
        progress = _Progress(stage="destroy")
        result = DestroyResult()

        def find(session: VSphereSession) -> tuple[Any, dict[str, Any]] | None:
            vm = session.content.searchIndex.FindByUuid(None, request.instance_uuid, True, True)
            props: dict[str, Any] | None = None
            if vm is None and request.folder:
                try:
                    vm = session.content.searchIndex.FindChild(
                        from_ref(session, request.folder), request.name
                    )
                except vmodl.fault.ManagedObjectNotFound:
                    vm = None  # the folder is gone (e.g. a simulator restarted): so is the VM
                if vm is not None:
                    props = retrieve(
                        session, [vm], ["config.extraConfig", "runtime.powerState", "runtime.host"]
                    ).get(ref(vm), {})
                    if _extra(props.get("config.extraConfig")).get(MARK_NODE) != request.name:
                        return None  # same name, not ours: leave it alone
            if vm is None:
                return None
            if props is None:
                props = retrieve(session, [vm], ["runtime.powerState", "runtime.host"]).get(
                    ref(vm), {}
                )
            return vm, props

        async def run(session: VSphereSession) -> None:
            for task in request.tasks:
                await self._cancel_and_await(session, task, progress.beat)
            found = await self._io(lambda: find(session))
            if found is None:
                return
            vm, props = found
            await self._destroy_vm(session, vm, props, progress)
            result.destroyed.append(ref(vm))

        with request_meter() as meter:
            await uninterrupted(
                self._call_async(request.credentials, f"destroy VM {request.name}", run)
            )
        result.vcenter_requests = meter[0]
        return result

    async def _destroy_vm(
        self, session: VSphereSession, vm: Any, props: dict[str, Any], progress: _Progress
    ) -> None:
        host = props.get("runtime.host")
        progress.vm = ref(vm)
        async with self._slot(
            "host", session.endpoint.server, ref(host) if host is not None else None, progress
        ):
            try:
                if props.get("runtime.powerState") == ON:
                    progress.stage = "power-off"
                    with contextlib.suppress(vim.fault.InvalidPowerState):  # already off
                        await self._await(session, await self._io(vm.PowerOffVM_Task), progress)
                progress.stage = "destroy"
                await self._await(session, await self._io(vm.Destroy_Task), progress)
            except vmodl.fault.ManagedObjectNotFound:
                return  # gone meanwhile

    @activity.defn(name="vm_sweep")
    async def sweep(self, request: SweepRequest) -> SweepResult:
        """Every VM in the datacenter marked as the cluster's; destroyed unless dry_run."""
        result = SweepResult()
        progress = _Progress(stage="sweep")

        tagged: set[str] = set()  # VMs carrying the cluster's tag (read first, over vAPI)

        async def run(session: VSphereSession) -> None:
            marked = await self._io(
                lambda: _marked_vms(
                    session, request.datacenter.strip("/"), request.cluster_id, tagged
                )
            )
            result.vms = [info for info, _ in marked]
            if request.dry_run:
                return
            for info, props in marked:
                vm = from_ref(session, info.ref)
                await self._destroy_vm(session, vm, props, progress)
                result.destroyed.append(info.ref)

        with request_meter() as meter:
            if request.tag_id:
                tag_id = request.tag_id
                tagged = set(
                    await self._io(
                        lambda: tagged_objects(self.key, self.sessions, request.credentials, tag_id)
                    )
                )
            await uninterrupted(
                self._call_async(request.credentials, f"sweep VMs of {request.cluster_id}", run)
            )
        result.vcenter_requests = meter[0]
        return result

    @activity.defn(name="vm_installer")
    async def installer(self, request: InstallerVmRequest) -> InstallerVmResult:
        """Power off (or destroy) the gateway's installer VM; not found = done."""
        progress = _Progress(stage=request.action)
        result = InstallerVmResult(found=False)

        def look(session: VSphereSession) -> tuple[Any, dict[str, Any]] | None:
            if request.vm.startswith("VirtualMachine:"):
                vm = from_ref(session, request.vm)
            else:
                vm = session.content.searchIndex.FindByInventoryPath(request.vm)
            try:
                props = (
                    retrieve(session, [vm], ["runtime.powerState", "runtime.host"]).get(ref(vm), {})
                    if vm is not None
                    else None
                )
            except vmodl.fault.ManagedObjectNotFound:
                props = None
            if vm is None or props is None:
                return None
            owner = read_properties(session, vm).get("kubegate.installer_name")
            if owner != request.installer_name:
                result.note = (
                    f"{request.vm} is not gateway {request.installer_name}'s installer "
                    f"(installer_name {owner!r}): left alone"
                )
                return None
            return vm, props

        async def run(session: VSphereSession) -> None:
            found = await self._io(lambda: look(session))
            if found is None:
                return
            vm, props = found
            result.found, result.ref = True, ref(vm)
            if request.action == "destroy":
                await self._destroy_vm(session, vm, props, progress)
                return
            if props.get("runtime.powerState") == ON:
                with contextlib.suppress(vim.fault.InvalidPowerState):
                    await self._await(session, await self._io(vm.PowerOffVM_Task), progress)
            result.power_state = "poweredOff"
            if await self._io(lambda: clear_pairing_code(session, vm)):
                task = await self._io(lambda: clear_pairing_code(session, vm, apply=True))
                await self._await(session, task, progress)
                result.note = "pairing code removed from its properties"

        with request_meter() as meter:
            await uninterrupted(
                self._call_async(
                    request.credentials, f"{request.action} installer {request.vm}", run
                )
            )
        result.vcenter_requests = meter[0]
        return result

    @activity.defn(name="vm_keep_apart")
    async def keep_apart(self, request: KeepApartRequest) -> KeepApartResult:
        """Make the compute cluster's anti-affinity rule `rule` hold exactly these VMs (add,
        edit or, for fewer than two, remove it); idempotent."""
        progress = _Progress(stage="keep-apart")
        wanted = sorted(set(request.vms))

        async def run(session: VSphereSession) -> KeepApartResult:
            cluster = from_ref(session, request.compute_cluster)
            config = (
                await self._io(lambda: retrieve(session, [cluster], ["configurationEx"]))
            ).get(ref(cluster), {})
            info = config.get("configurationEx")
            drs = bool(info and info.drsConfig and info.drsConfig.enabled)
            rules = list(info.rule or []) if info is not None else []
            found = next((r for r in rules if r.name == request.rule), None)
            have = sorted(ref(vm) for vm in (getattr(found, "vm", None) or []))
            if len(wanted) < 2:
                if found is None:
                    return KeepApartResult(rule=request.rule, drs=drs)
                spec = vim.cluster.RuleSpec(operation="remove", removeKey=found.key)
            elif found is not None and have == wanted and found.enabled:
                return KeepApartResult(rule=request.rule, vms=have, drs=drs)
            else:
                rule = vim.cluster.AntiAffinityRuleSpec(
                    name=request.rule,
                    enabled=True,
                    vm=[from_ref(session, vm) for vm in wanted],
                )
                if found is not None:
                    rule.key = found.key
                spec = vim.cluster.RuleSpec(
                    operation="edit" if found is not None else "add", info=rule
                )
            change = vim.cluster.ConfigSpecEx(rulesSpec=[spec])
            task = await self._io(lambda: cluster.ReconfigureComputeResource_Task(change, True))
            await self._await(session, task, progress)
            vms = wanted if len(wanted) >= 2 else []
            return KeepApartResult(rule=request.rule, vms=vms, drs=drs, changed=True)

        with request_meter() as meter:
            result = await uninterrupted(
                self._call_async(request.credentials, f"keep apart ({request.rule})", run)
            )
        result.vcenter_requests = meter[0]
        return result

    async def _wait_guests(
        self, session: VSphereSession, request: ReadinessRequest
    ) -> ReadinessResult:
        """vm_wait_ready in guest mode: _await_guests over every listed VM."""
        names = {vm_ref: hostname for vm_ref, hostname, _ in request.nodes}
        seen = await self._await_guests(
            session,
            request.nodes,
            request.timeout_seconds,
            lambda waiting: activity.heartbeat({"stage": "guest", "waiting": waiting}),
        )
        return ReadinessResult(nodes=[_vm_info(r, seen[r], names[r]) for r in names])

    async def _await_guests(
        self,
        session: VSphereSession,
        nodes: Sequence[Node],
        timeout_seconds: float,
        beat: Callable[[list[str]], None],
        *,
        seen: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Each VM's _GUEST_PATHS once every guest reports its expected hostname and address
        (any address when None).

        First one read of the VMs (none if the caller passes what it has just read, `seen`):
        guests already up cost nothing more. Otherwise one private collector with one filter
        over the VMs is waited on (WaitForUpdatesEx, ≤ 5 s a turn, `beat(waiting names)` after
        each) and destroyed afterwards. Cancellation raises CancelledError; the timeout a
        retryable NotReady naming what each waiting guest reports.
        """
        expected = {vm_ref: (hostname, address) for vm_ref, hostname, address in nodes}
        if seen is None:
            seen = await self._io(
                lambda: retrieve(session, [from_ref(session, r) for r in expected], _GUEST_PATHS)
            )
        state = {r: dict(seen.get(r, {})) for r in expected}
        deadline = time.monotonic() + timeout_seconds

        def waiting() -> list[str]:
            return [r for r in expected if not _guest_ready(state[r], *expected[r])]

        left = waiting()
        beat([expected[r][0] for r in left])
        if not left:
            return state
        watch = _GuestWatch(session, list(expected))
        try:
            await self._io(watch.open)
            while left:
                if _stopping():
                    raise _stopped("the wait for guests")
                if _cancelled():
                    raise CancelledError("cancelled while waiting for guests")
                if time.monotonic() > deadline:
                    report = "; ".join(
                        f"{expected[r][0]} reports address "
                        f"{state[r].get('guest.ipAddress') or 'none'}"
                        f", hostname {state[r].get('guest.hostName') or 'none'}"
                        f", power {state[r].get('runtime.powerState') or 'unknown'}"
                        for r in left
                    )
                    raise ApplicationError(
                        f"{len(left)} node(s) not ready after {timeout_seconds}s: {report}",
                        type=errors.NOT_READY,
                    )
                wait = max(1, min(5, int(deadline - time.monotonic())))
                changed = await in_thread(self.long_polls, functools.partial(watch.turn, wait))
                for vm_ref, changes in changed.items():
                    state.setdefault(vm_ref, {}).update(changes)
                left = waiting()
                beat([expected[r][0] for r in left])
        finally:
            await self._io(watch.close)
        return state

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for the agent's worker."""
        return [
            self.keep_apart,
            self.installer,
            self.resolve_placement,
            self.ensure_folder,
            self.remove_folder,
            self.create,
            self.power_on,
            self.wait_ready,
            self.destroy,
            self.sweep,
        ]


# --- helpers ---------------------------------------------------------------------------------


PAIRING_CODE_PROPERTY = "kubegate.pairing_code"


def clear_pairing_code(session: VSphereSession, vm: Any, apply: bool = False) -> Any:
    """Whether the installer still carries its (used) pairing code; with `apply`, the
    reconfigure task that blanks it (in its vApp properties, or the extraConfig key the
    simulator keeps them in)."""
    props = retrieve(session, [vm], ["config.vAppConfig", "config.extraConfig"]).get(ref(vm), {})
    vapp = props.get("config.vAppConfig")
    spec = vim.vm.ConfigSpec()
    if vapp is not None and vapp.property:
        found = [
            p
            for p in vapp.property
            if ".".join(x for x in (p.classId, p.id, p.instanceId) if x) == PAIRING_CODE_PROPERTY
            and (p.value or p.defaultValue)
        ]
        if not found:
            return None
        spec.vAppConfig = vim.vApp.VmConfigSpec(
            property=[
                vim.vApp.PropertySpec(
                    operation="edit",
                    info=vim.vApp.PropertyInfo(key=p.key, value="", defaultValue=""),
                )
                for p in found
            ]
        )
    else:
        extra = props.get("config.extraConfig") or []
        if not any(o.key == PAIRING_CODE_PROPERTY and o.value for o in extra):
            return None
        spec.extraConfig = [vim.option.OptionValue(key=PAIRING_CODE_PROPERTY, value="")]
    return vm.ReconfigVM_Task(spec) if apply else True


def _not_found(what: str, path: str) -> ApplicationError:
    return ApplicationError(
        f"no {what} at {path}; create it or correct the spec",
        type=errors.OBJECT_NOT_FOUND,
        non_retryable=True,
    )


def _folder_path(request: FolderRequest) -> str:
    dc = request.datacenter.strip("/")
    parent = request.parent.strip("/")
    return "/".join(p for p in (f"/{dc}/vm", parent, request.name.strip("/")) if p)


def retrieve_names(session: VSphereSession, objects: list[Any]) -> list[str]:
    """The names of objects of any type, in one request."""
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=o, skip=False) for o in objects],
        propSet=[PC.PropertySpec(type=vim.ManagedEntity, pathSet=["name"])]
        + [PC.PropertySpec(type=t, pathSet=["name"]) for t in {type(o) for o in objects}],
    )
    found = retrieve_spec(session, spec)
    return [f"{ref(o).split(':')[0]} {found.get(ref(o), {}).get('name', o._moId)}" for o in objects]


def _shallow_copy(obj: Any) -> Any:
    """A new pyVmomi data object with the same property values."""
    copy = type(obj)()
    for prop in obj._GetPropertyList():
        setattr(copy, prop.name, getattr(obj, prop.name))
    return copy


def _check_owner(props: dict[str, Any], request: CreateVmRequest) -> None:
    marks = _extra(props.get("config.extraConfig"))
    if marks.get(MARK_CLUSTER) not in (None, request.owner.cluster_id) or marks.get(
        MARK_NODE
    ) not in (None, request.owner.node):
        raise ApplicationError(
            f"the VM with instance UUID {request.instance_uuid} ({props.get('name')}) belongs "
            f"to {marks.get(MARK_CLUSTER)}/{marks.get(MARK_NODE)}, not to this node",
            type=errors.INVALID_SPEC,
            non_retryable=True,
        )


def _cancel_task(task: Any) -> None:
    """Ask vCenter to cancel a task; one that has ended or cannot be cancelled is left."""
    try:
        task.CancelTask()
    except (vim.fault.InvalidState, vmodl.fault.ManagedObjectNotFound, vmodl.fault.NotSupported):
        pass
    except vmodl.fault.MethodNotFound:
        pass  # a simulator without CancelTask: the task ran synchronously anyway


def _facts_key(session: VSphereSession, request: CreateVmRequest) -> tuple[str, str, str, str]:
    domain = request.domain
    return (
        session.endpoint.server.lower(),
        request.template,
        domain.network,
        domain.compute_cluster,
    )


@dataclass
class _TemplateFacts:
    """What a clone spec needs from the template and the network (and how many hosts the
    compute cluster has: its clone slots)."""

    nic: Any | None
    network: Any
    network_name: str = ""
    portgroup_key: str = ""
    switch_uuid: str = ""
    cluster_hosts: int = 0

    def backing(self) -> Any:
        card = vim.vm.device.VirtualEthernetCard
        if self.portgroup_key:
            return card.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(
                    switchUuid=self.switch_uuid, portgroupKey=self.portgroup_key
                )
            )
        return card.NetworkBackingInfo(deviceName=self.network_name, network=self.network)

    def backs(self, nic: Any) -> bool:
        backing = nic.backing
        if self.portgroup_key:
            port = getattr(backing, "port", None)
            return port is not None and port.portgroupKey == self.portgroup_key
        net = getattr(backing, "network", None)
        return net is not None and net._moId == self.network._moId

    def nic_for_clone(self) -> Any:
        nic = _shallow_copy(self.nic)
        nic.backing = self.backing()
        nic.macAddress = None
        nic.addressType = "generated"
        nic.connectable = vim.vm.device.VirtualDevice.ConnectInfo(
            startConnected=True, allowGuestControl=True, connected=False
        )
        return nic


def _read_template_facts(
    session: VSphereSession, template: str, network: str, compute_cluster: str
) -> _TemplateFacts:
    """The template's first NIC, the network's backing details and the compute cluster's
    hosts (1 request; 2 for a DVPG)."""
    tpl = from_ref(session, template)
    net = from_ref(session, network)
    cluster = from_ref(session, compute_cluster) if compute_cluster else None
    if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
        paths = ["key", "config.distributedVirtualSwitch"]
    elif isinstance(net, vim.OpaqueNetwork):
        raise ApplicationError(
            f"network {network}: opaque (NSX-T) networks are not supported yet",
            type=errors.INVALID_SPEC,
            non_retryable=True,
        )
    else:
        paths = ["name"]
    objects = [PC.ObjectSpec(obj=tpl, skip=False), PC.ObjectSpec(obj=net, skip=False)]
    wanted = [
        PC.PropertySpec(type=vim.VirtualMachine, pathSet=["config.hardware.device"]),
        PC.PropertySpec(type=type(net), pathSet=paths),
    ]
    if cluster is not None:
        objects.append(PC.ObjectSpec(obj=cluster, skip=False))
        wanted.append(PC.PropertySpec(type=type(cluster), pathSet=["host"]))
    found = retrieve_spec(session, PC.FilterSpec(objectSet=objects, propSet=wanted))
    devices = found.get(ref(tpl), {}).get("config.hardware.device") or []
    nic = next((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), None)
    props = found.get(ref(net), {})
    facts = _TemplateFacts(nic=nic, network=net, network_name=str(props.get("name") or ""))
    if cluster is not None:
        facts.cluster_hosts = len(found.get(ref(cluster), {}).get("host") or [])
    if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
        switch = props.get("config.distributedVirtualSwitch")
        facts.portgroup_key = str(props.get("key") or net._moId)
        facts.switch_uuid = str(retrieve(session, [switch], ["uuid"])[ref(switch)].get("uuid"))
    return facts


def _customization(request: CreateVmRequest) -> Any | None:
    """LinuxPrep with a fixed address for static nodes; None for DHCP (cloud-init does it)."""
    network = request.network
    if network.mode != "static" or not network.address:
        return None
    custom = vim.vm.customization
    prefix = network.prefix if network.prefix is not None else 24
    mask = str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    domain = network.search_domains[0] if network.search_domains else "local"
    return custom.Specification(
        identity=custom.LinuxPrep(
            hostName=custom.FixedName(name=request.name), domain=domain, hwClockUTC=True
        ),
        globalIPSettings=custom.GlobalIPSettings(
            dnsServerList=list(network.nameservers), dnsSuffixList=list(network.search_domains)
        ),
        nicSettingMap=[
            custom.AdapterMapping(
                adapter=custom.IPSettings(
                    ip=custom.FixedIp(ipAddress=network.address),
                    subnetMask=mask,
                    gateway=[network.gateway] if network.gateway else [],
                )
            )
        ],
    )


# --- placement -------------------------------------------------------------------------------

_ROLE_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "compute_cluster": ((vim.ClusterComputeResource,), "compute cluster"),
    "resource_pool": ((vim.ResourcePool,), "resource pool"),
    "datastore": ((vim.Datastore,), "datastore"),
    "network": ((vim.Network,), "network or port group"),
}


def _resolve_placement(
    session: VSphereSession, dc: str, request: PlacementRequest
) -> PlacementRefs:
    datacenter = find_by_path(session, f"/{dc}")
    if not isinstance(datacenter, vim.Datacenter):
        raise _not_found("datacenter", f"/{dc}")
    template_path = f"/{dc}/vm/{request.template.strip('/')}"
    template = find_by_path(session, template_path)
    if not isinstance(template, vim.VirtualMachine):
        raise _not_found("VM template", template_path)
    paths = inventory_paths(session, datacenter, dc)
    domains = []
    for cluster, pool, datastore, network in request.domains:
        where = Placement(
            datacenter=dc,
            compute_cluster=cluster,
            resource_pool=pool,
            datastore=datastore,
            network=network,
        ).inventory_paths()
        wanted = {role: where[role] for role in _ROLE_TYPES}
        refs: dict[str, str] = {}
        for role, path in wanted.items():
            obj = paths.get(path)
            kinds, word = _ROLE_TYPES[role]
            if obj is None or not isinstance(obj, kinds):
                raise _not_found(word, path)
            refs[role] = ref(obj)
        domains.append(DomainRefs(**refs))
    return PlacementRefs(template=ref(template), domains=domains)


# --- readiness -------------------------------------------------------------------------------


class _GuestWatch:
    """A private property collector over some VMs' _GUEST_PATHS (one filter)."""

    def __init__(self, session: VSphereSession, vms: list[str]) -> None:
        self.session, self.vms = session, vms
        self.collector: Any | None = None
        self.version = ""

    def open(self) -> None:
        session = self.session
        self.collector = session.content.propertyCollector.CreatePropertyCollector()
        self.collector.CreateFilter(
            PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=from_ref(session, r), skip=False) for r in self.vms],
                propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=_GUEST_PATHS)],
            ),
            partialUpdates=False,
        )

    def turn(self, wait: int) -> dict[str, dict[str, Any]]:
        """One WaitForUpdatesEx of at most `wait` seconds: the changed values by VM."""
        assert self.collector is not None
        update = self.collector.WaitForUpdatesEx(self.version, PC.WaitOptions(maxWaitSeconds=wait))
        changed: dict[str, dict[str, Any]] = {}
        if update is not None:
            self.version = update.version
            for filter_set in update.filterSet or []:
                for obj_set in filter_set.objectSet or []:
                    props = changed.setdefault(ref(obj_set.obj), {})
                    for change in obj_set.changeSet or []:
                        props[change.name] = change.val
        return changed

    def close(self) -> None:
        if self.collector is not None:
            with contextlib.suppress(Exception):  # best effort; vCenter drops it with the session
                self.collector.DestroyPropertyCollector()


def _vm_info(vm_ref: str, props: dict[str, Any], name: str) -> VmInfo:
    """VmInfo from _GUEST_PATHS values."""
    host = props.get("runtime.host")
    return VmInfo(
        ref=vm_ref,
        name=str(props.get("name") or name),
        instance_uuid=str(props.get("config.instanceUuid") or ""),
        host=ref(host) if host is not None else "",
        power_state=str(props.get("runtime.powerState") or ""),
        address=props.get("guest.ipAddress") or None,
        hostname=props.get("guest.hostName") or None,
    )


def _read_with_datacenter(
    session: VSphereSession, vms: list[Any]
) -> tuple[dict[str, dict[str, Any]], Any | None]:
    """The VMs' _GUEST_PATHS and their datacenter (None unless exactly one), in one request:
    a traversal up the VMs' `parent` folders."""
    up = PC.TraversalSpec(
        name="up",
        type=vim.Folder,
        path="parent",
        skip=False,
        selectSet=[PC.SelectionSpec(name="up")],
    )
    spec = PC.FilterSpec(
        objectSet=[
            PC.ObjectSpec(
                obj=vm,
                skip=False,
                selectSet=[
                    PC.TraversalSpec(
                        type=vim.VirtualMachine,
                        path="parent",
                        skip=False,
                        selectSet=[PC.SelectionSpec(name="up")],
                    ),
                    up,
                ],
            )
            for vm in vms
        ],
        propSet=[
            PC.PropertySpec(type=vim.VirtualMachine, pathSet=_GUEST_PATHS),
            PC.PropertySpec(type=vim.Datacenter, pathSet=["name"]),
        ],
    )
    found = retrieve_spec(session, spec)
    datacenters = [key for key in found if key.startswith("Datacenter:")]
    datacenter = from_ref(session, datacenters[0]) if len(datacenters) == 1 else None
    return found, datacenter


def _guest_ready(state: dict[str, Any], hostname: str, address: str | None) -> bool:
    have = state.get("guest.ipAddress")
    if not have or (address is not None and have != address):
        return False
    return bool(state.get("guest.hostName") == hostname)


def _wait_kubernetes(request: ReadinessRequest) -> ReadinessResult:
    """GET https://VIP:6443/readyz until 200. TLS is not verified: a request without the
    cluster's secrets carries no CA, and /readyz returns no secret. With the secrets,
    wait_kubernetes_ready verifies the server and checks the nodes' Ready conditions."""
    if not request.vip:
        raise ApplicationError(
            "readiness mode kubernetes needs the control-plane VIP",
            type=errors.INVALID_SPEC,
            non_retryable=True,
        )
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + request.timeout_seconds
    last = "no answer"
    while True:
        try:
            conn = http.client.HTTPSConnection(request.vip, 6443, timeout=5, context=context)
            try:
                conn.request("GET", "/readyz")
                response = conn.getresponse()
                body = response.read(200).decode(errors="replace").strip()
                if response.status == 200:
                    return ReadinessResult(nodes=[])
                last = f"HTTP {response.status} {body[:80]}"
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as exc:
            last = type(exc).__name__
        activity.heartbeat({"stage": "kubernetes", "last": last})
        if _stopping():
            raise _stopped("the wait for the API server")
        if _cancelled():
            raise CancelledError("cancelled while waiting for the API server")
        if time.monotonic() > deadline:
            raise ApplicationError(
                f"https://{request.vip}:6443/readyz not ready after "
                f"{request.timeout_seconds}s (last: {last})",
                type=errors.NOT_READY,
            )
        time.sleep(2)


# --- sweep -----------------------------------------------------------------------------------


def _usable_hosts(session: VSphereSession, cluster_ref: str, datastore: str) -> list[str] | None:
    """The hosts of a compute cluster a VM may be put on by name (connected, not in
    maintenance, seeing the datastore), sorted by name; None when DRS is on (it places VMs)."""
    cluster = from_ref(session, cluster_ref)
    props = retrieve(session, [cluster], ["configurationEx", "host"]).get(ref(cluster), {})
    config = props.get("configurationEx")
    if config is not None and config.drsConfig is not None and config.drsConfig.enabled:
        return None
    hosts = list(props.get("host") or [])
    facts = retrieve(
        session,
        hosts,
        ["name", "runtime.connectionState", "runtime.inMaintenanceMode", "datastore"],
    )
    usable = []
    for host in hosts:
        p = facts.get(ref(host), {})
        if p.get("runtime.connectionState") != "connected" or p.get("runtime.inMaintenanceMode"):
            continue
        if datastore not in {ref(d) for d in p.get("datastore") or []}:
            continue
        usable.append((str(p.get("name") or ""), ref(host)))
    return [r for _, r in sorted(usable)]


def kubegate_made(owner: str, props: dict[str, Any]) -> bool:
    """The VM has the instance UUID kubegate gives `owner`'s node of its name (proof that
    kubegate cloned it, where its extraConfig mark was lost)."""
    name = str(props.get("name") or "")
    uuid = str(props.get("config.instanceUuid") or "")
    return bool(name and uuid) and uuid == instance_uuid(owner, name)


def _marked_vms(
    session: VSphereSession, dc: str, cluster_id: str, tagged: Collection[str] = ()
) -> list[tuple[VmInfo, dict[str, Any]]]:
    """VMs of the datacenter whose extraConfig carries the cluster's mark, or that carry its
    tag (`tagged`: their refs): a container view, one read of every VM's annotation (the
    mark is repeated there), one read of the candidates' extraConfig."""
    datacenter = find_by_path(session, f"/{dc}")
    if not isinstance(datacenter, vim.Datacenter):
        return []  # no such datacenter: nothing of the cluster's can be in it
    everything = retrieve_all_vms(session, datacenter, ["config.annotation"])
    needle = f"{MARK_CLUSTER}={cluster_id}\n"
    candidates = [
        from_ref(session, key)
        for key, props in everything.items()
        if needle in str(props.get("config.annotation") or "") + "\n" or key in tagged
    ]
    if not candidates:
        return []
    props = retrieve(
        session,
        candidates,
        ["name", "config.instanceUuid", "config.extraConfig", "runtime.powerState", "runtime.host"],
    )
    marked = []
    for vm in candidates:
        p = props.get(ref(vm), {})
        mark = _extra(p.get("config.extraConfig")).get(MARK_CLUSTER)
        if mark != cluster_id and not (
            ref(vm) in tagged and mark is None and kubegate_made(cluster_id, p)
        ):
            # (marked as another's: the mark wins; tagged only, a tag can be put on any VM:
            # only one with the instance UUID kubegate gives that node is the cluster's)
            continue
        host = p.get("runtime.host")
        info = VmInfo(
            ref=ref(vm),
            name=str(p.get("name") or ""),
            instance_uuid=str(p.get("config.instanceUuid") or ""),
            host=ref(host) if host is not None else "",
            power_state=str(p.get("runtime.powerState") or ""),
        )
        marked.append(
            (info, {"runtime.powerState": p.get("runtime.powerState"), "runtime.host": host})
        )
    return sorted(marked, key=lambda m: m[0].name)
