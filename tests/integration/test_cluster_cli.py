"""`kubegate cluster …`: bad specs refused with their field path, and the commands end to end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from domain.ipam import IpPoolSpec
from plumbing.settings import Settings
from starters.client import KubegateClient
from tests.conftest import GATEWAY
from tests.integration.test_cluster import PROFILE, domain, make_pool, sim  # noqa: F401
from tests.support import ADMIN, Vcsim, run_cli, run_cli_split

pytestmark = pytest.mark.integration


def base(pool: str = "p") -> dict[str, Any]:
    return {
        "name": "cli",
        "profile": PROFILE,
        "cloud_account": "cliacct",
        "placement": {"datacenter": "DC0", "ip_allocation": "static"},
        "control_plane": {"size": 1, "placement": [domain("DC0_C0", pool)]},
        "workers": [{"name": "w", "size": 1, "placement": [domain("DC0_C1", pool)]}],
    }


def changed(path: str, value: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.loads(json.dumps(data or base()))
    keys = path.split(".")
    node: Any = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("name", changed("name", "Bad_Name"), "name: must be a DNS label"),
    ("cp size", changed("control_plane.size", 2), "control_plane.size"),
    (
        "cp two domains",
        changed("control_plane.placement", [domain("DC0_C0", "p"), domain("DC0_C1", "p")]),
        "control_plane.placement: ",
    ),
    (
        "static without pool",
        changed("workers.0.placement", [domain("DC0_C1", None)]),
        "workers.w.placement.0.ip_pool: required with static",
    ),
    (
        "dhcp with pool",
        changed("placement.ip_allocation", "dhcp"),
        "control_plane.placement.0.ip_pool: not allowed with DHCP",
    ),
    ("unknown pack", {**base(), "overrides": {"cni-cilium": {"x": 1}}}, "no pack named cni-cilium"),
    (
        "layers out of order",
        changed(
            "profile.layers", [PROFILE["layers"][1], PROFILE["layers"][0], PROFILE["layers"][2]]
        ),
        "layers: order must be",
    ),
    (
        "duplicate pools",
        changed("workers", [base()["workers"][0], base()["workers"][0]]),
        "pool names must be unique",
    ),
    ("bad ssh key", changed("placement.ssh_keys", ["not-a-key"]), "placement.ssh_keys"),
    ("tiny memory", changed("workers.0.memory_gb", 1), "workers.0.memory_gb"),
    ("unknown field", {**base(), "colour": "blue"}, "colour: Extra inputs are not permitted"),
    (
        "profile file missing",
        {**base(), "profile": {"file": "nope.yaml"}},
        "nope.yaml: no such file",
    ),
]


@pytest.mark.parametrize("data,expected", [(d, e) for _, d, e in BAD], ids=[n for n, _, _ in BAD])
async def test_bad_spec_is_refused_with_its_field(
    settings: Settings, tmp_path: Path, data: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    code, output = await run_cli(settings, "cluster", "deploy", "-f", str(path))
    assert code == 2, output
    assert expected in output, output
    assert "Traceback" not in output


def write_account(settings: Settings, sim_: Vcsim) -> None:
    accounts = settings.home / "accounts"
    accounts.mkdir(parents=True, exist_ok=True)
    (accounts / "cliacct.pw").write_text(sim_.password + "\n")
    (accounts / "cliacct.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "cliacct",
                "gateway": GATEWAY,
                "vcenter": {
                    "server": sim_.address,
                    "username": ADMIN,
                    "password_file": "cliacct.pw",
                    "thumbprint": sim_.thumbprint,
                },
            }
        )
    )


async def test_deploy_describe_scale_delete_through_the_cli(
    sim: Vcsim,  # noqa: F811
    settings: Settings,
    kubegate: KubegateClient,
    tmp_path: Path,
) -> None:
    # 6 addresses: the VIP and two nodes, then room for one more
    await kubegate.create_pool(
        IpPoolSpec.model_validate(
            {
                "name": "cli-pool",
                "gateway": GATEWAY,
                "kind": "range",
                "first": "10.81.0.10",
                "last": "10.81.0.15",
                "prefix": 24,
                "network_gateway": "10.81.0.1",
            }
        )
    )
    write_account(settings, sim)
    account_file = str(settings.home / "accounts" / "cliacct.yaml")
    code, output = await run_cli(settings, "account", "create", "-f", account_file)
    assert code == 0 and "cliacct" in output and "(checked)" in output, output
    code, output = await run_cli(settings, "account", "create", "-f", account_file)
    assert code == 2 and "exists already" in output, output
    path = tmp_path / "cluster.yaml"

    # what the spec names must exist, checked before anything starts
    for data, expected in [
        (base("no-such-pool"), "has no IP pool 'no-such-pool'"),
        ({**base("cli-pool"), "cloud_account": "nobody"}, "no gateway has a cloud account"),
        (changed("workers.0.size", 6, base("cli-pool")), "the cluster needs 8"),
    ]:
        path.write_text(yaml.safe_dump(data))
        code, output = await run_cli(settings, "cluster", "deploy", "-f", str(path))
        assert code == 2 and expected in output, output
        code, output = await run_cli(settings, "cluster", "get", "cli")
        assert code == 2 and "does not exist" in output, output
    path.write_text(yaml.safe_dump(base("cli-pool")))

    # --dry-run: the plan and the preflight of its placement, nothing created
    code, output = await run_cli(settings, "cluster", "deploy", "-f", str(path), "--dry-run")
    assert code == 0, output
    assert "create: cli-cp-0, cli-w-0" in output and "addresses: 3 from cli-pool" in output
    assert "passed" in output and "failed:" not in output, output
    code, output = await run_cli(settings, "cluster", "get", "cli")
    assert code == 2 and "does not exist" in output, output
    wrong = base("cli-pool")
    wrong["workers"][0]["placement"] = [domain("DC0_NOPE", "cli-pool")]
    wrong_path = tmp_path / "wrong.yaml"
    wrong_path.write_text(yaml.safe_dump(wrong))
    code, output = await run_cli(settings, "cluster", "deploy", "-f", str(wrong_path), "--dry-run")
    assert code == 1 and "DC0_NOPE" in output and "failed" in output, output

    code, output = await run_cli(settings, "cluster", "deploy", "-f", str(path), "--wait")
    assert code == 0, output
    assert "Create VMs" in output and "cli-cp-0" in output and "Running" in output
    assert sim.password not in output

    code, output = await run_cli(settings, "cluster", "wait", "cli", "--for", "running")
    assert code == 0 and "status Running" in output, output
    code, output = await run_cli(settings, "cluster", "events", "cli", "-o", "json")
    assert code == 0, output
    happened = json.loads(output)
    kinds = {row["kind"] for row in happened}
    assert {"step", "event"} <= kinds, output
    assert [row["time"] for row in happened] == sorted(row["time"] for row in happened)
    assert any(row["object"] == "cli-cp-0" for row in happened if row["kind"] == "event")

    code, output = await run_cli(settings, "cluster", "describe", "cli", "-o", "json")
    assert code == 0, output
    described = json.loads(output)
    assert described["status"] == "Running"
    assert [n["name"] for n in described["nodes"]] == ["cli-cp-0", "cli-w-0"]
    assert all(s["ended"] for s in described["steps"])

    code, output = await run_cli(settings, "cluster", "list", "-o", "json")
    assert code == 0 and "cli" in [c["name"] for c in json.loads(output)], output
    listed = next(c for c in json.loads(output) if c["name"] == "cli")
    assert listed["version"] and listed["created_at"] and listed["nodes"] == 2, listed
    code, output = await run_cli(settings, "cluster", "list")
    assert code == 0 and "version" in output and "age" in output, output
    code, output = await run_cli(settings, "cluster", "list", "-o", "wide")
    assert code == 0 and "cliacct" in output and "1+1" in output, output

    # -o yaml is the data alone, and its spec is what apply takes back: no change to make
    code, output = await run_cli(settings, "cluster", "get", "cli", "-o", "yaml")
    assert code == 0, output
    got = yaml.safe_load(output)
    assert got["status"] == "Running" and got["spec"]["name"] == "cli"
    got_path = tmp_path / "got.yaml"
    got_path.write_text(output)
    code, output = await run_cli(settings, "cluster", "apply", "-f", str(got_path), "--dry-run")
    assert code == 0 and "create:" not in output and "asks for no change" in output, output

    # apply --dry-run prints the plan and changes nothing; a field that cannot change: exit 2
    edited = base("cli-pool")
    edited["workers"][0]["size"] = 2
    edited_path = tmp_path / "edited.yaml"
    edited_path.write_text(yaml.safe_dump(edited))
    code, output = await run_cli(settings, "cluster", "apply", "-f", str(edited_path), "--dry-run")
    assert code == 0 and "resize worker pool w 1 -> 2" in output, output
    assert "create: cli-w-1" in output and "addresses: 1 from cli-pool" in output, output
    assert len((await kubegate.cluster_state("cli")).nodes) == 2
    edited["placement"]["folder"] = "elsewhere"
    edited_path.write_text(yaml.safe_dump(edited))
    code, output = await run_cli(settings, "cluster", "apply", "-f", str(edited_path))
    assert code == 2 and "placement.folder: cannot change in place" in output, output
    # an upgrade that skips a minor version: refused before anything starts, exit 2
    code, output = await run_cli(settings, "cluster", "upgrade", "cli", "--kubernetes", "9.0.0")
    assert code == 2 and "skips a minor version" in output, output

    # a kubeconfig goes to a file only its owner reads; the output names it, holds no key
    kubeconfig = tmp_path / "kube" / "cli.yaml"
    code, output = await run_cli(
        settings,
        "cluster",
        "kubeconfig",
        "cli",
        "--user",
        "ops",
        "--ttl",
        "1h",
        "--output-file",
        str(kubeconfig),
    )
    assert code == 0 and str(kubeconfig) in output and "user ops" in output, output
    assert "PRIVATE KEY" not in output and "client-key-data" not in output
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    assert "client-key-data" in kubeconfig.read_text()
    code, output = await run_cli(settings, "cluster", "describe", "cli")
    assert code == 0 and "Kubeconfigs issued" in output and "ops" in output, output

    code, output = await run_cli(settings, "cluster", "abort", "cli")
    assert code == 2 and "use delete" in output, output
    code, output = await run_cli(settings, "cluster", "scale", "cli", "nope", "--size", "2")
    assert code == 2 and "no worker pool named 'nope'" in output, output

    # beyond the pool's free addresses: refused before anything changes
    code, output = await run_cli(settings, "cluster", "scale", "cli", "w", "--size", "10")
    assert code == 2 and "has 3 free address(es); the change needs 9" in output, output
    state = await kubegate.cluster_state("cli")
    assert state.status.value == "Running" and len(state.nodes) == 2
    assert state.spec.workers[0].size == 1

    code, output = await run_cli(settings, "cluster", "scale", "cli", "w", "--size", "2")
    assert code == 0 and "added cli-w-1" in output, output

    # apply -o json: the result alone on stdout (the plan goes to stderr)
    bigger = base("cli-pool")
    bigger["workers"][0]["size"] = 3
    bigger_path = tmp_path / "bigger.yaml"
    bigger_path.write_text(yaml.safe_dump(bigger))
    code, stdout, stderr = await run_cli_split(
        settings, "cluster", "apply", "-f", str(bigger_path), "-o", "json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["added"] == ["cli-w-2"], stdout
    assert "create: cli-w-2" in stderr

    # a pool whose steps fail is not kept in the spec
    pool_path = tmp_path / "pool.yaml"
    pool_path.write_text(
        yaml.safe_dump({"name": "bad", "size": 1, "placement": [domain("DC0_NOPE", "cli-pool")]})
    )
    code, output = await run_cli(settings, "cluster", "add-pool", "cli", "-f", str(pool_path))
    assert code == 1, output
    state = await kubegate.cluster_state("cli")
    assert state.status.value == "Failed"
    assert [p.name for p in state.spec.workers] == ["w"]

    # followers started before the delete print it as it goes and end when it is Deleted
    events_watch = asyncio.create_task(
        run_cli(settings, "cluster", "events", "cli", "--watch", "--vcenter-every", "5")
    )
    describe_watch = asyncio.create_task(run_cli(settings, "cluster", "describe", "cli", "-w"))
    await asyncio.sleep(2)
    code, output = await run_cli(settings, "cluster", "delete", "cli", "--wait", "--yes")
    assert code == 0, output
    assert "Deleted" in output
    code, output = await asyncio.wait_for(events_watch, 60)
    assert code == 0, output
    lines = output.splitlines()
    assert any("step" in line and "Create VMs (done)" in line for line in lines), output
    assert any("step" in line and "Destroy the VMs (done)" in line for line in lines), output
    assert any("  event  cli-cp-0" in line for line in lines), output
    # each once, though vCenter was read several times
    assert sum("Created virtual machine cli-cp-0" in line for line in lines) == 1, output
    code, output = await asyncio.wait_for(describe_watch, 60)
    assert code == 0 and "status Deleted" in output and "Destroy the VMs" in output, output
    code, output = await run_cli(settings, "cluster", "get", "cli", "-o", "json")
    assert json.loads(output)["status"] == "Deleted"
    code, output = await run_cli(settings, "cluster", "get", "cli", "--watch")
    assert code == 0 and "status Deleted" in output, output  # (nothing more to watch)
    code, output = await run_cli(settings, "cluster", "wait", "cli", "--for", "deleted")
    assert code == 0 and "Deleted" in output, output
    code, output = await run_cli(settings, "cluster", "wait", "cli", "--timeout", "5")
    assert code == 1 and "Deleted" in output, output  # it ended, not Running
    code, output = await run_cli(settings, "cluster", "get", "nope")
    assert code == 2 and "does not exist" in output, output
    code, output = await run_cli(settings, "account", "list", "-o", "json")
    assert code == 0 and "cliacct" in [a["name"] for a in json.loads(output)], output
    assert sim.password not in output
    code, output = await run_cli(settings, "account", "delete", "cliacct")
    assert code == 0, output
