"""plan_apply: the plan `cluster apply` prints and the cluster carries out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from pydantic import ValidationError

from domain.cluster import ClusterSpec, node_build, plan_nodes
from domain.lifecycle import Node
from domain.plan import ChangePlan, plan_apply
from tests.unit.test_cluster_spec import changed, example


def spec(data: dict[str, Any] | None = None) -> ClusterSpec:
    return ClusterSpec.model_validate(data or example())


RUNNING = spec()


def named(slot: str, revisions: Mapping[str, int]) -> str:
    rev = revisions.get(slot, 0)
    return f"{slot}-r{rev}" if rev else slot


def records(
    running: ClusterSpec, nodes: Sequence[Node] | Mapping[str, str], revisions: dict[str, int]
) -> list[Node]:
    """The nodes as records (a name -> phase map: nodes built from `running`)."""
    if not isinstance(nodes, Mapping):
        return list(nodes)
    out = []
    by_name = {named(p.name, revisions): p for p in plan_nodes(running)}
    for name, phase in nodes.items():
        p = by_name.get(name)
        out.append(
            Node(
                name=name,
                pool=p.pool if p else "",
                index=p.index if p else 0,
                control_plane=p.control_plane if p else False,
                domain_index=0,
                compute_cluster="",
                instance_uuid="",
                phase=phase,
            )
        )
    return out


def plan_of(
    running: ClusterSpec,
    wanted: ClusterSpec,
    phases: Mapping[str, str],
    revisions: dict[str, int] | None = None,
) -> ChangePlan:
    """plan_apply with nodes given as name -> phase, all built from `running`."""
    return plan_apply(running, wanted, records(running, phases, revisions or {}), revisions)


NODES = {p.name: "ready" for p in plan_nodes(RUNNING)}


def test_the_same_spec_plans_nothing() -> None:
    plan = plan_of(RUNNING, spec(), NODES)
    assert plan.empty and plan.create == plan.remove == []


def test_resized_added_and_removed_pools_name_their_nodes_and_addresses() -> None:
    data = changed("workers.0.size", 3)  # general 2 -> 3
    data["workers"][1]["name"] = "batch"  # large removed, batch added
    plan = plan_of(RUNNING, spec(data), NODES)
    assert plan.changes == [
        "resize worker pool general 2 -> 3",
        "add worker pool batch (1 nodes)",
        "remove worker pool large (1 nodes)",
    ]
    assert plan.create == ["demo-general-2", "demo-batch-0"]
    assert plan.remove == ["demo-large-0"]
    assert sum(plan.addresses.values()) == 2 and not plan.refused


def test_shrinking_removes_the_newest_first_and_a_replaced_node_by_its_name() -> None:
    plan = plan_of(RUNNING, spec(changed("workers.0.size", 0)), NODES)
    assert plan.remove == ["demo-general-1", "demo-general-0"]
    nodes = {n if n != "demo-general-0" else "demo-general-0-r1": "ready" for n in NODES}
    plan = plan_of(RUNNING, spec(changed("workers.0.size", 3)), nodes, {"demo-general-0": 1})
    assert plan.create == ["demo-general-2"]  # the replaced node is there under its new name


def kube(data: dict[str, Any], version: str) -> dict[str, Any]:
    layer = next(entry for entry in data["profile"]["layers"] if entry["layer"] == "kubernetes")
    layer["pack"]["version"] = version
    return data


def test_fields_that_cannot_change_in_place_are_refused_each_with_its_reason() -> None:
    data = changed("placement.folder", "elsewhere")
    data["workers"][0]["placement"][0]["datastore"] = "other"
    data["control_plane"]["placement"][0]["datastore"] = "other"
    refused = " | ".join(plan_of(RUNNING, spec(data), NODES).refused)
    for field in ("workers.general.placement", "placement.folder", "control_plane.placement"):
        assert field in refused, field


def test_a_new_version_replaces_every_node_control_plane_first() -> None:
    plan = plan_of(RUNNING, spec(kube(example(), "1.31.2")), NODES)
    assert not plan.refused and plan.rolling
    assert "Kubernetes 1.30.4 -> 1.31.2" in plan.changes
    assert list(plan.replace) == [
        "demo-cp-0",
        "demo-cp-1",
        "demo-cp-2",
        "demo-general-0",
        "demo-general-1",
        "demo-large-0",
    ]
    assert plan.replace["demo-cp-0"] == "demo-cp-0-r1"
    assert sum(plan.addresses.values()) == 6 and not plan.create and not plan.remove


def test_resources_labels_and_template_replace_only_the_nodes_they_change() -> None:
    data = changed("workers.1.memory_gb", 64)
    plan = plan_of(RUNNING, spec(data), NODES)
    assert list(plan.replace) == ["demo-large-0"] and "workers.large.memory_gb changed" in (
        plan.changes
    )
    data = changed("workers.0.labels", {"team": "ml"})
    assert list(plan_of(RUNNING, spec(data), NODES).replace) == [
        "demo-general-0",
        "demo-general-1",
    ]
    plan = plan_of(RUNNING, RUNNING.with_template("templates/ubuntu-2404"), NODES)
    assert len(plan.replace) == 6 and plan.changes[0].startswith("template ")
    # how a pool is rolled is not what its nodes are built from
    data = changed("workers.0.rollout", {"max_surge": 0, "max_unavailable": 2})
    plan = plan_of(RUNNING, spec(data), NODES)
    assert not plan.replace and plan.changes == ["workers.general.rollout changed"]


def test_a_node_already_on_the_new_build_is_not_replaced_again() -> None:
    new = spec(kube(example(), "1.31.2"))
    layout = new.layout()
    nodes = [
        Node(
            name=p.name if p.pool != "cp" else f"{p.name}-r1",
            pool=p.pool,
            index=p.index,
            control_plane=p.control_plane,
            domain_index=0,
            compute_cluster="c",
            instance_uuid="u",
            phase="ready",
            build=node_build(p, layout) if p.pool == "cp" else None,
        )
        for p in layout.plans
    ]
    revisions = {f"demo-cp-{i}": 1 for i in range(3)}
    plan = plan_apply(RUNNING, new, nodes, revisions)
    assert list(plan.replace) == ["demo-general-0", "demo-general-1", "demo-large-0"]


def test_minor_versions_move_one_at_a_time_and_never_back() -> None:
    for version, rule in (
        ("1.32.0", "skips a minor version"),
        ("1.29.9", "does not downgrade"),
        ("2.0.0", "skips a minor version"),
        ("latest", "MAJOR.MINOR.PATCH"),
    ):
        refused = " ".join(plan_of(RUNNING, spec(kube(example(), version)), NODES).refused)
        assert rule in refused, version
    assert not plan_of(RUNNING, spec(kube(example(), "1.30.9")), NODES).refused


def test_control_plane_size_changes_one_member_at_a_time() -> None:
    plan = plan_of(RUNNING, spec(changed("control_plane.size", 5)), NODES)
    assert plan.rolling and plan.create == ["demo-cp-3", "demo-cp-4"] and not plan.refused
    plan = plan_of(RUNNING, spec(changed("control_plane.size", 1)), NODES)
    assert plan.remove == ["demo-cp-2", "demo-cp-1"]
    with pytest.raises(ValidationError):
        spec(changed("control_plane.size", 4))


def test_a_rollout_policy_must_let_a_node_move() -> None:
    with pytest.raises(ValidationError, match="cannot both be 0"):
        spec(changed("workers.0.rollout", {"max_surge": 0, "max_unavailable": 0}))


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
    plan = plan_of(RUNNING, spec(), left)
    assert plan.create == ["demo-general-1"] and not plan.empty  # nothing else differs
    stray = {**NODES, "demo-gone-0": "creating"}
    assert plan_of(RUNNING, spec(), stray).remove == ["demo-gone-0"]
