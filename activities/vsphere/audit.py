"""The orphan audit's agent activities: an inventory (read-only) and a removal of listed items.

`audit_inventory` reads, with the property collector (paged), every VM of a datacenter that
carries a kubegate mark (extraConfig `kubegate.cluster`, found through the annotation that
repeats it, or an owner tag of category `kubegate`) and every powered-on installer VM
(`kubegate.installer_name`), and browses the datacenter's datastores for VM directories that
no registered VM uses and whose .vmx carries a kubegate mark. The owner tags themselves are
read over the vAPI first (best effort: unreadable tags are reported in the result, and the
inventory goes by the extraConfig marks). It decides nothing: the audit workflow decides,
from Temporal's facts, which owners are gone.

`audit_remove` removes listed items, each read again first: a VM only while it still carries
the mark of the owner it was listed for (one listed by its tag alone: still unmarked and still
carrying that owner tag), an installer only while it names the same gateway, a directory only
while no VM uses it and its .vmx still names the owner, a folder only while it is empty, a tag
only while it is still that owner's tag of category `kubegate` and no VM that is unmarked or
marked for the same owner still carries it (deleting it would hide that VM). Not found =
done. (The agent's guard refuses beforehand any item whose owner the gateway says is live:
activities/guard.py.)
"""

from __future__ import annotations

import contextlib
import http.client
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from pyVmomi import vim, vmodl
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.vsphere.calls import run_blocking
from activities.vsphere.inventory import (
    find_by_path,
    from_ref,
    ref,
    retrieve,
    retrieve_all_vms,
)
from activities.vsphere.ovf import vapp_properties
from activities.vsphere.rest import RestSession
from activities.vsphere.session import (
    PinnedHTTPSConnection,
    VSphereSession,
    request_meter,
    ssl_context,
)
from activities.vsphere.tags import (
    attached_objects,
    call_rest,
    delete_tag,
    owner_tag_problem,
    owner_tags,
)
from activities.vsphere.vm import VmActivities, _extra, _Progress, kubegate_made
from activities.vsphere.watch import await_task
from domain import errors
from domain.account import VCenterCredentials
from domain.audit import (
    INSTALLER_MARK,
    AuditItem,
    InventoryRequest,
    InventoryResult,
    MarkedVm,
    OwnerTag,
    RemovalRequest,
    RemovalResult,
    VmDirectory,
    item_sort_key,
)
from domain.tags import owner_tag, tag_owner
from domain.trust import AgentPolicy
from domain.vm import MARK_CLUSTER, MARK_NODE

PC = vmodl.query.PropertyCollector
T = TypeVar("T")
ON = vim.VirtualMachine.PowerState.poweredOn

#: the largest .vmx read (a real one is a few kilobytes)
_VMX_LIMIT = 1 << 20
_VMX_MARK = re.compile(r'^\s*kubegate\.cluster\s*=\s*"([^"]*)"\s*$', re.MULTILINE)
#: what the annotation of a kubegate VM holds (domain/vm.py marks, activities/vsphere/vm.py)
_ANNOTATION_MARK = f"{MARK_CLUSTER}="


_Handler = Callable[[VSphereSession, AuditItem, RemovalRequest, _Progress], str]


