"""assess: what a reconcile reports and repairs, under the healing policy (domain/health.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from domain.cluster import Healing, NodeHealth
from domain.health import (
    MAX_BACKOFF,
    TOOLS_RUNNING,
    ClusterHealth,
    InspectResult,
    NodeFacts,
    PoolHealth,
    RepairRecord,
    VmSeen,
    assess,
    backoff,
)

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
POOLS = {
    "cp": PoolHealth(unhealthy_after_seconds=60, max_unhealthy=1),
    "w": PoolHealth(unhealthy_after_seconds=60, max_unhealthy=1),
}


def node(name: str, pool: str = "w", phase: str = "ready") -> NodeFacts:
    return NodeFacts(
        name=name,
        pool=pool,
        control_plane=pool == "cp",
        vm=f"VirtualMachine:vm-{name}",
        phase=phase,
        instance_uuid=f"uuid-{name}",
    )


def vm(
    name: str,
    power: str = "poweredOn",
    tools: str = TOOLS_RUNNING,
    address: str = "10.0.0.9",
    **more: object,
) -> VmSeen:
    return VmSeen(
        ref=f"VirtualMachine:vm-{name}",
        name=name,
        instance_uuid=f"uuid-{name}",
        power_state=power,
        connection="connected",
        tools=tools,
        address=address,
        **more,  # type: ignore[arg-type]
    )


def run(
    nodes: list[NodeFacts],
    seen: dict[str, VmSeen],
    health: ClusterHealth | None = None,
    now: datetime = NOW,
    powered_off: str = "power-on",
    cp: int = 3,
    pools: dict[str, PoolHealth] | None = None,
    foreign: list[VmSeen] | None = None,
):  # type: ignore[no-untyped-def]
    health = health or ClusterHealth()
    result = assess(
        nodes,
        InspectResult(nodes=seen, foreign=foreign or []),
        health,
        pools or POOLS,
        now,
        powered_off,  # type: ignore[arg-type]
        cp,
    )
    return result, health


CP = [node("cp-0", "cp"), node("cp-1", "cp"), node("cp-2", "cp")]
SEEN_CP = {n.name: vm(n.name) for n in CP}


def test_all_in_place_means_nothing_to_do() -> None:
    nodes = [*CP, node("w-0")]
    result, _ = run(nodes, {**SEEN_CP, "w-0": vm("w-0")})
    assert result.findings == [] and result.repairs == [] and result.next_due is None


def test_a_missing_vm_is_recreated_and_a_powered_off_one_powered_on_or_reported() -> None:
    nodes = [*CP, node("w-0"), node("w-1")]
    seen = {**SEEN_CP, "w-1": vm("w-1", power="poweredOff")}
    result, _ = run(nodes, seen)
    assert [(r.node, r.action) for r in result.repairs] == [
        ("w-0", "recreate"),
        ("w-1", "power-on"),
    ]
    result, _ = run(nodes, seen, powered_off="report")
    assert [(r.node, r.action) for r in result.repairs] == [("w-0", "recreate")]
    assert any(f.kind == "powered-off" and "policy: report" in f.detail for f in result.findings)


def test_foreign_renamed_moved_and_disconnected_vms_are_reported_only() -> None:
    nodes = [*CP, node("w-0"), node("w-1"), node("w-2")]
    seen = {
        **SEEN_CP,
        "w-0": vm("w-0").model_copy(update={"name": "x"}),
        "w-1": vm("w-1", in_folder=False),
        "w-2": vm("w-2").model_copy(update={"connection": "orphaned", "tools": ""}),
    }
    stranger = vm("stranger").model_copy(update={"owner": "cluster/other"})
    result, _ = run(nodes, seen, foreign=[stranger])
    kinds = sorted((f.kind, f.node) for f in result.findings)
    assert kinds == [("disconnected", "w-2"), ("foreign", ""), ("moved", "w-1"), ("renamed", "w-0")]
    assert "cluster/other" in next(f.detail for f in result.findings if f.kind == "foreign")
    assert result.repairs == []


def test_a_silent_guest_is_replaced_only_after_its_timeout() -> None:
    nodes = [*CP, node("w-0")]
    seen = {**SEEN_CP, "w-0": vm("w-0", tools="guestToolsNotRunning")}
    result, health = run(nodes, seen)
    assert result.repairs == [] and result.next_due == NOW + timedelta(seconds=60)
    assert health.unhealthy_since["w-0"] == NOW
    result, health = run(nodes, seen, health, now=NOW + timedelta(seconds=59))
    assert result.repairs == []
    result, health = run(nodes, seen, health, now=NOW + timedelta(seconds=60))
    assert [(r.node, r.action) for r in result.repairs] == [("w-0", "replace")]
    # it reports again before that: forgotten
    _, health = run(nodes, {**SEEN_CP, "w-0": vm("w-0")}, health)
    assert "w-0" not in health.unhealthy_since


def test_no_guest_address_counts_as_silent() -> None:
    nodes = [*CP, node("w-0")]
    health = ClusterHealth(unhealthy_since={"w-0": NOW - timedelta(minutes=5)})
    result, _ = run(nodes, {**SEEN_CP, "w-0": vm("w-0", address="")}, health)
    assert [r.action for r in result.repairs] == ["replace"]
    assert "no guest address" in result.repairs[0].reason


def test_at_most_max_unhealthy_of_a_pool_are_replaced_at_once() -> None:
    nodes = [*CP, node("w-0"), node("w-1"), node("w-2")]
    silent = {f"w-{i}": vm(f"w-{i}", tools="") for i in range(3)}
    since = {n: NOW - timedelta(minutes=5) for n in silent}
    result, _ = run(nodes, {**SEEN_CP, **silent}, ClusterHealth(unhealthy_since=dict(since)))
    assert [r.node for r in result.repairs] == ["w-0"]
    assert result.next_due == NOW  # the next one at the next reconcile
    pools = {**POOLS, "w": PoolHealth(unhealthy_after_seconds=60, max_unhealthy=2)}
    result, _ = run(
        nodes, {**SEEN_CP, **silent}, ClusterHealth(unhealthy_since=dict(since)), pools=pools
    )
    assert [r.node for r in result.repairs] == ["w-0", "w-1"]
    pools = {**POOLS, "w": PoolHealth(unhealthy_after_seconds=60, max_unhealthy=0)}
    result, _ = run(
        nodes, {**SEEN_CP, **silent}, ClusterHealth(unhealthy_since=dict(since)), pools=pools
    )
    assert result.repairs == []
    assert all("max_unhealthy is 0" in f.detail for f in result.findings)


def test_the_control_plane_is_repaired_one_member_at_a_time_and_only_with_quorum() -> None:
    result, _ = run(CP, {"cp-2": vm("cp-2"), "cp-1": vm("cp-1")})
    assert [r.node for r in result.repairs] == ["cp-0"]
    result, _ = run(CP, {"cp-2": vm("cp-2")})  # two of three gone: quorum lost
    assert result.repairs == []
    assert all("etcd needs 2" in f.detail for f in result.findings if f.node)
    five = [node(f"cp-{i}", "cp") for i in range(5)]
    result, _ = run(five, {f"cp-{i}": vm(f"cp-{i}") for i in (2, 3, 4)}, cp=5)
    assert [r.node for r in result.repairs] == ["cp-0"]  # cp-1 at the next reconcile
    assert "one control-plane member at a time" in next(
        f.detail for f in result.findings if f.node == "cp-1"
    )


def test_the_only_control_plane_member_is_never_rebuilt() -> None:
    only = [node("cp-0", "cp")]
    result, _ = run(only, {}, cp=1)
    assert result.repairs == []
    assert "only control-plane member" in result.findings[0].detail
    result, _ = run(only, {"cp-0": vm("cp-0", power="poweredOff")}, cp=1)
    assert [r.action for r in result.repairs] == ["power-on"]  # powering on is safe


def test_failed_repairs_back_off_then_are_given_up() -> None:
    nodes = [*CP, node("w-0", phase="failed")]
    record = RepairRecord(failures=1, last_error="boom", next_at=NOW + timedelta(seconds=30))
    health = ClusterHealth(failed={"w-0": record})
    result, _ = run(nodes, SEEN_CP, health)
    assert result.repairs == [] and result.next_due == record.next_at
    assert "next attempt at" in result.findings[0].detail
    result, _ = run(nodes, SEEN_CP, health, now=NOW + timedelta(seconds=30))
    assert [r.node for r in result.repairs] == ["w-0"]
    health.failed["w-0"] = RepairRecord(failures=3, last_error="boom", given_up=True)
    result, _ = run(nodes, SEEN_CP, health, now=NOW + timedelta(days=1))
    assert result.repairs == [] and result.findings[0].kind == "given-up"
    assert health.degraded.startswith("repair given up for w-0")


def test_a_failed_node_whose_vm_serves_is_recovered_and_forgiven() -> None:
    nodes = [*CP, node("w-0", phase="failed")]
    health = ClusterHealth(failed={"w-0": RepairRecord(failures=2, given_up=True)})
    result, health = run(nodes, {**SEEN_CP, "w-0": vm("w-0")}, health)
    assert result.recovered == ["w-0"] and health.failed == {} and health.degraded == ""


def test_paused_remediation_reports_silent_guests_but_repairs_drift() -> None:
    nodes = [*CP, node("w-0"), node("w-1")]
    health = ClusterHealth(
        remediation_paused=True, unhealthy_since={"w-0": NOW - timedelta(hours=1)}
    )
    result, _ = run(nodes, {**SEEN_CP, "w-0": vm("w-0", tools="")}, health)
    assert [(r.node, r.action) for r in result.repairs] == [("w-1", "recreate")]
    assert "remediation is paused" in next(f.detail for f in result.findings if f.node == "w-0")


def test_nodes_being_changed_or_unwanted_are_left_to_the_change() -> None:
    nodes = [*CP, node("w-0", phase="creating"), node("w-1").model_copy(update={"wanted": False})]
    result, _ = run(nodes, SEEN_CP)
    assert result.repairs == []


def test_backoff_doubles_and_is_bounded() -> None:
    assert backoff(60, 1) == timedelta(seconds=60)
    assert backoff(60, 2) == timedelta(seconds=120)
    assert backoff(60, 20) == MAX_BACKOFF
    assert backoff(0, 1) == timedelta(seconds=5)  # on demand only: still not a loop


def test_healing_and_health_specs_name_the_field_and_rule() -> None:
    with pytest.raises(ValidationError, match="reconcile_seconds"):
        Healing(reconcile_seconds=1)
    with pytest.raises(ValidationError, match="repair_attempts"):
        Healing(repair_attempts=0)
    with pytest.raises(ValidationError, match="unhealthy_after_seconds"):
        NodeHealth(unhealthy_after_seconds=1)
    assert Healing().reconcile_seconds == 300 and NodeHealth().max_unhealthy == 1
