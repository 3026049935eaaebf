"""A cluster's health: what a reconcile sees of its VMs in vCenter, and what it does about it.

A reconcile reads the cluster's folder once (`vm_inspect`, on the gateway's agent, its result
signed) and compares every node's VM with its record. `assess` turns what it saw into
findings (reported) and repairs (carried out as steps), under the cluster's healing policy:

- a node's VM gone from vCenter: recreated under the same name, instance UUID and address;
- a node's VM powered off outside kubegate: powered on, or reported (`healing.powered_off`);
- a node whose guest stopped reporting (VMware Tools not running, or no guest address), or
  whose Node the cluster's API shows not Ready (readiness `kubernetes`), for longer than its
  pool's `health.unhealthy_after_seconds`: replaced by a new VM of the same name and address,
  at most `health.max_unhealthy` of a pool at a time, a control-plane member only while the
  other members keep etcd's quorum;
- a VM in the folder that is no node's, a node's VM renamed or moved out of the folder:
  reported, never touched.

A repair that fails backs off (doubling from the reconcile interval) and, after
`healing.repair_attempts` failures, is given up: the cluster is Degraded until the node is
healthy again or a `reconcile` on demand starts the count again. Pure: the workflow decides
with it, tests check it without a workflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from domain.account import VCenterCredentials
from domain.requests import AgentRequest

#: VMware Tools is running in the guest (vim.vm.GuestInfo.ToolsRunningStatus)
TOOLS_RUNNING = "guestToolsRunning"
POWERED_ON = "poweredOn"
POWERED_OFF = "poweredOff"

#: a reconcile stops growing the run's history after this many quiet checks (continue as new)
CHECKS_PER_RUN = 100
#: the longest a failed repair waits before its next attempt
MAX_BACKOFF = timedelta(hours=1)
#: the soonest a reconcile follows the one before
MIN_INTERVAL = timedelta(seconds=5)
#: foreign VMs listed one by one (the rest are counted)
MAX_FOREIGN = 20


# -- the agent's read --------------------------------------------------------------------------


class ExpectedVm(AgentRequest):
    """A node as kubegate recorded it."""

    name: str = Field(description="The node's (and its VM's) name.")
    instance_uuid: str = Field(description="The VM's instance UUID (deterministic per node).")


class InspectRequest(AgentRequest):
    """Read the cluster's folder and find every node's VM (by instance UUID, wherever it is)."""

    credentials: VCenterCredentials
    folder: str = Field(description="The cluster's folder, 'Folder:group-…'.")
    owner: str = Field(description="The owner's mark, e.g. 'cluster/demo'.")
    nodes: list[ExpectedVm] = Field(default_factory=list, max_length=1000)


class VmSeen(BaseModel):
    """One VM as vCenter reports it."""

    ref: str
    name: str
    instance_uuid: str = ""
    power_state: str = ""
    #: runtime.connectionState: connected, disconnected, orphaned, inaccessible, invalid
    connection: str = ""
    #: guest.toolsRunningStatus ('' when vCenter does not say)
    tools: str = ""
    #: guest.guestHeartbeatStatus: VMware Tools' heartbeat (green, yellow, red; gray: none)
    heartbeat: str = ""
    address: str | None = None
    in_folder: bool = True
    #: the cluster id of its kubegate mark ('' when unmarked)
    owner: str = ""


class InspectResult(BaseModel):
    """What the agent found: the folder, the nodes' VMs, and the folder's other VMs."""

    folder_found: bool = True
    #: node name -> its VM (a node absent here has no VM in vCenter)
    nodes: dict[str, VmSeen] = Field(default_factory=dict)
    #: VMs in the folder that are no node's
    foreign: list[VmSeen] = Field(default_factory=list)
    vcenter_requests: int = 0


class ReconcileRequest(BaseModel):
    """A reconcile asked for (`cluster reconcile`, `gateway reconcile`)."""

    retry_given_up: bool = Field(
        default=False,
        description="Repairs given up get their attempts again (backoff in progress stays).",
    )


# -- the cluster's record ----------------------------------------------------------------------


class Finding(BaseModel):
    """Something a reconcile reports."""

    kind: Literal[
        "missing",
        "powered-off",
        "unhealthy",
        "foreign",
        "renamed",
        "moved",
        "disconnected",
        "folder-missing",
        "given-up",
    ]
    node: str = Field(default="", description="The node ('' for a VM that is no node's).")
    vm: str = Field(default="", description="The VM's ref, when it has one.")
    detail: str
    since: datetime | None = None


class Repair(BaseModel):
    """Something a reconcile does: a step of its own."""

    node: str
    action: Literal["recreate", "power-on", "replace"]
    reason: str


class RepairRecord(BaseModel):
    """A node's repairs since it last stayed healthy, for backoff and the limit. Kept until
    the node has been healthy for its pool's `unhealthy_after_seconds` (a node rebuilt
    that soon goes bad again counts on, so it is not rebuilt forever)."""

    attempts: int = Field(default=0, description="Repairs begun (failed or not).")
    failures: int = Field(default=0, description="Of them, those that failed.")
    last_error: str = ""
    next_at: datetime | None = None
    given_up: bool = False
    #: when it was first seen healthy after its last repair (None: not since)
    healthy_since: datetime | None = None


class ClusterHealth(BaseModel):
    """The last reconcile's view of the cluster (kept in its state)."""

    checked_at: datetime | None = None
    checks: int = Field(default=0, description="Reconciles run (all of them).")
    repairs_made: int = 0
    findings: list[Finding] = Field(default_factory=list)
    #: node -> when its guest was first seen not reporting (cleared when it reports again)
    unhealthy_since: dict[str, datetime] = Field(default_factory=dict)
    #: node -> its failed repairs
    failed: dict[str, RepairRecord] = Field(default_factory=dict)
    remediation_paused: bool = False
    #: the last reconcile could not read vCenter: why ('' when it could)
    error: str = ""
    #: when a pending decision (an unhealthy node's timeout, a repair's backoff) falls due
    next_due: datetime | None = None
    #: reads of vCenter that failed in a row (the next one backs off)
    failed_reads: int = 0

    @property
    def degraded(self) -> str:
        """Why the cluster is Degraded ('' when it is not): repairs given up."""
        given_up = sorted(n for n, r in self.failed.items() if r.given_up)
        if not given_up:
            return ""
        return f"repair given up for {', '.join(given_up)} (see its last step)"

    def rearm_given_up(self) -> None:
        """Repairs given up get their attempts again (`reconcile --retry-given-up`)."""
        for record in self.failed.values():
            if record.given_up:
                record.given_up, record.attempts, record.failures = False, 0, 0

    def next_reconcile(self, interval: int, since: datetime) -> datetime | None:
        """When the next scheduled reconcile is due: `interval` seconds after the last one
        (`since` before the first), or sooner when an unhealthy node's timeout or a repair's
        backoff falls due; never back to back. None: on demand only, nothing pending."""
        due = [] if self.next_due is None else [self.next_due]
        if interval > 0:
            due.append((self.checked_at or since) + timedelta(seconds=interval))
        if not due:
            return None
        if self.checked_at is None:
            return min(due)
        return max(min(due), self.checked_at + MIN_INTERVAL)


