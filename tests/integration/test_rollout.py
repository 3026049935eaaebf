"""Rolling upgrades and control-plane scaling, end to end: real simulator, real Temporal.

Every moment of a rollout is watched behind kubegate's back: a thread reads the cluster's
VMs from vCenter with its own pyVmomi session while the rollout runs, and the limits are
checked on every reading.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from domain.cluster import ClusterSpec
from domain.lifecycle import ClusterState, ClusterStatus, operations
from domain.names import cluster_workflow_id
from domain.vm import MARK_CLUSTER, MARK_NODE, MARK_POOL
from starters.client import KubegateClient, KubegateError, RequestRefused
from tests.conftest import GATEWAY
from tests.integration.test_cluster import (
    KEY,
    PROFILE,
    decode,
    deploy,
    domain,
    make_pool,
    owned_vms,
    until,
)
from tests.support import INVENTORY, TEMPLATE, Vcsim, record_history

pytestmark = pytest.mark.integration

NEW_TEMPLATE = "templates/ubuntu-2204-kube-v1.31"


@pytest.fixture(scope="module")
def sim(workdir: Path) -> Iterator[Vcsim]:
    sim = Vcsim(workdir, args=[*INVENTORY, "-dhcp", "DC0_DVPG0=10.62.0.100-10.62.0.199"]).start()
    copy_template(sim, NEW_TEMPLATE.rsplit("/", 1)[1])
    yield sim
    sim.stop()


def copy_template(sim: Vcsim, name: str) -> None:
    """A second template next to the simulator's own (a newer image)."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        source = content.searchIndex.FindByInventoryPath(f"DC0/vm/{TEMPLATE}")
        folder = content.searchIndex.FindByInventoryPath("DC0/vm/templates")
        pool = content.searchIndex.FindByInventoryPath("DC0/host/DC0_C0/Resources")
        spec = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(pool=pool), template=True, powerOn=False
        )
        WaitForTask(source.CloneVM_Task(folder=folder, name=name, spec=spec))
    finally:
        Vcsim.disconnect(si)


def spec_of(
    name: str, pool: str, cp: int, workers: int, surge: int = 1, unavailable: int = 0
) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "name": name,
            "profile": PROFILE,
            "cloud_account": "lab",
            "placement": {"datacenter": "DC0", "ssh_keys": [KEY], "ip_allocation": "static"},
            "control_plane": {"size": cp, "placement": [domain("DC0_C0", pool)]},
            "workers": [
                {
                    "name": "w",
                    "size": workers,
                    "placement": [domain("DC0_C1", pool)],
                    "rollout": {"max_surge": surge, "max_unavailable": unavailable},
                }
            ],
        }
    )


@dataclass
class Watcher:
    """Reads the cluster's VMs (name, pool, power) from vCenter over and over, in a thread,
    until stopped; every reading is kept."""

    sim: Vcsim
    cluster_id: str
    readings: list[list[tuple[str, str, str]]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def __enter__(self) -> Watcher:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        assert self.thread is not None
        self.thread.join(30)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        si = self.sim.connect()
        try:
            content = si.RetrieveContent()
            view = content.viewManager.CreateContainerView(
                content.rootFolder, [vim.VirtualMachine], True
            )
            collector = content.propertyCollector
            spec = vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[
                    vmodl.query.PropertyCollector.ObjectSpec(
                        obj=view,
                        skip=True,
                        selectSet=[
                            vmodl.query.PropertyCollector.TraversalSpec(
                                name="view", path="view", skip=False, type=vim.view.ContainerView
                            )
                        ],
                    )
                ],
                propSet=[
                    vmodl.query.PropertyCollector.PropertySpec(
                        type=vim.VirtualMachine,
                        pathSet=["name", "runtime.powerState", "config.extraConfig"],
                    )
                ],
            )
            while not self.stopping.is_set():
                reading = []
                for obj in collector.RetrieveContents([spec]):
                    props = {p.name: p.val for p in obj.propSet}
                    extra = {o.key: o.value for o in props.get("config.extraConfig") or []}
                    if extra.get(MARK_CLUSTER) == self.cluster_id:
                        reading.append(
                            (
                                extra.get(MARK_NODE, props["name"]),
                                extra.get(MARK_POOL, ""),
                                str(props.get("runtime.powerState")),
                            )
                        )
                self.readings.append(reading)
                time.sleep(0.02)
            view.Destroy()
        except BaseException as exc:
            self.error = exc
        finally:
            Vcsim.disconnect(si)

    def counts(self, pool: str) -> list[tuple[int, int]]:
        """Per reading: the pool's VMs, and those powered on."""
        out = []
        for reading in self.readings:
            mine = [r for r in reading if r[1] == pool]
            out.append((len(mine), sum(1 for r in mine if r[2] == "poweredOn")))
        return out


