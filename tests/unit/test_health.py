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
    not_ready: dict[str, str] | None = None,
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
        not_ready,
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
    nodes = [*CP, *(node(f"w-{i}") for i in range(6))]
    silent = {f"w-{i}": vm(f"w-{i}", tools="") for i in range(3)}
    fine = {f"w-{i}": vm(f"w-{i}") for i in range(3, 6)}
    since = {n: NOW - timedelta(minutes=5) for n in silent}
    seen = {**SEEN_CP, **silent, **fine}
    result, _ = run(nodes, seen, ClusterHealth(unhealthy_since=dict(since)))
    assert [r.node for r in result.repairs] == ["w-0"]
    assert result.next_due == NOW  # the next one at the next reconcile
    pools = {**POOLS, "w": PoolHealth(unhealthy_after_seconds=60, max_unhealthy=2)}
    result, _ = run(nodes, seen, ClusterHealth(unhealthy_since=dict(since)), pools=pools)
    assert [r.node for r in result.repairs] == ["w-0", "w-1"]
    pools = {**POOLS, "w": PoolHealth(unhealthy_after_seconds=60, max_unhealthy=0)}
    result, _ = run(nodes, seen, ClusterHealth(unhealthy_since=dict(since)), pools=pools)
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
    record = RepairRecord(
        attempts=1, failures=1, last_error="boom", next_at=NOW + timedelta(seconds=30)
    )
    health = ClusterHealth(failed={"w-0": record})
    result, _ = run(nodes, SEEN_CP, health)
    assert result.repairs == [] and result.next_due == record.next_at
    assert "next attempt at" in result.findings[0].detail
    result, _ = run(nodes, SEEN_CP, health, now=NOW + timedelta(seconds=30))
    assert [r.node for r in result.repairs] == ["w-0"]
    record.attempts = 3  # the limit (repair_attempts 3): given up, Degraded
    result, _ = run(nodes, SEEN_CP, health, now=NOW + timedelta(days=1))
    assert result.repairs == [] and result.findings[0].kind == "given-up"
    assert health.degraded.startswith("repair given up for w-0")


def test_a_failed_node_whose_vm_serves_is_recovered_and_forgiven_once_it_stayed_healthy() -> None:
    nodes = [*CP, node("w-0", phase="failed")]
    health = ClusterHealth(failed={"w-0": RepairRecord(attempts=2, failures=2)})
    result, health = run(nodes, {**SEEN_CP, "w-0": vm("w-0")}, health)
    assert result.recovered == ["w-0"] and health.failed["w-0"].healthy_since == NOW
    assert result.next_due == NOW + timedelta(seconds=60)  # to forget it then
    _, health = run(nodes, {**SEEN_CP, "w-0": vm("w-0")}, health, now=NOW + timedelta(seconds=60))
    assert health.failed == {} and health.degraded == ""


def test_a_node_rebuilt_that_goes_bad_again_soon_counts_on_and_is_given_up() -> None:
    """A node whose rebuilds do not last (healthy less than its timeout) is not rebuilt
    forever: each repair counts until the limit."""
    nodes = [*CP, node("w-0")]
    health = ClusterHealth()
    silent = {**SEEN_CP, "w-0": vm("w-0", tools="")}
    now = NOW
    for rebuilt in range(1, 4):
        run(nodes, silent, health, now=now)  # first seen silent
        now += timedelta(seconds=60)
        result, _ = run(nodes, silent, health, now=now)
        assert [r.action for r in result.repairs] == ["replace"], rebuilt
        record = health.failed.setdefault("w-0", RepairRecord())
        record.attempts += 1  # (what repair_all records)
        health.unhealthy_since.pop("w-0")
        now += timedelta(seconds=10)
        run(nodes, {**SEEN_CP, "w-0": vm("w-0")}, health, now=now)  # healthy for a moment
        now += timedelta(seconds=10)
    run(nodes, silent, health, now=now)
    result, _ = run(nodes, silent, health, now=now + timedelta(seconds=60))
    assert result.repairs == [] and health.degraded


def test_a_not_ready_failed_node_is_not_recovered() -> None:
    nodes = [*CP, node("w-0", phase="failed")]
    result, health = run(nodes, {**SEEN_CP, "w-0": vm("w-0")}, not_ready={"w-0": "Ready=False"})
    assert result.recovered == [] and "w-0" in health.unhealthy_since


