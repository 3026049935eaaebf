"""The gateway lifecycle on a real simulator and a real Temporal server (issue 5).

create -> install the OVA -> the agent pairs -> configure -> Running (nodes, VIP, default
account, installer off) -> clusters through it -> resize 1->3 -> upgrade with clusters queued
meanwhile -> delete refused, then allowed -> nothing left. Plus: wrong pairing codes, reset
after an injected failure, the password in no history, CLI output or bundle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim
from temporalio.testing import WorkflowEnvironment

from activities.vsphere.session import SessionPool
from domain.account import Placement, VCenterEndpoint
from domain.cluster import ClusterSpec
from domain.gateway import (
    GatewayFile,
    GatewayState,
    GatewayStatus,
    InstallerProperties,
)
from domain.ipam import IpPoolSpec
from domain.lifecycle import ClusterState, ClusterStatus, Timing, operations
from domain.sealing import AgentKey
from plumbing.settings import Settings
from starters.client import KubegateClient, RequestRefused
from starters.installer import install, installer_ova, read_installer
from tests.integration.test_cluster import PROFILE, domain, next_run
from tests.integration.test_healing import destroy
from tests.support import (
    ADMIN,
    INVENTORY,
    PLACEMENT,
    Vcsim,
    agent_policy,
    explained,
    history_text,
    record_history,
    run_cli,
)
from workers.gateway_agent import build_agent

pytestmark = pytest.mark.integration

FAST = Timing(heartbeat_seconds=5)
CLONE_MS = 700


@pytest.fixture(scope="module")
def gsim(workdir: Path) -> Iterator[Vcsim]:
    """Clones take 0.7 s (an upgrade lasts long enough for requests to arrive meanwhile)."""
    sim = Vcsim(
        workdir,
        args=[
            *INVENTORY,
            "-task-delay",
            f"CloneVM_Task={CLONE_MS}",
            "-dhcp",
            "VM Network=10.62.0.100-10.62.0.199",
        ],
    ).start()
    yield sim
    sim.stop()


def endpoint(sim: Vcsim) -> VCenterEndpoint:
    return VCenterEndpoint(server=sim.address, thumbprint=sim.thumbprint)


@asynccontextmanager
async def agent_of(
    temporal: WorkflowEnvironment, sessions: SessionPool, gateway: str, key: AgentKey
) -> AsyncIterator[None]:
    """The gateway's agent, in this process, polling its own task queue."""
    policy = agent_policy(
        Path(tempfile.mkdtemp(prefix=f"agent-{gateway}-")) / "policy.yaml", gateway
    )
    with ThreadPoolExecutor(max_workers=16) as executor:
        async with build_agent(
            temporal.client, gateway, key, sessions, executor, 16, policy=policy
        ):
            yield


def gateway_file(sim: Vcsim, **extra: Any) -> GatewayFile:
    return GatewayFile.model_validate(
        {
            "vcenter": {"server": sim.address, "username": ADMIN, "thumbprint": sim.thumbprint},
            "placement": PLACEMENT,
            "ntp_servers": ["0.pool.ntp.org"],
            **extra,
        }
    )


def pool_fields(name: str, third: int, count: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "range",
        "first": f"10.{third}.0.10",
        "last": f"10.{third}.0.{9 + count}",
        "prefix": 24,
        "network_gateway": f"10.{third}.0.1",
        "nameservers": [f"10.{third}.0.2"],
    }


def small_cluster(name: str, account: str, pool: str) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "name": name,
            "profile": PROFILE,
            "cloud_account": account,
            "placement": {"datacenter": "DC0", "ip_allocation": "static"},
            "control_plane": {"size": 1, "placement": [domain("DC0_C0", pool)]},
        }
    )


async def until_gateway(
    kubegate: KubegateClient, name: str, *statuses: GatewayStatus
) -> GatewayState:
    state = await explained(
        kubegate,
        kubegate.wait_gateway(
            name,
            lambda s: s.status in statuses or s.status is GatewayStatus.FAILED,
            timeout=180,
            interval=0.1,
        ),
    )
    assert state.status in statuses, (state.status, state.error, [s.error for s in state.steps])
    return state


