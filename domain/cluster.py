"""Cluster specs: profile, placement, node pools; and the node plan derived from them.

Pure and deterministic: the cluster workflow imports it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Annotated, Any, ClassVar, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    field_validator,
    model_validator,
)

from domain.names import DnsLabel, HostName, is_dns_label
from domain.version import version_key

#: Profile layers, in the order they must appear.
LAYER_ORDER = ("os", "kubernetes", "network", "storage", "addon")
REQUIRED_LAYERS = ("os", "kubernetes", "network")

_SSH_KEY = re.compile(
    r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-\S+) [A-Za-z0-9+/=]+"
)
_TAG = re.compile(r"^[A-Za-z0-9_.:/=+-]{1,128}$")
#: a region or zone: a Kubernetes label value (the cloud provider labels nodes with it)
_TOPOLOGY = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"

#: most nodes one worker pool may have
MAX_POOL_NODES = 200
#: most nodes of a cluster: control plane and every worker pool together
MAX_CLUSTER_NODES = 500
#: most worker pools of a cluster
MAX_WORKER_POOLS = 20
#: most placement domains of one pool
MAX_DOMAINS = 16
#: largest cluster spec, as JSON: it travels in workflow inputs and updates, whose payloads
#: Temporal warns about at 512 KiB and refuses at 2 MiB
MAX_SPEC_BYTES = 128 * 1024


class Pack(BaseModel):
    """One layer's content: a named, versioned pack and its values."""

    model_config = ConfigDict(extra="forbid")

    name: DnsLabel = Field(description="Pack name, e.g. 'ubuntu', 'kubernetes', 'cni-calico'.")
    version: str = Field(min_length=1, max_length=64, description="Pack version, e.g. '1.30.4'.")
    values: dict[str, Any] = Field(default_factory=dict, description="The pack's settings.")


class ProfileLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: Literal["os", "kubernetes", "network", "storage", "addon"]
    pack: Pack


class ClusterProfile(BaseModel):
    """Ordered layers: os, kubernetes, network, then optional storage, then add-ons."""

    model_config = ConfigDict(extra="forbid")

    name: DnsLabel = Field(description="Profile name.")
    version: str = Field(default="1.0.0", description="Profile version.")
    layers: list[ProfileLayer] = Field(min_length=3, description="Layers, in order.")

    @model_validator(mode="after")
    def _ordered(self) -> ClusterProfile:
        kinds: list[str] = [layer.layer for layer in self.layers]
        for required in REQUIRED_LAYERS:
            if kinds.count(required) != 1:
                raise ValueError(f"layers: needs exactly one '{required}' layer")
        if kinds.count("storage") > 1:
            raise ValueError("layers: at most one 'storage' layer")
        ranks = [LAYER_ORDER.index(kind) for kind in kinds]
        if ranks != sorted(ranks):
            raise ValueError("layers: order must be os, kubernetes, network, storage, add-ons")
        names = [layer.pack.name for layer in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"layers: pack names must be unique ({', '.join(duplicates)})")
        return self

    def pack(self, layer: str) -> Pack | None:
        return next((entry.pack for entry in self.layers if entry.layer == layer), None)

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> ClusterProfile:
        """A copy whose pack values are deep-merged with the overrides (keyed by pack name)."""
        unknown = sorted(set(overrides) - {entry.pack.name for entry in self.layers})
        if unknown:
            raise ValueError(f"overrides: no pack named {', '.join(unknown)} in the profile")
        merged = self.model_copy(deep=True)
        for entry in merged.layers:
            if entry.pack.name in overrides:
                entry.pack.values = deep_merge(entry.pack.values, overrides[entry.pack.name])
        return merged


