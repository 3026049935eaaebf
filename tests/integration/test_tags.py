"""vSphere tags and custom attributes on a cluster's VMs and placement domains, read back from
the simulator behind kubegate's back (its vAPI REST endpoints and pyvmomi, not kubegate's
client); the cluster's tag gone after a delete, which also sweeps a VM found only by it."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from domain.cluster import ClusterSpec
from domain.lifecycle import ClusterStatus
from domain.vm import instance_uuid
from starters.client import KubegateClient
from tests.conftest import GATEWAY
from tests.integration.test_cluster import PROFILE, deploy, domain, make_pool, until
from tests.support import ADMIN, INVENTORY, Vcsim

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sim(workdir: Path) -> Iterator[Vcsim]:
    sim = Vcsim(workdir, args=list(INVENTORY)).start()
    yield sim
    sim.stop()


class Rest:
    """The simulator's vAPI REST endpoints, spoken to directly."""

    def __init__(self, sim: Vcsim) -> None:
        context = ssl._create_unverified_context()  # noqa: S323 - test simulator
        self.conn = http.client.HTTPSConnection("127.0.0.1", int(sim.info["port"]), context=context)
        token = base64.b64encode(f"{ADMIN}:{sim.password}".encode()).decode()
        self.session = ""
        self.session = self.call(
            "POST", "/com/vmware/cis/session", headers={"Authorization": f"Basic {token}"}
        )

    def call(
        self, method: str, path: str, body: Any = None, action: str = "", headers: Any = None
    ) -> Any:
        sent = {"vmware-api-session-id": self.session, **(headers or {})}
        if body is not None:
            sent["Content-Type"] = "application/json"
        url = "/rest" + path + (f"?~action={action}" if action else "")
        self.conn.request(method, url, json.dumps(body) if body is not None else None, sent)
        response = self.conn.getresponse()
        text = response.read().decode()
        assert 200 <= response.status < 300, (method, url, response.status, text)
        return json.loads(text).get("value") if text.strip() else None

    def names(self) -> dict[str, tuple[str, str]]:
        """tag id -> (category name, tag name), of every tag."""
        categories = {
            c: self.call("GET", f"/com/vmware/cis/tagging/category/id:{c}")["name"]
            for c in self.call("GET", "/com/vmware/cis/tagging/category") or []
        }
        out = {}
        for tag_id in self.call("GET", "/com/vmware/cis/tagging/tag") or []:
            tag = self.call("GET", f"/com/vmware/cis/tagging/tag/id:{tag_id}")
            out[tag_id] = (categories[tag["category_id"]], tag["name"])
        return out

    def tags_of(self, kind: str, moid: str) -> set[tuple[str, str]]:
        names = self.names()
        ids = self.call(
            "POST",
            "/com/vmware/cis/tagging/tag-association",
            {"object_id": {"type": kind, "id": moid}},
            action="list-attached-tags",
        )
        return {names[i] for i in ids or []}

    def tag_id(self, category: str, name: str) -> str | None:
        return next((i for i, n in self.names().items() if n == (category, name)), None)


def cluster_vms(sim: Vcsim, folder: str) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (moid, custom attributes by name) of the VMs in the folder."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        fields = {f.key: f.name for f in content.customFieldsManager.field or []}
        found = content.searchIndex.FindByInventoryPath(folder)
        assert found is not None, folder
        return {
            vm.name: (vm._moId, {fields[v.key]: v.value for v in vm.customValue or []})
            for vm in found.childEntity
            if isinstance(vm, vim.VirtualMachine)
        }
    finally:
        Vcsim.disconnect(si)


def moid(sim: Vcsim, path: str) -> str:
    si = sim.connect()
    try:
        found = si.RetrieveContent().searchIndex.FindByInventoryPath(path)
        assert found is not None, path
        return str(found._moId)
    finally:
        Vcsim.disconnect(si)


