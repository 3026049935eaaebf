"""Upgrading kubegate under running lifecycles: the previous release (its code checked out
from the commit tests/replay/releases.txt names) pairs a gateway, configures it, and deploys
clusters through its own CLI, control worker and agent; its workers are stopped while one
cluster is still cloning; this release's workers take over. The cluster finishes, another is
scaled, both are deleted, the gateway is upgraded and deleted: nothing is duplicated or left.

Runs on its own Temporal dev server and simulator (the session's in-process workers are this
release's and must not take the old release's tasks).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from temporalio.testing import WorkflowEnvironment

from domain.gateway import GatewayStatus
from domain.lifecycle import ClusterStatus
from domain.names import SEARCH_ATTRIBUTES
from domain.version import VERSION
from plumbing.codec import ReadableMetadata, data_converter
from plumbing.settings import Settings, tool_path
from starters.client import KubegateClient
from tests.integration.test_cluster import PROFILE, owned_vms
from tests.integration.test_gateway import vms_in
from tests.support import ADMIN, INVENTORY, PLACEMENT, ROOT, Vcsim, agent_policy, record_history

pytestmark = pytest.mark.integration

RELEASES = ROOT / "tests" / "replay" / "releases.txt"
GW = "up"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3])


def previous_release() -> tuple[str, str]:
    """(version, commit) of the newest release before this one."""
    entries = [
        line.split()
        for line in RELEASES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    older = [(v, c) for v, c in entries if _release(v) < _release(VERSION)]
    assert older, f"{RELEASES} names no release before {VERSION}"
    return max(older, key=lambda e: _release(e[0]))


def _has_commit(commit: str) -> bool:
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
    )
    return found.returncode == 0


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's source, exported from its commit."""
    version, commit = previous_release()
    if not _has_commit(commit):  # a shallow clone: its history is one fetch away
        subprocess.run(["git", "-C", str(ROOT), "fetch", "--quiet", "--unshallow"], check=False)
    if not _has_commit(commit):
        pytest.fail(
            f"release {version} (commit {commit}) is not in this clone's history: the upgrade "
            "test checks it out (use a full git clone)"
        )
    dest = tmp_path_factory.mktemp(f"kubegate-{version}")
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    assert f'version = "{version}"' in (dest / "pyproject.toml").read_text()
    # as installed: the package metadata says its release (0.1.0 read only that, and the
    # environment's is this checkout's)
    info = dest / f"kubegate-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kubegate\nVersion: {version}\n")
    return dest


class Release:
    """One release's code (`tree`; None: this checkout) run as processes: CLI and workers."""

    def __init__(self, tree: Path | None, home: Path, address: str) -> None:
        self.tree, self.home, self.address = tree, home, address
        self.workers: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KUBEGATE_") or k == "KUBEGATE_VCSIM_BINARY"
        }
        env.update(
            KUBEGATE_HOME=str(self.home),
            KUBEGATE_TEMPORAL_ADDRESS=self.address,
            KUBEGATE_AGENT_SHUTDOWN_GRACE="0",
            COLUMNS="250",
            **extra,
        )
        if self.tree is not None:
            env["PYTHONPATH"] = str(self.tree)  # before the installed checkout on sys.path
        return env

    @property
    def cwd(self) -> str:
        return str(self.tree or ROOT)

    async def cli(self, *args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "starters.cli",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env(),
            cwd=self.cwd,
        )
        output, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, output.decode()

    async def ok(self, *args: str) -> str:
        code, output = await self.cli(*args)
        assert code == 0, (args, output)
        return output

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "-o", "json"))

    def spawn(self, name: str, *args: str, **extra: str) -> None:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115
        self.workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "starters.cli", *args],
                env=self.env(**extra),
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(sig)
        for process in self.workers:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.workers.clear()


