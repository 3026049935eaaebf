"""Inventory reads: lookups by inventory path and batched property-collector reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

from pyVmomi import VmomiSupport, vim, vmodl

from activities.vsphere.session import VSphereSession


def ref(obj: Any) -> str:
    """A managed object as 'Type:id' (e.g. 'ClusterComputeResource:domain-c7')."""
    return f"{obj._wsdlName}:{obj._moId}"


def from_ref(session: VSphereSession, value: str) -> Any:
    """The managed object a 'Type:id' string names, bound to the session."""
    type_name, _, moid = value.partition(":")
    return VmomiSupport.GetWsdlType("urn:vim25", type_name)(moid, session.stub)


def find_by_path(session: VSphereSession, path: str) -> Any | None:
    """One request: the object at an inventory path like '/DC0/host/DC0_C0', or None."""
    return session.content.searchIndex.FindByInventoryPath(path)


def retrieve(
    session: VSphereSession, objects: Iterable[Any], paths: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Read the same property paths of many objects of one type in one round trip.

    Returns {ref: {path: value}}; unset properties are absent.
    """
    objects = list(objects)
    if not objects:
        return {}
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=o, skip=False) for o in objects],
        propSet=[
            vmodl.query.PropertyCollector.PropertySpec(type=type(objects[0]), pathSet=list(paths))
        ],
    )
    return retrieve_spec(session, spec)


def retrieve_mixed(
    session: VSphereSession, requests: Sequence[tuple[Any, Sequence[str]]]
) -> dict[str, dict[str, Any]]:
    """Read different properties of objects of different types in one round trip."""
    by_type: dict[type, set[str]] = {}
    for obj, paths in requests:
        by_type.setdefault(type(obj), set()).update(paths)
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[
            vmodl.query.PropertyCollector.ObjectSpec(obj=o, skip=False) for o, _ in requests
        ],
        propSet=[
            vmodl.query.PropertyCollector.PropertySpec(type=t, pathSet=sorted(p))
            for t, p in by_type.items()
        ],
    )
    return retrieve_spec(session, spec)


def retrieve_spec(
    session: VSphereSession, spec: vmodl.query.PropertyCollector.FilterSpec
) -> dict[str, dict[str, Any]]:
    collector = session.content.propertyCollector
    result = collector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
    found: dict[str, dict[str, Any]] = {}
    while result is not None:
        for item in result.objects or []:
            found[ref(item.obj)] = {p.name: p.val for p in item.propSet or []}
        if not result.token:
            break
        result = collector.ContinueRetrievePropertiesEx(result.token)
    return found


def retrieve_all_vms(
    session: VSphereSession, container: Any, paths: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Every VM below a container (a datacenter, a folder) with these property paths: a
    container view and one paged read; the view destroyed after."""
    pc = vmodl.query.PropertyCollector
    view = session.content.viewManager.CreateContainerView(container, [vim.VirtualMachine], True)
    try:
        spec = pc.FilterSpec(
            objectSet=[
                pc.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        pc.TraversalSpec(
                            name="view", type=vim.view.ContainerView, path="view", skip=False
                        )
                    ],
                )
            ],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=list(paths))],
        )
        return retrieve_spec(session, spec)
    finally:
        with contextlib.suppress(Exception):  # best effort
            view.DestroyView()


def inventory_paths(session: VSphereSession, datacenter: Any, dc: str) -> dict[str, Any]:
    """Inventory path -> object for every folder, cluster, pool, datastore and network of the
    datacenter (not VMs, not hosts): one RetrievePropertiesEx with a traversal."""
    PC = vmodl.query.PropertyCollector

    def ts(name: str, kind: type, path: str, *nxt: str) -> Any:
        return PC.TraversalSpec(
            name=name,
            type=kind,
            path=path,
            skip=False,
            selectSet=[PC.SelectionSpec(name=n) for n in nxt],
        )

    select = [
        ts("dcHost", vim.Datacenter, "hostFolder", "folder"),
        ts("dcDatastore", vim.Datacenter, "datastoreFolder", "folder"),
        ts("dcNetwork", vim.Datacenter, "networkFolder", "folder"),
        ts("folder", vim.Folder, "childEntity", "folder", "clusterPool"),
        ts("clusterPool", vim.ClusterComputeResource, "resourcePool", "pool"),
        ts("pool", vim.ResourcePool, "resourcePool", "pool"),
    ]
    kinds = [
        vim.Folder,
        vim.ClusterComputeResource,
        vim.ResourcePool,
        vim.Datastore,
        vim.Network,
        vim.dvs.DistributedVirtualPortgroup,
    ]
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=datacenter, skip=True, selectSet=select)],
        propSet=[PC.PropertySpec(type=k, pathSet=["name", "parent"]) for k in kinds],
    )
    found = retrieve_spec(session, spec)
    objects = {key: from_ref(session, key) for key in found}
    dc_ref = ref(datacenter)
    paths: dict[str, Any] = {}

    def path_of(key: str, depth: int = 0) -> str | None:
        props = found.get(key)
        if props is None or depth > 64:
            return None
        parent = props.get("parent")
        name = str(props.get("name", "")).replace("/", "%2f")
        if parent is None:
            return None
        if ref(parent) == dc_ref:
            return f"/{dc}/{name}"
        above = path_of(ref(parent), depth + 1)
        return None if above is None else f"{above}/{name}"

    for key in found:
        path = path_of(key)
        if path is not None:
            paths[path] = objects[key]
    return paths
