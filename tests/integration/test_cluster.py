"""Cluster lifecycle end to end: real simulator, real Temporal, the real workflow and agent.

What kubegate did is checked behind its back with an independent pyvmomi connection.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from pyVim.task import WaitForTask
from pyVmomi import vim
from temporalio.testing import WorkflowEnvironment

from domain.account import CloudAccountSpec
from domain.cluster import ClusterSpec, WorkerPool
from domain.ipam import IpPoolSpec
from domain.kubeconfig import KubeconfigRequest
from domain.lifecycle import ClusterState, ClusterStatus, Timing, operations
from domain.sealing import AgentKey
from domain.vm import MARK_CLUSTER
from starters.client import KubegateClient, KubegateError, RequestRefused
from tests.conftest import GATEWAY
from tests.support import (
    ADMIN,
    INVENTORY,
    TEMPLATE,
    Vcsim,
    all_runs,
    ensure_account,
    explained,
    history_text,
    record_history,
)
from tests.unit.test_bootstrap import cloud_init_check
from workflows.cluster import ClusterWorkflow

pytestmark = pytest.mark.integration

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGf0Kq7b1QbbxF8kS0Fq4m6wVv6vXQ0Vq3n9m2c4Zt1a test"
FAST = Timing(heartbeat_seconds=5)


@pytest.fixture(scope="module")
def sim(workdir: Path) -> Iterator[Vcsim]:
    """A simulator every host of which keeps time, with DHCP on the distributed port group."""
    sim = Vcsim(
        workdir,
        args=[*INVENTORY, "-dhcp", "DC0_DVPG0=10.61.0.100-10.61.0.199"],
    ).start()
    yield sim
    sim.stop()


def account(sim: Vcsim, name: str = "lab", gateway: str = GATEWAY) -> CloudAccountSpec:
    return CloudAccountSpec.model_validate(
        {
            "name": name,
            "gateway": gateway,
            "vcenter": {"server": sim.address, "username": ADMIN, "thumbprint": sim.thumbprint},
        }
    )


PROFILE: dict[str, Any] = {
    "name": "ubuntu-k8s",
    "layers": [
        {
            "layer": "os",
            "pack": {"name": "ubuntu", "version": "22.04", "values": {"template": TEMPLATE}},
        },
        {
            "layer": "kubernetes",
            "pack": {
                "name": "kubernetes",
                "version": "1.30.4",
                "values": {"pod_cidr": "172.16.0.0/16", "service_cidr": "10.96.0.0/12"},
            },
        },
        {
            "layer": "network",
            "pack": {"name": "cni-calico", "version": "3.28.0", "values": {"mtu": 1400}},
        },
    ],
}


def domain(cluster: str, pool: str | None, network: str = "VM Network") -> dict[str, Any]:
    out = {"compute_cluster": cluster, "datastore": "LocalDS_0", "network": network}
    if pool is not None:
        out["ip_pool"] = pool
    return out


def static_spec(name: str, pool: str) -> ClusterSpec:
    """3 control-plane nodes on DC0_C0; 'general' over both clusters; 'large' on DC0_C1."""
    return ClusterSpec.model_validate(
        {
            "name": name,
            "profile": PROFILE,
            "overrides": {"cni-calico": {"mtu": 1380}},
            "cloud_account": "lab",
            "placement": {
                "datacenter": "DC0",
                "ssh_keys": [KEY],
                "ntp_servers": ["0.pool.ntp.org"],
                "ip_allocation": "static",
            },
            "control_plane": {
                "size": 3,
                "cpu": 2,
                "memory_gb": 4,
                "disk_gb": 40,
                "placement": [domain("DC0_C0", pool)],
            },
            "workers": [
                {
                    "name": "general",
                    "size": 2,
                    "cpu": 4,
                    "memory_gb": 8,
                    "disk_gb": 60,
                    "placement": [domain("DC0_C0", pool), domain("DC0_C1", pool)],
                },
                {
                    "name": "large",
                    "size": 1,
                    "cpu": 8,
                    "memory_gb": 16,
                    "disk_gb": 100,
                    "placement": [domain("DC0_C1", pool)],
                },
            ],
        }
    )


async def make_pool(
    kubegate: KubegateClient, name: str, third: int, gateway: str = GATEWAY
) -> IpPoolSpec:
    spec = IpPoolSpec.model_validate(
        {
            "name": name,
            "gateway": gateway,
            "kind": "range",
            "first": f"10.{third}.0.10",
            "last": f"10.{third}.0.250",
            "prefix": 24,
            "network_gateway": f"10.{third}.0.1",
            "nameservers": ["10.0.0.53"],
        }
    )
    await kubegate.create_pool(spec)
    return spec


async def deploy(
    kubegate: KubegateClient, sim: Vcsim, spec: ClusterSpec, gateway: str = GATEWAY
) -> ClusterState:
    name = await ensure_account(kubegate, sim, gateway)
    spec = spec.model_copy(update={"cloud_account": name})
    return await kubegate.deploy_cluster(spec, timing=FAST)


async def until(kubegate: KubegateClient, name: str, *statuses: ClusterStatus) -> ClusterState:
    """Wait for one of the statuses; a Failed cluster ends the wait too (and shows why)."""
    state = await explained(
        kubegate,
        kubegate.wait_cluster(
            name, lambda s: s.status in statuses or s.status is ClusterStatus.FAILED, timeout=300
        ),
    )
    assert state.status in statuses, f"{state.status}: {state.error}"
    return state


# -- independent view of vCenter ------------------------------------------------------------


def owned_vms(sim: Vcsim, cluster_id: str) -> list[dict[str, Any]]:
    """Facts of every VM carrying the cluster's ownership mark, read while connected."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        found = []
        for vm in view.view:
            marks = {o.key: o.value for o in (vm.config.extraConfig or [])} if vm.config else {}
            if marks.get(MARK_CLUSTER) == cluster_id:
                found.append(vm_facts(vm))
        view.Destroy()
        return found
    finally:
        Vcsim.disconnect(si)


