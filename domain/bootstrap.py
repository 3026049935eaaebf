"""Bootstrap data of a node: cloud-init user-data and metadata for the VMware datasource.

Rendered on the gateway agent only (the output holds the cluster's secrets); the cluster
workflow passes NodeBootstrap (no secrets) and the sealed ClusterSecrets.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from domain.cluster import Pack

#: SealedSecret purpose of a cluster's secrets bundle.
SECRETS_PURPOSE = "kubegate/cluster-secrets"


class NodeNetwork(BaseModel):
    """The node's address: static (from an IP pool) or DHCP."""

    mode: Literal["static", "dhcp"]
    address: str | None = None
    prefix: int | None = None
    gateway: str | None = None
    nameservers: list[str] = Field(default_factory=list)
    search_domains: list[str] = Field(default_factory=list)


class NodeBootstrap(BaseModel):
    """Everything a node's cloud-init needs except secrets."""

    cluster: str = Field(description="Cluster name.")
    hostname: str = Field(description="Node name = hostname.")
    instance_id: str = Field(description="Instance UUID of the VM.")
    role: Literal["init", "join-control-plane", "worker"]
    network: NodeNetwork
    ssh_keys: list[str] = Field(default_factory=list)
    ntp_servers: list[str] = Field(default_factory=list)
    #: control-plane endpoint address (kube-vip VIP); None with DHCP and no VIP
    vip: str | None = None
    api_port: int = 6443
    #: first control-plane node's address, the join endpoint when there is no VIP
    first_control_plane: str | None = None
    kubernetes_version: str
    pod_cidr: str = "192.168.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    allow_worker_capability: bool = False
    #: the effective profile's packs, in layer order (layer name, pack)
    packs: list[tuple[str, Pack]] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)


class ClusterSecrets(BaseModel):
    """Generated once per cluster on the agent; travels only sealed."""

    bootstrap_token: str
    certificate_key: str
    ca_cert_pem: str
    ca_key_pem: str
