"""The orphan audit: what kubegate left behind on a gateway's vCenters and IP pools.

An audit (workflows/audit.py, one AuditWorkflow per `kubegate audit` and gateway, started by
the gateway so that its agent works for it) lists, from facts it can verify:

- `vm`: a VM carrying kubegate's marks (extraConfig `kubegate.cluster`, repeated in its
  annotation) whose owner lifecycle is not running;
- `vm` too: a VM without that mark carrying the owner tag (`cluster:<name>`,
  `gateway-nodes:<gateway>`, category `kubegate`) of an owner that is not running, and of no
  owner that is (a VM whose extraConfig names an owner is listed under that owner alone);
- `folder`: the folder such a VM sits in, when it is named after that owner (a cluster's
  folder is named after the cluster) and holds nothing else;
- `file`: a datastore directory with no registered VM whose .vmx carries kubegate's marks for
  an owner that is not running;
- `allocation`: addresses of an IP pool of the gateway held by a lifecycle that is gone
  (never existed, or ended Deleted): exactly those the pool's own release path gives back;
- `installer`: an installer VM (vApp property `kubegate.installer_name`) left powered on,
  whose gateway is gone or past provisioning (it powers its installer off itself);
- `tag`: an owner tag of category `kubegate` whose owner is not running (e.g. its deletion
  failed when the cluster was deleted). Shared tags (pool:, gateway:, the spec's, regions and
  zones) and categories are never listed.

Tags are read best effort: without the vAPI (unreachable, or a missing privilege) the audit
goes by the marks alone and says so (`warnings`).

Cleaning removes only listed items, each checked again when it is removed (still marked, or
for a VM found by its tag alone still unmarked and tagged, for the same owner; the owner still
not running; a tag only once no orphan VM it marks is left), never anything unmarked.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from domain.account import VCenterCredentials
from domain.lifecycle import Step
from domain.requests import SINCE_0_3, AgentRequest

#: vApp property (or, in the simulator, extraConfig key) naming an installer VM's gateway
INSTALLER_MARK = "kubegate.installer_name"

ItemKind = Literal["vm", "folder", "file", "allocation", "installer", "tag"]

#: the order items are listed and removed in (VMs before their folders, files and tags)
KIND_ORDER: dict[str, int] = {
    "vm": 0,
    "installer": 1,
    "file": 2,
    "folder": 3,
    "tag": 4,
    "allocation": 5,
}

_AUDIT_ID = re.compile(r"^audit/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[0-9a-z-]{1,64}$")


def audit_workflow_id(gateway: str, stamp: str) -> str:
    """`audit/<gateway>/<stamp>` (the stamp: the time the audit was asked for, and a nonce)."""
    return f"audit/{gateway}/{stamp}"


def is_audit_id(workflow_id: str, gateway: str) -> bool:
    return bool(_AUDIT_ID.match(workflow_id)) and workflow_id.split("/")[1] == gateway


class AuditStatus(StrEnum):
    LISTING = "Listing"
    LISTED = "Listed"
    CLEANING = "Cleaning"
    CLEANED = "Cleaned"
    CLOSED = "Closed"
    FAILED = "Failed"


class AuditItem(BaseModel):
    """One leftover, as listed; `id` is what a clean names."""

    kind: ItemKind
    id: str = Field(description="Stable key: the vSphere ref, '[ds] dir', 'pool:owner'.")
    name: str = Field(description="VM, folder or directory name; the pool for allocations.")
    owner: str = Field(
        default="", description="The lifecycle its marks name ('cluster/x', 'gateway/g')."
    )
    account: str = Field(default="", description="The cloud account it was found with.")
    path: str = Field(default="", description="Inventory or datastore path.")
    detail: str = Field(default="", description="Power state, files, addresses.")
    reason: str = Field(default="", description="Why it is a leftover.")
    slots: list[str] = Field(default_factory=list, description="Allocations: the slots held.")
    parent: str = Field(default="", description="VMs: the folder they are in ('Folder:…').")
    tag: str = Field(
        default="",
        json_schema_extra=SINCE_0_3,
        description="A VM found by its owner tag alone (no extraConfig mark): that tag's id.",
    )


# -- the agent's inventory ----------------------------------------------------------------------


class InventoryRequest(AgentRequest):
    """Read (nothing changed) every kubegate-marked VM, installer VM and VM directory of a
    datacenter's datastores."""

    credentials: VCenterCredentials
    account: str
    datacenter: str = Field(description="Datacenter name.")
    files: bool = Field(default=True, description="Also browse the datastores.")


class MarkedVm(BaseModel):
    """A VM carrying a kubegate mark."""

    ref: str
    name: str
    owner: str = Field(default="", description="Its kubegate.cluster mark.")
    node: str = ""
    installer: str = Field(default="", description="Its kubegate.installer_name, if any.")
    power_state: str = ""
    folder: str = Field(default="", description="Its parent folder's ref.")
    folder_name: str = ""
    folder_path: str = ""
    folder_children: int = 0
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="owner -> id of the owner tag (category kubegate) the VM carries.",
    )