def vm_facts(vm: Any) -> dict[str, Any]:
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    extra = {o.key: o.value for o in vm.config.extraConfig or []}
    return {
        "name": vm.name,
        "cpu": vm.config.hardware.numCPU,
        "memory_mb": vm.config.hardware.memoryMB,
        "disk_gb": disks[0].capacityInKB // (1024 * 1024),
        "cluster": vm.runtime.host.parent.name,
        "datastores": sorted(ds.name for ds in vm.datastore),
        "networks": sorted(n.name for n in vm.network),
        "pool": vm.resourcePool.name,
        "folder": vm.parent.name,
        "ip": vm.guest.ipAddress,
        "hostname": vm.guest.hostName,
        "power": str(vm.runtime.powerState),
        "uuid": vm.config.instanceUuid,
        "extra": extra,
    }


def datastore_files(sim: Vcsim, name: str) -> list[str]:
    """Every file path on every datastore whose path mentions the name."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
        found: list[str] = []
        for ds in view.view:
            task = ds.browser.SearchDatastoreSubFolders_Task(
                f"[{ds.name}]", vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"])
            )
            WaitForTask(task)
            for result in task.info.result or []:
                for f in result.file or []:
                    path = f"{result.folderPath}{f.path}"
                    if name in path:
                        found.append(path)
        view.Destroy()
        return found
    finally:
        Vcsim.disconnect(si)


def decode(value: str) -> str:
    return gzip.decompress(base64.b64decode(value)).decode()


# -- tests ----------------------------------------------------------------------------------


async def test_static_cluster_matches_spec_then_delete_leaves_nothing(
    sim: Vcsim, kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    pool = await make_pool(kubegate, "cl-static", 51)
    spec = static_spec("alpha", pool.name)
    await deploy(kubegate, sim, spec)
    state = await until(kubegate, "alpha", ClusterStatus.RUNNING)

    steps = [s.name for s in state.steps]
    assert steps == [
        "validate",
        "preflight",
        "folder",
        "addresses",
        "bootstrap",
        "create-vms",
        "readiness",
        "keep-apart",
        "tags",
    ]
    assert all(s.state.value == "done" and s.started and s.ended for s in state.steps)
    kept = next(s for s in state.steps if s.name == "keep-apart")
    assert "alpha-control-plane: 3 VMs" in kept.detail, kept.detail

    vms = {vm["name"]: vm for vm in owned_vms(sim, "cluster/alpha")}
    expected = {
        "alpha-cp-0": (2, 4, 40, "DC0_C0"),
        "alpha-cp-1": (2, 4, 40, "DC0_C0"),
        "alpha-cp-2": (2, 4, 40, "DC0_C0"),
        "alpha-general-0": (4, 8, 60, "DC0_C0"),
        "alpha-general-1": (4, 8, 60, "DC0_C1"),  # round-robin over the two domains
        "alpha-large-0": (8, 16, 100, "DC0_C1"),
    }
    assert sorted(vms) == sorted(expected)
    first, last = ipaddress.ip_address("10.51.0.10"), ipaddress.ip_address("10.51.0.250")
    addresses = []
    for name, (cpu, mem, disk, cluster) in expected.items():
        facts = vms[name]
        assert (facts["cpu"], facts["memory_mb"], facts["disk_gb"]) == (cpu, mem * 1024, disk)
        assert facts["cluster"] == cluster
        assert facts["datastores"] == ["LocalDS_0"]
        assert facts["networks"] == ["VM Network"]
        assert facts["folder"] == "alpha"
        assert facts["power"] == "poweredOn"
        assert facts["hostname"] == name
        assert first <= ipaddress.ip_address(facts["ip"]) <= last
        addresses.append(facts["ip"])
        node = next(n for n in state.nodes if n.name == name)
        assert node.address == facts["ip"] and node.vm and node.instance_uuid == facts["uuid"]
        # bootstrap data: present, decodable, for this node
        extra = facts["extra"]
        assert extra["guestinfo.userdata.encoding"] == "gzip+base64"
        userdata = decode(extra["guestinfo.userdata"])
        assert userdata.startswith("#cloud-config")
        metadata = json.loads(decode(extra["guestinfo.metadata"]))
        assert metadata["local-hostname"] == name
        assert KEY.split()[1] in userdata
    # cloud-init itself reads each VM's guestinfo (its VMware datasource) and validates the
    # user-data against its schema; the network it parses is the node's static address
    checked = cloud_init_check(
        {
            name: {k: v for k, v in facts["extra"].items() if k.startswith("guestinfo.")}
            for name, facts in vms.items()
        }
    )
    for name, result in checked.items():
        assert result["read"] and result["hostname"] == name, result
        assert result["schema_errors"] is None, result["schema_errors"]
        (iface,) = result["interfaces"]
        (subnet,) = iface["subnets"]
        assert (subnet["type"], subnet["address"]) == ("static", vms[name]["ip"]), iface
        assert subnet["prefix"] == 24 and subnet["gateway"] == "10.51.0.1", iface
    assert len(set(addresses)) == len(addresses)
    assert state.vip is not None and state.vip not in addresses
    allocations = await kubegate.pool_allocations(GATEWAY, pool.name, owner="cluster/alpha")
    assert sorted(a.address for a in allocations) == sorted([*addresses, state.vip])

    # secrets never in the history; the password neither
    history = await temporal.client.get_workflow_handle("cluster/alpha").fetch_history()
    text = history_text(history)
    assert sim.password not in text
    assert "BEGIN EC PRIVATE KEY" not in text and "BEGIN PRIVATE KEY" not in text
    assert "BEGIN RSA PRIVATE KEY" not in text

    # wrong-state requests are refused
    with pytest.raises(RequestRefused, match="use delete"):
        await kubegate.abort_cluster("alpha")
    with pytest.raises(KubegateError, match="already exists"):
        await deploy(kubegate, sim, spec)

    await kubegate.delete_cluster("alpha")
    state = await until(kubegate, "alpha", ClusterStatus.DELETED)
    assert state.reason == "deleted"
    await record_history(temporal.client, "cluster/alpha", "cluster_deployed_deleted")
    assert owned_vms(sim, "cluster/alpha") == []
    assert datastore_files(sim, "alpha-") == []
    assert await kubegate.pool_allocations(GATEWAY, pool.name, owner="cluster/alpha") == []
    si = sim.connect()
    try:
        assert si.content.searchIndex.FindByInventoryPath("/DC0/vm/alpha") is None
    finally:
        Vcsim.disconnect(si)


async def test_dhcp_cluster_scale_add_and_remove_pools(
    sim: Vcsim, kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    spec = ClusterSpec.model_validate(
        {
            "name": "beta",
            "profile": PROFILE,
            "cloud_account": "lab",
            "placement": {"datacenter": "DC0", "ip_allocation": "dhcp"},
            "control_plane": {"size": 1, "placement": [domain("DC0_C0", None, "DC0_DVPG0")]},
            "workers": [
                {"name": "w", "size": 1, "placement": [domain("DC0_C1", None, "DC0_DVPG0")]}
            ],
        }
    )
    await deploy(kubegate, sim, spec)
    state = await until(kubegate, "beta", ClusterStatus.RUNNING)
    dhcp = ipaddress.ip_network("10.61.0.0/24")
    for node in state.nodes:
        assert node.address and ipaddress.ip_address(node.address) in dhcp

    result = await kubegate.scale_pool("beta", "w", 3)
    assert result.added == ["beta-w-1", "beta-w-2"]
    big = WorkerPool.model_validate(
        {
            "name": "big",
            "size": 1,
            "cpu": 8,
            "memory_gb": 16,
            "placement": [domain("DC0_C1", None, "DC0_DVPG0")],
        }
    )
    result = await kubegate.add_pool("beta", big)
    assert result.added == ["beta-big-0"]
    facts = {vm["name"]: vm for vm in owned_vms(sim, "cluster/beta")}
    assert sorted(facts) == ["beta-big-0", "beta-cp-0", "beta-w-0", "beta-w-1", "beta-w-2"]
    assert (facts["beta-big-0"]["cpu"], facts["beta-big-0"]["memory_mb"]) == (8, 16384)

    result = await kubegate.scale_pool("beta", "w", 1)  # newest first
    assert result.removed == ["beta-w-1", "beta-w-2"]
    result = await kubegate.remove_pool("beta", "big")
    assert result.removed == ["beta-big-0"]
    assert sorted(vm["name"] for vm in owned_vms(sim, "cluster/beta")) == ["beta-cp-0", "beta-w-0"]

    with pytest.raises(RequestRefused, match="no worker pool named 'nope'"):
        await kubegate.scale_pool("beta", "nope", 2)
    with pytest.raises(RequestRefused, match=r"control_plane\.vip: required with DHCP"):
        await kubegate.scale_pool("beta", "cp", 3)  # (DHCP: more members need a VIP)
    bad = big.model_copy(update={"name": "w"})
    with pytest.raises(RequestRefused, match="exists"):
        await kubegate.add_pool("beta", bad)
    static_pool = big.model_copy(
        update={"name": "stat", "placement": [big.placement[0].model_copy(update={"ip_pool": "x"})]}
    )
    with pytest.raises(RequestRefused, match=r"workers\.stat\.placement\.0\.ip_pool"):
        await kubegate.add_pool("beta", static_pool)

    await kubegate.delete_cluster("beta")
    await until(kubegate, "beta", ClusterStatus.DELETED)
    await record_history(temporal.client, "cluster/beta", "cluster_dhcp_day2")
    assert owned_vms(sim, "cluster/beta") == []
    assert datastore_files(sim, "beta-") == []


async def test_failed_preflight_names_the_problem_and_delete_cleans_up(
    vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    """The shared simulator's DC0_C1_H1 keeps no time: the preflight fails, the cluster too."""
    pool = await make_pool(kubegate, "cl-fail", 52)
    spec = static_spec("gamma", pool.name)
    await deploy(kubegate, vcsim, spec)
    state = await until(kubegate, "gamma", ClusterStatus.FAILED)
    failed = state.steps[-1]
    assert failed.name == "preflight" and failed.state.value == "failed"
    assert "DC0_C1_H1" in (failed.error or "")
    with pytest.raises(RequestRefused, match="changes need Running"):
        await kubegate.scale_pool("gamma", "general", 1)
    await kubegate.delete_cluster("gamma")
    state = await until(kubegate, "gamma", ClusterStatus.DELETED)
    assert owned_vms(vcsim, "cluster/gamma") == []
    assert await kubegate.pool_allocations(GATEWAY, pool.name) == []


