"""The gateway's own nodes: GatewayNodeSpec, and the ClusterSpec shape kept payloads hold."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from domain.account import Placement
from domain.cluster import ClusterSpec
from domain.gateway import GatewayConfig, GatewayNodes, GatewayNodeSpec, gateway_node_spec
from tests.support import HISTORIES


def kept_gateway_nodes() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every gateway's nodes carried in a kept history's inputs (0.1.0 wrote a ClusterState
    whose spec is a ClusterSpec; 0.2.0 a GatewayNodes)."""
    for path in sorted(HISTORIES.glob("*/gateway_*.json")):
        for event in json.loads(path.read_text())["events"]:
            for key in (
                "workflowExecutionStartedEventAttributes",
                "workflowExecutionContinuedAsNewEventAttributes",
            ):
                attributes = event.get(key)
                if attributes is None:
                    continue
                for payload in attributes.get("input", {}).get("payloads", []):
                    data = json.loads(base64.b64decode(payload["data"]))
                    nodes = (data.get("state") or {}).get("nodes")
                    if nodes is not None:
                        yield f"{path.parent.name}/{path.stem}", nodes


KEPT = list(kept_gateway_nodes())
#: those written before GatewayNodeSpec (0.1.0, and 0.2.0 before it): a ClusterSpec shape
OLD_SHAPE = [(name, n) for name, n in KEPT if "profile" in n["spec"]]
NEW_SHAPE = [(name, n) for name, n in KEPT if "profile" not in n["spec"]]


def test_kept_histories_hold_gateway_nodes_of_both_shapes() -> None:
    assert len(OLD_SHAPE) >= 5 and len(NEW_SHAPE) >= 5


@pytest.mark.parametrize("nodes", [n for _, n in NEW_SHAPE], ids=[name for name, _ in NEW_SHAPE])
def test_kept_gateway_nodes_of_this_shape_decode_and_round_trip(nodes: dict[str, Any]) -> None:
    decoded = GatewayNodes.model_validate(nodes)
    assert decoded.spec.layout().plans and decoded.steps
    assert GatewayNodes.model_validate_json(decoded.model_dump_json()) == decoded


@pytest.mark.parametrize("nodes", [n for _, n in OLD_SHAPE], ids=[name for name, _ in OLD_SHAPE])
def test_kept_gateway_nodes_decode_to_the_same_nodes(nodes: dict[str, Any]) -> None:
    """The old shape converts, and the node set builds exactly what the ClusterSpec said."""
    old = ClusterSpec.model_validate(nodes["spec"])
    converted = GatewayNodes.model_validate(nodes)
    assert converted.spec.layout() == old.layout()
    assert converted.spec.name == old.name
    assert [n.name for n in converted.nodes] == [n["name"] for n in nodes["nodes"]]
    assert converted.vip == nodes["vip"] and converted.steps  # node fields kept
    again = GatewayNodes.model_validate_json(converted.model_dump_json())
    assert again == converted  # the new shape round-trips


def config(**changes: Any) -> GatewayConfig:
    data: dict[str, Any] = {
        "placement": Placement(
            datacenter="DC0",
            compute_cluster="C0",
            datastore="ds0",
            network="VM Network",
            folder="gw",
            template="ubuntu-22.04",
        ),
        "ip_allocation": "dhcp",
        "vip": "10.0.0.9",
        "size": 1,
    }
    data.update(changes)
    return GatewayConfig.model_construct(**data)  # (credentials are not part of the nodes)


@pytest.mark.parametrize(
    ("changes", "version"),
    [
        ({}, "1.0.0"),
        ({"size": 3}, "1.1.0"),
        ({"ip_allocation": "static", "vip": None, "ip_pool": "gw-pool", "size": 3}, "1.0.0"),
        ({}, "9.9.9"),  # not a release: the first release's packs (as before)
    ],
)
def test_gateway_nodes_from_a_configuration(changes: dict[str, Any], version: str) -> None:
    spec = gateway_node_spec("gw1", config(**changes), version)
    layout = spec.layout()
    size = changes.get("size", 1)
    assert [p.name for p in layout.plans] == [f"gw1-pcg-cp-{i}" for i in range(size)]
    assert all(p.control_plane and p.cpu == 2 and p.memory_gb == 4 for p in layout.plans)
    assert layout.vip_pool == changes.get("ip_pool")
    assert layout.vip == (None if "vip" in changes else "10.0.0.9")
    assert layout.allow_worker_capability
    packs = [(e.layer, e.pack.name) for e in layout.profile.layers]
    assert packs == [
        ("os", "ubuntu"),
        ("kubernetes", "kubernetes"),
        ("network", "cni-calico"),
        ("addon", "kubegate-gateway"),
    ]
    assert layout.profile.version == (version if version != "9.9.9" else "1.0.0")
    spec.check()
    assert GatewayNodeSpec.model_validate(spec.model_dump(mode="json")) == spec