class AuditActivities:
    """The audit's activities on the gateway agent; they share the VM activities' sessions,
    per-host limits and task waits."""

    def __init__(self, vms: VmActivities) -> None:
        self.vms = vms

    # --- inventory ----------------------------------------------------------------------

    @activity.defn(name="audit_inventory")
    def inventory(self, request: InventoryRequest) -> InventoryResult:
        """Every kubegate-marked VM and installer VM of the datacenter, and the VM directories
        on its datastores no VM uses whose .vmx is kubegate's. Changes nothing."""

        tags: list[OwnerTag] = []
        problem = ""

        def run(session: VSphereSession) -> InventoryResult:
            dc = request.datacenter.strip("/")
            datacenter = find_by_path(session, f"/{dc}")
            if not isinstance(datacenter, vim.Datacenter):
                return InventoryResult()
            everything = _all_vms(session, datacenter)
            activity.heartbeat("vms read")
            tagged: dict[str, dict[str, str]] = {}
            for tag in tags:
                for obj in tag.objects:
                    tagged.setdefault(obj, {})[tag.owner] = tag.id
            vms = _marked(session, everything, tagged)
            _describe_folders(session, vms, dc)
            activity.heartbeat("marks read")
            directories: list[VmDirectory] = []
            if request.files:
                used = _used_directories(everything)
                directories = _stray_directories(session, datacenter, dc, used)
            return InventoryResult(
                vms=sorted(vms, key=lambda v: (v.name, v.ref)), directories=directories
            )

        with request_meter() as meter:
            try:
                tags = self._rest(request.credentials, "read kubegate's tags", owner_tags)
            except ApplicationError as exc:
                problem = exc.message
                with contextlib.suppress(Exception):
                    activity.logger.warning("audit without tags: %s", exc.message)
            activity.heartbeat("tags read")
            result = self.vms._call(
                request.credentials, f"audit of datacenter {request.datacenter}", run
            )
        result.tags, result.tags_read, result.tags_problem = tags, not problem, problem
        result.vcenter_requests = meter[0]
        return result

    def _rest(
        self,
        credentials: VCenterCredentials,
        context: str,
        call: Callable[[RestSession, dict[str, str]], T],
    ) -> T:
        return call_rest(self.vms.key, self.vms.sessions, credentials, context, call)

    # --- removal ------------------------------------------------------------------------

    @activity.defn(name="audit_remove")
    def remove(self, request: RemovalRequest) -> RemovalResult:
        """Remove the listed items, each checked again first; not found = done."""
        result = RemovalResult()
        progress = _Progress(stage="audit-remove")

        def run(session: VSphereSession) -> None:
            for item in sorted(request.items, key=item_sort_key):
                progress.beat()
                if item.id in result.removed or item.id in result.gone:
                    continue  # (a retry of this activity: done already)
                handler = self._handlers()[item.kind]
                try:
                    outcome = handler(session, item, request, progress)
                except ApplicationError as exc:
                    if exc.type != errors.MISSING_PRIVILEGE:
                        raise
                    outcome = f"{exc.message}: left alone"
                if outcome == "removed":
                    result.removed.append(item.id)
                elif outcome == "gone":
                    result.gone.append(item.id)
                else:
                    result.kept[item.id] = outcome

        with request_meter() as meter, activity.shield_thread_cancel_exception():
            self.vms._call(request.credentials, "audit clean", run)
        result.vcenter_requests = meter[0]
        return result

    def _handlers(self) -> dict[str, _Handler]:
        return {
            "vm": self._remove_vm,
            "installer": self._power_off_installer,
            "file": self._remove_directory,
            "folder": self._remove_folder,
            "tag": self._remove_tag,
        }

    def _remove_vm(
        self, session: VSphereSession, item: AuditItem, request: RemovalRequest, progress: _Progress
    ) -> str:
        vm = from_ref(session, item.id)
        try:
            props = retrieve(
                session,
                [vm],
                [
                    "name",
                    "config.instanceUuid",
                    "config.extraConfig",
                    "runtime.powerState",
                    "runtime.host",
                ],
            ).get(item.id)
        except vmodl.fault.ManagedObjectNotFound:
            return "gone"
        if not props:
            return "gone"
        mark = _extra(props.get("config.extraConfig")).get(MARK_CLUSTER, "")
        if not item.owner or ((mark or not item.tag) and mark != item.owner):
            return f"its mark is now {mark!r}, not {item.owner!r}: left alone"
        if not mark:  # listed by its owner tag alone: that tag must still be on it
            if not kubegate_made(item.owner, props):
                # (anyone who may tag could have put the tag on it: only the instance UUID
                # kubegate gives that node proves kubegate made it)
                return "unmarked, and not of the instance UUID kubegate gives it: left alone"
            why = self._tag_problem(request.credentials, item.tag, item.owner, {item.id})
            if why:
                return f"{why}: left alone"
        run_blocking(lambda: self.vms._destroy_vm(session, vm, props, progress))
        return "removed"

    def _tag_problem(
        self, credentials: VCenterCredentials, tag_id: str, owner: str, on: set[str]
    ) -> str | None:
        """Why tag_id is not owner's tag of category kubegate on all of `on` (None: it is)."""

        def check(rest: RestSession, known: dict[str, str]) -> str | None:
            why = owner_tag_problem(rest, known, tag_id, owner_tag(owner), owner)
            if why is None and on - set(attached_objects(rest, tag_id)):
                return f"it no longer carries the tag {owner_tag(owner)}"
            return why

        return self._rest(credentials, f"check tag {owner_tag(owner)}", check)

    def _remove_tag(
        self, session: VSphereSession, item: AuditItem, request: RemovalRequest, progress: _Progress
    ) -> str:
        """Delete an owner tag once nothing it is the only evidence of is left: a VM that
        carries it, exists, and is unmarked or marked for the same owner keeps it."""
        objects: list[str] = []

        def check(rest: RestSession, known: dict[str, str]) -> str | None:
            if tag_owner(item.name) != item.owner:
                return f"{item.name} is not {item.owner}'s tag"
            why = owner_tag_problem(rest, known, item.id, item.name, item.owner)
            objects.extend(attached_objects(rest, item.id))
            return why

        why = self._rest(request.credentials, f"check tag {item.name}", check)
        if why == "the tag is gone":
            return "gone"
        if why:
            return f"{why}: left alone"
        holding = _holding_vms(session, objects, item.owner)
        if holding:
            shown = ", ".join(holding[:3]) + (" ..." if len(holding) > 3 else "")
            return f"still on {len(holding)} VM(s) of {item.owner} ({shown}): left alone"
        deleted = self._rest(
            request.credentials,
            f"delete tag {item.name}",
            lambda rest, known: delete_tag(rest, known, item.id),
        )
        return "removed" if deleted else "gone"

    def _power_off_installer(
        self, session: VSphereSession, item: AuditItem, request: RemovalRequest, progress: _Progress
    ) -> str:
        vm = from_ref(session, item.id)
        try:
            props = retrieve(
                session, [vm], ["config.vAppConfig", "config.extraConfig", "runtime.powerState"]
            ).get(item.id)
        except vmodl.fault.ManagedObjectNotFound:
            return "gone"
        if not props:
            return "gone"
        named = vapp_properties(props.get("config.vAppConfig"), props.get("config.extraConfig"))
        gateway = item.owner.removeprefix("gateway/")
        if named.get(INSTALLER_MARK) != gateway:
            return f"it is no longer gateway {gateway}'s installer: left alone"
        if props.get("runtime.powerState") != ON:
            return "gone"  # off already
        with contextlib.suppress(vim.fault.InvalidPowerState):
            task = vm.PowerOffVM_Task()
            run_blocking(lambda: self.vms._await(session, task, progress))
        return "removed"

    def _remove_directory(
        self, session: VSphereSession, item: AuditItem, request: RemovalRequest, progress: _Progress
    ) -> str:
        dc = request.datacenter.strip("/")
        datacenter = find_by_path(session, f"/{dc}")
        if not isinstance(datacenter, vim.Datacenter):
            return "gone"
        datastore, directory = _split_path(item.path)
        if not datastore or not directory or "/" in directory:
            return f"{item.path}: not a top-level datastore directory: left alone"
        if (datastore, directory) in _used_directories(_all_vms(session, datacenter)):
            return f"{item.path}: a VM uses it now: left alone"
        owner = _vmx_owner(session, dc, datastore, directory)
        if owner is None:
            return "gone"
        if owner != item.owner:
            return f"{item.path}: its .vmx is now {owner or 'unmarked'}: left alone"
        manager = session.content.fileManager
        try:
            task = manager.DeleteDatastoreFile_Task(item.path, datacenter)
            run_blocking(lambda: self.vms._await(session, task, progress))
        except (vim.fault.FileNotFound, vim.fault.NotFound):
            return "gone"
        return "removed"

    def _remove_folder(
        self, session: VSphereSession, item: AuditItem, request: RemovalRequest, progress: _Progress
    ) -> str:
        folder = from_ref(session, item.id)
        try:
            props = retrieve(session, [folder], ["name", "childEntity"]).get(item.id)
        except vmodl.fault.ManagedObjectNotFound:
            return "gone"
        if not props:
            return "gone"
        if props.get("name") != item.name:
            return f"it is now named {props.get('name')!r}: left alone"
        if item.name != _folder_name(item.owner):
            return f"it is not the folder kubegate makes for {item.owner}: left alone"
        if list(props.get("childEntity") or []):
            return "it is not empty: left alone"
        # where it really is (read here, not the workflow's word) must be the policy's
        path = _inventory_path(session, folder)
        policy = self.vms.key.policy() if self.vms.key.policy is not None else None
        datacenter, _, below = path.strip("/").partition("/vm/")
        problem = None
        if isinstance(policy, AgentPolicy):
            problem = policy.datacenter_problem(datacenter) or policy.folder_problem(below)
        if problem or datacenter != request.datacenter.strip("/"):
            return f"{path}: {problem or 'not in the audited datacenter'}: left alone"
        try:
            task = folder.Destroy_Task()
            run_blocking(lambda: self.vms._await(session, task, progress))
        except vmodl.fault.ManagedObjectNotFound:
            return "gone"
        return "removed"

    def all(self) -> list[Callable[..., Any]]:
        return [self.inventory, self.remove]