class ProfileFile(BaseModel):
    """A profile kept in its own YAML file, resolved by the CLI before anything starts."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(min_length=1, description="Path of the profile YAML, relative to the spec.")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in the override replaces the base value."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class PlacementDomain(BaseModel):
    """Where a share of a pool's nodes run: one compute cluster and its storage and network."""

    model_config = ConfigDict(extra="forbid")

    compute_cluster: str = Field(min_length=1, description="Compute cluster in the datacenter.")
    datastore: str = Field(min_length=1, description="Datastore for the nodes' disks.")
    network: str = Field(min_length=1, description="Network or port group of the nodes.")
    resource_pool: str = Field(default="Resources", description="Resource pool in the cluster.")
    ip_pool: DnsLabel | None = Field(
        default=None, description="IP pool of the gateway (static addressing only)."
    )
    region: str | None = Field(
        default=None,
        pattern=_TOPOLOGY,
        description="Kubernetes region: a tag of category k8s-region on the compute cluster "
        "(for the vSphere cloud provider and CSI topology).",
    )
    zone: str | None = Field(
        default=None,
        pattern=_TOPOLOGY,
        description="Kubernetes zone: a tag of category k8s-zone on the compute cluster.",
    )

    @property
    def names(self) -> DomainNames:
        """The vCenter objects it names (two domains naming the same ones are one)."""
        return (self.compute_cluster, self.resource_pool, self.datastore, self.network)


#: (compute cluster, resource pool, datastore, network) names of a placement domain
DomainNames = tuple[str, str, str, str]