async def until_cluster(
    kubegate: KubegateClient, name: str, *statuses: ClusterStatus
) -> ClusterState:
    state = await explained(
        kubegate,
        kubegate.wait_cluster(
            name,
            lambda s: s.status in statuses or s.status is ClusterStatus.FAILED,
            timeout=180,
            interval=0.1,
        ),
    )
    assert state.status in statuses, (state.status, state.error)
    return state


def vms_in(sim: Vcsim, path: str) -> list[str] | None:
    """Names of the VMs in a folder (None if the folder does not exist)."""
    si = sim.connect()
    try:
        folder = si.RetrieveContent().searchIndex.FindByInventoryPath(path)
        if folder is None:
            return None
        return sorted(c.name for c in folder.childEntity if isinstance(c, vim.VirtualMachine))
    finally:
        sim.disconnect(si)


def installer_properties(sim: Vcsim, path: str) -> dict[str, str]:
    """The kubegate.* properties vCenter keeps for the installer VM."""
    from activities.vsphere.ovf import vapp_properties

    si = sim.connect()
    try:
        vm = si.RetrieveContent().searchIndex.FindByInventoryPath(path)
        return vapp_properties(vm.config.vAppConfig, vm.config.extraConfig)
    finally:
        sim.disconnect(si)


def vm_power(sim: Vcsim, path: str) -> str | None:
    si = sim.connect()
    try:
        vm = si.RetrieveContent().searchIndex.FindByInventoryPath(path)
        return None if vm is None else str(vm.runtime.powerState)
    finally:
        sim.disconnect(si)


