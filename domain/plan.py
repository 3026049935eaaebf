"""What applying an edited cluster spec would do: the plan `cluster apply --dry-run` prints
and the cluster carries out, computed by the one function both use."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, Field

from domain.cluster import ClusterSpec, WorkerPool, plan_nodes

#: why a field cannot change in place (the rest of the message names the field)
_NOT_IN_PLACE = {
    "name": "it names the cluster: deploy another",
    "cloud_account": "the cluster's VMs belong to its account's vCenter",
    "placement.datacenter": "the cluster's VMs live there",
    "placement.folder": "the cluster's folder is there",
    "placement.ip_allocation": "the nodes keep the addresses they have",
    "control_plane.placement": "the control plane's members and its VIP live there",
    "control_plane.vip": "the API server is reached there",
}
_ROLLING = "needs its nodes replaced one by one (a rolling upgrade: not available yet)"


class ChangePlan(BaseModel):
    """An edited spec against the running one."""

    changes: list[str] = Field(default_factory=list, description="What differs, in words.")
    create: list[str] = Field(default_factory=list, description="Nodes to create, in order.")
    remove: list[str] = Field(default_factory=list, description="Nodes to remove, in order.")
    addresses: dict[str, int] = Field(
        default_factory=dict, description="IP pool -> addresses the new nodes take."
    )
    refused: list[str] = Field(
        default_factory=list, description="Fields that cannot change in place, and why."
    )
    based_on: int = Field(default=0, description="The cluster's operations_run it was made at.")

    @property
    def empty(self) -> bool:
        return not (self.changes or self.refused or self.create or self.remove)


def plan_apply(
    running: ClusterSpec,
    wanted: ClusterSpec,
    nodes: Mapping[str, str],
    revisions: dict[str, int] | None = None,
) -> ChangePlan:
    """The plan for making a cluster running `running` with `nodes` (name -> phase) match
    `wanted`. A node not yet created or ready (left by a failed change) is created by the
    apply as by any change: it is in the plan. Pure: the CLI prints it, the workflow refuses
    or carries out the same."""
    plan = ChangePlan()
    before, after = running.model_dump(mode="json"), wanted.model_dump(mode="json")
    for field, reason in _NOT_IN_PLACE.items():
        if _at(before, field) != _at(after, field):
            plan.refused.append(f"{field}: cannot change in place ({reason})")
    if before["placement"]["ssh_keys"] != after["placement"]["ssh_keys"] or (
        before["placement"]["ntp_servers"] != after["placement"]["ntp_servers"]
    ):
        plan.refused.append(f"placement.ssh_keys, placement.ntp_servers: {_ROLLING}")
    cp_before, cp_after = before["control_plane"], after["control_plane"]
    if cp_before["size"] != cp_after["size"]:
        plan.refused.append(
            f"control_plane.size: {cp_before['size']} -> {cp_after['size']}: control-plane "
            "scaling is not available yet"
        )
    for field in ("cpu", "memory_gb", "disk_gb", "allow_worker_capability", "labels", "taints"):
        if cp_before[field] != cp_after[field]:
            plan.refused.append(f"control_plane.{field}: {_ROLLING}")
    if (
        running.effective_profile() != wanted.effective_profile()
        or before["overrides"] != after["overrides"]
    ):
        plan.refused.append(f"profile, overrides: {_ROLLING}")
    for field in ("description", "tags"):
        if before[field] != after[field]:
            plan.changes.append(f"{field} changed")
    _pools(running, wanted, plan)
    _nodes(running, wanted, nodes, revisions or {}, plan)
    return plan


def _pools(running: ClusterSpec, wanted: ClusterSpec, plan: ChangePlan) -> None:
    old = {p.name: p for p in running.workers}
    new = {p.name: p for p in wanted.workers}
    for name, pool in new.items():
        if name not in old:
            plan.changes.append(f"add worker pool {name} ({pool.size} nodes)")
            continue
        was = old[name]
        if _dump(was, "placement") != _dump(pool, "placement"):
            plan.refused.append(
                f"workers.{name}.placement: cannot change in place (add a pool placed anew "
                "and remove this one)"
            )
        for field in ("cpu", "memory_gb", "disk_gb", "labels", "taints"):
            if _dump(was, field) != _dump(pool, field):
                plan.refused.append(f"workers.{name}.{field}: {_ROLLING}")
        if was.size != pool.size:
            plan.changes.append(f"resize worker pool {name} {was.size} -> {pool.size}")
    for name, pool in old.items():
        if name not in new:
            plan.changes.append(f"remove worker pool {name} ({pool.size} nodes)")


def _nodes(
    running: ClusterSpec,
    wanted: ClusterSpec,
    nodes: Mapping[str, str],
    revisions: dict[str, int],
    plan: ChangePlan,
) -> None:
    def named(slot: str) -> str:
        rev = revisions.get(slot, 0)
        return f"{slot}-r{rev}" if rev else slot

    wanted_plans = plan_nodes(wanted)
    wanted_names = [named(p.name) for p in wanted_plans]
    have = {name for name, phase in nodes.items() if phase in ("created", "ready")}
    for p, name in zip(wanted_plans, wanted_names, strict=True):
        if name in have:
            continue
        plan.create.append(name)
        if wanted.placement.ip_allocation == "static" and p.domain.ip_pool is not None:
            plan.addresses[p.domain.ip_pool] = plan.addresses.get(p.domain.ip_pool, 0) + 1
    keep = set(wanted_names)
    order = {named(p.name): (p.pool, -p.index) for p in plan_nodes(running)}
    extra = [n for n in nodes if n not in keep]
    plan.remove = sorted(extra, key=lambda n: order.get(n, ("", 0)))  # newest first


def _at(document: dict[str, object], path: str) -> object:
    value: object = document
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _dump(pool: WorkerPool, field: str) -> object:
    return pool.model_dump(mode="json")[field]
