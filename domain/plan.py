"""What applying an edited cluster spec would do: the plan `cluster apply --dry-run` prints
and the cluster carries out, computed by the one function both use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, Field

from domain.cluster import (
    ClusterSpec,
    NodePlan,
    WorkerPool,
    kubernetes_step_problem,
    node_build,
    plan_nodes,
)
from domain.lifecycle import Node

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


class ChangePlan(BaseModel):
    """An edited spec against the running one."""

    changes: list[str] = Field(default_factory=list, description="What differs, in words.")
    create: list[str] = Field(default_factory=list, description="Nodes to create, in order.")
    remove: list[str] = Field(default_factory=list, description="Nodes to remove, in order.")
    replace: dict[str, str] = Field(
        default_factory=dict,
        description="Nodes replaced by a rolling upgrade, in order: old name -> new name.",
    )
    addresses: dict[str, int] = Field(
        default_factory=dict,
        description="IP pool -> addresses the new and replacing nodes take.",
    )
    refused: list[str] = Field(
        default_factory=list, description="Fields that cannot change in place, and why."
    )
    based_on: int = Field(default=0, description="The cluster's operations_run it was made at.")
    warnings: list[str] = Field(
        default_factory=list, description="What the change does not do that it might be thought to."
    )

    @property
    def empty(self) -> bool:
        return not (self.changes or self.refused or self.create or self.remove or self.replace)

    resizes_control_plane: bool = Field(
        default=False, description="Control-plane members come or go (one at a time)."
    )

    @property
    def rolling(self) -> bool:
        """Nodes are replaced, or control-plane members come or go: a rollout, one step at a
        time, that can be paused and aborted."""
        return bool(self.replace) or self.resizes_control_plane


def plan_apply(
    running: ClusterSpec,
    wanted: ClusterSpec,
    nodes: Sequence[Node],
    revisions: dict[str, int] | None = None,
) -> ChangePlan:
    """The plan for making a cluster running `running` with `nodes` match `wanted`. A node
    not yet created or ready (left by a failed change) is created by the apply as by any
    change: it is in the plan. A node whose build (node_build) differs from what the edited
    spec builds is replaced. Pure: the CLI prints it, the workflow refuses or carries out the
    same."""
    records = list(nodes)
    plan = ChangePlan()
    before, after = running.model_dump(mode="json"), wanted.model_dump(mode="json")
    for field, reason in _NOT_IN_PLACE.items():
        if _at(before, field) != _at(after, field):
            plan.refused.append(f"{field}: cannot change in place ({reason})")
    cp_before, cp_after = before["control_plane"], after["control_plane"]
    if cp_before["size"] != cp_after["size"]:
        plan.resizes_control_plane = True
        plan.changes.append(
            f"control plane {cp_before['size']} -> {cp_after['size']} members, one at a time"
        )
    old_kube, new_kube = running.kubernetes_version(), wanted.kubernetes_version()
    if old_kube != new_kube:
        plan.changes.append(f"Kubernetes {old_kube} -> {new_kube}")
    for version in sorted({n.kubernetes or old_kube for n in records}):
        problem = kubernetes_step_problem(version, new_kube)
        if problem:
            plan.refused.append(f"profile.kubernetes: {problem}")
            break
    old_template, new_template = running.template(), wanted.template()
    if old_template != new_template:
        plan.changes.append(
            f"template {old_template or '(the account default)'} -> "
            f"{new_template or '(the account default)'}"
        )
    for field in ("description", "tags", "healing"):
        if before.get(field) != after.get(field):
            plan.changes.append(f"{field} changed")
    if _rest_of(running) != _rest_of(wanted):
        plan.changes.append("profile or overrides changed")
    if before["placement"]["ssh_keys"] != after["placement"]["ssh_keys"]:
        plan.changes.append("placement.ssh_keys changed")
    if before["placement"]["ntp_servers"] != after["placement"]["ntp_servers"]:
        plan.changes.append("placement.ntp_servers changed")
    for field in (
        "cpu",
        "memory_gb",
        "disk_gb",
        "allow_worker_capability",
        "labels",
        "taints",
        "health",
    ):
        if cp_before.get(field) != cp_after.get(field):
            plan.changes.append(f"control_plane.{field} changed")
    _pools(running, wanted, plan)
    _nodes(running, wanted, records, revisions or {}, plan)
    cp_replaced = any(old.startswith(f"{running.name}-cp-") for old in plan.replace)
    if (
        cp_replaced
        and wanted.placement.ip_allocation == "dhcp"
        and wanted.control_plane.vip is None
    ):
        plan.refused.append(
            "control_plane: with DHCP and no VIP the control-plane node's own address is the "
            "cluster's endpoint: it cannot be replaced (deploy with a VIP to upgrade in place)"
        )
    return plan


def _rest_of(spec: ClusterSpec) -> object:
    """The effective profile but for its Kubernetes version and os template (named apart)."""
    document = spec.effective_profile().model_dump(mode="json")
    for layer in document["layers"]:
        if layer["layer"] == "kubernetes":
            layer["pack"]["version"] = ""
        if layer["layer"] == "os":
            layer["pack"]["values"].pop("template", None)
    return document


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
        for field in ("cpu", "memory_gb", "disk_gb", "labels", "taints", "rollout", "health"):
            if _dump(was, field) != _dump(pool, field):
                plan.changes.append(f"workers.{name}.{field} changed")
        if was.size != pool.size:
            plan.changes.append(f"resize worker pool {name} {was.size} -> {pool.size}")
    for name, pool in old.items():
        if name not in new:
            plan.changes.append(f"remove worker pool {name} ({pool.size} nodes)")


def _named(slot: str, revisions: Mapping[str, int]) -> str:
    rev = revisions.get(slot, 0)
    return f"{slot}-r{rev}" if rev else slot


def slot_builds(spec: ClusterSpec) -> dict[tuple[str, int], tuple[NodePlan, str]]:
    """Each node slot (pool, index) of a spec: its plan and the build it gives."""
    layout = spec.layout()
    return {(p.pool, p.index): (p, node_build(p, layout)) for p in layout.plans}


def node_builds(spec: ClusterSpec, nodes: Sequence[Node]) -> dict[str, str]:
    """Each node's build: recorded, else (made before builds were recorded, or a name -> phase
    record) the build `spec`, which it was made from, gives its slot."""
    slots = slot_builds(spec)
    out = {}
    for node in nodes:
        known = slots.get((node.pool, node.index))
        out[node.name] = node.build or (known[1] if known else "")
    return out


def outdated(spec: ClusterSpec, nodes: Sequence[Node], builds: Mapping[str, str]) -> list[Node]:
    """Nodes `spec` keeps whose build differs from the one it gives them, in rollout order:
    the control plane first, then the worker pools in the spec's order, each by index."""
    slots = slot_builds(spec)
    order = {"cp": 0} | {p.name: i + 1 for i, p in enumerate(spec.workers)}
    stale = [
        n
        for n in nodes
        if n.phase in ("created", "ready")
        and (n.pool, n.index) in slots
        and builds.get(n.name) != slots[(n.pool, n.index)][1]
    ]
    return sorted(stale, key=lambda n: (order.get(n.pool, 99), n.index))