def _folder_name(owner: str) -> str:
    """The name of the folder kubegate makes for an owner's VMs: a cluster's name, a gateway's
    '<name>-pcg'."""
    kind, _, name = owner.partition("/")
    return f"{name}-pcg" if kind == "gateway" else name


def _inventory_path(session: VSphereSession, obj: Any) -> str:
    """An object's inventory path, '/DC0/vm/kubegate/demo', read up its parents (one read
    per level)."""
    names: list[str] = []
    current = obj
    for _ in range(64):  # (a bound: vSphere nests folders far less deep)
        props = retrieve(session, [current], ["name", "parent"]).get(ref(current), {})
        parent = props.get("parent")
        if parent is None:
            break  # the root folder: not part of paths
        names.append(str(props.get("name") or ""))
        current = parent
    return "/" + "/".join(reversed(names))


# --- reading ---------------------------------------------------------------------------------

#: what the inventory reads of every VM (one paged read)
_VM_PATHS = ["name", "config.annotation", "config.files.vmPathName", "runtime.powerState", "parent"]


def _all_vms(session: VSphereSession, datacenter: Any) -> dict[str, dict[str, Any]]:
    """Every VM of the datacenter with _VM_PATHS (one paged read)."""
    return retrieve_all_vms(session, datacenter, _VM_PATHS)