@pytest.fixture(scope="module")
def usim(workdir: Path) -> Iterator[Vcsim]:
    """Clones take 1.5 s (a deploy can be caught while they run); DHCP for the gateway."""
    sim = Vcsim(
        workdir,
        args=[
            *INVENTORY,
            "-task-delay",
            "CloneVM_Task=1500",
            "-dhcp",
            "VM Network=10.63.0.100-10.63.0.199",
        ],
    ).start()
    yield sim
    sim.stop()


@pytest_asyncio.fixture
async def own_temporal() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(tool_path("temporal")),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(strict=False),
        interceptors=[ReadableMetadata()],
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _cluster(name: str, workers: int) -> dict[str, Any]:
    def domain() -> dict[str, str]:
        return {
            "compute_cluster": "DC0_C0",
            "datastore": "LocalDS_0",
            "network": "VM Network",
            "ip_pool": "up-pool",
        }

    return {
        "name": name,
        "profile": PROFILE,
        "cloud_account": "up-account",
        "placement": {"datacenter": "DC0", "ip_allocation": "static"},
        "control_plane": {"size": 1, "placement": [domain()]},
        "workers": [{"name": "workers", "size": workers, "placement": [domain()]}],
    }


async def test_lifecycles_of_the_previous_release_finish_on_this_one(
    old_tree: Path, usim: Vcsim, own_temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    version, _ = previous_release()
    address = own_temporal.client.service_client.config.target_host
    home = tmp_path / "home"
    (home / "agents" / GW).mkdir(parents=True, mode=0o700)
    old = Release(old_tree, home, address)
    new = Release(None, home, address)
    client = KubegateClient(own_temporal.client, Settings(home=home, temporal_address=address))
    password = tmp_path / "password"  # (a file, never an argument)
    password.write_text(usim.password + "\n")
    password.chmod(0o600)
    vcenter = {
        "server": usim.address,
        "username": ADMIN,
        "thumbprint": usim.thumbprint,
        "password_file": str(password),
    }
    try:
        # -- the previous release: a gateway paired and configured, two clusters ---------------
        old.spawn("control-old", "worker", "control")
        created = await old.json("gateway", "create", GW)
        code = home / "agents" / GW / "pairing-code"
        fd = os.open(code, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(created["pairing_code"] + "\n")
        agent_policy(home / "agents" / GW / "policy.yaml", GW)  # the operator's file
        old.spawn("agent-old", "gateway", "agent", GW, KUBEGATE_PAIRING_CODE_FILE=str(code))
        registered = await client.wait_gateway(GW, lambda s: s.agent is not None, timeout=180)
        assert registered.agent.version == version  # the agent says which release it runs
        await old.ok("gateway", "approve", GW, registered.agent.fingerprint)
        gateway_file = _write(
            tmp_path / "gateway.yaml",
            {"vcenter": vcenter, "placement": PLACEMENT, "vip": "10.63.0.52"},
        )
        await old.ok("gateway", "configure", GW, "-f", str(gateway_file), "--wait")
        pool = {
            "name": "up-pool",
            "gateway": GW,
            "kind": "range",
            "first": "10.64.0.10",
            "last": "10.64.0.40",
            "prefix": 24,
            "network_gateway": "10.64.0.1",
            "nameservers": ["10.64.0.2"],
        }
        await old.ok("ippool", "create", "-f", str(_write(tmp_path / "pool.yaml", pool)))
        account = {"name": "up-account", "gateway": GW, "vcenter": vcenter}
        await old.ok("account", "create", "-f", str(_write(tmp_path / "account.yaml", account)))
        first = _write(tmp_path / "first.yaml", _cluster("first", 1))
        await old.ok("cluster", "deploy", "-f", str(first), "--wait")
        second = _write(tmp_path / "second.yaml", _cluster("second", 2))
        await old.ok("cluster", "deploy", "-f", str(second))
        await client.wait_cluster(
            "second", lambda s: any(n.phase == "creating" for n in s.nodes), timeout=180
        )

        # -- the upgrade: old workers stop mid-deploy, this release's take over ----------------
        old.stop()
        code.unlink(missing_ok=True)  # paired long ago: the key alone pairs from now on
        # this release's control worker is versioned (the old one was not): the first version
        # of its deployment becomes current, and the old release's runs move to it
        new.spawn("control-new", "worker", "control", KUBEGATE_WORKER_DEPLOYMENT="kubegate")
        new.spawn("agent-new", "gateway", "agent", GW)
        state = await client.wait_gateway(
            GW, lambda s: s.agent is not None and s.agent.version == VERSION, timeout=180
        )
        assert state.agent_problem in (None, "")

        second_state = await client.wait_cluster(
            "second",
            lambda s: s.status in (ClusterStatus.RUNNING, ClusterStatus.FAILED),
            timeout=180,
        )
        assert second_state.status is ClusterStatus.RUNNING, second_state.error
        made = sorted(vm["name"] for vm in owned_vms(usim, "cluster/second"))
        assert made == sorted(n.name for n in second_state.nodes)  # each VM once

        # the gateway wakes the clusters whose runs began under the old release, once
        # (they take up what this one added: reconciles)
        await client.wait_gateway(GW, lambda s: s.woken_release == VERSION, timeout=120)
        woken = await client.cluster_handle("first").fetch_history()
        assert any(
            e.workflow_execution_signaled_event_attributes.signal_name == "wake"
            for e in woken.events
            if e.HasField("workflow_execution_signaled_event_attributes")
        )
        change = await client.scale_pool("first", "workers", 2)
        assert len(change.added) == 1
        first_state = await client.cluster_state("first")
        made = sorted(vm["name"] for vm in owned_vms(usim, "cluster/first"))
        assert made == sorted(n.name for n in first_state.nodes) and len(made) == 3
        for lifecycle in (client.cluster_handle("first"), client.gateway_handle(GW)):
            info = (await lifecycle.describe()).raw_description.workflow_execution_info
            moved = info.versioning_info.deployment_version
            assert (moved.deployment_name, moved.build_id) == ("kubegate", VERSION)

        for name in ("second", "first"):
            await client.delete_cluster(name)
            deleted = await client.wait_cluster(
                name,
                lambda s: s.status in (ClusterStatus.DELETED, ClusterStatus.FAILED),
                timeout=180,
            )
            assert deleted.status is ClusterStatus.DELETED, deleted.error
            assert owned_vms(usim, f"cluster/{name}") == []
        assert await client.pool_allocations(GW, "up-pool") == []

        before = await client.gateway_state(GW)
        await client.upgrade_gateway(GW, "1.1.0")
        upgraded = await client.wait_gateway(
            GW, lambda s: s.status in (GatewayStatus.RUNNING, GatewayStatus.FAILED), timeout=180
        )
        assert upgraded.status is GatewayStatus.RUNNING, upgraded.error
        assert upgraded.version == "1.1.0"
        assert before.nodes is not None and upgraded.nodes is not None
        old_names = {n.name for n in before.nodes.nodes}
        new_names = [n.name for n in upgraded.nodes.nodes]
        assert not old_names & set(new_names)  # each node replaced
        assert vms_in(usim, f"/DC0/vm/{GW}-pcg") == sorted(new_names)

        await client.delete_pool(GW, "up-pool")
        await client.delete_gateway(GW)
        gone = await client.wait_gateway(
            GW, lambda s: s.status in (GatewayStatus.DELETED, GatewayStatus.FAILED), timeout=180
        )
        assert gone.status is GatewayStatus.DELETED, gone.error
        assert vms_in(usim, f"/DC0/vm/{GW}-pcg") is None
        # lives begun by the previous release and ended by this one: replayed from now on
        await record_history(own_temporal.client, "cluster/second", "cluster_upgraded")
        await record_history(own_temporal.client, "cluster/first", "cluster_upgraded_scaled")
        await record_history(own_temporal.client, f"gateway/{GW}", "gateway_upgraded")
    finally:
        old.stop()
        new.stop()