async def test_deploying_cluster_refuses_delete(sim: Vcsim, kubegate: KubegateClient) -> None:
    pool = await make_pool(kubegate, "cl-refuse", 53)
    spec = static_spec("delta", pool.name)
    await deploy(kubegate, sim, spec)
    with pytest.raises(RequestRefused, match="use abort"):
        await kubegate.delete_cluster("delta")
    await kubegate.abort_cluster("delta")
    state = await until(kubegate, "delta", ClusterStatus.DELETED)
    assert state.reason == "aborted"
    assert owned_vms(sim, "cluster/delta") == []
    assert await kubegate.pool_allocations(GATEWAY, pool.name) == []


def small_spec(name: str, pool: str, workers: int = 1) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "name": name,
            "profile": PROFILE,
            "cloud_account": "lab",
            "placement": {"datacenter": "DC0", "ip_allocation": "static"},
            "control_plane": {"size": 1, "placement": [domain("DC0_C0", pool)]},
            "workers": [{"name": "w", "size": workers, "placement": [domain("DC0_C1", pool)]}],
        }
    )


async def test_failed_change_can_be_undone_and_failed_delete_repeated(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """A scale-up that runs out of addresses leaves the cluster Failed; scaling back recovers
    it. A delete that cannot finish (a foreign VM in the folder) says why; deleting again after
    the obstacle is gone completes."""
    spec = IpPoolSpec.model_validate(
        {
            "name": "cl-tiny",
            "gateway": GATEWAY,
            "kind": "range",
            "first": "10.54.0.10",
            "last": "10.54.0.12",  # VIP + 2 nodes
            "prefix": 24,
            "network_gateway": "10.54.0.1",
        }
    )
    await kubegate.create_pool(spec)
    await deploy(kubegate, sim, small_spec("eps", "cl-tiny"))
    await until(kubegate, "eps", ClusterStatus.RUNNING)

    # a scale beyond the pool's free addresses is refused up front: nothing changes
    with pytest.raises(KubegateError, match="free"):
        await kubegate.scale_pool("eps", "w", 3)
    state = await kubegate.cluster_state("eps")
    assert state.status is ClusterStatus.RUNNING and len(state.nodes) == 2, state.error
    assert sorted(vm["name"] for vm in owned_vms(sim, "cluster/eps")) == ["eps-cp-0", "eps-w-0"]

    si = sim.connect()
    try:
        content = si.RetrieveContent()
        folder = content.searchIndex.FindByInventoryPath("/DC0/vm/eps")
        template = content.searchIndex.FindByInventoryPath(f"/DC0/vm/{TEMPLATE}")
        pool = content.searchIndex.FindByInventoryPath("/DC0/host/DC0_C0/Resources")
        WaitForTask(
            template.CloneVM_Task(
                folder, "someone-else", vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool))
            )
        )
    finally:
        Vcsim.disconnect(si)
    await kubegate.delete_cluster("eps")
    state = await until(kubegate, "eps", ClusterStatus.FAILED)
    assert "someone-else" in (state.error or ""), state.error
    assert owned_vms(sim, "cluster/eps") == []  # its own VMs are gone already

    si = sim.connect()
    try:
        vm = si.RetrieveContent().searchIndex.FindByInventoryPath("/DC0/vm/eps/someone-else")
        WaitForTask(vm.Destroy_Task())
    finally:
        Vcsim.disconnect(si)
    await kubegate.delete_cluster("eps")
    state = await until(kubegate, "eps", ClusterStatus.DELETED)
    assert await kubegate.pool_allocations(GATEWAY, "cl-tiny") == []
    await record_history(kubegate.client, "cluster/eps", "cluster_change_refused_delete_failed")


