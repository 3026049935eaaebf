"""plan_apply: the plan `cluster apply` prints and the cluster carries out."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from domain.cluster import ClusterSpec, plan_nodes
from domain.plan import plan_apply
from tests.unit.test_cluster_spec import changed, example


def spec(data: dict[str, Any] | None = None) -> ClusterSpec:
    return ClusterSpec.model_validate(data or example())


RUNNING = spec()
NODES = {p.name: "ready" for p in plan_nodes(RUNNING)}


def test_the_same_spec_plans_nothing() -> None:
    plan = plan_apply(RUNNING, spec(), NODES)
    assert plan.empty and plan.create == plan.remove == []


def test_resized_added_and_removed_pools_name_their_nodes_and_addresses() -> None:
    data = changed("workers.0.size", 3)  # general 2 -> 3
    data["workers"][1]["name"] = "batch"  # large removed, batch added
    plan = plan_apply(RUNNING, spec(data), NODES)
    assert plan.changes == [
        "resize worker pool general 2 -> 3",
        "add worker pool batch (1 nodes)",
        "remove worker pool large (1 nodes)",
    ]
    assert plan.create == ["demo-general-2", "demo-batch-0"]
    assert plan.remove == ["demo-large-0"]
    assert sum(plan.addresses.values()) == 2 and not plan.refused


def test_shrinking_removes_the_newest_first_and_a_replaced_node_by_its_name() -> None:
    plan = plan_apply(RUNNING, spec(changed("workers.0.size", 0)), NODES)
    assert plan.remove == ["demo-general-1", "demo-general-0"]
    nodes = {n if n != "demo-general-0" else "demo-general-0-r1": "ready" for n in NODES}
    plan = plan_apply(RUNNING, spec(changed("workers.0.size", 3)), nodes, {"demo-general-0": 1})
    assert plan.create == ["demo-general-2"]  # the replaced node is there under its new name


def test_fields_that_cannot_change_in_place_are_refused_each_with_its_reason() -> None:
    data = changed("control_plane.size", 5)
    data["control_plane"]["cpu"] = 8
    data["workers"][0]["placement"][0]["datastore"] = "other"
    data["workers"][1]["memory_gb"] = 64
    data["placement"]["folder"] = "elsewhere"
    data["workers"][0]["labels"] = {"team": "ml"}
    profile = data["profile"]
    kube = next(layer for layer in profile["layers"] if layer["layer"] == "kubernetes")
    kube["pack"]["version"] = "1.31.0"
    refused = " | ".join(plan_apply(RUNNING, spec(data), NODES).refused)
    for field in (
        "control_plane.size",
        "control_plane.cpu",
        "workers.general.placement",
        "workers.large.memory_gb",
        "workers.general.labels",
        "placement.folder",
        "profile, overrides",
    ):
        assert field in refused, field
    assert "rolling upgrade" in refused


def test_labels_the_kubelet_may_not_set_are_refused_naming_the_rule() -> None:
    for labels, rule in (
        ({"node-role.kubernetes.io/gpu": ""}, "kubernetes.io and k8s.io"),
        ({"team": "a b"}, "value"),
        ({"-bad": "x"}, "name of at most 63"),
    ):
        with pytest.raises(ValidationError, match=rule):
            spec(changed("workers.0.labels", labels))
    assert spec(changed("workers.0.labels", {"node.kubernetes.io/pool": "gpu"}))
    for labels in ({"evilnode.kubernetes.io/x": "1"}, {"a.k8s.io/x": "1"}):
        with pytest.raises(ValidationError, match="namespaces"):
            spec(changed("workers.0.labels", labels))
    assert spec(
        changed("workers.0.labels", {"notkubernetes.io/x": "1", "a.node.kubernetes.io/y": ""})
    )
    twice = [
        {"key": "a", "value": "1", "effect": "NoSchedule"},
        {"key": "a", "effect": "NoSchedule"},
    ]
    with pytest.raises(ValidationError, match="listed twice"):
        spec(changed("workers.0.taints", twice))
    own = [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
    with pytest.raises(ValidationError, match="kubeadm's own"):
        spec(changed("control_plane.taints", own))


def test_nodes_a_failed_change_left_unmade_are_in_the_plan() -> None:
    """A change's converge makes every node not yet created or ready: so does the plan."""
    left = {**NODES, "demo-general-1": "failed"}
    plan = plan_apply(RUNNING, spec(), left)
    assert plan.create == ["demo-general-1"] and not plan.empty  # nothing else differs
    stray = {**NODES, "demo-gone-0": "creating"}
    assert plan_apply(RUNNING, spec(), stray).remove == ["demo-gone-0"]