def discovery_server(document: str) -> str:
    """The API server a joiner's discovery kubeconfig names."""
    for item in yaml.safe_load(document).get("write_files", []):
        if item["path"].endswith("kubegate-discovery.conf"):
            return str(yaml.safe_load(item["content"])["clusters"][0]["cluster"]["server"])
    raise AssertionError("no discovery kubeconfig")


def apart_rule(sim: Vcsim, cluster: str, compute_cluster: str = "DC0_C0") -> list[str] | None:
    """The VMs (names) of the cluster's control-plane anti-affinity rule, read from vCenter;
    None when there is no such rule."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        found = content.searchIndex.FindByInventoryPath(f"DC0/host/{compute_cluster}")
        for rule in found.configurationEx.rule or []:
            if rule.name == f"kubegate-{cluster}-control-plane":
                assert isinstance(rule, vim.cluster.AntiAffinityRuleSpec) and rule.enabled
                return sorted(vm.name for vm in rule.vm)
        return None
    finally:
        Vcsim.disconnect(si)


def userdata(vm: dict[str, Any]) -> str:
    return decode(vm["extra"]["guestinfo.userdata"])


async def test_a_rolling_upgrade_keeps_surge_and_unavailable_limits_at_every_moment(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """3+3 to a new Kubernetes version and template: the control plane first, one member at a
    time and never fewer than three on; the workers two at a time (surge 1, unavailable 1)
    and never more than four or fewer than two on; every node replaced, every old address
    given back."""
    pool = await make_pool(kubegate, "roll-pool", 101)
    await deploy(kubegate, sim, spec_of("roll", pool.name, cp=3, workers=3, unavailable=1))
    await until(kubegate, "roll", ClusterStatus.RUNNING)
    before = {vm["name"] for vm in owned_vms(sim, "cluster/roll")}

    plan = await kubegate.plan_apply(
        await kubegate.upgraded_spec("roll", kubernetes="1.31.0", template=NEW_TEMPLATE)
    )
    assert list(plan.replace) == [
        "roll-cp-0",
        "roll-cp-1",
        "roll-cp-2",
        "roll-w-0",
        "roll-w-1",
        "roll-w-2",
    ]
    with Watcher(sim, "cluster/roll") as watcher:
        result = await kubegate.upgrade_cluster(
            "roll", kubernetes="1.31.0", template=NEW_TEMPLATE, timeout=300
        )
    assert len(watcher.readings) > 20
    for made, on in watcher.counts("cp"):
        assert on >= 3 and made <= 4, (made, on)  # expand-first: quorum always there
    for made, on in watcher.counts("w"):
        assert on >= 2 and made <= 4, (made, on)  # size 3, surge 1, unavailable 1
    assert max(on for _, on in watcher.counts("cp")) == 4  # it did surge

    state = await kubegate.cluster_state("roll")
    assert state.status is ClusterStatus.RUNNING and state.rollout is not None
    assert state.rollout.state == "done" and len(state.rollout.replaced) == 6
    assert state.rollout.replaced[0] == "roll-cp-0 -> roll-cp-0-r1"
    assert sorted(result.added) == sorted(plan.replace.values())
    assert sorted(result.removed) == sorted(before)
    vms = owned_vms(sim, "cluster/roll")
    assert sorted(vm["name"] for vm in vms) == sorted(plan.replace.values())
    # the first new control-plane member moves the cluster's kubeadm configuration to the new
    # version once it joined (kubeadm's upgrade order); the others join it as it is then
    upgrades = {vm["name"] for vm in vms if "kubeadm upgrade apply v1.31.0" in userdata(vm)}
    assert upgrades == {"roll-cp-0-r1"}
    assert {n.kubernetes for n in state.nodes} == {"1.31.0"}
    assert state.spec.template() == NEW_TEMPLATE
    # the control plane's new members are the ones kept apart (a DRS anti-affinity rule)
    assert apart_rule(sim, "roll") == ["roll-cp-0-r1", "roll-cp-1-r1", "roll-cp-2-r1"]
    allocations = await kubegate.pool_allocations(GATEWAY, pool.name)
    assert len(allocations) == 7  # the VIP and six nodes: every old address given back
    # the step history shows each replacement, the control plane's one member at a time
    (_, _, steps), *_ = [g for g in operations(state.steps) if g[0].startswith("Upgrade")]
    titles = [s.title for s in steps]
    cp_creates = [t for t in titles if t.startswith("Replace roll-cp-") and "Create VMs" in t]
    assert len(cp_creates) == 3
    assert any(t.startswith("Replace roll-w-0, roll-w-1: Create VMs") for t in titles)

    # kubeadm moves one minor at a time: a skip is refused, nothing changes
    with pytest.raises(RequestRefused, match="skips a minor version"):
        await kubegate.upgrade_cluster("roll", kubernetes="1.33.0")
    with pytest.raises(RequestRefused, match="nothing to replace"):
        await kubegate.upgrade_cluster("roll", kubernetes="1.31.0")
    await kubegate.delete_cluster("roll")
    await until(kubegate, "roll", ClusterStatus.DELETED)
    assert apart_rule(sim, "roll") is None  # removed with the cluster
    await record_history(kubegate.client, cluster_workflow_id("roll"), "cluster_rolling_upgrade")
    assert owned_vms(sim, "cluster/roll") == []
    assert await kubegate.pool_allocations(GATEWAY, pool.name) == []


async def wait_state(kubegate: KubegateClient, name: str, check: Any) -> ClusterState:
    state: ClusterState = await kubegate.wait_cluster(name, check, timeout=120, interval=0.1)
    return state


def paused(state: ClusterState) -> bool:
    return "rollout paused" in state.reason


async def test_a_rollout_pauses_resumes_and_aborts_between_replacements(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """Paused, nothing moves in vCenter until it resumes; aborted, it stops after the
    replacement in progress with every node serving (some on the old build), and upgrading
    again finishes it."""
    pool = await make_pool(kubegate, "pause-pool", 102)
    await deploy(kubegate, sim, spec_of("pz", pool.name, cp=1, workers=5))
    await until(kubegate, "pz", ClusterStatus.RUNNING)
    with pytest.raises(RequestRefused, match="no rollout"):
        await kubegate.pause_rollout("pz")

    accepted = await kubegate.upgrade_cluster("pz", kubernetes="1.31.0", wait=False)
    assert accepted.status == ClusterStatus.UPDATING.value
    rollout = await kubegate.pause_rollout("pz")
    assert rollout.state == "paused"
    with pytest.raises(RequestRefused, match="paused already"):
        await kubegate.pause_rollout("pz")
    state = await wait_state(kubegate, "pz", paused)
    held = sorted(vm["name"] for vm in owned_vms(sim, "cluster/pz"))
    assert len(held) == 6  # the replacement in progress finished: nothing half-made
    await asyncio.sleep(3)
    assert sorted(vm["name"] for vm in owned_vms(sim, "cluster/pz")) == held
    assert (await kubegate.cluster_state("pz")).status is ClusterStatus.UPDATING
    assert state.rollout is not None
    paused_at = len(state.rollout.replaced)

    await kubegate.resume_rollout("pz")
    await wait_state(
        kubegate, "pz", lambda s: s.rollout is not None and len(s.rollout.replaced) > paused_at
    )
    await kubegate.pause_rollout("pz")
    await wait_state(kubegate, "pz", paused)
    await kubegate.abort_rollout("pz")  # (while paused: it stops where it is)
    with pytest.raises(KubegateError, match="rollout aborted after"):
        await kubegate.wait_change("pz", accepted.operation, timeout=120)
    state = await kubegate.cluster_state("pz")
    assert state.status is ClusterStatus.RUNNING and state.rollout is not None
    assert state.rollout.state == "aborted" and state.rollout.outdated
    assert 0 < len(state.rollout.replaced) < 6
    vms = sorted(vm["name"] for vm in owned_vms(sim, "cluster/pz"))
    assert vms == sorted(n.name for n in state.nodes) and len(vms) == 6  # consistent
    assert all(n.phase == "ready" for n in state.nodes)
    assert len(await kubegate.pool_allocations(GATEWAY, pool.name)) == 7

    # the same upgrade again finishes what the aborted one left
    left = state.rollout.outdated
    result = await kubegate.upgrade_cluster("pz", kubernetes="1.31.0", timeout=300)
    assert sorted(result.removed) == sorted(left)
    state = await kubegate.cluster_state("pz")
    assert state.rollout is not None and state.rollout.state == "done"
    assert {n.kubernetes for n in state.nodes} == {"1.31.0"}
    assert all(vm["name"].endswith("-r1") for vm in owned_vms(sim, "cluster/pz"))
    await kubegate.delete_cluster("pz")
    await until(kubegate, "pz", ClusterStatus.DELETED)
    await record_history(kubegate.client, cluster_workflow_id("pz"), "cluster_rollout_paused")
    assert await kubegate.pool_allocations(GATEWAY, pool.name) == []


async def test_the_control_plane_grows_and_shrinks_one_member_at_a_time(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """1 -> 3 -> 1: each member added (or removed) by its own steps, never two at once;
    even sizes refused."""
    pool = await make_pool(kubegate, "cpscale-pool", 103)
    await deploy(kubegate, sim, spec_of("cps", pool.name, cp=1, workers=1))
    await until(kubegate, "cps", ClusterStatus.RUNNING)
    with pytest.raises(RequestRefused, match="1, 3 or 5"):
        await kubegate.scale_pool("cps", "cp", 2)

    with Watcher(sim, "cluster/cps") as watcher:
        result = await kubegate.scale_pool("cps", "cp", 3, timeout=300)
    assert sorted(result.added) == ["cps-cp-1", "cps-cp-2"]
    assert apart_rule(sim, "cps") == ["cps-cp-0", "cps-cp-1", "cps-cp-2"]
    made = [m for m, _ in watcher.counts("cp")]
    assert made[0] == 1 and made[-1] == 3
    assert all(b - a <= 1 for a, b in itertools.pairwise(made))  # one at a time
    assert 2 in made  # there was a moment with exactly two
    state = await kubegate.cluster_state("cps")
    (_, _, steps), *_ = [g for g in operations(state.steps) if g[0] == "Scale cp to 3"]
    creates = [s for s in steps if s.title == "Control plane, a member more: Create VMs"]
    assert len(creates) == 2  # a member at a time
    for vm in owned_vms(sim, "cluster/cps"):
        if vm["name"] in result.added:  # they join the running control plane
            assert "controlPlane:" in userdata(vm) and "JoinConfiguration" in userdata(vm)

    with Watcher(sim, "cluster/cps") as watcher:
        result = await kubegate.scale_pool("cps", "cp", 1, timeout=300)
    assert result.removed == ["cps-cp-1", "cps-cp-2"]
    made = [m for m, _ in watcher.counts("cp")]
    assert all(a - b <= 1 for a, b in itertools.pairwise(made)) and made[-1] == 1
    assert sorted(vm["name"] for vm in owned_vms(sim, "cluster/cps")) == ["cps-cp-0", "cps-w-0"]
    assert apart_rule(sim, "cps") is None  # one member: nothing to keep apart
    assert len(await kubegate.pool_allocations(GATEWAY, pool.name)) == 3
    await kubegate.delete_cluster("cps")
    await until(kubegate, "cps", ClusterStatus.DELETED)
    await record_history(kubegate.client, cluster_workflow_id("cps"), "cluster_control_plane_scale")


def first_and_last_seen(watcher: Watcher) -> tuple[dict[str, int], dict[str, int]]:
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, reading in enumerate(watcher.readings):
        for name, _, _ in reading:
            first.setdefault(name, index)
            last[name] = index
    return first, last


async def test_an_applied_spec_does_in_vcenter_what_its_plan_says_in_its_order(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """A spec edited as a user would (a pool resized, a pool added, the version raised): the
    plan names every node made, replaced and kept; vCenter sees them come and go in the
    plan's order: the control plane replaced first, then the new workers, then each old
    worker replaced one by one (surge 1)."""
    pool = await make_pool(kubegate, "apply-pool", 104)
    running = await deploy(kubegate, sim, spec_of("ar", pool.name, cp=1, workers=2))
    await until(kubegate, "ar", ClusterStatus.RUNNING)
    edited = running.spec.with_kubernetes("1.31.0").model_dump(mode="json")
    edited["workers"][0]["size"] = 3
    edited["workers"].append(
        {"name": "x", "size": 1, "placement": [domain("DC0_C1", pool.name)], "cpu": 2}
    )
    spec = ClusterSpec.model_validate(edited)
    plan = await kubegate.plan_apply(spec)
    assert plan.replace == {
        "ar-cp-0": "ar-cp-0-r1",
        "ar-w-0": "ar-w-0-r1",
        "ar-w-1": "ar-w-1-r1",
    }
    assert plan.create == ["ar-w-2", "ar-x-0"] and not plan.remove and not plan.refused
    assert plan.addresses == {pool.name: 5}
    with Watcher(sim, "cluster/ar") as watcher:
        result = await kubegate.apply_cluster(spec, plan=plan, timeout=300)
    assert sorted(result.added) == sorted([*plan.create, *plan.replace.values()])
    assert sorted(result.removed) == sorted(plan.replace)
    first, last = first_and_last_seen(watcher)
    # the control plane first: its new member made, then its old one gone...
    assert first["ar-cp-0-r1"] < last["ar-cp-0"] < first["ar-w-2"]
    # ...then the new workers, then each old worker replaced in turn, new before old
    assert max(first["ar-w-2"], first["ar-x-0"]) < first["ar-w-0-r1"] < last["ar-w-0"]
    assert last["ar-w-0"] < first["ar-w-1-r1"] < last["ar-w-1"]
    names = sorted(vm["name"] for vm in owned_vms(sim, "cluster/ar"))
    assert names == sorted(["ar-w-2", "ar-x-0", *plan.replace.values()])
    state = await kubegate.cluster_state("ar")
    assert {n.kubernetes for n in state.nodes} == {"1.31.0"}
    await kubegate.delete_cluster("ar")
    await until(kubegate, "ar", ClusterStatus.DELETED)
    await record_history(kubegate.client, cluster_workflow_id("ar"), "cluster_applied_rollout")


async def test_dhcp_workers_roll_and_a_control_plane_without_vip_is_not_replaced(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """With DHCP: a pool's new memory size replaces its workers one by one, each new one
    joining through the control-plane node's address; the control plane without a VIP
    (its address is the cluster's endpoint) is refused a replacement, naming why."""
    spec = ClusterSpec.model_validate(
        {
            "name": "dh",
            "profile": PROFILE,
            "cloud_account": "lab",
            "placement": {"datacenter": "DC0", "ip_allocation": "dhcp"},
            "control_plane": {"size": 1, "placement": [domain("DC0_C0", None, "DC0_DVPG0")]},
            "workers": [
                {"name": "w", "size": 2, "placement": [domain("DC0_C1", None, "DC0_DVPG0")]}
            ],
        }
    )
    running = await deploy(kubegate, sim, spec)
    state = await until(kubegate, "dh", ClusterStatus.RUNNING)
    endpoint = next(n.address for n in state.nodes if n.control_plane)
    edited = running.spec.model_dump(mode="json")
    edited["workers"][0]["memory_gb"] = 16
    bigger = ClusterSpec.model_validate(edited)
    plan = await kubegate.plan_apply(bigger)
    assert plan.replace == {"dh-w-0": "dh-w-0-r1", "dh-w-1": "dh-w-1-r1"} and not plan.addresses
    assert plan.warnings and "readiness guest" in plan.warnings[0]
    result = await kubegate.apply_cluster(bigger, plan=plan, timeout=300)
    assert sorted(result.added) == ["dh-w-0-r1", "dh-w-1-r1"]
    vms = {vm["name"]: vm for vm in owned_vms(sim, "cluster/dh")}
    assert sorted(vms) == ["dh-cp-0", "dh-w-0-r1", "dh-w-1-r1"]
    for name in ("dh-w-0-r1", "dh-w-1-r1"):
        assert vms[name]["memory_mb"] == 16 * 1024
        assert discovery_server(userdata(vms[name])) == f"https://{endpoint}:6443"

    with pytest.raises(RequestRefused, match="DHCP and no VIP"):
        await kubegate.upgrade_cluster("dh", kubernetes="1.31.0")
    await kubegate.delete_cluster("dh")
    await until(kubegate, "dh", ClusterStatus.DELETED)
