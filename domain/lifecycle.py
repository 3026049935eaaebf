"""Cluster lifecycle state: status, step history, nodes, and the messages that change them.

Pure models: ClusterWorkflow keeps one ClusterState and returns it from its queries.
"""

from __future__ import annotations

from abc import abstractmethod
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from domain.account import SealedSecret, VCenterCredentials
from domain.bootstrap import NodeNetwork
from domain.cluster import MAX_POOL_NODES, ClusterSpec, NodeSpec, WorkerPool
from domain.health import ClusterHealth
from domain.kubeconfig import KubeconfigIssue
from domain.presence import WAITING, AgentPresence
from domain.version import version_at_least


class ClusterStatus(StrEnum):
    QUEUED = "Queued"
    PROVISIONING = "Provisioning"
    RUNNING = "Running"
    UPDATING = "Updating"
    DELETING = "Deleting"
    DELETED = "Deleted"
    FAILED = "Failed"
    #: Running, but a repair was given up (see `health`): it serves, not as its spec says
    DEGRADED = "Degraded"


class StepState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class Step(BaseModel):
    """One step of a lifecycle as it happened."""

    name: str = Field(description="Stable id, e.g. 'create-vms'.")
    title: str = Field(description="What the step does, in words.")
    state: StepState = StepState.RUNNING
    started: datetime | None = None
    ended: datetime | None = None
    attempts: int = Field(default=0, description="Activity attempts the step took.")
    error: str | None = None
    objects: list[str] = Field(default_factory=list, description="vSphere objects touched.")
    detail: str = ""
    operation: str = Field(
        default="",
        description="The operation the step belongs to: deploy, retry, a change (e.g. 'Scale "
        "workers to 5'), abort, delete; a gateway's configure, resize, upgrade, reset.",
    )
    #: which run of that operation (operations repeat: two scales, a retry after a failure)
    operation_number: int = 0

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return (self.ended - self.started).total_seconds()


#: a lifecycle's step history keeps the steps of this many operations, newest first ...
KEEP_OPERATIONS = 20
#: ... and never more steps than this (an operation's own steps are kept whole when it fits)
KEEP_STEPS = 300


def trim_steps(steps: list[Step]) -> tuple[list[Step], int]:
    """The steps of the newest operations within the bounds, and how many operations were
    dropped. Steps of a running operation are always kept."""
    numbers: list[int] = []
    for step in steps:
        if step.operation_number not in numbers:
            numbers.append(step.operation_number)
    kept_numbers: set[int] = set()
    count = 0
    full = False
    for number in reversed(numbers):
        size = sum(1 for s in steps if s.operation_number == number)
        running = any(s.operation_number == number and s.state is StepState.RUNNING for s in steps)
        full = full or bool(
            kept_numbers and (len(kept_numbers) >= KEEP_OPERATIONS or count + size > KEEP_STEPS)
        )
        if full and not running:
            continue
        kept_numbers.add(number)
        count += size
    kept = [s for s in steps if s.operation_number in kept_numbers]
    return kept, len(numbers) - len(kept_numbers)


def operations(steps: list[Step]) -> list[tuple[str, int, list[Step]]]:
    """Steps grouped by operation, in order: (operation, its number, its steps)."""
    groups: list[tuple[str, int, list[Step]]] = []
    for step in steps:
        if groups and groups[-1][1] == step.operation_number and groups[-1][0] == step.operation:
            groups[-1][2].append(step)
        else:
            groups.append((step.operation, step.operation_number, [step]))
    return groups


def note_waiting(steps: list[Step], away: AgentPresence | None) -> None:
    """Running steps say they wait for an absent agent (`away`), unless they say something
    of their own; the note goes once the agent is back."""
    for step in steps:
        if step.state is not StepState.RUNNING:
            continue
        waiting = step.detail.startswith(WAITING)
        if away is not None and (waiting or not step.detail):
            step.detail = away.waiting_note()
        elif away is None and waiting:
            step.detail = ""


NodePhase = Literal["planned", "creating", "created", "ready", "deleting", "deleted", "failed"]


class Node(BaseModel):
    """A node of the cluster and its VM."""

    name: str
    pool: str
    index: int
    control_plane: bool
    domain_index: int
    compute_cluster: str
    ip_pool: str | None = None
    instance_uuid: str
    phase: NodePhase = "planned"
    vm: str | None = Field(default=None, description="'VirtualMachine:vm-…' once it exists.")
    host: str = ""
    address: str | None = None
    power_state: str = ""
    #: vCenter tasks the node's create activity was last waiting on (for abort)
    tasks: list[str] = Field(default_factory=list)
    #: SHA-256 of the cloud-init data its VM was created with (content-free, for audits)
    bootstrap_digest: str | None = None
    #: what the node is built from (node_build: profile, template, size, labels, taints);
    #: None for nodes made before builds were recorded (their spec's build, at the next change)
    build: str | None = None
    #: the Kubernetes version the node runs ('' when not recorded)
    kubernetes: str = ""


