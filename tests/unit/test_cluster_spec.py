"""Cluster spec rules (each names its field), profile overrides, round-robin placement."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from domain.cluster import ClusterProfile, ClusterSpec, deep_merge, plan_nodes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example() -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / "cluster.yaml").read_text())
    data["profile"] = yaml.safe_load((EXAMPLES / "profile.yaml").read_text())
    return data


def errors_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        ClusterSpec.model_validate(data)
    return "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in info.value.errors())


def changed(path: str, value: Any) -> dict[str, Any]:
    data = example()
    node: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


DELETE = object()


def test_the_example_is_valid_and_plans_seven_nodes() -> None:
    spec = ClusterSpec.model_validate(example())
    plan = plan_nodes(spec)
    assert [n.name for n in plan] == [
        "demo-cp-0",
        "demo-cp-1",
        "demo-cp-2",
        "demo-general-0",
        "demo-general-1",
        "demo-large-0",
    ]
    assert all(n.control_plane for n in plan[:3])


def test_file_reference_parses_and_must_be_resolved() -> None:
    data = yaml.safe_load((EXAMPLES / "cluster.yaml").read_text())
    spec = ClusterSpec.model_validate(data)
    with pytest.raises(ValueError, match="must be resolved"):
        spec.effective_profile()
    with pytest.raises(ValueError, match="must be resolved"):
        spec.check()  # (a node set's validate step refuses it)


def test_the_layout_a_node_set_builds_from_a_cluster() -> None:
    spec = ClusterSpec.model_validate(example())
    layout = spec.layout()
    assert layout.plans == plan_nodes(spec)
    assert layout.domains == [domain for _, domain in spec.domains()]
    assert layout.vip_pool == spec.control_plane.placement[0].ip_pool
    assert layout.vip == (str(spec.control_plane.vip) if spec.control_plane.vip else None)
    assert layout.profile == spec.effective_profile()
    assert layout.name == spec.name and layout.placement == spec.placement
    assert layout.allow_worker_capability == spec.control_plane.allow_worker_capability
    spec.check()


def test_round_robin_over_domains_in_order() -> None:
    data = example()
    data["workers"][0]["size"] = 5
    plan = [n for n in plan_nodes(ClusterSpec.model_validate(data)) if n.pool == "general"]
    assert [n.domain.compute_cluster for n in plan] == [
        "DC0_C0",
        "DC0_C1",
        "DC0_C0",
        "DC0_C1",
        "DC0_C0",
    ]
    assert [n.domain_index for n in plan] == [0, 1, 0, 1, 0]


def test_overrides_deep_merge_and_keep_the_rest() -> None:
    profile = ClusterSpec.model_validate(example()).effective_profile()
    kubernetes = profile.pack("kubernetes")
    assert kubernetes is not None
    assert kubernetes.values["apiserver"] == {"audit": True}
    assert kubernetes.values["pod_cidr"] == "192.168.0.0/16"


def test_deep_merge_does_not_change_its_inputs() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    override = {"a": {"b": 2}, "e": {"f": 1}}
    before = copy.deepcopy(base)
    assert deep_merge(base, override) == {"a": {"b": 2, "c": [1]}, "d": 1, "e": {"f": 1}}
    assert base == before


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("name", "Demo_1", "name: "),
        ("control_plane.size", 2, "control_plane.size"),
        ("control_plane.size", 4, "control_plane.size"),
        ("control_plane.cpu", 0, "control_plane.cpu"),
        ("control_plane.memory_gb", 1, "control_plane.memory_gb"),
        ("control_plane.disk_gb", 10, "control_plane.disk_gb"),
        ("control_plane.placement", [], "exactly one placement domain"),
        ("workers.0.placement", [], "workers.0.placement"),
        ("workers.0.size", -1, "workers.0.size"),
        ("workers.1.name", "general", "pool names must be unique (general)"),
        ("workers.1.name", "cp", "'cp' is the control plane's name"),
        ("workers.0.placement.1.ip_pool", DELETE, "workers.general.placement.1.ip_pool: required"),
        ("placement.ip_allocation", "manual", "placement.ip_allocation"),
        ("placement.ssh_keys", ["not a key"], "placement.ssh_keys"),
        ("overrides", {"no-such-pack": {"a": 1}}, "no pack named no-such-pack"),
        ("cloud_account", "", "cloud_account"),
        ("tags", ["has space"], "tag 'has space'"),
        ("colour", "red", "colour"),
        (
            "workers.0.name",
            "a-very-long-pool-name-that-will-not-fit-in-a-node-name-at-all",
            "is not a DNS label",
        ),
    ],
)
def test_rules_name_the_field(path: str, value: Any, message: str) -> None:
    assert message in errors_of(changed(path, value))


def test_dhcp_refuses_ip_pools_and_accepts_none() -> None:
    data = changed("placement.ip_allocation", "dhcp")
    assert "control_plane.placement.0.ip_pool: not allowed with DHCP" in errors_of(data)
    for domain_list in [data["control_plane"]["placement"]] + [
        w["placement"] for w in data["workers"]
    ]:
        for domain in domain_list:
            domain.pop("ip_pool", None)
    assert "control_plane.vip: required with DHCP" in errors_of(data)
    data["control_plane"]["vip"] = "10.9.0.5"
    assert ClusterSpec.model_validate(data).placement.ip_allocation == "dhcp"


def test_static_refuses_a_fixed_vip() -> None:
    data = changed("control_plane.vip", "10.9.0.5")
    assert "control_plane.vip: with static addressing it comes from the IP pool" in errors_of(data)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (["kubernetes", "os", "network"], "order must be os, kubernetes, network"),
        (["os", "kubernetes"], "at least 3"),
        (["os", "kubernetes", "network", "network"], "exactly one 'network'"),
        (["os", "kubernetes", "network", "addon", "storage"], "order must be"),
        (["os", "kubernetes", "network", "storage", "storage"], "at most one 'storage'"),
    ],
)
def test_profile_layers_are_ordered_and_complete(layers: list[str], message: str) -> None:
    data = {
        "name": "p",
        "layers": [
            {"layer": kind, "pack": {"name": f"pack-{i}", "version": "1"}}
            for i, kind in enumerate(layers)
        ],
    }
    with pytest.raises(ValidationError, match=message):
        ClusterProfile.model_validate(data)


def test_pack_names_are_unique_in_a_profile() -> None:
    data = {
        "name": "p",
        "layers": [
            {"layer": kind, "pack": {"name": "same", "version": "1"}}
            for kind in ("os", "kubernetes", "network")
        ],
    }
    with pytest.raises(ValidationError, match="pack names must be unique"):
        ClusterProfile.model_validate(data)