class ClusterPlacement(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datacenter: str = Field(min_length=1, description="Datacenter of the nodes.")
    folder: str = Field(default="", description="VM folder; the cluster gets a folder inside it.")
    ssh_keys: list[str] = Field(default_factory=list, description="Public keys for the nodes.")
    ntp_servers: list[HostName] = Field(
        default_factory=list, max_length=16, description="NTP servers (host names or addresses)."
    )
    ip_allocation: Literal["static", "dhcp"] = Field(description="Node addressing.")

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            if not _SSH_KEY.match(key.strip()):
                raise ValueError(f"entry {i} is not an OpenSSH public key ('ssh-ed25519 AAAA…')")
        return [k.strip() for k in keys]


Cpu = Annotated[int, Field(ge=1, le=768, description="vCPUs per node.")]
MemoryGb = Annotated[int, Field(ge=2, le=24_576, description="Memory per node in GB.")]
DiskGb = Annotated[int, Field(ge=20, le=62_000, description="Disk per node in GB (grows only).")]


_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
#: label prefixes of the kubernetes.io and k8s.io namespaces a kubelet may set on its node
_KUBELET_PREFIXES = ("kubelet.kubernetes.io", "node.kubernetes.io")


def label_key_problem(key: str) -> str | None:
    """Why `key` cannot be a node label the kubelet sets at registration, or None."""
    prefix, _, name = key.rpartition("/")
    if not _LABEL_NAME.match(name):
        return "a name of at most 63 letters, digits and . _ - (alphanumeric at both ends)"
    if prefix and (len(prefix) > 253 or not _LABEL_PREFIX.match(prefix)):
        return "its prefix must be a DNS subdomain"
    restricted = _in_namespace(prefix, ("kubernetes.io", "k8s.io"))
    if restricted and not _in_namespace(prefix, _KUBELET_PREFIXES):
        return (
            "the kubelet may not set labels of the kubernetes.io and k8s.io namespaces "
            "(except node.kubernetes.io and kubelet.kubernetes.io)"
        )
    return None


def _in_namespace(prefix: str, namespaces: tuple[str, ...]) -> bool:
    """Whether `prefix` is one of `namespaces` or a subdomain of one."""
    return any(prefix == ns or prefix.endswith("." + ns) for ns in namespaces)


def _taints(taints: list[Taint], control_plane: bool = False) -> list[Taint]:
    """Taints unique by key and effect (the API server refuses a node with repeats)."""
    seen: set[tuple[str, str]] = set()
    for taint in taints:
        if (taint.key, taint.effect) in seen:
            raise ValueError(f"{taint.key}:{taint.effect} is listed twice")
        seen.add((taint.key, taint.effect))
        if control_plane and taint.key == CONTROL_PLANE_TAINT:
            raise ValueError(
                f"{CONTROL_PLANE_TAINT} is kubeadm's own (allow_worker_capability removes it)"
            )
    return taints


#: the taint kubeadm gives control-plane nodes
CONTROL_PLANE_TAINT = "node-role.kubernetes.io/control-plane"


class Taint(BaseModel):
    """A taint the node registers with (kubeadm's nodeRegistration.taints)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=316)
    value: str = Field(default="", max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]

    @model_validator(mode="after")
    def _valid(self) -> Taint:
        problem = label_key_problem(self.key)
        if problem and "namespaces" not in problem:  # taints may use any prefix
            raise ValueError(f"key {self.key!r}: {problem}")
        if not _LABEL_VALUE.match(self.value):
            raise ValueError(f"value {self.value!r}: letters, digits and . _ - (at most 63)")
        return self


def _labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        problem = label_key_problem(key)
        if problem:
            raise ValueError(f"{key!r}: {problem}")
        if not _LABEL_VALUE.match(value):
            raise ValueError(f"{key!r}: value {value!r}: letters, digits and . _ - (at most 63)")
    return labels


class NodeOptions(BaseModel):
    """What every node of a pool registers with: labels and taints. (Fields of the pools
    that derive from it; a control-plane pool keeps kubeadm's own taint beside these unless
    allow_worker_capability.)"""

    labels: dict[str, str] = Field(
        default_factory=dict, max_length=32, description="Node labels (kubelet --node-labels)."
    )
    taints: list[Taint] = Field(default_factory=list, max_length=16, description="Node taints.")

    #: whether the pool is the control plane (it may not list kubeadm's control-plane taint)
    _control_plane: ClassVar[bool] = False

    @field_validator("labels")
    @classmethod
    def _labels_ok(cls, labels: dict[str, str]) -> dict[str, str]:
        return _labels(labels)

    @field_validator("taints")
    @classmethod
    def _taints_ok(cls, taints: list[Taint]) -> list[Taint]:
        return _taints(taints, control_plane=cls._control_plane)


class RolloutPolicy(BaseModel):
    """How a worker pool's nodes are replaced when what they are built from changes (a
    Kubernetes upgrade, another template, other resources, labels or taints)."""

    model_config = ConfigDict(extra="forbid")

    max_surge: int = Field(
        default=1,
        ge=0,
        le=MAX_POOL_NODES,
        description="Nodes the pool may have beyond its size while its nodes are replaced.",
    )
    max_unavailable: int = Field(
        default=0,
        ge=0,
        le=MAX_POOL_NODES,
        description="Nodes of the pool that may be missing while its nodes are replaced.",
    )

    @model_validator(mode="after")
    def _moves(self) -> RolloutPolicy:
        if self.max_surge + self.max_unavailable == 0:
            raise ValueError(
                "rollout: max_surge and max_unavailable cannot both be 0 (no node could be "
                "replaced)"
            )
        return self

    @property
    def batch(self) -> int:
        """Nodes replaced at once."""
        return self.max_surge + self.max_unavailable


class NodeHealth(BaseModel):
    """When a pool's node counts as unhealthy, and how many of them are replaced at once."""

    model_config = ConfigDict(extra="forbid")

    unhealthy_after_seconds: int = Field(
        default=300,
        ge=5,
        le=86400,
        description="A node whose guest stops reporting (VMware Tools not running, no guest "
        "address) this long is replaced by a new VM of the same name and address.",
    )
    max_unhealthy: int = Field(
        default=1,
        ge=0,
        le=MAX_POOL_NODES,
        description="Nodes of the pool replaced at once (0: unhealthy nodes are only "
        "reported). The control plane: one member at a time, and only while the others keep "
        "etcd's quorum.",
    )