class ClusterAccount(BaseModel):
    """The cloud account a cluster runs on. Its credentials are not carried in the cluster's
    input: the cluster asks its gateway for the current ones when work is scheduled."""

    name: str
    gateway: str
    credentials: VCenterCredentials | None = Field(
        default=None, description="Current credentials (fetched from the gateway)."
    )
    template: str = Field(description="VM template path below the datacenter's VM folder.")
    agent_signing_key: str | None = Field(
        default=None, description="The gateway's approved agent's Ed25519 key (base64)."
    )
    agent_release: str | None = Field(
        default=None, description="The kubegate release that agent runs (None: not known)."
    )

    def agent_runs(self, release: str) -> bool:
        """Whether the agent is known to run `release` or later (what it can do)."""
        return version_at_least(self.agent_release or "", release)

    @property
    def current(self) -> VCenterCredentials:
        """The credentials, once fetched (a workflow bug if not)."""
        if self.credentials is None:
            raise ValueError(f"cloud account {self.name}: credentials not fetched yet")
        return self.credentials


class Timing(BaseModel):
    """Activity timeouts; tests shorten the heartbeat timeout to see crashes sooner."""

    heartbeat_seconds: int = Field(
        default=15,
        ge=2,
        description="A task whose agent stays silent this long goes to the next agent (every "
        "agent task heartbeats, at most every 0.8 of this): work resumes within about this "
        "long of a new agent's start.",
    )
    create_vm_minutes: int = Field(default=60, ge=1)
    readiness_minutes: int = Field(default=30, ge=1)
    agent_silence_seconds: int = Field(
        default=60,
        ge=3,
        le=3600,
        description="A gateway whose agent is silent this long is Disconnected (and its "
        "clusters' waiting steps say so).",
    )


class ClusterInput(BaseModel):
    """Input of ClusterWorkflow (also carries the state across continue-as-new)."""

    spec: ClusterSpec = Field(description="The cluster, its profile resolved inline.")
    account: ClusterAccount
    readiness: Literal["guest", "kubernetes"] = "guest"
    timing: Timing = Field(default_factory=Timing)
    #: the gateway workflow told of every status change (clusters deployed through a gateway)
    gateway_workflow: str | None = None
    #: wait for the gateway's `proceed` signal before provisioning (gateway upgrading)
    queued: bool = False
    #: carried across continue-as-new
    state: ClusterState | None = None
    secrets: SealedSecret | None = None


class ChangeResult(BaseModel):
    """A day-2 change: accepted (status Updating: follow `operation` in the step history
    and `ClusterState.changes`), or what it did once it ended."""

    status: str
    added: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    #: the operation carrying the change (0: answered by a release before operations)
    operation: int = 0
    #: the error of a change that failed
    error: str | None = None


#: ended changes a cluster's state keeps
CHANGES_KEPT = 10


class Rollout(BaseModel):
    """A rolling replacement of a cluster's nodes (an upgrade): where it stands."""

    operation: int = Field(description="The operation carrying it.")
    target: str = Field(description="What the nodes move to, in words.")
    state: Literal["running", "paused", "aborted", "failed", "done"] = "running"
    total: int = Field(default=0, description="Nodes to replace when it began.")
    replaced: list[str] = Field(default_factory=list, description="'old -> new', in order.")
    current: list[str] = Field(default_factory=list, description="Nodes being replaced now.")
    outdated: list[str] = Field(
        default_factory=list, description="Nodes still on their old build (when it stopped)."
    )
    members: list[str] = Field(
        default_factory=list,
        description="Control-plane members added ('+name') or removed ('-name'), in order.",
    )

    @property
    def done(self) -> int:
        """Node changes done: replacements and control-plane members added or removed."""
        return len(self.replaced) + len(self.members)


