"""Requests and results of `vm_events`: recent vCenter events and tasks of a gateway's objects.

Pure models: the gateway workflow builds the request; activities/vsphere/events.py answers it
and starters/logs.py writes the answer into the logs bundle.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, Field, field_validator

from domain.account import VCenterCredentials
from domain.requests import AgentRequest

#: 'Type:id', e.g. 'VirtualMachine:vm-42' (activities.vsphere.inventory.ref)
_REF = re.compile(r"^[A-Za-z]+:[A-Za-z0-9._-]+$")

#: vCenter returns at most this many events per query (and vcsim rejects a larger maxCount).
MAX_EVENTS_PER_QUERY = 1000


class EventsRequest(AgentRequest):
    """Recent events and tasks of some managed objects and of the VMs in a folder."""

    credentials: VCenterCredentials
    datacenter: str = Field(description="Datacenter name, e.g. 'DC0'.")
    objects: list[str] = Field(
        default_factory=list,
        description="Managed object refs, e.g. 'VirtualMachine:vm-42', 'Folder:group-v7'; "
        "a folder includes the VMs below it.",
    )
    folder: str | None = Field(
        default=None,
        description="Inventory path of a folder whose VMs are included as well: absolute "
        "('/DC0/vm/gw') or below the datacenter's VM folder ('gw').",
    )
    since: datetime | None = Field(default=None, description="Only what happened since (UTC).")
    limit: int = Field(
        default=500,
        ge=1,
        le=MAX_EVENTS_PER_QUERY,
        description="At most this many events and this many tasks, newest first.",
    )

    @field_validator("objects")
    @classmethod
    def _refs(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not _REF.match(v)]
        if bad:
            raise ValueError(f"not a managed object ref ('Type:id'): {', '.join(bad)}")
        return list(dict.fromkeys(value))

    def folder_path(self) -> str | None:
        """The folder's absolute inventory path."""
        if not self.folder:
            return None
        if self.folder.startswith("/"):
            return self.folder.rstrip("/")
        return f"/{self.datacenter.strip('/')}/vm/{self.folder.strip('/')}"


class EventRecord(BaseModel):
    """One vCenter event."""

    key: int = Field(default=0, description="vCenter's event key (unique per vCenter).")
    time: datetime
    type: str = Field(description="Event class, e.g. 'VmPoweredOnEvent' (eventTypeId for EventEx).")
    message: str = ""
    object: str = Field(default="", description="Ref of the most specific entity it names.")
    object_name: str = ""
    user: str = ""


class TaskRecord(BaseModel):
    """One vCenter task."""

    key: str = Field(default="", description="'Task:task-12'.")
    time: datetime = Field(description="When it started, or was queued if it has not started.")
    completed: datetime | None = None
    name: str = Field(description="descriptionId, e.g. 'VirtualMachine.clone'.")
    state: str = Field(description="queued, running, success or error.")
    object: str = Field(default="", description="Ref of the entity the task ran on.")
    object_name: str = ""
    result: str | None = Field(default=None, description="Ref the task returned, if any.")
    error: str | None = None


class EventsResult(BaseModel):
    events: list[EventRecord] = Field(default_factory=list, description="Newest first.")
    tasks: list[TaskRecord] = Field(default_factory=list, description="Newest first.")
    missing: list[str] = Field(
        default_factory=list, description="Objects asked for that no longer exist (skipped)."
    )
    vcenter_requests: int = 0
    attempt: int = 1