class Healing(BaseModel):
    """How a running cluster keeps matching its record: reconciles and their repairs."""

    model_config = ConfigDict(extra="forbid")

    reconcile_seconds: int = Field(
        default=300,
        ge=0,
        le=86400,
        description="How often the cluster's VMs are compared with its record (0: only on "
        "demand, `kubegate cluster reconcile`).",
    )
    powered_off: Literal["power-on", "report"] = Field(
        default="power-on",
        description="A node's VM powered off outside kubegate: powered on again, or reported.",
    )
    repair_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="Failed repairs of a node (backing off between them) before it is given "
        "up and the cluster is Degraded.",
    )

    @field_validator("reconcile_seconds")
    @classmethod
    def _often(cls, value: int) -> int:
        if 0 < value < 2:
            raise ValueError("reconcile_seconds: 0 (on demand only) or at least 2")
        return value


#: the control plane is replaced one member at a time, the new one first (etcd quorum)
CONTROL_PLANE_ROLLOUT = RolloutPolicy(max_surge=1, max_unavailable=0)


class ControlPlanePool(NodeOptions):
    model_config = ConfigDict(extra="forbid")
    _control_plane: ClassVar[bool] = True

    size: Literal[1, 3, 5] = Field(description="Control-plane nodes: 1, 3 or 5 (etcd quorum).")
    allow_worker_capability: bool = Field(
        default=False, description="Let workloads run on control-plane nodes."
    )
    cpu: Cpu = 2
    memory_gb: MemoryGb = 4
    disk_gb: DiskGb = 40
    placement: list[PlacementDomain] = Field(description="Exactly one placement domain.")
    vip: IPvAnyAddress | None = Field(
        default=None,
        description="Control-plane endpoint with DHCP (kube-vip holds it); with static "
        "addressing it comes from the IP pool.",
    )
    health: NodeHealth = Field(
        default_factory=NodeHealth, description="When a member counts as unhealthy."
    )

    @field_validator("placement")
    @classmethod
    def _one_domain(cls, domains: list[PlacementDomain]) -> list[PlacementDomain]:
        if len(domains) != 1:
            raise ValueError("the control-plane pool takes exactly one placement domain")
        return domains


class WorkerPool(NodeOptions):
    model_config = ConfigDict(extra="forbid")

    name: DnsLabel = Field(description="Pool name, e.g. 'general' or 'large'.")
    size: int = Field(ge=0, le=MAX_POOL_NODES, description="Number of nodes.")
    cpu: Cpu = 4
    memory_gb: MemoryGb = 8
    disk_gb: DiskGb = 60
    placement: list[PlacementDomain] = Field(
        min_length=1,
        max_length=MAX_DOMAINS,
        description="Placement domains; nodes go round-robin over them, in order.",
    )
    rollout: RolloutPolicy = Field(
        default_factory=RolloutPolicy,
        description="How the pool's nodes are replaced in a rolling upgrade.",
    )
    health: NodeHealth = Field(
        default_factory=NodeHealth,
        description="When a node counts as unhealthy, and how many are replaced at once.",
    )