def _nodes(
    running: ClusterSpec,
    wanted: ClusterSpec,
    nodes: Sequence[Node],
    revisions: dict[str, int],
    plan: ChangePlan,
) -> None:
    wanted_plans = plan_nodes(wanted)
    wanted_names = [_named(p.name, revisions) for p in wanted_plans]
    have = {n.name for n in nodes if n.phase in ("created", "ready")}
    static = wanted.placement.ip_allocation == "static"

    def address(p: NodePlan) -> None:
        if static and p.domain.ip_pool is not None:
            plan.addresses[p.domain.ip_pool] = plan.addresses.get(p.domain.ip_pool, 0) + 1

    for p, name in zip(wanted_plans, wanted_names, strict=True):
        if name in have:
            continue
        plan.create.append(name)
        address(p)
    keep = set(wanted_names)
    order = {_named(p.name, revisions): (p.pool, -p.index) for p in plan_nodes(running)}
    extra = [n.name for n in nodes if n.name not in keep]
    plan.remove = sorted(extra, key=lambda n: order.get(n, ("", 0)))  # newest first
    builds = node_builds(running, nodes)
    plans = {(p.pool, p.index): p for p in wanted_plans}
    for node in outdated(wanted, [n for n in nodes if n.name in keep], builds):
        slot = plans[(node.pool, node.index)]
        plan.replace[node.name] = f"{slot.name}-r{revisions.get(slot.name, 0) + 1}"
        address(slot)


def _at(document: dict[str, object], path: str) -> object:
    value: object = document
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _dump(pool: WorkerPool, field: str) -> object:
    return pool.model_dump(mode="json")[field]