class OwnerTag(BaseModel):
    """An owner tag of category `kubegate` ('cluster:demo', 'gateway-nodes:lab')."""

    id: str
    name: str
    owner: str = Field(description="The lifecycle it names ('cluster/demo').")
    objects: list[str] = Field(default_factory=list, description="'Type:id' it is on.")


class VmDirectory(BaseModel):
    """A top-level datastore directory no registered VM uses, whose .vmx is kubegate's."""

    datastore: str = Field(description="'Datastore:…'.")
    path: str = Field(description="'[LocalDS_0] demo-cp-0'.")
    owner: str = Field(description="The kubegate.cluster mark its .vmx carries.")
    files: list[str] = Field(default_factory=list)


class InventoryResult(BaseModel):
    vms: list[MarkedVm] = Field(default_factory=list)
    directories: list[VmDirectory] = Field(default_factory=list)
    tags: list[OwnerTag] = Field(default_factory=list, description="The vCenter's owner tags.")
    tags_read: bool = Field(default=False, description="Whether the tags could be read.")
    tags_problem: str = Field(default="", description="Why they could not be.")
    vcenter_requests: int = 0


class RemovalRequest(AgentRequest):
    """Remove these listed items, each checked again first; not found = done."""

    credentials: VCenterCredentials
    account: str
    datacenter: str
    items: list[AuditItem]


class RemovalResult(BaseModel):
    removed: list[str] = Field(default_factory=list, description="Ids removed now.")
    gone: list[str] = Field(default_factory=list, description="Ids not found (done already).")
    kept: dict[str, str] = Field(
        default_factory=dict, description="Ids left alone, with why (no longer a leftover)."
    )
    vcenter_requests: int = 0


# -- the workflow -------------------------------------------------------------------------------


class AuditAccount(BaseModel):
    """A cloud account of the gateway, and the datacenter to audit with it."""

    name: str
    credentials: VCenterCredentials
    datacenter: str


class AuditInput(BaseModel):
    gateway: str
    gateway_status: str = Field(description="The gateway's status when the audit began.")
    accounts: list[AuditAccount] = Field(default_factory=list)
    agent_signing_key: str | None = None
    heartbeat_seconds: int = 15
    #: how long a listing waits for a clean (then the audit ends without one)
    wait_minutes: int = 60


#: an audit ends within this (its execution timeout): a gateway forgets older records
AUDIT_LIFETIME_HOURS = 3


class AuditRecord(BaseModel):
    """An audit a gateway started, authorized for its agent until it ends."""

    workflow_id: str
    started_at: datetime


class AuditStart(BaseModel):
    """Ask a gateway for an audit (its `start_audit` Update)."""

    workflow_id: str


class CleanRequest(BaseModel):
    """Remove exactly these listed items (their ids)."""

    items: list[str] = Field(min_length=1)


class AuditState(BaseModel):
    """Everything the audit knows; its `state` query."""

    gateway: str
    workflow_id: str = ""
    status: AuditStatus = AuditStatus.LISTING
    items: list[AuditItem] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    kept: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    #: what the audit could not look at (e.g. tags unreadable): it went on without
    warnings: list[str] = Field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def item(self, item_id: str) -> AuditItem | None:
        return next((i for i in self.items if i.id == item_id), None)


class CleanResult(BaseModel):
    removed: list[str] = Field(default_factory=list)
    kept: dict[str, str] = Field(default_factory=dict)


class AuditOwners(BaseModel):
    """Lifecycles whose fate an audit asks Temporal for."""

    owners: list[str]


class OwnerFacts(BaseModel):
    """owner -> whether a lifecycle of that id is running now; and, of those not running,
    which are gone for good (never existed, or ended Deleted)."""

    running: list[str] = Field(default_factory=list)
    gone: list[str] = Field(default_factory=list)
    ended: dict[str, str] = Field(default_factory=dict, description="owner -> its status")


class PoolLeftovers(BaseModel):
    """Ask for the allocations of a gateway's pools held by lifecycles that are gone."""

    gateway: str


class ReleaseLeftover(BaseModel):
    gateway: str
    pool: str
    owner: str


def item_sort_key(item: AuditItem) -> tuple[int, str, str]:
    return (KIND_ORDER.get(item.kind, 9), item.name, item.id)


def vm_owner(vm: MarkedVm, running: set[str]) -> tuple[str, str]:
    """(owner, tag id) a VM is judged by: its extraConfig mark when it has one, whatever its
    tags say (tag id ''); else the owner its owner tag names, a running one first (so a VM
    tagged for a live owner is never listed). ('', '') when it has neither."""
    if vm.owner or not vm.tags:
        return vm.owner, ""
    owner = sorted(vm.tags, key=lambda o: (o not in running, o))[0]
    return owner, vm.tags[owner]
