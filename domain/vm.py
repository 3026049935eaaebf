"""Requests and results of the VM activities (run on the gateway agent).

Pure models: the cluster workflow builds the requests; activities/vsphere/vm.py acts on them.
Managed objects travel as 'Type:id' strings (activities.vsphere.inventory.ref / from_ref).
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, Field

from domain.account import SealedSecret, VCenterCredentials
from domain.bootstrap import NodeBootstrap, NodeNetwork
from domain.requests import SINCE_0_3, AgentRequest

#: Namespace of the deterministic instance UUIDs of nodes.
NODE_UUID_NAMESPACE = uuid.UUID("5b0d7c1e-3f38-4b8e-9a43-7c1b2e6f0d11")

#: extraConfig keys that mark a VM as owned by a cluster (read back by the sweep).
MARK_CLUSTER = "kubegate.cluster"
MARK_POOL = "kubegate.pool"
MARK_NODE = "kubegate.node"


def instance_uuid(cluster_id: str, node: str, generation: int = 0) -> str:
    """The instance UUID a node's VM gets: the same on every attempt, unique per cluster."""
    return str(uuid.uuid5(NODE_UUID_NAMESPACE, f"{cluster_id}/{node}/{generation}"))


class OwnerMark(AgentRequest):
    """Who owns a VM; written into the VM (extraConfig keys + annotation) at clone time."""

    cluster_id: str = Field(description="Workflow id of the cluster, e.g. 'cluster/demo'.")
    pool: str = Field(description="Node pool ('cp' for the control plane).")
    node: str = Field(description="Node name (= VM name).")


class FolderRequest(AgentRequest):
    credentials: VCenterCredentials
    datacenter: str = Field(description="Datacenter name or path, e.g. 'DC0'.")
    parent: str = Field(default="", description="Parent folder below the datacenter's VM folder.")
    name: str = Field(description="The cluster's own folder name.")


class FolderResult(BaseModel):
    ref: str = Field(description="'Folder:group-v…' of the cluster folder.")
    path: str = Field(description="Inventory path, e.g. '/DC0/vm/demo'.")
    created: bool = False
    vcenter_requests: int = 0


class PlacementRequest(AgentRequest):
    """Resolve a template and placement domains to managed object refs (one round of finds)."""

    credentials: VCenterCredentials
    datacenter: str
    template: str = Field(description="Template path below the datacenter's VM folder.")
    #: (compute_cluster, resource_pool, datastore, network) names per domain, as in the spec
    domains: list[tuple[str, str, str, str]]


class DomainRefs(BaseModel):
    compute_cluster: str
    resource_pool: str
    datastore: str
    network: str


class PlacementRefs(BaseModel):
    template: str
    domains: list[DomainRefs]
    vcenter_requests: int = 0


class ResolvedPlacement(BaseModel):
    """A node set's placement as vCenter objects, resolved once (by the preflight, or by
    vm_resolve_placement when the domains change) for every VM the set creates."""

    #: the distinct domains, by the names of their objects, in the order of `refs.domains`
    domains: list[tuple[str, str, str, str]]
    refs: PlacementRefs

    def covers(self, domains: list[tuple[str, str, str, str]]) -> bool:
        """Whether it was resolved for exactly these domains."""
        return self.domains == domains

    def of(self, domain: tuple[str, str, str, str]) -> DomainRefs:
        """The refs of a domain (by its names)."""
        return self.refs.domains[self.domains.index(domain)]


class CreateVmRequest(AgentRequest):
    """Everything needed to create one node's VM, idempotently."""

    credentials: VCenterCredentials
    name: str = Field(description="VM name = node name = hostname.")
    instance_uuid: str = Field(description="Deterministic; find-before-create uses it.")
    owner: OwnerMark
    template: str = Field(description="Template ref.")
    folder: str = Field(description="Cluster folder ref.")
    domain: DomainRefs
    cpu: int
    memory_mb: int
    disk_gb: int
    network: NodeNetwork
    #: cloud-init inputs (no secrets); the activity renders guestinfo.* from them and the
    #: cluster secrets, which are sealed to the agent's key and opened only on the agent.
    bootstrap: NodeBootstrap | None = None
    secrets: SealedSecret | None = None
    power_on: bool = True
    #: after power-on, wait until VMware Tools report the node's hostname and address
    #: (network.address, or any address with DHCP); VmInfo then carries them
    wait_guest: bool = False
    guest_timeout_seconds: int = 1800
    host_slot: int | None = Field(
        default=None,
        ge=0,
        le=64,
        json_schema_extra=SINCE_0_3,
        description="With DRS off in its compute cluster: the VM goes on the cluster's "
        "host_slot-th usable host (connected, not in maintenance, seeing the datastore; by "
        "name, modulo their number), so a control plane's members land on distinct hosts. "
        "Ignored where DRS places VMs (the anti-affinity rule keeps them apart there).",
    )


