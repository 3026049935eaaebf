"""A node leaving a cluster: what the agent is asked, what it answers, and the pure decisions
it takes on the answers of the cluster's Kubernetes API and etcd.

The agent (activities/kube.py) does the talking, with credentials it mints from the
cluster's CAs for one call; nothing here touches the network or a key.
"""

from __future__ import annotations

import ipaddress
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator

from domain.account import SealedSecret
from domain.requests import AgentRequest

#: a Kubernetes node name (a DNS subdomain), as kubegate names its nodes: it goes into URLs
NODE_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
#: etcd's client port (kubeadm's default)
ETCD_PORT = 2379
#: the annotation the kubelet puts on the API's copy of a static pod
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


class NodeLeaveRequest(AgentRequest):
    """Take one node out of its cluster: cordon, evict its pods, delete its Node and, for a
    control-plane node, remove its etcd member. Its VM is removed by other activities."""

    cluster: str = Field(description="Cluster name (for messages).")
    server: str = Field(
        pattern=r"^https://[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$",
        description="The API server's URL, e.g. https://10.0.0.5:6443 or https://[fd00::5]:6443.",
    )
    secrets: SealedSecret = Field(description="The cluster's secrets, sealed to the agent.")
    node: str = Field(
        pattern=NODE_NAME, description="Kubernetes node name (= kubegate node name = hostname)."
    )
    control_plane: bool = Field(description="Also remove the node's etcd member.")
    address: str | None = Field(
        default=None, description="The leaving node's address (finds its etcd member by peer URL)."
    )
    etcd_endpoints: list[str] = Field(
        default_factory=list,
        description="Addresses of the OTHER control-plane members: etcd is asked through them.",
    )
    etcd_port: int = Field(default=ETCD_PORT, ge=1, le=65535)
    kubernetes_version: str = Field(description="Picks kubeadm's admin group (admin_groups).")
    drain: bool = Field(
        default=True,
        description="Cordon the Node and evict its pods (and remove a control-plane node's "
        "etcd member): done before its VM goes.",
    )
    delete_node: bool = Field(
        default=True,
        description="Delete the Node object: done once its VM is gone, so no running kubelet "
        "registers it again (as Cluster API orders it).",
    )
    drain_timeout_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="How long evictions are retried and evicted pods waited for; then the "
        "Node is deleted anyway (0: one eviction per pod, no wait).",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value

    @field_validator("etcd_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for endpoint in value:
            ipaddress.ip_address(endpoint)
        return value


class NodeLeaveResult(BaseModel):
    """What the node's leave did; the fields say the end state, `detail` how it got there."""

    cordoned: bool = Field(description="The Node was marked unschedulable (False: it was gone).")
    evicted: int = Field(description="Pods evicted by this call.")
    node_deleted: bool = Field(description="The Node is gone (deleted now or before).")
    etcd_member_removed: bool = Field(
        description="The node's etcd member is gone (removed now or before); False for a worker."
    )
    detail: str = Field(description="One line for people.")


class NodesStatusRequest(AgentRequest):
    """Which of these nodes the cluster's API does not show Ready (a reconcile's look)."""

    cluster: str = Field(description="Cluster name (for messages).")
    server: str = Field(
        pattern=r"^https://[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$",
        description="The API server's URL, e.g. https://10.0.0.5:6443.",
    )
    secrets: SealedSecret = Field(description="The cluster's secrets, sealed to the agent.")
    nodes: list[str] = Field(default_factory=list, max_length=1000)
    kubernetes_version: str = Field(description="Picks kubeadm's admin group (admin_groups).")


class NodesStatus(BaseModel):
    """What the API said: per node not Ready, why; or that it could not be asked."""

    answered: bool = Field(description="The API listed the nodes (False: see detail).")
    not_ready: dict[str, str] = Field(default_factory=dict)
    detail: str = ""


# -- nodes ------------------------------------------------------------------------------------


def node_condition(node: dict[str, Any], kind: str = "Ready") -> dict[str, Any] | None:
    """A condition of a Node object (JSON), or None when it reports none of that type."""
    for condition in (node.get("status") or {}).get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == kind:
            return condition
    return None


def node_ready(node: dict[str, Any]) -> bool:
    """The Node's Ready condition is True."""
    condition = node_condition(node)
    return condition is not None and condition.get("status") == "True"


def not_ready_nodes(node_list: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Of `names`, those a NodeList (JSON) does not show Ready, with why (for people)."""
    found = {
        str((item.get("metadata") or {}).get("name")): item
        for item in node_list.get("items") or []
        if isinstance(item, dict)
    }
    waiting: dict[str, str] = {}
    for name in names:
        node = found.get(name)
        if node is None:
            waiting[name] = "not registered"
        elif not node_ready(node):
            condition = node_condition(node)
            if condition is None:
                waiting[name] = "no Ready condition yet"
            else:
                reason = condition.get("reason") or ""
                waiting[name] = f"Ready={condition.get('status')}" + (
                    f" ({reason})" if reason else ""
                )
    return waiting


# -- pods -------------------------------------------------------------------------------------


class Pod(NamedTuple):
    """A pod that must leave a node."""

    namespace: str
    name: str
    uid: str
    terminating: bool

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def pods_to_evict(pod_list: dict[str, Any]) -> list[Pod]:
    """The pods of a PodList (JSON) that a drain evicts, as `kubectl drain` would with
    --ignore-daemonsets --delete-emptydir-data --force (the node is going away): all but
    mirror pods (the kubelet's static pods), DaemonSet pods (they tolerate the cordon and
    go with the node) and pods that have already terminated (Succeeded or Failed)."""
    pods = []
    for item in pod_list.get("items") or []:
        if not isinstance(item, dict):
            continue
        meta = item.get("metadata") or {}
        if MIRROR_ANNOTATION in (meta.get("annotations") or {}):
            continue
        if any(
            isinstance(owner, dict) and owner.get("kind") == "DaemonSet"
            for owner in meta.get("ownerReferences") or []
        ):
            continue
        if (item.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        pods.append(
            Pod(
                namespace=str(meta.get("namespace") or "default"),
                name=str(meta.get("name") or ""),
                uid=str(meta.get("uid") or ""),
                terminating=bool(meta.get("deletionTimestamp")),
            )
        )
    return pods


def eviction(pod: Pod) -> dict[str, Any]:
    """The body of a policy/v1 Eviction of the pod."""
    return {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod.name, "namespace": pod.namespace},
    }


def namespace_terminating(status: dict[str, Any]) -> bool:
    """A 403 Status that refuses an eviction because the pod's namespace is being deleted
    (the namespace's deletion removes the pod: nothing to do but wait)."""
    causes = (status.get("details") or {}).get("causes") or []
    return any(isinstance(c, dict) and c.get("type") == "NamespaceTerminating" for c in causes)


# -- etcd -------------------------------------------------------------------------------------


class EtcdMember(NamedTuple):
    """One member of an etcd cluster, as its JSON gateway lists it."""

    id: int
    name: str
    peer_urls: tuple[str, ...]

    @property
    def hex_id(self) -> str:
        """The ID as etcdctl shows it."""
        return f"{self.id:x}"


def etcd_members(answer: dict[str, Any]) -> list[EtcdMember]:
    """The members of a /v3/cluster/member/list answer (the JSON gateway gives uint64 IDs as
    strings)."""
    members = []
    for item in answer.get("members") or []:
        if not isinstance(item, dict) or item.get("ID") in (None, ""):
            continue
        members.append(
            EtcdMember(
                id=int(str(item["ID"])),
                name=str(item.get("name") or ""),
                peer_urls=tuple(str(u) for u in item.get("peerURLs") or []),
            )
        )
    return members


def leaving_member(answer: dict[str, Any], node: str, address: str | None) -> EtcdMember | None:
    """The leaving node's member: the one named after the node (kubeadm names members so),
    else the one whose peer URLs point at its address (a member added but never started has
    no name). None: it is not a member (any more)."""
    members = etcd_members(answer)
    for member in members:
        if member.name == node:
            return member
    if address is None:
        return None
    wanted = ipaddress.ip_address(address)
    for member in members:
        for url in member.peer_urls:
            try:
                host = urlsplit(url).hostname
                if host is not None and ipaddress.ip_address(host) == wanted:
                    return member
            except ValueError:
                continue
    return None


def etcd_removal(answer: dict[str, Any], node: str, address: str | None) -> EtcdMember | None:
    """What to remove for the leaving node: its member, or None when it is not a member any
    more (removed before: done). ValueError when removing it would leave etcd with no member
    (that is deleting the cluster, not a node leaving)."""
    member = leaving_member(answer, node, address)
    if member is not None and len(etcd_members(answer)) == 1:
        raise ValueError(f"etcd member {member.hex_id} of node {node} is the cluster's last one")
    return member


def leave_detail(
    *,
    node_found: bool,
    evicted: int,
    left_behind: list[str],
    blocked: list[str],
    node_deleted_now: bool,
    control_plane: bool,
    member: str | None,
    member_removed_now: bool,
    drained: bool = True,
    deleted: bool = True,
) -> str:
    """The result's one line: what was done, what was already so, what was left."""
    parts = []
    if not drained:  # the Node deleted after its VM went
        parts.append("Node deleted" if node_deleted_now else "Node already gone")
    elif not deleted:  # drained (and out of etcd) before its VM goes; the Node stays till then
        if node_found:
            parts.append("cordoned")
            parts.append(f"{evicted} pod{'' if evicted == 1 else 's'} evicted")
            if blocked:
                parts.append(f"{len(blocked)} blocked by a PodDisruptionBudget until the timeout")
            still = [p for p in left_behind if p not in blocked]
            if still:
                parts.append(f"{len(still)} still terminating at the drain timeout")
        else:
            parts.append("Node already gone")
    elif node_found:
        parts.append("cordoned")
        parts.append(f"{evicted} pod{'' if evicted == 1 else 's'} evicted")
        if blocked:
            parts.append(
                f"{len(blocked)} blocked by a PodDisruptionBudget until the drain timeout "
                f"({', '.join(blocked[:5])}{', …' if len(blocked) > 5 else ''})"
            )
        still = [p for p in left_behind if p not in blocked]
        if still:
            parts.append(
                f"{len(still)} still terminating at the drain timeout "
                f"({', '.join(still[:5])}{', …' if len(still) > 5 else ''})"
            )
        if blocked or still:
            parts.append("Node deleted anyway" if node_deleted_now else "Node already gone")
        else:
            parts.append("Node deleted" if node_deleted_now else "Node already gone")
    else:
        parts.append("Node already gone")
    if control_plane:
        if member is None:
            parts.append("etcd member already removed")
        elif member_removed_now:
            parts.append(f"etcd member {member} removed")
        else:
            parts.append(f"etcd member {member} already removed")
    return ", ".join(parts)