class ClusterSpec(BaseModel):
    """A cluster as the user writes it (cluster.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: DnsLabel = Field(description="Cluster name, a DNS label.")
    description: str = Field(default="", max_length=1024)
    tags: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Tags; every VM of the cluster carries them as vSphere tags (category "
        "kubegate-tags).",
    )
    profile: ClusterProfile | ProfileFile = Field(description="Inline profile, or {file: PATH}.")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Pack values to change, keyed by pack name."
    )
    cloud_account: DnsLabel = Field(description="Cloud account whose gateway runs the cluster.")
    placement: ClusterPlacement
    control_plane: ControlPlanePool
    workers: list[WorkerPool] = Field(default_factory=list, max_length=MAX_WORKER_POOLS)
    healing: Healing = Field(
        default_factory=Healing,
        description="Reconciles: how often, and what they repair (docs/clusters.md).",
    )

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not _TAG.match(tag):
                raise ValueError(f"tag {tag!r}: 1-128 letters, digits or _.:/=+-")
        return tags

    @model_validator(mode="after")
    def _rules(self) -> ClusterSpec:
        names = [pool.name for pool in self.workers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"workers: pool names must be unique ({', '.join(duplicates)})")
        if "cp" in names:
            raise ValueError("workers: 'cp' is the control plane's name; choose another")
        total = self.control_plane.size + sum(pool.size for pool in self.workers)
        if total > MAX_CLUSTER_NODES:
            raise ValueError(
                f"workers: {total} nodes in all; a cluster has at most {MAX_CLUSTER_NODES} "
                "(control plane and worker pools together)"
            )
        size = len(self.model_dump_json())
        if size > MAX_SPEC_BYTES:
            raise ValueError(
                f"the spec is {size} bytes as JSON; at most {MAX_SPEC_BYTES} (shrink the "
                "profile's or overrides' values)"
            )
        for pool in self.workers:
            longest = node_name(self.name, pool.name, max(pool.size - 1, 0))
            if not is_dns_label(longest):
                raise ValueError(
                    f"workers.{pool.name}: node name {longest!r} is not a DNS label "
                    "(shorten the cluster or pool name)"
                )
        static = self.placement.ip_allocation == "static"
        for where, domain in self.domains():
            if static and domain.ip_pool is None:
                raise ValueError(f"{where}.ip_pool: required with static IP allocation")
            if not static and domain.ip_pool is not None:
                raise ValueError(f"{where}.ip_pool: not allowed with DHCP (remove it)")
        topology: dict[str, tuple[str | None, str | None]] = {}
        for where, domain in self.domains():
            seen = topology.setdefault(domain.compute_cluster, (domain.region, domain.zone))
            if seen != (domain.region, domain.zone):
                raise ValueError(
                    f"{where}: compute cluster {domain.compute_cluster} has region/zone "
                    f"{seen[0]}/{seen[1]} in another placement domain; one each per compute "
                    "cluster (its tags take one per category)"
                )
        if static and self.control_plane.vip is not None:
            raise ValueError("control_plane.vip: with static addressing it comes from the IP pool")
        if not static and self.control_plane.size > 1 and self.control_plane.vip is None:
            raise ValueError(
                "control_plane.vip: required with DHCP and more than one control-plane node "
                "(the nodes join through it; kube-vip holds it)"
            )
        if isinstance(self.profile, ClusterProfile):
            self.profile.with_overrides(self.overrides)  # refuses unknown packs
        return self

    def domains(self) -> list[tuple[str, PlacementDomain]]:
        """Every placement domain with its field path."""
        out = [
            (f"control_plane.placement.{i}", d) for i, d in enumerate(self.control_plane.placement)
        ]
        for pool in self.workers:
            out += [(f"workers.{pool.name}.placement.{i}", d) for i, d in enumerate(pool.placement)]
        return out

    def effective_profile(self) -> ClusterProfile:
        """The profile with the cluster's overrides merged in (needs an inline profile)."""
        if not isinstance(self.profile, ClusterProfile):
            raise ValueError("profile: a file reference must be resolved before use")
        return self.profile.with_overrides(self.overrides)

    def check(self) -> None:
        """Validate the spec again as a whole (ValueError naming the field otherwise)."""
        ClusterSpec.model_validate(self.model_dump(mode="json"))
        self.effective_profile()

    def layout(self) -> NodeLayout:
        """The cluster's nodes as a node set builds them (plan_nodes)."""
        vip = self.control_plane.vip
        return NodeLayout(
            name=self.name,
            placement=self.placement,
            plans=plan_nodes(self),
            domains=[domain for _, domain in self.domains()],
            vip=str(vip) if vip is not None else None,
            profile=self.effective_profile(),
            allow_worker_capability=self.control_plane.allow_worker_capability,
        )

    def kubernetes_version(self) -> str:
        """The Kubernetes pack's version ('' when the profile is not resolved)."""
        if not isinstance(self.profile, ClusterProfile):
            return ""
        pack = self.profile.pack("kubernetes")
        return pack.version if pack else ""

    def rollout_of(self, pool: str) -> RolloutPolicy:
        """How a pool's nodes are replaced ('cp': one member at a time, the new one first)."""
        if pool == "cp":
            return CONTROL_PLANE_ROLLOUT
        return next((p.rollout for p in self.workers if p.name == pool), RolloutPolicy())

    def template(self) -> str | None:
        """The VM template the os pack names (None: the cloud account's)."""
        if not isinstance(self.profile, ClusterProfile):
            return None
        return template_of(self.effective_profile())

    def with_kubernetes(self, version: str) -> ClusterSpec:
        """The spec with its profile's Kubernetes pack at `version` (profile resolved)."""
        if not isinstance(self.profile, ClusterProfile):
            raise ValueError("profile: a file reference must be resolved before use")
        profile = self.profile.model_copy(deep=True)
        for layer in profile.layers:
            if layer.layer == "kubernetes":
                layer.pack.version = version
        return self.model_copy(update={"profile": profile})

    def upgraded(self, kubernetes: str | None = None, template: str | None = None) -> ClusterSpec:
        """The spec with another Kubernetes version and/or os template, validated again
        (ValueError or ValidationError naming the field)."""
        if kubernetes is None and template is None:
            raise ValueError("kubernetes, template: name a version, a template or both")
        spec = self.with_kubernetes(kubernetes) if kubernetes is not None else self
        spec = spec.with_template(template) if template is not None else spec
        return ClusterSpec.model_validate(spec.model_dump(mode="json"))

    def with_template(self, template: str) -> ClusterSpec:
        """The spec with its os pack's `values.template` at `template` (an override of it
        dropped)."""
        if not isinstance(self.profile, ClusterProfile):
            raise ValueError("profile: a file reference must be resolved before use")
        profile = self.profile.model_copy(deep=True)
        overrides = copy.deepcopy(self.overrides)
        for layer in profile.layers:
            if layer.layer == "os":
                layer.pack.values["template"] = template
                overrides.get(layer.pack.name, {}).pop("template", None)
        return self.model_copy(update={"profile": profile, "overrides": overrides})