class NodeSetState(BaseModel):
    """A set of nodes as the node machinery keeps it: its VMs, addresses, folder and the steps
    that made them (a cluster's, or a gateway's own nodes)."""

    gateway: str = Field(description="The gateway whose agent and IP pools the nodes use.")
    vip: str | None = None
    folder: str | None = Field(default=None, description="Inventory path of the folder.")
    folder_ref: str | None = None
    #: per IP pool: prefix, gateway and name servers of its network (static addressing)
    networks: dict[str, NodeNetwork] = Field(default_factory=dict)
    steps: list[Step] = Field(default_factory=list)
    #: operations whose steps were dropped from `steps` (the oldest; see trim_steps)
    trimmed_operations: int = 0
    nodes: list[Node] = Field(default_factory=list)
    vcenter_requests: int = 0
    provisioned: bool = Field(default=False, description="It has been Running at least once.")
    #: node slot (name at revision 0) -> revision; a replaced node is named '<slot>-r<rev>'
    revisions: dict[str, int] = Field(default_factory=dict)
    #: node slot -> profile version its current node was built from (set by a rolling upgrade)
    slot_versions: dict[str, str] = Field(default_factory=dict)
    #: the control-plane VMs its anti-affinity rule keeps apart (none: no rule)
    kept_apart: list[str] = Field(default_factory=list)
    #: the compute cluster holding that rule ('ClusterComputeResource:…')
    kept_apart_in: str | None = None
    #: VMs carrying their vSphere tags and custom attributes (refs)
    marked: list[str] = Field(default_factory=list)
    #: the spec's tags those VMs carry
    marked_tags: list[str] = Field(default_factory=list)
    #: placement domains' region/zone tags attached ('compute cluster ref=region/zone')
    zones_marked: list[str] = Field(default_factory=list)
    #: the id of the owner's own vSphere tag (deleted with it)
    owner_tag: str | None = None
    #: why the last tagging did not do everything (None: it did)
    marks_problem: str | None = None

    @abstractmethod
    def node_spec(self) -> NodeSpec:
        """The spec the nodes are built from (each kind of node set keeps its own)."""


class ClusterState(NodeSetState):
    """Everything the cluster workflow knows; returned by its `state` query."""

    name: str
    status: ClusterStatus = ClusterStatus.QUEUED
    reason: str = ""
    error: str | None = None
    spec: ClusterSpec
    account: str
    readiness: str = "guest"
    #: operations run so far (numbers the steps' operations)
    operations_run: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: the latest day-2 changes (scale, add-pool, remove-pool) that ended, oldest first, at
    #: most CHANGES_KEPT: what each did
    changes: list[ChangeResult] = Field(default_factory=list)
    #: kubeconfigs issued (who, when, until when, which certificate), the newest last
    kubeconfigs: list[KubeconfigIssue] = Field(default_factory=list)
    #: the latest rolling replacement of nodes (upgrade), running or ended
    rollout: Rollout | None = None
    #: the gateway's agent is away (its gateway said so): running steps say they wait
    agent_away: AgentPresence | None = None
    #: what the last reconcile saw and did (drift, unhealthy nodes, repairs given up)
    health: ClusterHealth = Field(default_factory=ClusterHealth)

    def node_spec(self) -> NodeSpec:
        return self.spec

    def current_step(self) -> Step | None:
        running = [s for s in self.steps if s.state is StepState.RUNNING]
        return running[-1] if running else (self.steps[-1] if self.steps else None)


class ClusterSummary(BaseModel):
    """One line of `cluster list`."""

    name: str
    status: str
    gateway: str
    nodes: int
    step: str = ""
    version: str = Field(default="", description="The Kubernetes version of its spec.")
    created_at: datetime | None = None
    account: str = ""
    vip: str | None = None
    control_plane: int = Field(default=0, description="Control-plane nodes of its spec.")
    workers: int = Field(default=0, description="Worker nodes of its spec (every pool).")
    reason: str = Field(default="", description="Why it is in its status, when it says.")


class ScaleRequest(BaseModel):
    pool: str = Field(description="Worker pool name, or 'cp' for the control plane.")
    size: int = Field(ge=0, le=MAX_POOL_NODES)


class AddPoolRequest(BaseModel):
    pool: WorkerPool


class RemovePoolRequest(BaseModel):
    pool: str


class ApplyRequest(BaseModel):
    """Make the cluster match an edited spec (its profile resolved), as one operation."""

    spec: ClusterSpec
    based_on: int | None = Field(
        default=None,
        description="The cluster's operations_run when the plan was made: refused if it has "
        "changed since (the plan carried out is the plan shown).",
    )


class ClusterUpgradeRequest(BaseModel):
    """Move every node to another Kubernetes version and/or VM template by rolling
    replacement (at least one of them)."""

    kubernetes: str | None = Field(
        default=None, min_length=1, max_length=64, description="The Kubernetes pack's version."
    )
    template: str | None = Field(
        default=None, min_length=1, max_length=512, description="The nodes' VM template."
    )


class DeleteRequest(BaseModel):
    reason: str = "deleted"


ClusterInput.model_rebuild()
