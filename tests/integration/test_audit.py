"""Orphan audit end to end: leftovers planted with pyVmomi (and tags planted over the vAPI)
beside a live cluster are listed exactly, and `kubegate audit --clean` removes them and nothing
else.

Real simulator, real Temporal, the real workflows, a gateway of its own with its own agent.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pyVim.task import WaitForTask
from pyVmomi import vim
from temporalio.testing import WorkflowEnvironment

from activities.vsphere.session import SessionPool
from domain.audit import AuditState, AuditStatus
from domain.cluster import ClusterSpec
from domain.gateway import default_account_name
from domain.ipam import IpPoolSpec
from domain.lifecycle import ClusterStatus, Timing
from domain.sealing import AgentKey
from domain.vm import MARK_CLUSTER, MARK_NODE, MARK_POOL, instance_uuid
from plumbing.settings import Settings
from starters.client import KubegateClient, RequestRefused
from tests.integration.test_cluster import PROFILE, domain, until
from tests.integration.test_tags import Rest
from tests.support import (
    INVENTORY,
    Vcsim,
    agent_policy,
    record_history,
    run_cli,
    system_gateway,
)
from workers.gateway_agent import build_agent

pytestmark = pytest.mark.integration

GW = "aud"
FAST = Timing(heartbeat_seconds=5)


@pytest.fixture(scope="module")
def asim(workdir: Path) -> Iterator[Vcsim]:
    sim = Vcsim(workdir, args=[*INVENTORY]).start()
    yield sim
    sim.stop()


@pytest_asyncio.fixture
async def audited(
    temporal: WorkflowEnvironment, sessions: SessionPool, asim: Vcsim, settings: Settings
) -> AsyncIterator[KubegateClient]:
    """Gateway `aud` on its own simulator, its agent running in this process."""
    kubegate = KubegateClient(temporal.client, settings)
    key = AgentKey.generate()
    policy = agent_policy(Path(tempfile.mkdtemp(prefix=f"agent-{GW}-")) / "policy.yaml", GW)
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with build_agent(temporal.client, GW, key, sessions, executor, 8, policy=policy):
            await system_gateway(kubegate, GW, asim, key)
            yield kubegate


# -- planting behind kubegate's back ------------------------------------------------------------


def _find(content: Any, kind: type, name: str) -> Any:
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return next((o for o in view.view if o.name == name), None)
    finally:
        view.Destroy()


def _make_vm(
    si: Any,
    folder: Any,
    name: str,
    extra: dict[str, str],
    annotation: str = "",
    uuid: str | None = None,
) -> Any:
    content = si.RetrieveContent()
    cluster = _find(content, vim.ClusterComputeResource, "DC0_C0")
    spec = vim.vm.ConfigSpec(
        name=name,
        numCPUs=1,
        memoryMB=128,
        guestId="otherGuest64",
        annotation=annotation,
        files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"),
        extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in extra.items()],
        instanceUuid=uuid,
    )
    task = folder.CreateVM_Task(config=spec, pool=cluster.resourcePool)
    WaitForTask(task)
    return task.info.result


def _marks(cluster_id: str, node: str) -> tuple[dict[str, str], str]:
    marks = {MARK_CLUSTER: cluster_id, MARK_POOL: "cp", MARK_NODE: node}
    annotation = "Managed by kubegate; do not edit.\n" + "\n".join(
        f"{k}={v}" for k, v in marks.items()
    )
    return marks, annotation


def plant(sim: Vcsim) -> dict[str, str]:
    """A marked VM of a cluster that never existed (in a folder named after it), a stray VM
    directory with a marked .vmx, an installer VM of a gateway that never existed left on;
    and what must be left alone: an unmarked VM, a directory with an unmarked .vmx."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        dc = _find(content, vim.Datacenter, "DC0")
        ghost_folder = dc.vmFolder.CreateFolder("ghost")
        marks, annotation = _marks("cluster/ghost", "ghost-cp-0")
        ghost = _make_vm(si, ghost_folder, "ghost-cp-0", marks, annotation)
        installer = _make_vm(
            si, dc.vmFolder, "kubegate-installer-gone", {"kubegate.installer_name": "gone-gw"}
        )
        WaitForTask(installer.PowerOnVM_Task())
        plain = _make_vm(si, dc.vmFolder, "plain-vm", {"app": "mine"}, "not kubegate's")
        WaitForTask(plain.PowerOnVM_Task())
        store = _find(content, vim.Datastore, "LocalDS_0")
        root = Path(store.info.url)
        (root / "ghost-cp-1").mkdir()
        (root / "ghost-cp-1" / "ghost-cp-1.vmx").write_text(
            '.encoding = "UTF-8"\ndisplayName = "ghost-cp-1"\n'
            'kubegate.cluster = "cluster/ghost"\nkubegate.node = "ghost-cp-1"\n'
        )
        (root / "ghost-cp-1" / "ghost-cp-1.vmdk").write_text("disk")
        (root / "plain-dir").mkdir()
        (root / "plain-dir" / "plain-dir.vmx").write_text('displayName = "plain-dir"\n')
        return {
            "ghost": ghost._moId,
            "folder": ghost_folder._moId,
            "installer": installer._moId,
            "plain": plain._moId,
            "root": str(root),
        }
    finally:
        Vcsim.disconnect(si)