def plant_vm(sim: Vcsim, name: str, uuid: str | None = None) -> str:
    """A VM without kubegate's extraConfig marks, in the datacenter's VM folder (with this
    instance UUID, when given)."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        folder = content.searchIndex.FindByInventoryPath("/DC0/vm")
        cluster = content.searchIndex.FindByInventoryPath("/DC0/host/DC0_C0")
        config = vim.vm.ConfigSpec(
            name=name,
            guestId="otherGuest",
            files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"),
            instanceUuid=uuid,
        )
        task = folder.CreateVM_Task(config=config, pool=cluster.resourcePool)
        WaitForTask(task)
        return str(task.info.result._moId)
    finally:
        Vcsim.disconnect(si)


def vm_exists(sim: Vcsim, name: str) -> bool:
    si = sim.connect()
    try:
        return si.RetrieveContent().searchIndex.FindByInventoryPath(f"/DC0/vm/{name}") is not None
    finally:
        Vcsim.disconnect(si)


async def test_vms_and_domains_carry_tags_read_back_and_the_clusters_tag_goes_with_it(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    pool = await make_pool(kubegate, "cl-tags", 120)
    east = {**domain("DC0_C0", pool.name), "region": "eu", "zone": "eu-a"}
    west = {**domain("DC0_C1", pool.name), "region": "eu", "zone": "eu-b"}
    spec = ClusterSpec.model_validate(
        {
            "name": "tagged",
            "tags": ["env:test", "team=k8s"],
            "profile": PROFILE,
            "cloud_account": "lab",
            "placement": {"datacenter": "DC0", "ip_allocation": "static"},
            "control_plane": {"size": 1, "placement": [east]},
            "workers": [{"name": "w", "size": 2, "placement": [east, west]}],
        }
    )
    await deploy(kubegate, sim, spec)
    state = await until(kubegate, "tagged", ClusterStatus.RUNNING)
    (step,) = [s for s in state.steps if s.name == "tags"]
    assert step.state.value == "done", step
    assert "3 VM(s)" in step.detail and "2 compute cluster(s)" in step.detail, step.detail
    assert state.marks_problem is None and state.owner_tag

    rest = Rest(sim)
    vms = cluster_vms(sim, "/DC0/vm/tagged")
    assert sorted(vms) == ["tagged-cp-0", "tagged-w-0", "tagged-w-1"]
    for name, (vm, attributes) in vms.items():
        pool_name = "cp" if "-cp-" in name else "w"
        assert rest.tags_of("VirtualMachine", vm) == {
            ("kubegate", "cluster:tagged"),
            ("kubegate", f"pool:{pool_name}"),
            ("kubegate", f"gateway:{GATEWAY}"),
            ("kubegate-tags", "env:test"),
            ("kubegate-tags", "team=k8s"),
        }, name
        assert attributes == {"kubegate.cluster": "cluster/tagged"}, name
    east_ref = moid(sim, "/DC0/host/DC0_C0")
    west_ref = moid(sim, "/DC0/host/DC0_C1")
    assert rest.tags_of("ClusterComputeResource", east_ref) == {
        ("k8s-region", "eu"),
        ("k8s-zone", "eu-a"),
    }
    assert rest.tags_of("ClusterComputeResource", west_ref) == {
        ("k8s-region", "eu"),
        ("k8s-zone", "eu-b"),
    }

    # a VM that lost its extraConfig marks but still carries the cluster's tag and the
    # instance UUID kubegate gives that node is swept too; one someone else tagged is not
    cluster_tag = rest.tag_id("kubegate", "cluster:tagged")
    assert cluster_tag == state.owner_tag
    stray = plant_vm(sim, "tagged-stray", uuid=instance_uuid("cluster/tagged", "tagged-stray"))
    innocent = plant_vm(sim, "tagged-innocent")
    for vm in (stray, innocent):
        rest.call(
            "POST",
            f"/com/vmware/cis/tagging/tag-association/id:{cluster_tag}",
            {"object_id": {"type": "VirtualMachine", "id": vm}},
            action="attach",
        )
    # (and one carrying no tag stays)
    plant_vm(sim, "tagged-foreign")

    await kubegate.delete_cluster("tagged")
    state = await until(kubegate, "tagged", ClusterStatus.DELETED)
    steps = [s.name for s in state.steps if s.operation == "delete"]
    assert steps.index("delete-vms") < steps.index("tags"), steps
    deleted = next(s for s in state.steps if s.operation == "delete" and s.name == "tags")
    assert "deleted" in deleted.detail, deleted.detail
    assert not vm_exists(sim, "tagged-stray")
    assert vm_exists(sim, "tagged-foreign")
    assert vm_exists(sim, "tagged-innocent")  # a tag alone never gets a VM destroyed
    assert rest.tag_id("kubegate", "cluster:tagged") is None
    # shared tags stay: pools, the gateway, the spec's, the domains' region and zone
    remaining = set(rest.names().values())
    assert {("kubegate", "pool:w"), ("kubegate", f"gateway:{GATEWAY}")} <= remaining
    assert ("kubegate-tags", "env:test") in remaining
    assert rest.tags_of("ClusterComputeResource", east_ref) == {
        ("k8s-region", "eu"),
        ("k8s-zone", "eu-a"),
    }