def template_of(profile: ClusterProfile) -> str | None:
    """The VM template an (effective) profile's os pack names, if any."""
    pack = profile.pack("os")
    value = pack.values.get("template") if pack else None
    return value.strip("/") if isinstance(value, str) and value.strip("/") else None


def kubernetes_step_problem(current: str, wanted: str) -> str | None:
    """Why nodes on Kubernetes `current` cannot move to `wanted`: kubeadm moves one minor
    version at a time and never back. None when the step is allowed (or nothing moves)."""
    if current == wanted or not current:
        return None
    old, new = version_key(current), version_key(wanted)
    if new is None:
        return f"Kubernetes version {wanted!r}: expected MAJOR.MINOR.PATCH, e.g. 1.30.4"
    if old is None:
        return None  # (a version kubegate cannot read: the user's own pack; let it be)
    if new < old:
        return f"Kubernetes {current} -> {wanted}: kubeadm does not downgrade"
    if new[0] != old[0] or new[1] > old[1] + 1:
        return (
            f"Kubernetes {current} -> {wanted} skips a minor version: upgrade one minor at a "
            f"time, as kubeadm does ({old[0]}.{old[1] + 1} first)"
        )
    return None


def node_build(plan: NodePlan, layout: NodeLayout) -> str:
    """A digest of everything the spec says a node is built from: the profile (Kubernetes
    version, packs, values, the os pack's VM template), its size, labels and taints, keys
    and NTP servers. A node whose recorded build differs from its
    plan's is replaced by a rolling upgrade."""
    document = {
        "profile": layout.profile.model_dump(mode="json"),
        "cpu": plan.cpu,
        "memory_gb": plan.memory_gb,
        "disk_gb": plan.disk_gb,
        "labels": plan.labels,
        "taints": [t.model_dump(mode="json") for t in plan.taints],
        "worker_capability": layout.allow_worker_capability if plan.control_plane else None,
        "ssh_keys": layout.placement.ssh_keys,
        "ntp_servers": layout.placement.ntp_servers,
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def node_name(cluster: str, pool: str, index: int) -> str:
    return f"{cluster}-{pool}-{index}"


class NodePlan(BaseModel):
    """One node as planned: its name, pool, size and placement domain."""

    name: str
    pool: str
    index: int
    control_plane: bool
    cpu: int
    memory_gb: int
    disk_gb: int
    domain_index: int
    domain: PlacementDomain
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)