TAGS = "/com/vmware/cis/tagging"


def plant_tags(sim: Vcsim, live_vm: str) -> dict[str, str]:
    """Over the vAPI, behind kubegate's back: a VM without any extraConfig mark tagged
    `cluster:gone` (that tag also put, by mistake, on a live cluster's VM), a `cluster:gone2`
    tag on nothing, and the shared `gateway:aud` tag on the unmarked plain VM."""
    si = sim.connect()
    try:
        dc = _find(si.RetrieveContent(), vim.Datacenter, "DC0")
        # (unmarked, with the instance UUID kubegate gives that node of cluster/gone: one
        # kubegate made whose extraConfig was lost; a tag alone proves nothing)
        tagged = _make_vm(
            si,
            dc.vmFolder,
            "tagged-gone-0",
            {},
            uuid=instance_uuid("cluster/gone", "tagged-gone-0"),
        )._moId
        plain = _find(si.RetrieveContent(), vim.VirtualMachine, "plain-vm")._moId
    finally:
        Vcsim.disconnect(si)
    rest = Rest(sim)
    names = rest.names()
    category = next(
        c
        for c in rest.call("GET", f"{TAGS}/category")
        if rest.call("GET", f"{TAGS}/category/id:{c}")["name"] == "kubegate"
    )
    made = {}
    for name in ("cluster:gone", "cluster:gone2"):
        spec = {"name": name, "description": "planted", "category_id": category}
        made[name] = rest.call("POST", f"{TAGS}/tag", {"create_spec": spec})
    shared = next(i for i, n in names.items() if n == ("kubegate", f"gateway:{GW}"))
    for tag_id, objects in ((made["cluster:gone"], [tagged, live_vm]), (shared, [plain])):
        rest.call(
            "POST",
            f"{TAGS}/tag-association/id:{tag_id}",
            {"object_ids": [{"type": "VirtualMachine", "id": o} for o in objects]},
            action="attach-tag-to-multiple-objects",
        )
    return {"tagged": tagged, **made}


def remark(sim: Vcsim, moid: str, owner: str) -> None:
    """Change a VM's kubegate.cluster mark behind kubegate's back."""
    si = sim.connect()
    try:
        vm = vim.VirtualMachine(moid, si._stub)
        spec = vim.vm.ConfigSpec(
            extraConfig=[vim.option.OptionValue(key=MARK_CLUSTER, value=owner)]
        )
        WaitForTask(vm.ReconfigVM_Task(spec))
    finally:
        Vcsim.disconnect(si)


