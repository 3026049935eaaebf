"""The example files parse as the CLI reads them, and scripts/demo.sh can pin the simulator in
the two that name its vCenter."""

from __future__ import annotations

import re
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml

from domain.account import CloudAccountSpec, VCenterEndpoint
from domain.cluster import ClusterSpec
from domain.gateway import GatewayFile
from domain.ipam import IpPoolSpec
from starters.cli.gateway import InstallFile

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(data, dict)
    return data


def test_gateway_yaml_makes_one_node_with_static_addresses_from_its_own_pool() -> None:
    spec = GatewayFile.model_validate(load("gateway.yaml"))
    assert (spec.size, spec.ip_allocation, spec.ip_pool) == (1, "static", None)
    assert spec.placement.template is not None
    assert spec.create_ip_pool is not None
    pool = IpPoolSpec.model_validate({**spec.create_ip_pool, "gateway": "lab"})
    cluster_pool = IpPoolSpec.model_validate(load("ippool.yaml"))
    assert pool.name == "lab-gw-pool" and cluster_pool.gateway == "lab"
    gw = [int(ip_address(str(a))) for a in (pool.first, pool.last)]
    clusters = [int(ip_address(str(a))) for a in (cluster_pool.first, cluster_pool.last)]
    assert gw[1] < clusters[0] or gw[0] > clusters[1], "gateway lab's two pools must not overlap"


def test_install_yaml_reads_as_the_cli_reads_it() -> None:
    spec = InstallFile.model_validate(load("install.yaml"))
    assert spec.placement.template is None
    assert "pairing_code" not in spec.properties  # given in a file of its own only


@pytest.mark.parametrize("name", ["install.yaml", "gateway.yaml"])
def test_the_demo_can_pin_the_simulator(name: str) -> None:
    """scripts/demo.sh replaces `thumbprint: null` and the default simulator address."""
    text = (EXAMPLES / name).read_text()
    assert re.search(r"^\s*thumbprint:\s*null", text, re.M)
    assert re.search(r"^\s*server:\s*127\.0\.0\.1:8989", text, re.M)
    vcenter = load(name)["vcenter"]
    assert "password" not in vcenter and vcenter["password_env"] == "KUBEGATE_VCSIM_PASSWORD"
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert "thumbprint:)" in demo and r"127\.0\.0\.1:8989" in demo
    VCenterEndpoint.model_validate({k: vcenter[k] for k in ("server", "thumbprint")})


def test_cluster_and_account_examples_name_the_demo_gateway() -> None:
    cluster = load("cluster.yaml")
    cluster["profile"] = load("profile.yaml")
    assert ClusterSpec.model_validate(cluster).cloud_account == "lab-default"
    assert CloudAccountSpec.model_validate(load("account.yaml")).gateway == "lab"


def test_policy_yaml_is_the_compose_agents_valid_policy() -> None:
    from activities.guard import load_policy

    policy = load_policy(EXAMPLES / "policy.yaml")
    assert policy.gateway == "local" and [vc.trust for vc in policy.vcenters] == ["thumbprint"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    agent = compose["services"]["gateway-agent"]
    assert "KUBEGATE_PAIRING_CODE" not in agent["environment"]  # the code only in a file
    assert agent["environment"]["KUBEGATE_PAIRING_CODE_FILE"] == "/run/secrets/pairing-code"
    mounts = [m for m in agent["volumes"] if isinstance(m, dict)]
    assert [m["target"] for m in mounts] == ["/var/lib/kubegate/agents/local/policy.yaml"]


def test_the_demo_script_imports_what_exists() -> None:
    """Every Python import scripts/demo.sh makes resolves (a module moved once broke it)."""
    import importlib
    import re

    demo = (ROOT / "scripts" / "demo.sh").read_text()
    found = re.findall(r"from ([\w.]+) import ([\w, ]+)", demo)
    assert found
    for module, names in found:
        loaded = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(loaded, name), f"{module}.{name}"