class NodeFacts(BaseModel):
    """What assess needs of a node record."""

    name: str
    pool: str
    control_plane: bool
    vm: str | None
    phase: str
    instance_uuid: str
    #: the spec still wants it (an extra node waiting to be removed is only reported)
    wanted: bool = True
    #: why it may be powered on but not rebuilt now ('' when it may), e.g. an outdated build
    hold: str = ""


class PoolHealth(BaseModel):
    """A pool's health policy, as assess takes it."""

    unhealthy_after_seconds: int
    max_unhealthy: int


class Assessment(BaseModel):
    findings: list[Finding] = Field(default_factory=list)
    repairs: list[Repair] = Field(default_factory=list)
    #: the soonest moment a pending decision (an unhealthy timeout, a backoff) falls due
    next_due: datetime | None = None
    #: nodes left failed (a change or repair) whose VM runs and whose guest reports: they serve
    recovered: list[str] = Field(default_factory=list)


def healthy_guest(seen: VmSeen) -> bool:
    """A powered-on VM's guest reports: VMware Tools runs, its heartbeat is not red, and it
    has an address."""
    return seen.tools == TOOLS_RUNNING and seen.heartbeat != "red" and bool(seen.address)


def assess(
    nodes: list[NodeFacts],
    seen: InspectResult,
    health: ClusterHealth,
    pools: dict[str, PoolHealth],
    now: datetime,
    powered_off: Literal["power-on", "report"],
    control_plane_size: int,
    not_ready: Mapping[str, str] | None = None,
    repair_attempts: int = 3,
) -> Assessment:
    """Findings and repairs for what was seen; updates `health.unhealthy_since` (first seen)
    and forgets the repairs of nodes that stayed healthy for their timeout. `not_ready`: the
    nodes the cluster's API does not show Ready, and why (None: not asked, or it did not
    answer)."""
    out = Assessment()
    not_ready = not_ready or {}
    known = {n.name for n in nodes}
    for gone in [n for n in health.failed if n not in known]:
        del health.failed[gone]  # (removed or renamed by a change: its record goes too)
    for gone in [n for n in health.unhealthy_since if n not in known]:
        del health.unhealthy_since[gone]

    def policy_of(pool: str) -> PoolHealth:
        return pools.get(pool) or PoolHealth(unhealthy_after_seconds=300, max_unhealthy=1)

    def healthy(name: str, vm: VmSeen) -> bool:
        return healthy_guest(vm) and name not in not_ready

    due: list[datetime] = []
    if not seen.folder_found:
        out.findings.append(
            Finding(kind="folder-missing", detail="the cluster's folder is gone from vCenter")
        )
    for other in seen.foreign[:MAX_FOREIGN]:
        out.findings.append(
            Finding(
                kind="foreign",
                vm=other.ref,
                detail=f"VM {other.name} is in the cluster's folder but is no node of it"
                + (f" (marked as {other.owner}'s)" if other.owner else "")
                + "; left alone",
            )
        )
    if len(seen.foreign) > MAX_FOREIGN:
        out.findings.append(
            Finding(
                kind="foreign",
                detail=f"{len(seen.foreign) - MAX_FOREIGN} more VMs in the folder are no node "
                "of the cluster; left alone",
            )
        )
    # members that serve: found, on, guest reporting (for quorum)
    serving_members = {
        n.name
        for n in nodes
        if n.control_plane
        and (found := seen.nodes.get(n.name)) is not None
        and found.power_state == POWERED_ON
        and healthy(n.name, found)
    }
    candidates: list[tuple[NodeFacts, Repair]] = []
    for node in nodes:
        if node.phase not in ("ready", "failed"):
            continue  # being made or removed by a change: not a reconcile's business
        vm = seen.nodes.get(node.name)
        if vm is None:
            if not seen.folder_found:
                continue  # the folder's loss is reported; nodes are not recreated without it
            repair = Repair(
                node=node.name,
                action="recreate",
                reason="its VM was removed outside kubegate"
                if node.phase != "failed"
                else "its VM was not made (a repair or change failed)",
            )
            out.findings.append(
                Finding(kind="missing", node=node.name, vm=node.vm or "", detail=repair.reason)
            )
            health.unhealthy_since.pop(node.name, None)
            if node.name in health.failed:
                health.failed[node.name].healthy_since = None
            candidates.append((node, repair))
            continue
        if vm.name != node.name:
            out.findings.append(
                Finding(
                    kind="renamed",
                    node=node.name,
                    vm=vm.ref,
                    detail=f"its VM is named {vm.name} in vCenter (renamed outside kubegate)",
                )
            )
        if not vm.in_folder:
            out.findings.append(
                Finding(
                    kind="moved",
                    node=node.name,
                    vm=vm.ref,
                    detail="its VM was moved out of the cluster's folder outside kubegate",
                )
            )
        if vm.connection and vm.connection != "connected":
            out.findings.append(
                Finding(
                    kind="disconnected",
                    node=node.name,
                    vm=vm.ref,
                    detail=f"its VM is {vm.connection} in vCenter (its host or storage)",
                )
            )
            health.unhealthy_since.pop(node.name, None)
            continue  # vCenter cannot act on it: reported only
        if vm.power_state != POWERED_ON:
            health.unhealthy_since.pop(node.name, None)
            word = "suspended" if vm.power_state == "suspended" else "powered off"
            if powered_off == "power-on":
                repair = Repair(
                    node=node.name,
                    action="power-on",
                    reason=f"its VM was {word} outside kubegate",
                )
                candidates.append((node, repair))
                detail = repair.reason
            else:
                detail = f"its VM was {word} outside kubegate (policy: report)"
            out.findings.append(
                Finding(kind="powered-off", node=node.name, vm=vm.ref, detail=detail)
            )
            continue
        record = health.failed.get(node.name)
        if healthy(node.name, vm):
            health.unhealthy_since.pop(node.name, None)
            if record is not None:  # its repairs are forgotten once it stayed healthy
                record.healthy_since = record.healthy_since or now
                stable = timedelta(seconds=policy_of(node.pool).unhealthy_after_seconds)
                if now - record.healthy_since >= stable:
                    del health.failed[node.name]
                else:
                    due.append(record.healthy_since + stable)
            if node.phase == "failed":
                out.recovered.append(node.name)
            continue
        if record is not None:
            record.healthy_since = None
        since = health.unhealthy_since.setdefault(node.name, now)
        policy = policy_of(node.pool)
        if healthy_guest(vm):
            what = f"Kubernetes: {not_ready[node.name]}"
            stopped = "it is not Ready"
        else:
            if vm.tools != TOOLS_RUNNING:
                what = "VMware Tools is not running"
            elif vm.heartbeat == "red":
                what = "VMware Tools' heartbeat is red"
            else:
                what = "no guest address"
            stopped = "its guest stopped reporting"
        waited = (now - since).total_seconds()
        out.findings.append(
            Finding(
                kind="unhealthy",
                node=node.name,
                vm=vm.ref,
                since=since,
                detail=f"{stopped} ({what}) since {int(waited)} s",
            )
        )
        deadline = since + timedelta(seconds=policy.unhealthy_after_seconds)
        if now < deadline:
            due.append(deadline)
            continue
        candidates.append(
            (
                node,
                Repair(
                    node=node.name,
                    action="replace",
                    reason=f"{stopped} ({what}) for {policy.unhealthy_after_seconds} s or more",
                ),
            )
        )
    # failures: back off, give up after the limit
    active: list[tuple[NodeFacts, Repair]] = []
    for node, repair in candidates:
        record = health.failed.get(node.name)
        if record is not None and record.attempts >= repair_attempts:
            record.given_up, record.next_at = True, None
        if record is not None and record.given_up:
            last = f" (last error: {record.last_error})" if record.last_error else ""
            _explain(
                out,
                node.name,
                f"repair given up after {record.attempts} attempt(s), {record.failures} "
                f"failed{last}; `reconcile --retry-given-up` tries again",
                given_up=True,
            )
            continue
        if record is not None and record.next_at is not None and now < record.next_at:
            due.append(record.next_at)
            _explain(
                out,
                node.name,
                f"{record.attempts} repair(s) so far (last error: {record.last_error or '-'}); "
                f"next attempt at {record.next_at:%H:%M:%S} UTC",
            )
            continue
        if not node.wanted:
            continue  # to be removed by the change in progress: reported only
        if node.hold and repair.action != "power-on":
            _explain(out, node.name, node.hold)
            continue
        active.append((node, repair))
    # bounds: the control plane one member at a time and only while the other members keep
    # etcd's quorum (never its only member: its etcd would be lost); per pool at most
    # max_unhealthy nodes replaced at once
    # out of service already: no VM, or left failed by a repair or change (a repair counts
    # against max_unhealthy until its node serves again)
    down: dict[str, set[str]] = {}
    for node in nodes:
        if node.phase == "failed" or (
            node.phase == "ready" and seen.folder_found and node.name not in seen.nodes
        ):
            down.setdefault(node.pool, set()).add(node.name)
    # unhealthy now, whatever for how long (a pool more than half unhealthy is not remediated:
    # the cause is most likely beyond its nodes — network, CNI, certificates)
    unhealthy: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for node in nodes:
        sizes[node.pool] = sizes.get(node.pool, 0) + 1
        if node.name in health.unhealthy_since:
            unhealthy[node.pool] = unhealthy.get(node.pool, 0) + 1
    replacing: dict[str, int] = {}
    member_taken = False
    for node, repair in active:
        if repair.action == "power-on":
            out.repairs.append(repair)
            continue
        if node.control_plane:
            if control_plane_size <= 1:
                _explain(
                    out,
                    node.name,
                    "it is the only control-plane member (its etcd is gone with it): restore "
                    "it or deploy anew",
                )
                continue
            if member_taken:
                due.append(now)  # the next member at the next reconcile
                _explain(out, node.name, "one control-plane member at a time")
                continue
            others = len(serving_members - {node.name})
            quorum = control_plane_size // 2 + 1
            if others < quorum:
                _explain(out, node.name, f"{others} other member(s) serve; etcd needs {quorum}")
                continue
        if repair.action == "replace":
            if health.remediation_paused:
                _explain(out, node.name, "remediation is paused")
                continue
            policy = policy_of(node.pool)
            if policy.max_unhealthy == 0:
                _explain(out, node.name, "the pool's health.max_unhealthy is 0")
                continue
            many = unhealthy.get(node.pool, 0)
            if many > max(policy.max_unhealthy, sizes.get(node.pool, 0) // 2):
                _explain(
                    out,
                    node.name,
                    f"{many} of the pool's {sizes[node.pool]} nodes are unhealthy at once (more "
                    "than half, and than health.max_unhealthy): the cause is likely beyond "
                    "the nodes",
                )
                continue
            busy = len(down.get(node.pool, set()) - {node.name}) + replacing.get(node.pool, 0)
            if busy >= policy.max_unhealthy:
                due.append(now)
                _explain(
                    out,
                    node.name,
                    f"{busy} node(s) of the pool are out of service or being repaired "
                    f"(health.max_unhealthy {policy.max_unhealthy})",
                )
                continue
            replacing[node.pool] = replacing.get(node.pool, 0) + 1
        member_taken = member_taken or node.control_plane
        out.repairs.append(repair)
    out.next_due = min(due) if due else None
    return out


def _explain(out: Assessment, node: str, why: str, given_up: bool = False) -> None:
    """Say why a node's finding is not repaired now (on its finding)."""
    finding = next((f for f in reversed(out.findings) if f.node == node), None)
    if finding is None:
        return
    finding.detail = (
        f"{finding.detail}; {why}" if given_up else f"{finding.detail}; not repaired: {why}"
    )
    if given_up:
        finding.kind = "given-up"


def backoff(interval_seconds: int, failures: int) -> timedelta:
    """How long a repair that failed `failures` times waits before its next attempt."""
    seconds = max(interval_seconds, 5) * (2 ** max(failures - 1, 0))
    return min(timedelta(seconds=seconds), MAX_BACKOFF)