class VmInfo(BaseModel):
    """A node's VM as vCenter reports it."""

    ref: str
    name: str
    instance_uuid: str
    host: str = ""
    power_state: str = ""
    address: str | None = None
    hostname: str | None = None
    vcenter_requests: int = 0
    attempt: int = Field(default=1, description="The activity attempt that returned this.")
    bootstrap_digest: str | None = Field(
        default=None,
        description="digest() of the cloud-init data rendered for this VM (None: not rendered "
        "by this call, e.g. the VM existed).",
    )


class GuestsRequest(AgentRequest):
    """VMs and what their guests must report: (vm ref, hostname, address or None for DHCP)."""

    credentials: VCenterCredentials
    nodes: list[tuple[str, str, str | None]]
    timeout_seconds: int = 1800


class ReadinessRequest(GuestsRequest):
    """Wait until every listed VM reports its expected address (None: any) and hostname."""

    mode: Literal["guest", "kubernetes"] = "guest"
    vip: str | None = None
    secrets: SealedSecret | None = Field(
        default=None,
        json_schema_extra=SINCE_0_3,
        description="The cluster's secrets, sealed to the agent. With them, mode kubernetes "
        "verifies the API server against the cluster's CA and waits until every listed node "
        "is Ready; without, it waits for /readyz alone, unverified.",
    )
    kubernetes_version: str = Field(
        default="",
        json_schema_extra=SINCE_0_3,
        description="Picks the admin group of the agent's credential (admin_groups).",
    )


class ReadinessResult(BaseModel):
    nodes: list[VmInfo]
    vcenter_requests: int = 0


class PowerOnRequest(GuestsRequest):
    """Power on VMs (already on = done) and, with wait_guest, wait for their guests."""

    wait_guest: bool = True


class DestroyVmRequest(AgentRequest):
    """Remove one node's VM (and its disks); not found = done."""

    credentials: VCenterCredentials
    name: str
    instance_uuid: str
    folder: str | None = None
    #: vCenter tasks that may still be creating it (from heartbeats); cancelled and awaited first
    tasks: list[str] = Field(default_factory=list)


class DestroyResult(BaseModel):
    destroyed: list[str] = Field(default_factory=list, description="Refs of VMs destroyed.")
    vcenter_requests: int = 0


class SweepRequest(AgentRequest):
    """Find (and destroy, unless dry_run) every VM carrying the cluster's ownership mark."""

    credentials: VCenterCredentials
    datacenter: str
    cluster_id: str
    dry_run: bool = False
    tag_id: str = Field(
        default="",
        json_schema_extra=SINCE_0_3,
        description="The id of the cluster's vSphere tag: VMs carrying it are the cluster's "
        "too, whatever their extraConfig says ('': by the extraConfig marks alone).",
    )


class SweepResult(BaseModel):
    """The VMs found carrying a cluster's mark, and those destroyed."""

    vms: list[VmInfo] = Field(default_factory=list)
    destroyed: list[str] = Field(default_factory=list)
    vcenter_requests: int = 0


class InstallerVmRequest(AgentRequest):
    """Power off or destroy a gateway's installer VM (by inventory path or ref)."""

    credentials: VCenterCredentials
    vm: str = Field(description="Inventory path ('/DC0/vm/…') or ref ('VirtualMachine:vm-…').")
    action: Literal["power_off", "destroy"]
    installer_name: str = Field(
        description="The gateway; a VM whose kubegate.installer_name differs is left alone."
    )


class InstallerVmResult(BaseModel):
    found: bool
    ref: str | None = None
    note: str = ""
    power_state: str = ""
    vcenter_requests: int = 0


class KeepApartRequest(AgentRequest):
    """Keep these VMs of one compute cluster on distinct hosts: a DRS VM-VM anti-affinity
    rule named `rule` with exactly them (fewer than two: the rule is removed)."""

    credentials: VCenterCredentials
    compute_cluster: str = Field(description="'ClusterComputeResource:domain-c…'.")
    rule: str = Field(min_length=1, max_length=80, description="The rule's name.")
    vms: list[str] = Field(default_factory=list, description="'VirtualMachine:vm-…' refs.")


class KeepApartResult(BaseModel):
    """The rule as vCenter now has it, and whether DRS enforces it."""

    rule: str
    vms: list[str] = Field(default_factory=list, description="The VMs in it (none: removed).")
    drs: bool = Field(description="DRS is on in the cluster (off: the rule is not enforced).")
    changed: bool = False
    vcenter_requests: int = 0
