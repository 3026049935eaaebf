"""vSphere tags and custom attributes kubegate puts on what it makes (requests and results
of the agent's `vm_tag` and `vm_untag`; activities/vsphere/tags.py acts on them).

Categories (made on first use, never removed):

- `kubegate` (many tags per object, on VMs): `cluster:<name>` (a gateway's own nodes:
  `gateway-nodes:<name>`), `pool:<pool>` and `gateway:<gateway>`. Only the owner tag belongs
  to one cluster and is deleted with it; pool and gateway tags are shared.
- `kubegate-tags` (many per object, on VMs): the cluster spec's `tags`, one tag each (shared
  by every cluster that names it; never deleted).
- `k8s-region` and `k8s-zone` (one per object, on compute clusters and hosts): a placement
  domain's `region` and `zone`, for the vSphere cloud provider and CSI topology (configure
  them with these category names).

Custom attribute: `kubegate.cluster` on every VM (the owner, e.g. 'cluster/demo').
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from domain.account import VCenterCredentials
from domain.names import is_dns_label
from domain.requests import AgentRequest

#: the category of kubegate's own marks
CATEGORY = "kubegate"
#: the category of the cluster spec's tags
SPEC_CATEGORY = "kubegate-tags"
#: the categories of placement domains' region and zone (Kubernetes topology)
REGION_CATEGORY = "k8s-region"
ZONE_CATEGORY = "k8s-zone"

Category = Literal["kubegate", "kubegate-tags", "k8s-region", "k8s-zone"]

#: category -> (cardinality, the object types its tags go on)
CATEGORIES: dict[str, tuple[str, list[str]]] = {
    CATEGORY: ("MULTIPLE", ["VirtualMachine"]),
    SPEC_CATEGORY: ("MULTIPLE", ["VirtualMachine"]),
    REGION_CATEGORY: ("SINGLE", ["ClusterComputeResource", "HostSystem", "Datacenter"]),
    ZONE_CATEGORY: ("SINGLE", ["ClusterComputeResource", "HostSystem", "Datacenter"]),
}

#: the custom attribute every VM gets (the owner)
FIELD_OWNER = "kubegate.cluster"


def owner_tag(owner: str) -> str:
    """The tag of the VMs of one owner ('cluster/demo' -> 'cluster:demo')."""
    kind, _, name = owner.partition("/")
    return f"{'gateway-nodes' if kind == 'gateway' else kind}:{name}"


def tag_owner(name: str) -> str | None:
    """The owner an owner tag names ('cluster:demo' -> 'cluster/demo', 'gateway-nodes:lab' ->
    'gateway/lab'); None for any other tag (pool:, gateway:, the spec's), which is shared."""
    kind, sep, rest = name.partition(":")
    if not sep or not is_dns_label(rest):
        return None
    return {"cluster": f"cluster/{rest}", "gateway-nodes": f"gateway/{rest}"}.get(kind)


def pool_tag(pool: str) -> str:
    return f"pool:{pool}"


def gateway_tag(gateway: str) -> str:
    return f"gateway:{gateway}"


class TagSpec(BaseModel):
    """One tag, made if missing, attached to these objects ('Type:id' refs)."""

    category: Category
    name: str = Field(min_length=1, max_length=256)
    objects: list[str] = Field(default_factory=list)


class TagRequest(AgentRequest):
    """Attach tags (categories and tags made once, one attach call per tag) and set custom
    attributes. Missing privileges are reported in the result, not raised."""

    credentials: VCenterCredentials
    tags: list[TagSpec] = Field(default_factory=list)
    #: VM ref -> {custom attribute: value}
    fields: dict[str, dict[str, str]] = Field(default_factory=dict)


class TagResult(BaseModel):
    #: 'category/name' -> tag id, of every tag of the request
    ids: dict[str, str] = Field(default_factory=dict)
    attached: int = Field(default=0, description="Attachments made (objects x tags).")
    fields_set: int = 0
    #: what could not be done (missing privileges), for the step's detail
    problems: list[str] = Field(default_factory=list)
    vcenter_requests: int = 0


class UntagRequest(AgentRequest):
    """Delete tags (by id; a tag already gone is done)."""

    credentials: VCenterCredentials
    tag_ids: list[str] = Field(default_factory=list)


class UntagResult(BaseModel):
    deleted: list[str] = Field(default_factory=list)
    vcenter_requests: int = 0
