"""What a reconcile reads of a cluster in vCenter (`vm_inspect`): read only, so always safe to
retry.

Cost on vCenter: one property read of the cluster's folder and the VMs in it (name, instance
UUID, power and connection state, VMware Tools' status and heartbeat, guest address,
annotation); only when a node's VM
is not in the folder, one `FindByUuid` for it (it may have been moved) and one read of what
it finds. A cluster whose VMs are all in place costs one request.
"""

from __future__ import annotations

from typing import Any

from pyVmomi import vim, vmodl
from temporalio import activity

from activities.vsphere.calls import call_vcenter
from activities.vsphere.inventory import from_ref, ref, retrieve, retrieve_spec
from activities.vsphere.session import SessionPool, VSphereSession, request_meter
from domain.health import InspectRequest, InspectResult, VmSeen
from domain.sealing import AgentKey
from domain.vm import MARK_CLUSTER

PC = vmodl.query.PropertyCollector

#: what a reconcile reads of each VM
_PATHS = [
    "name",
    "config.instanceUuid",
    "config.annotation",
    "runtime.powerState",
    "runtime.connectionState",
    "guest.toolsRunningStatus",
    "guest.guestHeartbeatStatus",
    "guest.ipAddress",
]


class DriftActivities:
    """The reconcile's read of one gateway agent (its key opens sealed passwords)."""

    def __init__(self, key: AgentKey, sessions: SessionPool) -> None:
        self.key = key
        self.sessions = sessions

    @activity.defn(name="vm_inspect")
    def inspect(self, request: InspectRequest) -> InspectResult:
        """Every node's VM (found by instance UUID in the folder, else anywhere) and every
        other VM in the cluster's folder."""
        with request_meter() as meter:
            result = call_vcenter(
                self.key,
                self.sessions,
                request.credentials,
                f"inspect the VMs of {request.owner}",
                lambda session: _inspect(session, request),
            )
        result.vcenter_requests = meter[0]
        return result


def _inspect(session: VSphereSession, request: InspectRequest) -> InspectResult:
    folder = from_ref(session, request.folder)
    spec = PC.FilterSpec(
        objectSet=[
            PC.ObjectSpec(
                obj=folder,
                skip=True,
                selectSet=[
                    PC.TraversalSpec(
                        name="children", type=vim.Folder, path="childEntity", skip=False
                    )
                ],
            )
        ],
        propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=_PATHS)],
    )
    result = InspectResult()
    try:
        in_folder = retrieve_spec(session, spec)
    except vmodl.fault.ManagedObjectNotFound:
        result.folder_found = False
        in_folder = {}
    by_uuid = {str(p.get("config.instanceUuid") or ""): (key, p) for key, p in in_folder.items()}
    claimed: set[str] = set()
    for node in request.nodes:
        found = by_uuid.get(node.instance_uuid)
        if found is not None:
            key, props = found
            claimed.add(key)
            result.nodes[node.name] = _seen(key, props, in_folder=True)
            continue
        vm = session.content.searchIndex.FindByUuid(None, node.instance_uuid, True, True)
        if vm is None:
            continue  # no VM of this node anywhere: gone
        props = retrieve(session, [vm], _PATHS).get(ref(vm), {})
        result.nodes[node.name] = _seen(ref(vm), props, in_folder=False)
    result.foreign = [
        _seen(key, props, in_folder=True)
        for key, props in sorted(in_folder.items())
        if key not in claimed
    ]
    return result


def _seen(key: str, props: dict[str, Any], in_folder: bool) -> VmSeen:
    return VmSeen(
        ref=key,
        name=str(props.get("name") or ""),
        instance_uuid=str(props.get("config.instanceUuid") or ""),
        power_state=str(props.get("runtime.powerState") or ""),
        connection=str(props.get("runtime.connectionState") or ""),
        tools=str(props.get("guest.toolsRunningStatus") or ""),
        heartbeat=str(props.get("guest.guestHeartbeatStatus") or ""),
        address=str(props.get("guest.ipAddress") or "") or None,
        in_folder=in_folder,
        owner=_owner(str(props.get("config.annotation") or "")),
    )


def _owner(annotation: str) -> str:
    """The cluster id of a kubegate annotation's mark ('' when unmarked)."""
    for line in annotation.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == MARK_CLUSTER:
            return value.strip()
    return ""