async def test_gateway_story(
    gsim: Vcsim,
    kubegate: KubegateClient,
    temporal: WorkflowEnvironment,
    sessions: SessionPool,
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    name = "gw1"
    outputs: list[str] = []

    # create: Pending, a code shown once, only its hash kept
    state, code = await kubegate.create_gateway(name, timing=FAST)
    assert state.status is GatewayStatus.PENDING and state.agent is None
    assert code not in state.model_dump_json()
    with pytest.raises(RequestRefused, match="already exists"):
        await kubegate.create_gateway(name)

    # the installer OVA, imported with its properties, powered on; the agent reads them back
    props = InstallerProperties(
        installer_name=name,
        console_endpoint=f"http://{settings.temporal_address}",
        pairing_code=code,
    )
    placement = Placement.model_validate(PLACEMENT)
    installed = await asyncio.to_thread(
        install, endpoint(gsim), ADMIN, gsim.password, placement, props, installer_ova(settings)
    )
    assert installed.power_state == "poweredOn"
    read = await asyncio.to_thread(
        read_installer, endpoint(gsim), ADMIN, gsim.password, "DC0", installed.inventory_path
    )
    assert read.pairing_code == props.pairing_code

    # pairing: configure before it is refused; a wrong code is refused; the right one pairs once
    key = AgentKey.generate()
    code_cli, out = await run_cli(settings, "gateway", "configure", name, "-f", "/nonexistent")
    assert code_cli == 2 and "no such file" in out, out
    with pytest.raises(RequestRefused, match="wrong pairing code"):
        await kubegate.register_agent(name, key, "ABCDE-FGHJK")
    async with agent_of(temporal, sessions, name, key):
        state = await kubegate.register_agent(
            name, key, read.pairing_code, installer_vm=installed.inventory_path
        )
        # paired, but nothing is sealed to it until the operator approves its fingerprint
        assert state.status is GatewayStatus.PENDING, state.reason
        assert state.agent is not None and state.agent.public_key == key.public_key_b64
        assert key.fingerprint in state.reason and not state.agent.approved
        with pytest.raises(RequestRefused, match="not approved"):
            await kubegate.gateway_public_key(name)
        with pytest.raises(RequestRefused, match="not the paired agent"):
            await kubegate.approve_agent(name, AgentKey.generate().fingerprint)
        state = await kubegate.approve_agent(name, key.fingerprint)
        assert state.status is GatewayStatus.REGISTERED
        again = await kubegate.register_agent(name, key, None)  # a restart: nothing to do
        assert again.status is GatewayStatus.REGISTERED
        with pytest.raises(RequestRefused, match="paired with another agent"):
            await kubegate.register_agent(name, AgentKey.generate(), read.pairing_code)

        # configure (through the CLI, the password from a file): static addresses from a pool
        # the file creates; 1 node behind a VIP
        (tmp_path / "vc.pw").write_text(gsim.password + "\n")
        file = gateway_file(
            gsim, ip_allocation="static", create_ip_pool=pool_fields("gw1-pool", 91, 12)
        )
        data = file.model_dump(mode="json", exclude_none=True)
        data["vcenter"]["password_file"] = "vc.pw"
        (tmp_path / "gateway.yaml").write_text(json.dumps(data))
        code_cli, out = await run_cli(
            settings, "gateway", "configure", name, "-f", str(tmp_path / "gateway.yaml"), "--wait"
        )
        outputs.append(out)
        assert code_cli == 0, out
        assert "Create VMs" in out and "Running" in out, out
        state = await until_gateway(kubegate, name, GatewayStatus.RUNNING)
        steps = [s.name for s in state.steps]
        for expected in (
            "validate",
            "preflight",
            "folder",
            "addresses",
            "bootstrap",
            "create-vms",
            "readiness",
            "default-account",
            "installer",
        ):
            assert expected in steps, steps
        assert all(s.ended for s in state.steps)
        assert state.nodes is not None and [n.name for n in state.nodes.nodes] == ["gw1-pcg-cp-0"]
        assert state.nodes.vip is not None and state.nodes.nodes[0].address is not None
        assert vms_in(gsim, "/DC0/vm/gw1-pcg") == ["gw1-pcg-cp-0"]
        assert vm_power(gsim, installed.inventory_path) == "poweredOff"
        # the used pairing code is gone from the installer's properties (others stay)
        left = installer_properties(gsim, installed.inventory_path)
        assert left.get("kubegate.pairing_code", "") == "", left
        assert left["kubegate.installer_name"] == name
        assert read.pairing_code not in json.dumps(left)
        held = await kubegate.pool_allocations(name, "gw1-pool", owner="gateway/gw1")
        assert sorted(a.slot for a in held) == ["gw1-pcg-cp-0", "vip"]
        assert [a.name for a in state.accounts] == ["gw1-default"]
        assert state.available_version == "1.1.0"
        account = {
            "name": "gw1-ops",
            "gateway": name,
            "vcenter": {**data["vcenter"], "username": ADMIN},
        }
        (tmp_path / "account.yaml").write_text(json.dumps(account))
        code_cli, out = await run_cli(
            settings, "account", "create", "-f", str(tmp_path / "account.yaml")
        )
        outputs.append(out)
        assert code_cli == 0 and "gw1-ops" in out, out
        code_cli, out = await run_cli(settings, "account", "list", "-g", name)
        outputs.append(out)
        assert code_cli == 0 and "gw1-default" in out and "gw1-ops" in out, out
        code_cli, out = await run_cli(settings, "account", "delete", "gw1-ops")
        assert code_cli == 0, out

        # a cluster through the default account
        await kubegate.create_pool(
            IpPoolSpec.model_validate({**pool_fields("gw1-clusters", 92, 20), "gateway": name})
        )
        await kubegate.deploy_cluster(
            small_cluster("gwc1", "gw1-default", "gw1-clusters"), timing=FAST
        )
        await until_cluster(kubegate, "gwc1", ClusterStatus.RUNNING)
        # the gateway hears it by the cluster's signal, in its own workflow task: a moment later
        state = await kubegate.wait_gateway(
            name, lambda s: [c.status for c in s.clusters] != ["Provisioning"], timeout=30
        )
        assert [(c.name, c.status) for c in state.clusters] == [("gwc1", "Running")]

        # refusals: delete while a cluster lives; its account while used; shrink; same size
        code_cli, out = await run_cli(settings, "gateway", "delete", name, "--yes")
        outputs.append(out)
        assert code_cli == 2 and "gwc1" in out, out
        with pytest.raises(RequestRefused, match="used by cluster"):
            await kubegate.delete_account("gw1-default")
        with pytest.raises(RequestRefused, match="already has 1"):
            await kubegate.resize_gateway(name, 1)
        with pytest.raises(RequestRefused, match="cloud account 'nope'"):
            await kubegate.deploy_cluster(
                small_cluster("gwc9", "nope", "gw1-clusters"), gateway=name
            )

        # resize 1 -> 3: two nodes more, addresses from the gateway's pool; 3 -> 1 refused
        state = await kubegate.resize_gateway(name, 3)
        assert state.status is GatewayStatus.UPGRADING
        state = await until_gateway(kubegate, name, GatewayStatus.RUNNING)
        assert state.nodes is not None and len(state.nodes.nodes) == 3
        assert vms_in(gsim, "/DC0/vm/gw1-pcg") == [f"gw1-pcg-cp-{i}" for i in range(3)]
        code_cli, out = await run_cli(settings, "gateway", "resize", name, "--size", "1")
        outputs.append(out)
        assert code_cli == 2 and "cannot shrink" in out, out

        # a node's VM removed behind kubegate's back: the gateway's reconcile makes it again,
        # same name and address (the two others keep etcd's quorum)
        address = {n.name: n.address for n in state.nodes.nodes}["gw1-pcg-cp-1"]
        destroy(gsim, "gw1-pcg/gw1-pcg-cp-1")
        assert vms_in(gsim, "/DC0/vm/gw1-pcg") == ["gw1-pcg-cp-0", "gw1-pcg-cp-2"]
        code_cli, out = await run_cli(settings, "gateway", "reconcile", name)
        outputs.append(out)
        assert code_cli == 0 and "missing" in out and "1 repair(s)" in out, out
        assert vms_in(gsim, "/DC0/vm/gw1-pcg") == [f"gw1-pcg-cp-{i}" for i in range(3)]
        state = await kubegate.gateway_state(name)
        assert state.nodes is not None and state.shown_status == "Running"
        assert {n.name: n.address for n in state.nodes.nodes}["gw1-pcg-cp-1"] == address
        assert any(s.title.startswith("Recreate gw1-pcg-cp-1") for s in state.steps)

        # upgrade: nodes replaced one at a time; clusters requested meanwhile wait in order;
        # a running cluster is not touched
        before = await kubegate.cluster_state("gwc1")
        started_upgrade = (await kubegate.gateway_state(name)).steps[-1].ended
        assert started_upgrade is not None
        state = await kubegate.upgrade_gateway(name)
        assert state.status is GatewayStatus.UPGRADING and state.target_version == "1.1.0"
        for cluster in ("gwc2", "gwc3"):
            queued = await kubegate.deploy_cluster(
                small_cluster(cluster, "gw1-default", "gw1-clusters"), timing=FAST
            )
            assert queued.status is ClusterStatus.QUEUED, queued.status
        assert (await kubegate.gateway_state(name)).queue == ["gwc2", "gwc3"]
        # a queued cluster can be aborted: nothing was made; it leaves the queue
        await kubegate.deploy_cluster(
            small_cluster("gwc4", "gw1-default", "gw1-clusters"), timing=FAST
        )
        await kubegate.abort_cluster("gwc4")
        aborted = await until_cluster(kubegate, "gwc4", ClusterStatus.DELETED)
        assert aborted.reason == "aborted while queued" and not aborted.nodes
        await kubegate.wait_gateway(name, lambda s: "gwc4" not in s.queue, timeout=30)
        state = await until_gateway(kubegate, name, GatewayStatus.RUNNING)
        assert state.version == "1.1.0" and state.available_version is None
        assert state.nodes is not None
        assert sorted(n.name for n in state.nodes.nodes) == [f"gw1-pcg-cp-{i}-r1" for i in range(3)]
        assert vms_in(gsim, "/DC0/vm/gw1-pcg") == [f"gw1-pcg-cp-{i}-r1" for i in range(3)]
        first, second = [
            await until_cluster(kubegate, c, ClusterStatus.RUNNING) for c in ("gwc2", "gwc3")
        ]
        started = [
            next(s.started for s in c.steps if s.name == "validate") for c in (first, second)
        ]
        assert started[0] is not None and started[1] is not None and started[0] <= started[1]
        assert (await kubegate.gateway_state(name)).queue == []
        after = await kubegate.cluster_state("gwc1")
        assert after.status is ClusterStatus.RUNNING
        assert [(n.vm, n.phase) for n in after.nodes] == [(n.vm, n.phase) for n in before.nodes]
        assert len(after.steps) == len(before.steps)
        assert vms_in(gsim, "/DC0/vm/gwc1") == ["gwc1-cp-0"]
        # one node at a time: each replacement added one node, then removed one
        upgrade_steps = [s for s in state.steps if s.started and s.started >= started_upgrade]
        removals = [s for s in upgrade_steps if s.name == "remove-nodes"]
        assert [s.title for s in removals] == ["Remove 1 node(s)"] * 3, [s.title for s in removals]
        held = await kubegate.pool_allocations(name, "gw1-pool", owner="gateway/gw1")
        assert len(held) == 4  # VIP + three nodes; the replaced nodes' addresses were released

        # the logs bundle (the agent runs in this process: its log file is not there)
        bundle = tmp_path / "gw1.tgz"
        code_cli, out = await run_cli(
            settings, "gateway", "logs", name, "--output-file", str(bundle)
        )
        outputs.append(out)
        assert code_cli == 0, out
        with tarfile.open(bundle) as tar:
            members = tar.getnames()
            texts = [
                tar.extractfile(m).read().decode(errors="replace")  # type: ignore[union-attr]
                for m in tar.getmembers()
                if m.isfile()
            ]
        assert {"state.json", "steps.txt", "events.txt", "tasks.txt", "notes.txt"} <= set(members)
        assert any("gw1-pcg-cp-0-r1" in t for t in texts)
        assert all(gsim.password not in t for t in texts)

        # delete: the clusters first, then the gateway; nothing of it is left
        for cluster in ("gwc1", "gwc2", "gwc3"):
            await kubegate.delete_cluster(cluster)
        for cluster in ("gwc1", "gwc2", "gwc3"):
            await until_cluster(kubegate, cluster, ClusterStatus.DELETED)
        state = await kubegate.wait_gateway(name, lambda s: not s.clusters, timeout=30)
        code_cli, out = await run_cli(settings, "gateway", "describe", name)
        outputs.append(out)
        assert code_cli == 0 and "Running" in out, out
        await kubegate.delete_gateway(name)
        state = await until_gateway(kubegate, name, GatewayStatus.DELETED)
    assert vms_in(gsim, "/DC0/vm/gw1-pcg") is None
    assert vm_power(gsim, installed.inventory_path) is None
    assert await kubegate.pool_allocations(name, "gw1-pool", owner="gateway/gw1") == []

    # the password is in no history (decoded payloads), no CLI output, no log line
    for workflow_id in (
        "gateway/gw1",
        "cluster/gwc1",
        "cluster/gwc2",
        "cluster/gwc3",
        "cluster/gwc4",
    ):
        history = await kubegate.client.get_workflow_handle(workflow_id).fetch_history()
        assert gsim.password not in history_text(history), workflow_id
    assert all(gsim.password not in out for out in outputs)
    assert caplog.records and gsim.password not in caplog.text
    await record_history(kubegate.client, "gateway/gw1", "gateway_story_healing")
    await record_history(kubegate.client, "cluster/gwc2", "cluster_queued_by_gateway_healing")


async def test_reset_after_a_failed_provisioning(
    gsim: Vcsim,
    kubegate: KubegateClient,
    temporal: WorkflowEnvironment,
    sessions: SessionPool,
    settings: Settings,
) -> None:
    """A foreign VM holds the node's name: create-vms fails; fix it, reset, configure again."""
    name = "rgw"
    _, code = await kubegate.create_gateway(name, timing=FAST)
    foreign_vm(gsim, "/DC0/vm/rgw-pcg", "rgw-pcg-cp-0")
    key = AgentKey.generate()
    async with agent_of(temporal, sessions, name, key):
        await kubegate.register_agent(name, key, code)
        await kubegate.approve_agent(name, key.fingerprint)
        file = gateway_file(gsim, ip_allocation="dhcp", vip="10.62.0.50")
        await kubegate.configure_gateway(name, file, gsim.password)
        state = await until_gateway(kubegate, name, GatewayStatus.FAILED)
        failed = [s for s in state.steps if s.state.value == "failed"]
        assert [s.name for s in failed] == ["create-vms"], [(s.name, s.state) for s in state.steps]
        assert "already exists" in (failed[0].error or "")
        with pytest.raises(RequestRefused, match="clusters need a Running gateway"):
            await kubegate.deploy_cluster(small_cluster("rgwc", "rgw-default", "x"), gateway=name)

        # the operator removes the foreign VM, resets, and configures again
        destroy_vm(gsim, "/DC0/vm/rgw-pcg/rgw-pcg-cp-0")
        code_cli, out = await run_cli(settings, "gateway", "reset", name, "--wait", "-o", "json")
        assert code_cli == 0, out
        # (the progress goes to stderr; stdout is the JSON alone, any new pairing code in it)
        reset = json.loads(out[out.index("\n{") + 1 :] if not out.startswith("{") else out)
        assert reset["status"] == "Pending" and "pairing_code" in reset, reset
        state = await kubegate.gateway_state(name)
        assert state.status is GatewayStatus.PENDING and state.agent is not None
        assert state.config is None and state.nodes is None and not state.accounts
        assert vms_in(gsim, "/DC0/vm/rgw-pcg") is None
        assert "create-vms" in [s.name for s in state.steps]  # the failed attempt stays visible

        await kubegate.configure_gateway(name, file, gsim.password)
        state = await until_gateway(kubegate, name, GatewayStatus.RUNNING)
        assert vms_in(gsim, "/DC0/vm/rgw-pcg") == ["rgw-pcg-cp-0"]
        code_cli, out = await run_cli(settings, "gateway", "reset", name)
        assert code_cli == 2 and "reset is for" in out, out
        await kubegate.delete_gateway(name)
        await until_gateway(kubegate, name, GatewayStatus.DELETED)
    assert vms_in(gsim, "/DC0/vm/rgw-pcg") is None
    history = await kubegate.client.get_workflow_handle("gateway/rgw").fetch_history()
    assert gsim.password not in history_text(history)
    await record_history(kubegate.client, "gateway/rgw", "gateway_reset")


async def test_configuration_refused_by_the_preflight(
    gsim: Vcsim,
    kubegate: KubegateClient,
    temporal: WorkflowEnvironment,
    sessions: SessionPool,
    settings: Settings,
) -> None:
    """A wrong datastore: refused (exit 2) with the check named; the gateway stays Registered."""
    name = "pgw"
    _, code = await kubegate.create_gateway(name, timing=FAST)
    key = AgentKey.generate()
    async with agent_of(temporal, sessions, name, key):
        await kubegate.register_agent(name, key, code)
        await kubegate.approve_agent(name, key.fingerprint)
        file = gateway_file(gsim, vip="10.62.0.51")
        file.placement = file.placement.model_copy(update={"datastore": "NoSuchDS"})
        with pytest.raises(RequestRefused, match="NoSuchDS"):
            await kubegate.configure_gateway(name, file, gsim.password)
        # the same refusal with a pool the file asks for: the pool is not left behind
        static = gateway_file(
            gsim, ip_allocation="static", create_ip_pool=pool_fields("pgw-pool", 94, 4)
        )
        static.placement = static.placement.model_copy(update={"datastore": "NoSuchDS"})
        with pytest.raises(RequestRefused, match="NoSuchDS"):
            await kubegate.configure_gateway(name, static, gsim.password)
        assert [p.spec.name for p in await kubegate.list_pools(name)] == []
        state = await kubegate.gateway_state(name)
        assert state.status is GatewayStatus.REGISTERED and state.config is None
        assert any(s.name == "preflight" and s.error for s in state.steps)
        with pytest.raises(RequestRefused, match="vip: required with DHCP"):
            await kubegate.configure_gateway(name, gateway_file(gsim), gsim.password)
        await kubegate.delete_gateway(name)
        await until_gateway(kubegate, name, GatewayStatus.DELETED)
        history = await kubegate.client.get_workflow_handle(f"gateway/{name}").fetch_history()
        assert gsim.password not in history_text(history)


async def test_reset_while_provisioning_cancels_and_removes_everything(
    workdir: Path,
    kubegate: KubegateClient,
    temporal: WorkflowEnvironment,
    sessions: SessionPool,
) -> None:
    """Reset a gateway stuck in its clone (3 s): the clone is cancelled, nothing is left."""
    slow = Vcsim(workdir, args=[*INVENTORY, "-task-delay", "CloneVM_Task=3000"]).start()
    try:
        name = "sgw"
        _, code = await kubegate.create_gateway(name, timing=FAST)
        key = AgentKey.generate()
        async with agent_of(temporal, sessions, name, key):
            await kubegate.register_agent(name, key, code)
            await kubegate.approve_agent(name, key.fingerprint)
            file = gateway_file(
                slow, ip_allocation="static", create_ip_pool=pool_fields("sgw-pool", 93, 4)
            )
            await kubegate.configure_gateway(name, file, slow.password)
            await kubegate.wait_gateway(
                name,
                lambda s: s.nodes is not None and any(n.phase == "creating" for n in s.nodes.nodes),
                timeout=60,
                interval=0.05,
            )
            state, new_code = await kubegate.reset_gateway(name)
            assert new_code is None  # the agent stays paired
            state = await until_gateway(kubegate, name, GatewayStatus.PENDING)
            assert state.agent is not None and state.config is None
            steps = {s.name: s for s in state.steps}
            assert steps["create-vms"].state.value == "cancelled", steps["create-vms"]
            assert steps["delete-vms"].state.value == "done"
            await asyncio.sleep(3.5)  # a clone that was not cancelled would have landed now
            assert vms_in(slow, "/DC0/vm/sgw-pcg") is None
            assert await kubegate.pool_allocations(name, "sgw-pool", owner="gateway/sgw") == []
            await kubegate.delete_gateway(name)
            await until_gateway(kubegate, name, GatewayStatus.DELETED)
    finally:
        slow.stop()


def foreign_vm(sim: Vcsim, folder_path: str, name: str) -> None:
    """A VM that is not kubegate's, with a name kubegate is about to use."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        folder = content.searchIndex.FindByInventoryPath(folder_path)
        if folder is None:
            parent, _, leaf = folder_path.rpartition("/")
            folder = content.searchIndex.FindByInventoryPath(parent).CreateFolder(leaf)
        template = content.searchIndex.FindByInventoryPath(f"/DC0/vm/{PLACEMENT['template']}")
        pool = content.searchIndex.FindByInventoryPath("/DC0/host/DC0_C0/Resources")
        spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool))
        WaitForTask(template.CloneVM_Task(folder=folder, name=name, spec=spec))
    finally:
        sim.disconnect(si)


def destroy_vm(sim: Vcsim, path: str) -> None:
    si = sim.connect()
    try:
        WaitForTask(si.RetrieveContent().searchIndex.FindByInventoryPath(path).Destroy_Task())
    finally:
        sim.disconnect(si)


async def test_failed_upgrade_resumes_where_it_stopped(
    gsim: Vcsim,
    kubegate: KubegateClient,
    temporal: WorkflowEnvironment,
    sessions: SessionPool,
) -> None:
    """The replacement's name is taken: the upgrade fails; fixed and repeated, it resumes
    (the node is replaced once, not twice) and the gateway runs the new version."""
    name = "ugw"
    _, code = await kubegate.create_gateway(name, timing=FAST)
    first_run = (await kubegate.gateway_handle(name).describe()).run_id
    key = AgentKey.generate()
    async with agent_of(temporal, sessions, name, key):
        await kubegate.register_agent(name, key, code)
        await kubegate.approve_agent(name, key.fingerprint)
        await kubegate.configure_gateway(name, gateway_file(gsim, vip="10.62.0.52"), gsim.password)
        state = await until_gateway(kubegate, name, GatewayStatus.RUNNING)
        assert [op for op, _, _ in operations(state.steps)] == ["configure"]
        # settled once Running: continued as new (the agent's pin is the first run: kept)
        await next_run(kubegate, f"gateway/{name}", first_run)
        foreign_vm(gsim, "/DC0/vm/ugw-pcg", "ugw-pcg-cp-0-r1")

        await kubegate.upgrade_gateway(name, "1.1.0")
        state = await until_gateway(kubegate, name, GatewayStatus.FAILED)
        assert state.failed_operation == "upgrade" and state.version == "1.0.0"
        assert "already exists" in (state.error or "")
        with pytest.raises(RequestRefused, match="resize needs Running"):
            await kubegate.resize_gateway(name, 3)  # only the failed operation may be repeated
        with pytest.raises(RequestRefused, match="repeat the upgrade"):
            await kubegate.reset_gateway(name)

        destroy_vm(gsim, "/DC0/vm/ugw-pcg/ugw-pcg-cp-0-r1")
        await kubegate.upgrade_gateway(name)  # the pending target, 1.1.0
        state = await until_gateway(kubegate, name, GatewayStatus.RUNNING)
        assert state.version == "1.1.0" and state.failed_operation is None
        assert [(op, n) for op, n, _ in operations(state.steps)] == [
            ("configure", 1),
            ("upgrade", 2),
            ("upgrade", 3),
        ]
        assert state.nodes is not None
        assert [n.name for n in state.nodes.nodes] == ["ugw-pcg-cp-0-r1"]
        assert vms_in(gsim, "/DC0/vm/ugw-pcg") == ["ugw-pcg-cp-0-r1"]
        await kubegate.delete_gateway(name)
        await until_gateway(kubegate, name, GatewayStatus.DELETED)
    assert vms_in(gsim, "/DC0/vm/ugw-pcg") is None


async def test_delete_removes_the_installer_in_every_state(
    gsim: Vcsim,
    kubegate: KubegateClient,
    temporal: WorkflowEnvironment,
    sessions: SessionPool,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """A gateway that never got vCenter credentials (Pending: never paired; Registered: paired
    and approved, never configured; Pending again after a reset) cannot remove its installer
    itself: `gateway delete --vcenter install.yaml` does, and says so. (Configured gateways
    remove it themselves: the story above.)"""
    (tmp_path / "vc.pw").write_text(gsim.password + "\n")
    install_yaml = tmp_path / "install.yaml"
    install_yaml.write_text(
        json.dumps(
            {
                "vcenter": {
                    "server": gsim.address,
                    "username": ADMIN,
                    "thumbprint": gsim.thumbprint,
                    "password_file": str(tmp_path / "vc.pw"),
                },
                "placement": PLACEMENT,
                "properties": {},
            }
        )
    )
    placement = Placement.model_validate(PLACEMENT)
    for name, paired in (("idle-pending", False), ("idle-registered", True)):
        _, code = await kubegate.create_gateway(name, timing=FAST)
        props = InstallerProperties(
            installer_name=name,
            console_endpoint=f"http://{settings.temporal_address}",
            pairing_code=code,
        )
        installed = await asyncio.to_thread(
            install, endpoint(gsim), ADMIN, gsim.password, placement, props, installer_ova(settings)
        )
        if paired:
            key = AgentKey.generate()
            await kubegate.register_agent(name, key, code)
            await kubegate.approve_agent(name, key.fingerprint)
        assert vm_power(gsim, installed.inventory_path) == "poweredOn"
        # without --vcenter: deleted, and told that the installer stays
        if not paired:
            status, out = await run_cli(settings, "gateway", "delete", name, "--wait", "--yes")
            assert status == 0 and "--vcenter install.yaml" in " ".join(out.split()), out
            assert vm_power(gsim, installed.inventory_path) == "poweredOn"
        # with it (also once the gateway is deleted): the installer goes
        status, out = await run_cli(
            settings, "gateway", "delete", name, "--vcenter", str(install_yaml), "--wait", "-y"
        )
        assert status == 0, out
        assert f"installer VM {installed.inventory_path} removed" in " ".join(out.split()), out
        assert vm_power(gsim, installed.inventory_path) is None
        assert (await kubegate.gateway_state(name)).status is GatewayStatus.DELETED
        status, out = await run_cli(
            settings, "gateway", "delete", name, "--vcenter", str(install_yaml), "--yes"
        )
        assert status == 0 and "no installer VM to remove" in out, out