def vm_facts(sim: Vcsim) -> dict[str, tuple[str, str]]:
    """name -> (power state, parent folder name) of every VM."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        facts = {vm.name: (str(vm.runtime.powerState), vm.parent.name) for vm in view.view}
        view.Destroy()
        return facts
    finally:
        Vcsim.disconnect(si)


def folder_names(sim: Vcsim) -> set[str]:
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        dc = _find(content, vim.Datacenter, "DC0")
        return {f.name for f in dc.vmFolder.childEntity if isinstance(f, vim.Folder)}
    finally:
        Vcsim.disconnect(si)


def listed(state: AuditState) -> set[tuple[str, str]]:
    return {(i.kind, i.name) for i in state.items}


# -- the test -----------------------------------------------------------------------------------


async def test_audit_lists_exactly_the_planted_leftovers_and_clean_removes_only_them(
    asim: Vcsim, audited: KubegateClient, settings: Settings
) -> None:
    kubegate = audited
    pool = IpPoolSpec.model_validate(
        {
            "name": "aud-pool",
            "gateway": GW,
            "kind": "range",
            "first": "10.130.0.10",
            "last": "10.130.0.60",
            "prefix": 24,
            "network_gateway": "10.130.0.1",
            "nameservers": ["10.130.0.2"],
        }
    )
    if "aud-pool" not in {p.spec.name for p in await kubegate.list_pools(GW)}:
        await kubegate.create_pool(pool)
    spec = ClusterSpec.model_validate(
        {
            "name": "aud-live",
            "profile": PROFILE,
            "cloud_account": default_account_name(GW),
            "placement": {"datacenter": "DC0", "ip_allocation": "static"},
            "control_plane": {"size": 1, "placement": [domain("DC0_C0", "aud-pool")]},
            "workers": [
                {"name": "w", "size": 1, "placement": [domain("DC0_C0", "aud-pool")]},
            ],
        }
    )
    await kubegate.deploy_cluster(spec, timing=FAST)
    await until(kubegate, "aud-live", ClusterStatus.RUNNING)

    planted = plant(asim)
    rest = Rest(asim)
    live_tag = rest.tag_id("kubegate", "cluster:aud-live")
    assert live_tag, rest.names()
    live_tagged = rest.call(
        "POST", f"{TAGS}/tag-association/id:{live_tag}", {}, action="list-attached-objects"
    )
    assert len(live_tagged) == 2
    planted |= plant_tags(asim, live_tagged[0]["id"])
    ghost_addresses = await kubegate.allocate(GW, "aud-pool", "cluster/ghost", ["cp-0", "vip"])
    before_vms = vm_facts(asim)
    live_allocations = await kubegate.pool_allocations(GW, "aud-pool", owner="cluster/aud-live")
    assert live_allocations

    expected = {
        ("vm", "ghost-cp-0"),
        ("folder", "ghost"),
        ("file", "ghost-cp-1"),
        ("installer", "kubegate-installer-gone"),
        ("allocation", "aud-pool"),
        # by the tags: a VM unmarked but tagged for a cluster that never existed, and the
        # owner tags of no live cluster (the shared gateway:aud tag and cluster:aud-live not)
        ("vm", "tagged-gone-0"),
        ("tag", "cluster:gone"),
        ("tag", "cluster:gone2"),
    }
    state = await kubegate.audit(GW, timeout=300)
    assert state.status is AuditStatus.LISTED, state.error
    assert listed(state) == expected, state.items
    assert [s.name for s in state.steps] == ["inventory", "owners", "addresses"]
    assert "owner tag(s)" in state.steps[0].detail and state.warnings == []
    by_kind = {i.kind: i for i in state.items if i.name not in ("tagged-gone-0", "cluster:gone2")}
    assert by_kind["vm"].id == f"VirtualMachine:{planted['ghost']}"
    assert by_kind["vm"].owner == "cluster/ghost" and not by_kind["vm"].tag
    assert by_kind["allocation"].owner == "cluster/ghost"
    assert sorted(by_kind["allocation"].slots) == ["cp-0", "vip"]
    assert by_kind["file"].path == "[LocalDS_0] ghost-cp-1"
    by_name = {i.name: i for i in state.items}
    tagged = by_name["tagged-gone-0"]
    assert tagged.owner == "cluster/gone" and tagged.tag == planted["cluster:gone"]
    assert tagged.id == f"VirtualMachine:{planted['tagged']}"
    assert by_name["cluster:gone"].id == planted["cluster:gone"]
    assert by_name["cluster:gone"].detail == "on 2 VM(s)"
    assert by_name["cluster:gone2"].detail == "on nothing"
    assert by_name["cluster:gone2"].path == "kubegate/cluster:gone2"

    # a clean names only what the audit listed: anything else is refused before it starts
    with pytest.raises(RequestRefused, match="not listed"):
        await kubegate.clean_audit(state.workflow_id, [f"VirtualMachine:{planted['plain']}"])
    assert vm_facts(asim) == before_vms  # listing changed nothing

    # each item is read again when it is removed: a VM marked meanwhile for a live cluster is
    # left alone (and named), whatever the listing said
    remark(asim, planted["ghost"], "cluster/aud-live")
    result = await kubegate.clean_audit(state.workflow_id, [by_kind["vm"].id])
    assert result.removed == [] and "left alone" in result.kept[by_kind["vm"].id], result
    assert vm_facts(asim) == before_vms
    cleaned = await kubegate.wait_audit(state.workflow_id, AuditStatus.CLEANED)
    assert [s.name for s in cleaned.steps][-3:] == ["recheck", "remove", "release-addresses"]
    remark(asim, planted["ghost"], "cluster/ghost")

    # the command: json list, clean without asking (not a terminal: --yes)
    code, output = await run_cli(settings, "audit", "--gateway", GW, "-o", "json", "--clean", "-y")
    assert code == 0, output
    (report,) = json.loads(output)
    assert {(i["kind"], i["name"]) for i in report["items"]} == expected
    assert sorted(report["removed"]) == sorted(i["id"] for i in report["items"])
    assert report["kept"] == {}

    after = vm_facts(asim)
    assert "ghost-cp-0" not in after and "tagged-gone-0" not in after
    assert after["kubegate-installer-gone"][0] == "poweredOff"  # powered off, not destroyed
    assert after["plain-vm"] == before_vms["plain-vm"]
    live = {n: f for n, f in before_vms.items() if n.startswith("aud-live-")}
    assert len(live) == 2 and all(after[n] == f for n, f in live.items())
    assert set(after) == set(before_vms) - {"ghost-cp-0", "tagged-gone-0"}
    tags_now = rest.names()
    assert ("kubegate", "cluster:gone") not in tags_now.values()
    assert ("kubegate", "cluster:gone2") not in tags_now.values()
    assert tags_now[live_tag] == ("kubegate", "cluster:aud-live")  # the live cluster's: kept
    still = rest.call(
        "POST", f"{TAGS}/tag-association/id:{live_tag}", {}, action="list-attached-objects"
    )
    assert sorted(o["id"] for o in still) == sorted(o["id"] for o in live_tagged)
    assert rest.tags_of("VirtualMachine", planted["plain"]) == {("kubegate", f"gateway:{GW}")}
    folders = folder_names(asim)
    assert "ghost" not in folders and "aud-live" in folders
    root = Path(planted["root"])
    assert not (root / "ghost-cp-1").exists()
    assert (root / "plain-dir" / "plain-dir.vmx").exists()
    assert all((root / n).is_dir() for n in live)
    assert await kubegate.pool_allocations(GW, "aud-pool", owner="cluster/ghost") == []
    assert (
        await kubegate.pool_allocations(GW, "aud-pool", owner="cluster/aud-live")
        == live_allocations
    )
    assert ghost_addresses.addresses

    ended = await kubegate.client.get_workflow_handle(report["workflow_id"]).result()
    assert ended["status"] == "Cleaned"
    await record_history(kubegate.client, report["workflow_id"], "audit_cleaned")

    # nothing is left over now
    again = await kubegate.audit(GW, timeout=300)
    assert again.items == [], again.items
    await kubegate.close_audit(again.workflow_id)
    await kubegate.client.get_workflow_handle(again.workflow_id).result()
    await record_history(kubegate.client, again.workflow_id, "audit_nothing_left")
    gateway = await kubegate.gateway_state(GW)
    assert gateway.audits == []  # each audit told its gateway it ended
    await record_history(kubegate.client, f"gateway/{GW}", "gateway_audited")
    state_after = await kubegate.cluster_state("aud-live")
    assert state_after.status is ClusterStatus.RUNNING