def _marked(
    session: VSphereSession,
    everything: dict[str, dict[str, Any]],
    tagged: dict[str, dict[str, str]],
) -> list[MarkedVm]:
    """The VMs carrying kubegate's marks: those whose annotation repeats the mark (read back
    from extraConfig), those carrying an owner tag (`tagged`: ref -> owner -> tag id), and
    powered-on VMs naming an installer's gateway."""
    candidates = [
        key
        for key, props in everything.items()
        if _ANNOTATION_MARK in str(props.get("config.annotation") or "")
        or props.get("runtime.powerState") == ON
        or key in tagged
    ]
    if not candidates:
        return []
    details = retrieve(
        session,
        [from_ref(session, key) for key in candidates],
        ["config.extraConfig", "config.vAppConfig", "config.instanceUuid", "config.template"],
    )
    found = []
    for key in candidates:
        props, more = everything[key], details.get(key, {})
        if more.get("config.template"):
            continue  # a template (perhaps made from a node: it has its marks) is never listed
        marks = _extra(more.get("config.extraConfig"))
        installer = vapp_properties(
            more.get("config.vAppConfig"), more.get("config.extraConfig")
        ).get(INSTALLER_MARK, "")
        owner = marks.get(MARK_CLUSTER, "")
        made = {"name": props.get("name"), "config.instanceUuid": more.get("config.instanceUuid")}
        tags = {
            tag_owner: tag_id
            for tag_owner, tag_id in tagged.get(key, {}).items()
            # unmarked: only a VM of the instance UUID kubegate gives its node is one kubegate
            # made (anyone who may tag could have tagged any VM)
            if owner or kubegate_made(tag_owner, made)
        }
        if not owner and not installer and not tags:
            continue
        parent = props.get("parent")
        found.append(
            MarkedVm(
                ref=key,
                name=str(props.get("name") or ""),
                owner=owner,
                node=marks.get(MARK_NODE, ""),
                installer=installer,
                power_state=str(props.get("runtime.powerState") or ""),
                folder=ref(parent) if parent is not None else "",
                tags=tags,
            )
        )
    return found