async def next_run(kubegate: KubegateClient, workflow_id: str, run: str) -> str:
    """The run after `run` (continue-as-new follows a settle point within moments)."""
    handle = kubegate.client.get_workflow_handle(workflow_id)
    for _ in range(100):
        current = (await handle.describe()).run_id
        if current != run:
            return current
        await asyncio.sleep(0.1)
    raise AssertionError(f"{workflow_id} did not continue as new after run {run}")


async def test_a_resting_cluster_continues_as_new_with_its_steps_grouped(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """Each operation that ends (deploy, a scale, a failed one) is a settle point: the cluster
    continues as new there, so a resting cluster's current history is short; its step history
    is grouped by operation. A cluster that was never queued is never shown Queued."""
    pool = await make_pool(kubegate, "cl-settle", 88)
    await deploy(kubegate, sim, small_spec("settle", pool.name))
    handle = kubegate.cluster_handle("settle")
    first_run = (await handle.describe()).run_id  # (the deploy takes seconds)
    state = await until(kubegate, "settle", ClusterStatus.RUNNING)
    resting_run = await next_run(kubegate, "cluster/settle", first_run)  # continued as new
    first = await kubegate.client.get_workflow_handle(
        "cluster/settle", run_id=first_run
    ).fetch_history()  # the deploy's run, ended with continue-as-new
    statuses = [
        e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields[
            "KubegateStatus"
        ].data
        for e in first.events
        if e.HasField("upsert_workflow_search_attributes_event_attributes")
    ]
    assert statuses and b"Queued" not in statuses[0], statuses
    assert first.events[-1].HasField("workflow_execution_continued_as_new_event_attributes")
    events = [
        e
        async for e in kubegate.client.get_workflow_handle("cluster/settle").fetch_history_events()
    ]
    assert len(events) < 20, len(events)  # a resting cluster's history: a few events
    assert {s.operation for s in state.steps} == {"deploy"}
    assert {s.operation_number for s in state.steps} == {1}

    await kubegate.scale_pool("settle", "w", 2)
    state = await until(kubegate, "settle", ClusterStatus.RUNNING)
    groups = [(op, n) for op, n, _ in operations(state.steps)]
    assert groups == [("deploy", 1), ("Scale w to 2", 2)], groups
    scale_steps = [s for s in state.steps if s.operation_number == 2]
    assert scale_steps and all(s.state.value in ("done", "skipped") for s in scale_steps)
    await next_run(kubegate, "cluster/settle", resting_run)  # once the scale ended

    await kubegate.delete_cluster("settle")
    state = await until(kubegate, "settle", ClusterStatus.DELETED)
    assert [op for op, _, _ in operations(state.steps)] == ["deploy", "Scale w to 2", "delete"]
    assert owned_vms(sim, "cluster/settle") == []
    await record_history(kubegate.client, "cluster/settle", "cluster_settled")


async def test_a_kubeconfig_is_minted_from_the_cluster_ca_and_only_its_requester_reads_it(
    sim: Vcsim, kubegate: KubegateClient, tmp_path: Path
) -> None:
    """The file works with kubectl as it is; its certificate chains to the CA the nodes boot
    with, names the user and admin group and lives as long as asked; no history holds a key."""
    await kubegate.create_pool(
        IpPoolSpec.model_validate(
            {
                "name": "kc-pool",
                "gateway": GATEWAY,
                "kind": "range",
                "first": "10.56.0.10",
                "last": "10.56.0.20",
                "prefix": 24,
                "network_gateway": "10.56.0.1",
            }
        )
    )
    await deploy(kubegate, sim, small_spec("kc", "kc-pool"))
    state = await until(kubegate, "kc", ClusterStatus.RUNNING)

    text, issue = await kubegate.kubeconfig("kc", "alice@example.com", ttl=timedelta(hours=2))
    path = tmp_path / "kc.yaml"
    path.write_text(text)
    viewed = await asyncio.to_thread(
        subprocess.run,
        ["kubectl", "config", "view", "--kubeconfig", str(path), "--raw", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(viewed.stdout)
    assert config["current-context"] == "alice@example.com@kc"
    (cluster,) = config["clusters"]
    assert cluster["cluster"]["server"] == f"https://{state.vip}:6443"
    (user,) = config["users"]
    ca_pem = base64.b64decode(cluster["cluster"]["certificate-authority-data"]).decode()
    cert_pem = base64.b64decode(user["user"]["client-certificate-data"]).decode()
    key_pem = base64.b64decode(user["user"]["client-key-data"]).decode()
    (tmp_path / "ca.pem").write_text(ca_pem)
    (tmp_path / "cert.pem").write_text(cert_pem)
    verified = await asyncio.to_thread(
        subprocess.run,
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem")],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stderr
    # the CA is the one the control plane boots with (in its cloud-init)
    (cp,) = [vm for vm in owned_vms(sim, "cluster/kc") if vm["name"] == "kc-cp-0"]
    userdata = decode(cp["extra"]["guestinfo.userdata"])
    assert all(line in userdata for line in ca_pem.strip().splitlines())

    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    subject = {a.oid: a.value for a in cert.subject}
    assert subject[NameOID.COMMON_NAME] == "alice@example.com"
    assert subject[NameOID.ORGANIZATION_NAME] == "kubeadm:cluster-admins"  # 1.30: kubeadm's
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(hours=2, minutes=5)  # backdated five minutes for skew
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.OID_CLIENT_AUTH]
    assert (
        issue.serial == f"{cert.serial_number:x}" and issue.expires_at == cert.not_valid_after_utc
    )

    # recorded in the cluster's state; the key only in the requester's file
    recorded = await kubegate.cluster_state("kc")
    assert [k.request_id for k in recorded.kubeconfigs] == [issue.request_id]
    key_body = "".join(key_pem.strip().splitlines()[1:-1])
    for history in await all_runs(kubegate.client, "cluster/kc"):
        seen = history_text(history)
        assert "PRIVATE KEY" not in seen and key_body not in seen
        assert "client-key-data" not in seen

    # a signed request is answered once: sent again (as anyone could, from the history), refused
    # (any run: the cluster may have continued as new since, after a reconcile)
    (sent,) = [
        e.workflow_execution_update_accepted_event_attributes.accepted_request
        for history in await all_runs(kubegate.client, "cluster/kc")
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
        and e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        == "kubeconfig"
    ]
    (payload,) = sent.input.args.payloads
    again = KubeconfigRequest.model_validate_json(payload.data)
    with pytest.raises(RequestRefused, match="answered already"):
        await kubegate._cluster_update("kc", ClusterWorkflow.kubeconfig, again)

    # only for an operator the agent's policy lists: anyone else who reaches Temporal is refused
    with pytest.raises(KubegateError, match="may not have kubeconfigs"):
        await kubegate.kubeconfig("kc", "mallory", operator=AgentKey.generate())
    assert len((await kubegate.cluster_state("kc")).kubeconfigs) == 1

    # a kubeconfig only for a serving cluster, and within the bounds
    with pytest.raises(RequestRefused, match="ttl_seconds"):
        await kubegate.kubeconfig("kc", "alice", ttl=timedelta(days=30))
    await kubegate.delete_cluster("kc")
    with pytest.raises(RequestRefused, match="Running"):
        await kubegate.kubeconfig("kc", "alice")
    await until(kubegate, "kc", ClusterStatus.DELETED)


async def test_apply_carries_out_exactly_the_plan_and_refuses_what_cannot_change(
    sim: Vcsim, kubegate: KubegateClient
) -> None:
    """An edited spec (a pool resized, a pool added): the plan names the nodes and addresses;
    the apply makes exactly those in vCenter; fields that cannot change are refused whole."""
    await kubegate.create_pool(
        IpPoolSpec.model_validate(
            {
                "name": "ap-pool",
                "gateway": GATEWAY,
                "kind": "range",
                "first": "10.57.0.10",
                "last": "10.57.0.20",
                "prefix": 24,
                "network_gateway": "10.57.0.1",
            }
        )
    )
    running = await deploy(kubegate, sim, small_spec("ap", "ap-pool"))
    await until(kubegate, "ap", ClusterStatus.RUNNING)

    edited = running.spec.model_dump(mode="json")
    edited["description"] = "two workers and a pool for batch jobs"
    edited["workers"][0]["size"] = 2
    edited["workers"].append(
        {
            "name": "x",
            "size": 1,
            "placement": [domain("DC0_C1", "ap-pool")],
            "labels": {"team": "batch"},
            "taints": [{"key": "example.com/batch", "effect": "NoSchedule"}],
        }
    )
    grown = ClusterSpec.model_validate(edited)
    plan = await kubegate.plan_apply(grown)
    assert plan.create == ["ap-w-1", "ap-x-0"] and plan.remove == []
    assert plan.addresses == {"ap-pool": 2} and not plan.refused
    result = await kubegate.apply_cluster(grown, plan=plan)
    assert sorted(result.added) == sorted(plan.create) and result.removed == []
    with pytest.raises(RequestRefused, match="plan again"):  # a plan made before it
        await kubegate.apply_cluster(running.spec, plan=plan)
    state = await kubegate.cluster_state("ap")
    assert state.spec == grown
    assert sorted(vm["name"] for vm in owned_vms(sim, "cluster/ap")) == sorted(
        ["ap-cp-0", "ap-w-0", *plan.create]
    )
    ops = [op for op, _, _ in operations(state.steps)]
    assert ops[-1].startswith("Apply: description changed; resize worker pool w 1 -> 2")
    (x0,) = [vm for vm in owned_vms(sim, "cluster/ap") if vm["name"] == "ap-x-0"]
    registration = decode(x0["extra"]["guestinfo.userdata"])
    assert "node-labels: team=batch" in registration and "example.com/batch" in registration

    # what cannot change in place is refused whole, naming each field; nothing changes
    for change, field in (
        ({"placement": {**edited["placement"], "datacenter": "DC9"}}, "placement.datacenter"),
        (
            {
                "control_plane": {
                    **edited["control_plane"],
                    "placement": [domain("DC0_C1", "ap-pool")],
                }
            },
            "control_plane.placement",
        ),
        ({"profile": running.spec.with_kubernetes("1.32.0").profile}, "skips a minor version"),
    ):
        refused = ClusterSpec.model_validate({**edited, **change})
        assert field in " ".join((await kubegate.plan_apply(refused)).refused)
        with pytest.raises(RequestRefused, match=field.split()[0]):
            await kubegate.apply_cluster(refused)
    assert (await kubegate.cluster_state("ap")).spec == grown

    # back again: the plan removes the newest nodes first, and so does the apply
    shrunk = running.spec
    plan = await kubegate.plan_apply(shrunk)
    assert plan.create == [] and plan.remove == ["ap-w-1", "ap-x-0"]
    result = await kubegate.apply_cluster(shrunk)
    assert result.removed == sorted(plan.remove) and result.added == []
    assert sorted(vm["name"] for vm in owned_vms(sim, "cluster/ap")) == ["ap-cp-0", "ap-w-0"]
    assert len(await kubegate.pool_allocations(GATEWAY, "ap-pool")) == 3  # VIP and 2 nodes
    with pytest.raises(RequestRefused, match="no change"):
        await kubegate.apply_cluster(shrunk)
    await kubegate.delete_cluster("ap")
    await until(kubegate, "ap", ClusterStatus.DELETED)
