"""vm_events against the shared simulator, run through temporalio's ActivityEnvironment: a
folder and its VMs made with pyvmomi behind kubegate's back, then their events and tasks."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from pyVim.task import WaitForTask
from pyVmomi import vim
from temporalio.testing import ActivityEnvironment

from activities.vsphere.events import EventActivities
from activities.vsphere.session import SessionPool
from domain.account import VCenterCredentials, VCenterEndpoint, password_binding
from domain.events import EventsRequest, EventsResult, TaskRecord
from domain.sealing import AgentKey, seal
from tests.support import ADMIN, TEMPLATE, Vcsim

pytestmark = pytest.mark.integration

#: folder lookup, one read of objects and VMs, one query per entity (folder, 1 VM), tasks
FOLDER_BUDGET = 1 + 1 + 2 + 1


@dataclass
class World:
    acts: EventActivities
    creds: VCenterCredentials
    folder: str  # its name below /DC0/vm
    folder_ref: str
    vm: str
    gone: str  # a VM that was in the folder and was destroyed


@pytest.fixture(scope="module")
def world(vcsim: Vcsim) -> Any:
    key = AgentKey.generate()
    endpoint = VCenterEndpoint(
        server="127.0.0.1", port=vcsim.info["port"], thumbprint=vcsim.thumbprint
    )
    use = password_binding(key.gateway, "events", endpoint, ADMIN)
    creds = VCenterCredentials(
        endpoint=endpoint, username=ADMIN, password=seal(vcsim.password, key.public_bytes, use)
    )
    name = f"events-{uuid.uuid4().hex[:6]}"
    si = vcsim.connect()
    try:
        find = si.RetrieveContent().searchIndex.FindByInventoryPath
        folder = find("/DC0/vm").CreateFolder(name)
        template = find(f"/DC0/vm/{TEMPLATE}")
        spec = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(pool=find("/DC0/host/DC0_C0/Resources")), powerOn=False
        )
        vms = []
        for vm_name in (f"{name}-a", f"{name}-b"):
            task = template.CloneVM_Task(folder=folder, name=vm_name, spec=spec)
            WaitForTask(task)
            vms.append(task.info.result)
        WaitForTask(vms[0].PowerOnVM_Task())
        WaitForTask(vms[1].Destroy_Task())
        pool = SessionPool()
        yield World(
            acts=EventActivities(key, pool),
            creds=creds,
            folder=name,
            folder_ref=f"Folder:{folder._moId}",
            vm=f"VirtualMachine:{vms[0]._moId}",
            gone=f"VirtualMachine:{vms[1]._moId}",
        )
        pool.close_all()
        WaitForTask(vms[0].PowerOffVM_Task())
        WaitForTask(folder.Destroy_Task())  # leave the shared simulator as it was
    finally:
        Vcsim.disconnect(si)


def run(world: World, beats: list[Any] | None = None, **fields: Any) -> EventsResult:
    env = ActivityEnvironment()
    if beats is not None:
        env.on_heartbeat = lambda *details: beats.extend(details)
    request = EventsRequest(credentials=world.creds, datacenter="DC0", **fields)
    result: EventsResult = env.run(world.acts.vm_events, request)
    return result


def named(task: TaskRecord, word: str) -> bool:
    return task.name.lower().startswith(f"virtualmachine.{word}")


def test_folder_events_and_tasks_name_its_vm(world: World) -> None:
    run(world, folder=world.folder)  # log in first: the budget below is for the reads
    beats: list[Any] = []
    result = run(world, beats, folder=world.folder)
    mine = [e for e in result.events if e.object == world.vm]
    types = {e.type for e in mine}
    assert {"VmClonedEvent", "VmPoweredOnEvent"} <= types, types
    assert "VmBeingCreatedEvent" in types
    assert all(e.object_name == f"{world.folder}-a" and e.user == ADMIN for e in mine)
    powered = next(e for e in mine if e.type == "VmPoweredOnEvent")
    assert world.folder + "-a" in powered.message
    times = [e.time for e in result.events]
    assert times == sorted(times, reverse=True)  # newest first
    # the clone runs on the template and returns the VM: it is one of the folder's tasks
    # (vcsim's descriptionIds are not vCenter's: 'VirtualMachine.cloneVm', not '….clone')
    clones = [t for t in result.tasks if named(t, "clone") and t.result == world.vm]
    assert len(clones) == 1 and clones[0].state == "success" and clones[0].error is None
    assert any(named(t, "poweron") and t.object == world.vm for t in result.tasks), result.tasks
    assert result.missing == []
    assert result.vcenter_requests == FOLDER_BUDGET and result.attempt == 1
    assert [b["stage"] for b in beats] == ["objects", "events", "events", "tasks"]


def test_objects_gone_are_skipped(world: World) -> None:
    result = run(
        world,
        objects=[world.gone, "VirtualMachine:vm-99999", world.vm],
        folder=f"{world.folder}-nothere",
    )
    assert sorted(result.missing) == sorted(
        [world.gone, "VirtualMachine:vm-99999", f"/DC0/vm/{world.folder}-nothere"]
    )
    assert result.events and {e.object for e in result.events} == {world.vm}
    # what happened to the one that is gone is still among the tasks
    assert any(named(t, "destroy") and t.object == world.gone for t in result.tasks), result.tasks


def test_limit_and_since(world: World) -> None:
    everything = run(world, objects=[world.folder_ref])
    assert len(everything.events) > 3 and len(everything.tasks) > 2
    two = run(world, objects=[world.folder_ref], limit=2)
    assert two.events == everything.events[:2] and two.tasks == everything.tasks[:2]
    since = everything.events[1].time
    recent = run(world, objects=[world.folder_ref], since=since)
    assert recent.events and all(e.time >= since for e in recent.events)
    assert {e.key for e in recent.events} < {e.key for e in everything.events}
    later = run(world, objects=[world.folder_ref], since=datetime.now(UTC) + timedelta(hours=1))
    assert later.events == [] and later.tasks == []


def test_request_checks_refs() -> None:
    with pytest.raises(ValidationError, match="not a managed object ref"):
        EventsRequest.model_validate(
            {"credentials": None, "datacenter": "DC0", "objects": ["vm-42"]}
        )