def _holding_vms(session: VSphereSession, objects: list[str], owner: str) -> list[str]:
    """Of the objects carrying an owner tag, those it must stay on: anything but a VM, and
    every existing VM unmarked or marked for that owner (a VM marked for another owner only
    carries the tag by mistake)."""
    holding = []
    for obj in sorted(objects):
        if not obj.startswith("VirtualMachine:"):
            holding.append(obj)
            continue
        try:
            props = retrieve(session, [from_ref(session, obj)], ["config.extraConfig"]).get(obj)
        except vmodl.fault.ManagedObjectNotFound:
            continue
        if props is None:
            continue
        if _extra(props.get("config.extraConfig")).get(MARK_CLUSTER, "") in ("", owner):
            holding.append(obj)
    return holding


def _describe_folders(session: VSphereSession, vms: list[MarkedVm], dc: str) -> None:
    """Each marked VM's folder: its name, inventory path and number of children."""
    refs = sorted({v.folder for v in vms if v.folder.startswith("Folder:")})
    if not refs:
        return
    folders = retrieve(
        session, [from_ref(session, r) for r in refs], ["name", "parent", "childEntity"]
    )
    paths: dict[str, str] = {}
    for r in refs:
        names: list[str] = []
        current: str | None = r
        seen: dict[str, dict[str, Any]] = dict(folders)
        for _ in range(32):  # a folder is never this deep
            if current is None or not current.startswith("Folder:"):
                break
            if current not in seen:
                seen.update(retrieve(session, [from_ref(session, current)], ["name", "parent"]))
            props = seen.get(current, {})
            names.append(str(props.get("name") or ""))
            parent = props.get("parent")
            current = ref(parent) if parent is not None else None
        # names: folder, ..., 'vm' (the datacenter's VM folder)
        below = list(reversed(names))[1:]
        paths[r] = "/".join([f"/{dc}/vm", *below])
    for vm in vms:
        facts = folders.get(vm.folder)
        if facts is None:
            continue
        vm.folder_name = str(facts.get("name") or "")
        vm.folder_path = paths.get(vm.folder, "")
        vm.folder_children = len(list(facts.get("childEntity") or []))


def _split_path(path: str) -> tuple[str, str]:
    """'[LocalDS_0] demo-cp-0/demo-cp-0.vmx' -> ('LocalDS_0', 'demo-cp-0/demo-cp-0.vmx')."""
    match = re.match(r"^\[([^\]]+)\]\s*/?(.*)$", path)
    if not match:
        return "", ""
    return match.group(1), match.group(2).strip("/")