def test_max_unhealthy_counts_nodes_already_out_of_service() -> None:
    """A pool whose node is missing (or left failed by a repair) has no room for another
    replacement with max_unhealthy 1."""
    nodes = [*CP, node("w-0"), node("w-1"), node("w-2"), node("w-3")]
    health = ClusterHealth(unhealthy_since={"w-1": NOW - timedelta(minutes=5)})
    seen = {**SEEN_CP, "w-1": vm("w-1", tools=""), "w-2": vm("w-2"), "w-3": vm("w-3")}
    result, _ = run(nodes, seen, health)  # w-0 has no VM
    assert [(r.node, r.action) for r in result.repairs] == [("w-0", "recreate")]
    assert "out of service or being repaired" in next(
        f.detail for f in result.findings if f.node == "w-1"
    )


def test_a_pool_more_than_half_unhealthy_is_not_remediated() -> None:
    nodes = [*CP, node("w-0"), node("w-1"), node("w-2")]
    long_ago = NOW - timedelta(minutes=5)
    health = ClusterHealth(unhealthy_since={"w-0": long_ago, "w-1": long_ago})
    seen = {**SEEN_CP, "w-0": vm("w-0", tools=""), "w-1": vm("w-1", tools=""), "w-2": vm("w-2")}
    result, _ = run(nodes, seen, health)
    assert result.repairs == []
    assert all("likely beyond the nodes" in f.detail for f in result.findings)


def test_records_of_nodes_gone_are_forgotten() -> None:
    health = ClusterHealth(
        failed={"w-9": RepairRecord(attempts=3, given_up=True)},
        unhealthy_since={"w-9": NOW},
    )
    run([*CP], SEEN_CP, health)
    assert health.failed == {} and health.unhealthy_since == {} and health.degraded == ""


def test_an_outdated_node_is_powered_on_but_not_rebuilt() -> None:
    held = node("w-0").model_copy(update={"hold": "its build is outdated"})
    result, _ = run([*CP, held], SEEN_CP)
    assert result.repairs == [] and "its build is outdated" in result.findings[0].detail
    result, _ = run([*CP, held], {**SEEN_CP, "w-0": vm("w-0", power="poweredOff")})
    assert [r.action for r in result.repairs] == ["power-on"]


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


def test_a_red_heartbeat_counts_as_silent() -> None:
    nodes = [*CP, node("w-0")]
    health = ClusterHealth(unhealthy_since={"w-0": NOW - timedelta(minutes=5)})
    red = vm("w-0").model_copy(update={"heartbeat": "red"})
    result, _ = run(nodes, {**SEEN_CP, "w-0": red}, health)
    assert [r.action for r in result.repairs] == ["replace"]
    assert "heartbeat is red" in result.repairs[0].reason
    gray = vm("w-0").model_copy(update={"heartbeat": "gray"})  # no heartbeat reported: fine
    result, _ = run(nodes, {**SEEN_CP, "w-0": gray}, ClusterHealth())
    assert result.repairs == [] and result.findings == []


def test_the_next_reconcile_is_an_interval_after_the_last_or_sooner_never_back_to_back() -> None:
    from datetime import UTC, datetime, timedelta

    from domain.health import MIN_INTERVAL, ClusterHealth

    t0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    never = ClusterHealth()
    assert never.next_reconcile(0, t0) is None  # on demand only, nothing pending
    assert never.next_reconcile(300, t0) == t0 + timedelta(seconds=300)
    checked = ClusterHealth(checked_at=t0)
    assert checked.next_reconcile(300, t0 - timedelta(days=1)) == t0 + timedelta(seconds=300)
    soon = ClusterHealth(checked_at=t0, next_due=t0 + timedelta(seconds=30))
    assert soon.next_reconcile(300, t0) == t0 + timedelta(seconds=30)  # a timeout falls due
    assert soon.next_reconcile(0, t0) == t0 + timedelta(seconds=30)
    now = ClusterHealth(checked_at=t0, next_due=t0)
    assert now.next_reconcile(300, t0) == t0 + MIN_INTERVAL  # never back to back
