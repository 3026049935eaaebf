"""Self-healing, end to end: real simulator, real Temporal. VMs are removed, powered off,
planted and silenced behind kubegate's back with the test's own pyVmomi session; the
cluster's reconciles repair or report them as docs/clusters.md says, with no loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from domain.cluster import ClusterSpec
from domain.lifecycle import ClusterState, ClusterStatus
from starters.client import KubegateClient, RequestRefused
from tests.integration.test_cluster import KEY, PROFILE, deploy, domain, make_pool, until
from tests.support import INVENTORY, TEMPLATE, Vcsim, record_history

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sim(workdir: Path) -> Iterator[Vcsim]:
    sim = Vcsim(workdir, args=[*INVENTORY, "-no-drs", "DC0_C1"]).start()
    yield sim
    sim.stop()


def spec_of(
    name: str,
    pool: str,
    cp: int = 1,
    workers: int = 2,
    healing: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    cp_cluster: str = "DC0_C0",
    worker_cluster: str = "DC0_C1",
) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "name": name,
            "profile": PROFILE,
            "cloud_account": "lab",
            "placement": {"datacenter": "DC0", "ssh_keys": [KEY], "ip_allocation": "static"},
            "control_plane": {"size": cp, "placement": [domain(cp_cluster, pool)]},
            "workers": [
                {
                    "name": "w",
                    "size": workers,
                    "placement": [domain(worker_cluster, pool)],
                    "health": health or {},
                }
            ],
            "healing": healing or {"reconcile_seconds": 0},
        }
    )


# -- the test's own view of vCenter ----------------------------------------------------------


def on_vcenter(sim: Vcsim, work: Callable[[Any], Any]) -> Any:
    si = sim.connect()
    try:
        return work(si.RetrieveContent())
    finally:
        Vcsim.disconnect(si)


def find_vm(content: Any, path: str) -> Any:
    vm = content.searchIndex.FindByInventoryPath(f"DC0/vm/{path}")
    assert vm is not None, path
    return vm


def destroy(sim: Vcsim, path: str) -> None:
    def work(content: Any) -> None:
        vm = find_vm(content, path)
        if vm.runtime.powerState == "poweredOn":
            WaitForTask(vm.PowerOffVM_Task())
        WaitForTask(vm.Destroy_Task())

    on_vcenter(sim, work)


def power_off(sim: Vcsim, path: str) -> None:
    on_vcenter(sim, lambda c: WaitForTask(find_vm(c, path).PowerOffVM_Task()))


def silence(sim: Vcsim, path: str) -> None:
    """The guest stops reporting: VMware Tools not running, no guest address."""

    def work(content: Any) -> None:
        spec = vim.vm.ConfigSpec(
            extraConfig=[
                vim.option.OptionValue(
                    key="SET.guest.toolsRunningStatus", value="guestToolsNotRunning"
                ),
                vim.option.OptionValue(key="SET.guest.ipAddress", value=""),
            ]
        )
        WaitForTask(find_vm(content, path).ReconfigVM_Task(spec))

    on_vcenter(sim, work)


def plant(sim: Vcsim, folder: str, name: str) -> str:
    """A VM kubegate did not make (a clone of the template, unmarked) in the cluster's folder;
    its moref."""

    def work(content: Any) -> str:
        target = content.searchIndex.FindByInventoryPath(f"/DC0/vm/{folder}")
        template = content.searchIndex.FindByInventoryPath(f"/DC0/vm/{TEMPLATE}")
        pool = content.searchIndex.FindByInventoryPath("/DC0/host/DC0_C0/Resources")
        task = template.CloneVM_Task(
            target, name, vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool))
        )
        WaitForTask(task)
        return str(task.info.result._moId)

    result: str = on_vcenter(sim, work)
    return result


def vm_facts(sim: Vcsim, path: str) -> dict[str, Any] | None:
    def work(content: Any) -> dict[str, Any] | None:
        vm = content.searchIndex.FindByInventoryPath(f"DC0/vm/{path}")
        if vm is None:
            return None
        return {
            "moid": vm._moId,
            "uuid": vm.config.instanceUuid,
            "power": str(vm.runtime.powerState),
            "address": vm.guest.ipAddress,
            "tools": vm.guest.toolsRunningStatus,
        }

    result: dict[str, Any] | None = on_vcenter(sim, work)
    return result


async def wait_for(
    kubegate: KubegateClient, name: str, done: Callable[[ClusterState], bool], timeout: float = 90
) -> ClusterState:
    return await kubegate.wait_cluster(name, done, timeout=timeout)


def repair_steps(state: ClusterState) -> list[str]:
    return [s.title for s in state.steps if s.name == "repair"]


# -- tests -----------------------------------------------------------------------------------


async def test_drift_is_repaired_or_reported_on_demand(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """A deleted worker is recreated with its name, address and instance UUID; a powered-off
    one is powered on; a foreign VM in the folder is reported and left alone; the next
    reconcile finds nothing to do."""
    pool = "heal-a"
    await make_pool(kubegate, pool, 140)
    spec = spec_of("heal-a", pool, cp=1, workers=2)
    await deploy(kubegate, sim, spec)
    state = await until(kubegate, "heal-a", ClusterStatus.RUNNING)
    folder = "heal-a"
    nodes = {n.name: n for n in state.nodes}
    w0, w1 = "heal-a-w-0", "heal-a-w-1"
    before = vm_facts(sim, f"{folder}/{w0}")
    assert before is not None

    destroy(sim, f"{folder}/{w0}")
    power_off(sim, f"{folder}/{w1}")
    stranger = plant(sim, folder, "not-a-node")

    health = await kubegate.reconcile_cluster("heal-a")
    kinds = {(f.kind, f.node) for f in health.findings}
    assert ("missing", w0) in kinds, health.findings
    assert ("powered-off", w1) in kinds, health.findings
    assert any(f.kind == "foreign" and f.vm.endswith(stranger) for f in health.findings)
    assert health.repairs_made == 2

    after = vm_facts(sim, f"{folder}/{w0}")
    assert after is not None
    assert after["uuid"] == before["uuid"] and after["moid"] != before["moid"]
    assert after["address"] == nodes[w0].address
    assert vm_facts(sim, f"{folder}/{w1}")["power"] == "poweredOn"  # type: ignore[index]
    assert vm_facts(sim, f"{folder}/not-a-node") is not None  # reported, never deleted

    state = await kubegate.cluster_state("heal-a")
    assert state.status is ClusterStatus.RUNNING
    titles = repair_steps(state)
    assert any(t.startswith(f"Recreate {w0}: its VM was removed") for t in titles), titles
    assert any(t.startswith(f"Power on {w1}: its VM was powered off") for t in titles), titles
    new = {n.name: n for n in state.nodes}
    assert new[w0].address == nodes[w0].address and new[w0].phase == "ready"

    health = await kubegate.reconcile_cluster("heal-a")  # nothing left to repair
    assert health.repairs_made == 2
    assert [f.kind for f in health.findings] == ["foreign"]

    # removed from the inventory only (its files stay on the datastore): made again too
    def unregister(content: Any) -> None:
        vm = find_vm(content, f"{folder}/{w1}")
        WaitForTask(vm.PowerOffVM_Task())
        vm.UnregisterVM()

    on_vcenter(sim, unregister)
    health = await kubegate.reconcile_cluster("heal-a")
    assert health.repairs_made == 3, health.findings
    assert vm_facts(sim, f"{folder}/{w1}") is not None

    destroy(sim, f"{folder}/not-a-node")  # (a foreign VM keeps the folder: delete would say so)
    await kubegate.delete_cluster("heal-a")
    await until(kubegate, "heal-a", ClusterStatus.DELETED)
    await record_history(kubegate.client, "cluster/heal-a", "cluster_healed")


async def test_powered_off_report_policy_and_a_repair_that_keeps_failing(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """Policy `report`: a powered-off node stays off and is listed. A deleted node whose name
    someone else's VM took cannot be recreated: the attempts back off, stop at the limit
    (each a step of one attempt), and the cluster is Degraded, with no loop; once the
    stranger is gone, `reconcile` tries again and the cluster is Running."""
    pool = "heal-b"
    await make_pool(kubegate, pool, 141)
    spec = spec_of(
        "heal-b",
        pool,
        cp=1,
        workers=2,
        healing={"reconcile_seconds": 2, "powered_off": "report", "repair_attempts": 2},
    )
    await deploy(kubegate, sim, spec)
    state = await until(kubegate, "heal-b", ClusterStatus.RUNNING)
    folder = "heal-b"
    w0, w1 = "heal-b-w-0", "heal-b-w-1"
    power_off(sim, f"{folder}/{w1}")
    destroy(sim, f"{folder}/{w0}")
    plant(sim, folder, w0)  # a VM of the node's name that is not the node's

    state = await wait_for(
        kubegate, "heal-b", lambda s: s.status is ClusterStatus.DEGRADED, timeout=120
    )
    failed = [s for s in state.steps if s.name == "repair"]
    assert len(failed) == 2, [s.title for s in failed]
    assert all(s.state.value == "failed" and s.attempts <= 1 for s in failed)
    assert "not this node's" in (failed[-1].error or "")
    assert w0 in state.reason
    await asyncio.sleep(8)  # a few reconciles more: no further attempt
    state = await kubegate.cluster_state("heal-b")
    assert len(repair_steps(state)) == 2
    assert state.status is ClusterStatus.DEGRADED
    assert vm_facts(sim, f"{folder}/{w1}")["power"] == "poweredOff"  # type: ignore[index]
    assert any(f.kind == "powered-off" and f.node == w1 for f in state.health.findings)
    assert any(f.kind == "given-up" and f.node == w0 for f in state.health.findings)

    destroy(sim, f"{folder}/{w0}")  # the stranger goes
    health = await kubegate.reconcile_cluster("heal-b")  # given up stays given up
    assert health.repairs_made == 0 and health.degraded
    health = await kubegate.reconcile_cluster("heal-b", retry_given_up=True)
    assert health.repairs_made == 1
    state = await until(kubegate, "heal-b", ClusterStatus.RUNNING)
    assert vm_facts(sim, f"{folder}/{w0}") is not None

    await kubegate.delete_cluster("heal-b")
    await until(kubegate, "heal-b", ClusterStatus.DELETED)
    await record_history(kubegate.client, "cluster/heal-b", "cluster_degraded")


async def test_a_silent_guest_is_replaced_within_its_timeout_one_at_a_time(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """Two of four workers' guests stop reporting; with max_unhealthy 1 they are replaced one
    after the other (never two at once), each by a new VM of the same name and address, after
    the pool's timeout; with remediation paused, a silent guest is only reported."""
    pool = "heal-c"
    await make_pool(kubegate, pool, 142)
    spec = spec_of(
        "heal-c",
        pool,
        cp=1,
        workers=4,
        healing={"reconcile_seconds": 2},
        health={"unhealthy_after_seconds": 6, "max_unhealthy": 1},
    )
    await deploy(kubegate, sim, spec)
    state = await until(kubegate, "heal-c", ClusterStatus.RUNNING)
    folder = "heal-c"
    addresses = {n.name: n.address for n in state.nodes}
    w0, w1, w2 = "heal-c-w-0", "heal-c-w-1", "heal-c-w-2"
    old = {w: vm_facts(sim, f"{folder}/{w}") for w in (w0, w1)}
    silence(sim, f"{folder}/{w0}")
    silence(sim, f"{folder}/{w1}")
    started = asyncio.get_running_loop().time()

    state = await wait_for(
        kubegate,
        "heal-c",
        lambda s: s.health.repairs_made >= 2 and s.status is ClusterStatus.RUNNING,
        timeout=120,
    )
    took = asyncio.get_running_loop().time() - started
    steps = [s for s in state.steps if s.name == "repair"]
    assert [s.title.split(":")[0] for s in steps] == [f"Replace {w0}", f"Replace {w1}"] or [
        s.title.split(":")[0] for s in steps
    ] == [f"Replace {w1}", f"Replace {w0}"]
    first, second = sorted(steps, key=lambda s: s.started)  # type: ignore[arg-type,return-value]
    assert first.ended is not None and second.started is not None
    assert second.started >= first.ended, "two nodes of the pool replaced at once"
    assert first.started is not None
    for w in (w0, w1):
        new = vm_facts(sim, f"{folder}/{w}")
        assert new is not None and old[w] is not None
        assert new["moid"] != old[w]["moid"] and new["uuid"] == old[w]["uuid"]  # type: ignore[index]
        assert new["tools"] == "guestToolsRunning"
        assert {n.name: n.address for n in state.nodes}[w] == addresses[w]
    assert took >= 6, "replaced before its timeout"
    assert took < 60

    await kubegate.pause_remediation("heal-c")
    silence(sim, f"{folder}/{w2}")
    for _ in range(30):  # past its timeout, it is reported, not replaced
        health = await kubegate.reconcile_cluster("heal-c")
        if any("remediation is paused" in f.detail for f in health.findings):
            break
        await asyncio.sleep(1)
    assert any(
        f.node == w2 and f.kind == "unhealthy" and "remediation is paused" in f.detail
        for f in health.findings
    ), health.findings
    assert health.repairs_made == 2
    await kubegate.resume_remediation("heal-c")
    state = await wait_for(kubegate, "heal-c", lambda s: s.health.repairs_made >= 3, timeout=60)
    with pytest.raises(RequestRefused, match="not paused"):
        await kubegate.resume_remediation("heal-c")

    await kubegate.delete_cluster("heal-c")
    await until(kubegate, "heal-c", ClusterStatus.DELETED)
    await record_history(kubegate.client, "cluster/heal-c", "cluster_remediated")