def _used_directories(everything: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    """(datastore name, top-level directory) of every registered VM's configuration file."""
    used = set()
    for props in everything.values():
        datastore, rest = _split_path(str(props.get("config.files.vmPathName") or ""))
        if datastore and rest:
            used.add((datastore, rest.split("/", 1)[0]))
    return used


def _stray_directories(
    session: VSphereSession, datacenter: Any, dc: str, used: set[tuple[str, str]]
) -> list[VmDirectory]:
    """Top-level directories with a .vmx that no VM uses and whose .vmx is kubegate's."""
    stores = list(
        retrieve(session, [datacenter], ["datastore"]).get(ref(datacenter), {}).get("datastore")
        or []
    )
    if not stores:
        return []
    facts = retrieve(session, stores, ["name", "browser", "summary.accessible"])
    found: list[VmDirectory] = []
    for store in stores:
        props = facts.get(ref(store), {})
        name = str(props.get("name") or "")
        browser = props.get("browser")
        if not name or browser is None or props.get("summary.accessible") is False:
            continue
        spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*.vmx"])
        task = browser.SearchDatastoreSubFolders_Task(f"[{name}]", spec)
        results = _await_plain(session, task) or []
        activity.heartbeat(f"browsed {name}")
        per_directory: dict[str, list[str]] = {}
        for result in results:
            _, folder = _split_path(str(result.folderPath or ""))
            for file in result.file or []:
                relative = "/".join(p for p in (folder, str(file.path)) if p)
                if "/" not in relative:
                    continue  # a file at the datastore's root is not a VM's directory
                top, rest = relative.split("/", 1)
                per_directory.setdefault(top, []).append(rest)
        for directory, files in sorted(per_directory.items()):
            if (name, directory) in used:
                continue
            owner = _vmx_owner(session, dc, name, directory, files)
            if owner:
                found.append(
                    VmDirectory(
                        datastore=ref(store),
                        path=f"[{name}] {directory}",
                        owner=owner,
                        files=sorted(files),
                    )
                )
    return found


def _await_plain(session: VSphereSession, task: Any) -> Any:
    """A short read task's result (a datastore search), heartbeating meanwhile."""
    return await_task(session, ref(task), lambda _progress: activity.heartbeat())


def _vmx_owner(
    session: VSphereSession,
    dc: str,
    datastore: str,
    directory: str,
    files: list[str] | None = None,
) -> str | None:
    """The kubegate.cluster mark in the directory's .vmx ('' unmarked, None: no .vmx)."""
    if files is None:
        spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*.vmx"])
        datacenter = find_by_path(session, f"/{dc}")
        stores = list(datacenter.datastore or []) if datacenter is not None else []
        store = next((s for s in stores if s.name == datastore), None)
        if store is None:
            return None
        try:
            result = _await_plain(
                session, store.browser.SearchDatastore_Task(f"[{datastore}] {directory}", spec)
            )
        except (vim.fault.FileNotFound, vim.fault.NotFound):
            return None
        files = [str(f.path) for f in (getattr(result, "file", None) or [])]
    vmx = sorted(f for f in files if f.endswith(".vmx") and "/" not in f)
    if not vmx:
        return None
    for name in vmx:
        text = _read_datastore_file(session, dc, datastore, f"{directory}/{name}")
        if text is None:
            continue
        match = _VMX_MARK.search(text)
        if match:
            return match.group(1)
    return ""


def _read_datastore_file(session: VSphereSession, dc: str, datastore: str, path: str) -> str | None:
    """A small datastore file's text, through vCenter's /folder service; None: not there."""
    endpoint = session.endpoint
    query = urllib.parse.urlencode({"dcPath": dc, "dsName": datastore})
    target = "/folder/" + urllib.parse.quote(path) + "?" + query
    conn: http.client.HTTPSConnection
    if endpoint.thumbprint:
        conn = PinnedHTTPSConnection(
            endpoint.server,
            endpoint.port,
            context=ssl_context(endpoint),
            timeout=30,
            pin=endpoint.thumbprint,
        )
    else:
        conn = http.client.HTTPSConnection(
            endpoint.server, endpoint.port, context=ssl_context(endpoint), timeout=30
        )
    try:
        conn.putrequest("GET", target)
        if session.stub.cookie:
            conn.putheader("Cookie", session.stub.cookie)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read(_VMX_LIMIT)
        if response.status == 404:
            return None
        if response.status != 200:
            raise OSError(f"reading [{datastore}] {path}: HTTP {response.status}")
        return body.decode("utf-8", errors="replace")
    finally:
        conn.close()