def plan_nodes(spec: ClusterSpec) -> list[NodePlan]:
    """Every node of the cluster; a pool's nodes go round-robin over its domains, in order."""
    pools: list[tuple[str, bool, ControlPlanePool | WorkerPool, int]] = [
        ("cp", True, spec.control_plane, spec.control_plane.size)
    ]
    pools += [(pool.name, False, pool, pool.size) for pool in spec.workers]
    plan = []
    for pool_name, control_plane, pool, size in pools:
        for index in range(size):
            domain_index = index % len(pool.placement)
            plan.append(
                NodePlan(
                    name=node_name(spec.name, pool_name, index),
                    pool=pool_name,
                    index=index,
                    control_plane=control_plane,
                    cpu=pool.cpu,
                    memory_gb=pool.memory_gb,
                    disk_gb=pool.disk_gb,
                    domain_index=domain_index,
                    domain=pool.placement[domain_index],
                    labels=dict(pool.labels),
                    taints=list(pool.taints),
                )
            )
    return plan


class NodeLayout(BaseModel):
    """What a node set is built from, whatever its spec (a cluster's, a gateway's nodes'):
    every planned node, where the nodes go and what they boot."""

    name: str = Field(description="The folder's name; node names start with it.")
    placement: ClusterPlacement = Field(
        description="Datacenter, the folder the set's own folder goes in, keys, NTP servers."
    )
    plans: list[NodePlan] = Field(description="Every node, by slot name (revision 0).")
    domains: list[PlacementDomain] = Field(
        description="Every placement domain, control plane's first (repeats kept)."
    )
    vip: str | None = Field(default=None, description="The fixed VIP (DHCP), if any.")
    profile: ClusterProfile = Field(description="What the nodes boot (overrides merged).")
    allow_worker_capability: bool = False

    @property
    def kubernetes(self) -> str:
        """The Kubernetes pack's version ('' when there is none)."""
        pack = self.profile.pack("kubernetes")
        return pack.version if pack else ""

    @property
    def vip_pool(self) -> str | None:
        """The pool the VIP comes from (static addressing): the control plane's."""
        return self.domains[0].ip_pool


class NodeSpec(Protocol):
    """A spec a node set can build: ClusterSpec, GatewayNodeSpec."""

    def check(self) -> None:
        """Validate the spec again; ValueError (or ValidationError) naming what is wrong."""
        ...

    def layout(self) -> NodeLayout:
        """The nodes to build; ValueError when the spec cannot be planned."""
        ...


def distinct_domains(layout: NodeLayout) -> list[DomainNames]:
    """A layout's placement domains, each once (by the objects they name), in order."""
    seen: list[DomainNames] = []
    for domain in layout.domains:
        if domain.names not in seen:
            seen.append(domain.names)
    return seen