def hosts_of(sim: Vcsim, folder: str, names: list[str]) -> dict[str, str]:
    def work(content: Any) -> dict[str, str]:
        return {n: find_vm(content, f"{folder}/{n}").runtime.host.name for n in names}

    result: dict[str, str] = on_vcenter(sim, work)
    return result


async def test_with_drs_off_the_control_plane_is_placed_on_distinct_hosts(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """DRS off in the control plane's compute cluster (the simulator's DC0_C1): the
    anti-affinity rule is not enforced, so the members are put on distinct hosts when made
    (read back from vCenter)."""
    pool = "heal-d"
    await make_pool(kubegate, pool, 144)
    spec = spec_of("heal-d", pool, cp=3, workers=1, cp_cluster="DC0_C1", worker_cluster="DC0_C0")
    await deploy(kubegate, sim, spec)
    state = await until(kubegate, "heal-d", ClusterStatus.RUNNING)
    members = [f"heal-d-cp-{i}" for i in range(3)]
    placed = hosts_of(sim, "heal-d", members)
    assert len(set(placed.values())) == 3, placed
    apart = next(s for s in state.steps if s.name == "keep-apart")
    assert "DRS is off" in apart.detail and "distinct hosts when made" in apart.detail
    await kubegate.delete_cluster("heal-d")
    await until(kubegate, "heal-d", ClusterStatus.DELETED)
    await record_history(kubegate.client, "cluster/heal-d", "cluster_placed_apart")
