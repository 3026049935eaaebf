"""Bootstrap data of a node: cloud-init user-data and metadata for the VMware datasource.

Rendered on the gateway agent only (the output holds the cluster's secrets); the cluster
workflow passes NodeBootstrap (no secrets) and the sealed ClusterSecrets. The rendering
functions are pure and deterministic: the same input gives the same bytes, so a digest of
the output can be recorded in the step history. Generating secrets is not here (it needs
randomness): see activities/bootstrap.py.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import ipaddress
import json
import re
from datetime import datetime, timedelta
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from domain.account import SealedSecret
from domain.certs import client_certificate
from domain.cluster import CONTROL_PLANE_TAINT, Pack, Taint
from domain.kubeconfig import kubeconfig_file
from domain.requests import SINCE_0_3, AgentRequest

#: SealedSecret purpose of a cluster's secrets bundle.
SECRETS_PURPOSE = "kubegate/cluster-secrets"
#: secrets with shared control-plane keys (0.3.0 on): an agent of 0.2 cannot open them, so it
#: never renders a node of such a cluster the old way (its joins would not match)
SHARED_SECRETS_PURPOSE = "kubegate/cluster-secrets-shared-keys"

#: Encoding of guestinfo.userdata and guestinfo.metadata (read by cloud-init's VMware datasource).
ENCODING = "gzip+base64"
KUBE_VIP_IMAGE = "ghcr.io/kube-vip/kube-vip:v0.8.9"
#: The node's only NIC is renamed to this (as CAPV does), so kube-vip can name it.
INTERFACE = "eth0"
#: The login user that gets the SSH keys (passwordless sudo, password locked).
LOGIN_USER = "kubegate"
#: kubeadm's configuration; /run is a tmpfs, so the token never reaches the disk.
KUBEADM_CONFIG = "/run/kubeadm/kubeadm.yaml"
KUBE_VIP_MANIFEST = "/etc/kubernetes/manifests/kube-vip.yaml"
#: A joining control-plane node gets kube-vip after `kubeadm join`: join's preflight wants an
#: empty /etc/kubernetes/manifests.
KUBE_VIP_STAGED = "/etc/kubegate/kube-vip.yaml"
PACKS_DIR = "/etc/kubegate/packs"
#: Written when kubeadm has finished; its absence after boot means bootstrap failed.
SUCCESS_MARK = "/run/kubegate/bootstrap-success.complete"

_TOKEN = re.compile(r"^[a-z0-9]{6}\.[a-z0-9]{16}$")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
_CRI_SOCKET = "unix:///var/run/containerd/containerd.sock"
_ADMIN_CONF = "/etc/kubernetes/admin.conf"
_SUPER_ADMIN_CONF = "/etc/kubernetes/super-admin.conf"


class NodeNetwork(BaseModel):
    """The node's address: static (from an IP pool) or DHCP."""

    mode: Literal["static", "dhcp"]
    address: str | None = None
    prefix: int | None = None
    gateway: str | None = None
    nameservers: list[str] = Field(default_factory=list)
    search_domains: list[str] = Field(default_factory=list)
    #: MAC of the VM's NIC when known (after the clone): the NIC is matched by it, as CAPV
    #: does; without it, by name `e*` (the VM has one NIC).
    mac_address: str | None = None


class NodeBootstrap(AgentRequest):
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
    labels: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=SINCE_0_3, description="Node labels."
    )
    taints: list[Taint] = Field(
        default_factory=list, json_schema_extra=SINCE_0_3, description="Node taints."
    )
    upgrade_control_plane: bool = Field(
        default=False,
        json_schema_extra=SINCE_0_3,
        description="The first control-plane member of a newer Kubernetes version: once "
        "joined, it runs `kubeadm upgrade apply` (the cluster's kubeadm configuration, "
        "kubelet configuration and add-ons move to its version).",
    )


class ClusterSecrets(BaseModel):
    """Generated once per cluster on the agent; travels only sealed."""

    bootstrap_token: str = Field(pattern=_TOKEN.pattern)
    certificate_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    ca_cert_pem: str
    ca_key_pem: str
    #: the keys every control-plane member shares, made with the CA (0.3.0 on; clusters made
    #: before have none: their first node made its own, and joiners use the uploaded copies)
    shared: SharedKeys | None = None


class SharedKeys(BaseModel):
    """What kubeadm would otherwise make on the first control-plane node and upload for two
    hours: with them, every control-plane member is given its copy in its own bootstrap data,
    and no join depends on anything that expires."""

    sa_key_pem: str = Field(description="Service-account signing key (sa.key).")
    sa_pub_pem: str = Field(description="Its public half (sa.pub).")
    front_proxy_ca_cert_pem: str
    front_proxy_ca_key_pem: str
    etcd_ca_cert_pem: str
    etcd_ca_key_pem: str


#: how long the credential a joining node is given stays valid (minted as its VM is made)
JOIN_CREDENTIAL_VALIDITY = timedelta(hours=24)
#: the group kubeadm lets create and auto-approve a node's certificate request
BOOTSTRAPPERS = "system:bootstrappers:kubeadm:default-node-token"
#: on tmpfs, beside kubeadm's config: the join credential never reaches the disk
DISCOVERY_CONF = "/run/kubeadm/kubegate-discovery.conf"


class SecretsRequest(AgentRequest):
    """Generate a cluster's secrets on the agent (activity bootstrap_secrets)."""

    cluster: str = Field(description="Cluster name (for the log line only).")


class RenderRequest(AgentRequest):
    """Render these nodes' bootstrap data on the agent (activity bootstrap_render)."""

    nodes: list[NodeBootstrap]
    secrets: SealedSecret | None = Field(
        default=None,
        description="ClusterSecrets sealed to the agent's key; None: generate them first "
        "(the result then carries them, sealed).",
    )


class RenderedNode(BaseModel):
    """What rendering one node produced, without its content."""

    hostname: str
    role: str
    digest: str = Field(description="digest() of the node's guestinfo entries.")
    userdata_bytes: int = Field(description="Size of the plain user-data.")
    metadata_bytes: int = Field(description="Size of the plain metadata.")
    extra_config_bytes: int = Field(description="Size of the encoded guestinfo entries.")


class RenderResult(BaseModel):
    nodes: list[RenderedNode]
    secrets: SealedSecret | None = Field(
        default=None, description="The secrets generated by this call (sealed), if any."
    )


# -- validation ---------------------------------------------------------------------------


def _ip(value: str, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{field}: {value!r} is not an IP address") from None


def kubernetes_minor(version: str) -> int:
    """Minor version of 'v1.30.4' or '1.30.4'."""
    match = _VERSION.match(version)
    if not match:
        raise ValueError(f"kubernetes_version: {version!r} is not a version like 1.30.4")
    return int(match.group(2))


def validate(node: NodeBootstrap) -> None:
    """Refuse a node whose bootstrap data could not work; the message names the field."""
    net = node.network
    if net.mode == "static":
        for field in ("address", "prefix", "gateway"):
            if getattr(net, field) in (None, ""):
                raise ValueError(f"network.{field}: required with static addressing")
        assert net.address is not None and net.prefix is not None and net.gateway is not None
        address = _ip(net.address, "network.address")
        if not 0 < net.prefix <= address.max_prefixlen:
            raise ValueError(f"network.prefix: {net.prefix} is not a prefix length for {address}")
        if _ip(net.gateway, "network.gateway").version != address.version:
            raise ValueError("network.gateway: not in the address family of network.address")
    for i, server in enumerate(net.nameservers):
        _ip(server, f"network.nameservers.{i}")
    if net.mac_address is not None and not re.match(
        r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", net.mac_address
    ):
        raise ValueError(f"network.mac_address: {net.mac_address!r} is not a lower-case MAC")
    if node.vip is not None:
        _ip(node.vip, "vip")
    if node.first_control_plane is not None:
        _ip(node.first_control_plane, "first_control_plane")
    if not 0 < node.api_port < 65536:
        raise ValueError(f"api_port: {node.api_port} is not a port")
    kubernetes_minor(node.kubernetes_version)
    for field in ("pod_cidr", "service_cidr"):
        try:
            ipaddress.ip_network(getattr(node, field))
        except ValueError:
            raise ValueError(f"{field}: {getattr(node, field)!r} is not a CIDR") from None
    if node.role != "init" and node.vip is None and node.first_control_plane is None:
        raise ValueError(
            f"vip: role {node.role!r} joins through the control-plane endpoint; "
            "set vip or first_control_plane"
        )


def endpoint_host(node: NodeBootstrap) -> str | None:
    """The control-plane endpoint's address: the VIP, else the first control-plane node.

    The init node without either uses its own static address; with DHCP it has none (then
    kubeadm advertises the address it finds, and the cluster can have one control plane only).
    """
    if node.vip:
        return node.vip
    if node.first_control_plane:
        return node.first_control_plane
    if node.role == "init" and node.network.mode == "static":
        return node.network.address
    return None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- metadata -----------------------------------------------------------------------------


def network_config(network: NodeNetwork) -> dict[str, Any]:
    """Netplan v2 for the node's one NIC, shaped like CAPV's metadata template."""
    match = {"macaddress": network.mac_address} if network.mac_address else {"name": "e*"}
    nic: dict[str, Any] = {"match": match, "set-name": INTERFACE}
    if network.mode == "dhcp":
        nic["dhcp4"] = True
        nic["dhcp6"] = False
    else:
        assert network.address is not None and network.gateway is not None
        v6 = ":" in network.address
        nic["dhcp4"] = False
        nic["dhcp6"] = False
        nic["addresses"] = [f"{network.address}/{network.prefix}"]
        nic["gateway6" if v6 else "gateway4"] = network.gateway
    nameservers: dict[str, list[str]] = {}
    if network.nameservers:
        nameservers["addresses"] = list(network.nameservers)
    if network.search_domains:
        nameservers["search"] = list(network.search_domains)
    if nameservers:
        nic["nameservers"] = nameservers
    return {"version": 2, "ethernets": {"id0": nic}}


def render_metadata(node: NodeBootstrap) -> str:
    """The plain metadata document (JSON) for guestinfo.metadata."""
    validate(node)
    v6 = node.network.mode == "static" and ":" in (node.network.address or "")
    doc = {
        "instance-id": node.instance_id,
        "local-hostname": node.hostname,
        "wait-on-network": {"ipv4": not v6, "ipv6": v6},
        # cloud-init clears guestinfo.userdata (it holds the secrets) once it has read it
        "redact": ["userdata"],
        "network": network_config(node.network),
    }
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


# -- user-data ----------------------------------------------------------------------------


#: libyaml's emitter where PyYAML has it: the same text as the pure-Python one for these
#: documents, at a fraction of the CPU (each node's cloud-init is rendered on the agent)
_SafeDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_SafeDumper):  # type: ignore[misc]
    """Multi-line strings as literal blocks, so the files in write_files stay readable."""


def _str(dumper: yaml.representer.SafeRepresenter, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def ca_cert_hash(ca_cert_pem: str) -> str:
    """kubeadm's discovery hash: 'sha256:' + hex SHA-256 of the CA's SubjectPublicKeyInfo."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def _api_version(node: NodeBootstrap) -> str:
    """kubeadm's config API: v1beta4 from Kubernetes 1.31, v1beta3 before."""
    return "kubeadm.k8s.io/" + (
        "v1beta4" if kubernetes_minor(node.kubernetes_version) >= 31 else "v1beta3"
    )


def _node_registration(node: NodeBootstrap) -> dict[str, Any]:
    registration: dict[str, Any] = {"name": node.hostname, "criSocket": _CRI_SOCKET}
    taints = [t.model_dump(exclude_defaults=True) for t in node.taints]
    if node.role != "worker" and not node.allow_worker_capability and taints:
        # kubeadm's own control-plane taint, kept beside the pool's (a list replaces it)
        taints.insert(0, {"key": CONTROL_PLANE_TAINT, "effect": "NoSchedule"})
    if taints or (node.role != "worker" and node.allow_worker_capability):
        registration["taints"] = taints  # [] : no control-plane taint, workloads may run here
    if node.labels:
        labels = ",".join(f"{k}={v}" for k, v in sorted(node.labels.items()))
        if kubernetes_minor(node.kubernetes_version) >= 31:  # v1beta4: a list of arguments
            registration["kubeletExtraArgs"] = [{"name": "node-labels", "value": labels}]
        else:
            registration["kubeletExtraArgs"] = {"node-labels": labels}
    return registration


def _local_endpoint(node: NodeBootstrap) -> dict[str, Any]:
    local: dict[str, Any] = {"bindPort": node.api_port}
    if node.network.mode == "static":
        local = {"advertiseAddress": node.network.address, **local}
    return local


def kubeadm_documents(node: NodeBootstrap, secrets: ClusterSecrets) -> list[dict[str, Any]]:
    """kubeadm's configuration for the node's role (Init+Cluster, or Join). With shared keys
    a joiner discovers the cluster through a file holding a credential minted for it
    (`join_files`), and a control-plane joiner finds the shared keys on disk: nothing it
    uses expires with the first node's token or uploaded certificates."""
    api = _api_version(node)
    endpoint = endpoint_host(node)
    if node.role == "init":
        init = {
            "apiVersion": api,
            "kind": "InitConfiguration",
            "bootstrapTokens": [
                {
                    "token": secrets.bootstrap_token,
                    "description": f"kubegate: nodes of cluster {node.cluster} join with it",
                    "ttl": "24h0m0s",
                    "usages": ["signing", "authentication"],
                    "groups": ["system:bootstrappers:kubeadm:default-node-token"],
                }
            ],
            "localAPIEndpoint": _local_endpoint(node),
            "nodeRegistration": _node_registration(node),
        }
        if secrets.shared is None:  # (joiners take the certificates kubeadm uploads)
            init = {**init, "certificateKey": secrets.certificate_key}
        cluster: dict[str, Any] = {
            "apiVersion": api,
            "kind": "ClusterConfiguration",
            "clusterName": node.cluster,
            "kubernetesVersion": "v" + node.kubernetes_version.lstrip("v"),
        }
        if endpoint:
            cluster["controlPlaneEndpoint"] = _host_port(endpoint, node.api_port)
        cluster["networking"] = {
            "podSubnet": node.pod_cidr,
            "serviceSubnet": node.service_cidr,
            "dnsDomain": "cluster.local",
        }
        return [init, cluster]
    assert endpoint is not None  # validate() requires one for joining nodes
    discovery: dict[str, Any] = (
        {"file": {"kubeConfigPath": DISCOVERY_CONF}}
        if secrets.shared is not None
        else {
            "bootstrapToken": {
                "apiServerEndpoint": _host_port(endpoint, node.api_port),
                "token": secrets.bootstrap_token,
                "caCertHashes": [ca_cert_hash(secrets.ca_cert_pem)],
            }
        }
    )
    join: dict[str, Any] = {
        "apiVersion": api,
        "kind": "JoinConfiguration",
        "discovery": discovery,
        "nodeRegistration": _node_registration(node),
    }
    if node.role == "join-control-plane":
        join["controlPlane"] = {"localAPIEndpoint": _local_endpoint(node)}
        if secrets.shared is None:
            join["controlPlane"] = {
                "certificateKey": secrets.certificate_key,
                **join["controlPlane"],
            }
    return [join]


def pki_files(secrets: ClusterSecrets) -> list[dict[str, str]]:
    """The CA, and with shared keys the keys every control-plane member shares, as kubeadm
    expects them in /etc/kubernetes/pki (it uses what it finds there)."""
    pki = "/etc/kubernetes/pki"
    files = [
        _file(f"{pki}/ca.crt", secrets.ca_cert_pem),
        _file(f"{pki}/ca.key", secrets.ca_key_pem, "0600"),
    ]
    shared = secrets.shared
    if shared is not None:
        files += [
            _file(f"{pki}/sa.key", shared.sa_key_pem, "0600"),
            _file(f"{pki}/sa.pub", shared.sa_pub_pem),
            _file(f"{pki}/front-proxy-ca.crt", shared.front_proxy_ca_cert_pem),
            _file(f"{pki}/front-proxy-ca.key", shared.front_proxy_ca_key_pem, "0600"),
            _file(f"{pki}/etcd/ca.crt", shared.etcd_ca_cert_pem),
            _file(f"{pki}/etcd/ca.key", shared.etcd_ca_key_pem, "0600"),
        ]
    return files


def discovery_file(
    node: NodeBootstrap, secrets: ClusterSecrets, now: datetime | None = None
) -> dict[str, str]:
    """The joiner's discovery kubeconfig: the endpoint, the CA, and a client certificate in
    kubeadm's bootstrappers group minted now for this node (kubeadm uses a discovery file's
    own credential for the kubelet's TLS bootstrap), valid JOIN_CREDENTIAL_VALIDITY."""
    endpoint = endpoint_host(node)
    assert endpoint is not None  # validate() requires one for joining nodes
    cert_pem, key_pem, _ = client_certificate(
        secrets.ca_cert_pem,
        secrets.ca_key_pem,
        f"system:bootstrap:{node.hostname}",
        [BOOTSTRAPPERS],
        JOIN_CREDENTIAL_VALIDITY,
        now=now,
    )
    document = kubeconfig_file(
        node.cluster,
        f"https://{_host_port(endpoint, node.api_port)}",
        secrets.ca_cert_pem,
        f"join-{node.hostname}",
        cert_pem,
        key_pem,
    )
    return _file(DISCOVERY_CONF, document, "0600")


def kube_vip_manifest(node: NodeBootstrap, *, kubeconfig: str) -> dict[str, Any]:
    """kube-vip as a static pod: ARP mode, holds the VIP for the API server, leader election."""
    assert node.vip is not None
    env = {
        "vip_arp": "true",
        "port": str(node.api_port),
        "vip_interface": INTERFACE,
        "vip_cidr": "128" if ":" in node.vip else "32",
        "dns_mode": "first",
        "cp_enable": "true",
        "cp_namespace": "kube-system",
        "vip_leaderelection": "true",
        "vip_leasename": "plndr-cp-lock",
        "vip_leaseduration": "5",
        "vip_renewdeadline": "3",
        "vip_retryperiod": "1",
        "address": node.vip,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kube-vip", "namespace": "kube-system"},
        "spec": {
            "containers": [
                {
                    "name": "kube-vip",
                    "image": KUBE_VIP_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "args": ["manager"],
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                    "securityContext": {
                        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
                    },
                    "volumeMounts": [{"mountPath": _ADMIN_CONF, "name": "kubeconfig"}],
                }
            ],
            "hostAliases": [{"hostnames": ["kubernetes"], "ip": "127.0.0.1"}],
            "hostNetwork": True,
            "volumes": [{"name": "kubeconfig", "hostPath": {"path": kubeconfig}}],
        },
    }


def _file(path: str, content: str, permissions: str = "0644") -> dict[str, str]:
    return {"path": path, "owner": "root:root", "permissions": permissions, "content": content}


def _kube_vip(node: NodeBootstrap) -> tuple[list[dict[str, str]], list[str]]:
    """kube-vip's file and the commands to run after kubeadm, for a control-plane node."""
    if node.vip is None or node.role == "worker":
        return [], []
    if node.role == "join-control-plane":
        manifest = _yaml(kube_vip_manifest(node, kubeconfig=_ADMIN_CONF))
        after = [f"install -m 0644 {KUBE_VIP_STAGED} {KUBE_VIP_MANIFEST}"]
        return [_file(KUBE_VIP_STAGED, manifest)], after
    # From Kubernetes 1.29, admin.conf has no rights until `kubeadm init` has finished, but
    # kube-vip must hold the VIP before: it uses super-admin.conf until then.
    if kubernetes_minor(node.kubernetes_version) < 29:
        manifest = _yaml(kube_vip_manifest(node, kubeconfig=_ADMIN_CONF))
        return [_file(KUBE_VIP_MANIFEST, manifest)], []
    manifest = _yaml(kube_vip_manifest(node, kubeconfig=_SUPER_ADMIN_CONF))
    after = [f"sed -i 's#{_SUPER_ADMIN_CONF}#{_ADMIN_CONF}#' {KUBE_VIP_MANIFEST}"]
    return [_file(KUBE_VIP_MANIFEST, manifest)], after


def render_userdata(
    node: NodeBootstrap, secrets: ClusterSecrets, now: datetime | None = None
) -> str:
    """The plain #cloud-config document for guestinfo.userdata. A joiner of a cluster with
    shared keys gets a credential minted at `now` (default: this moment), so rendering it is
    not deterministic."""
    validate(node)
    files: list[dict[str, str]] = []
    if node.role == "init" or (node.role == "join-control-plane" and secrets.shared):
        files += pki_files(secrets)
    if node.role != "init" and secrets.shared is not None:
        files.append(discovery_file(node, secrets, now))
    files.append(
        _file(
            KUBEADM_CONFIG, "---\n".join(_yaml(d) for d in kubeadm_documents(node, secrets)), "0600"
        )
    )
    vip_files, after_kubeadm = _kube_vip(node)
    files += vip_files
    for layer, pack in node.packs:
        content = _yaml({"name": pack.name, "version": pack.version, "values": pack.values})
        files.append(_file(f"{PACKS_DIR}/{layer}-{pack.name}.yaml", content, "0600"))

    if node.role == "init":
        upload = " --upload-certs" if secrets.shared is None else ""
        kubeadm = f"kubeadm init --config {KUBEADM_CONFIG}{upload}"
    else:
        kubeadm = f"kubeadm join --config {KUBEADM_CONFIG}"
    doc: dict[str, Any] = {
        "hostname": node.hostname,
        "preserve_hostname": False,
        "manage_etc_hosts": True,
        "disable_root": True,
        "ssh_pwauth": False,
        "users": [
            {
                "name": LOGIN_USER,
                "gecos": "kubegate node administrator",
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": True,
                "ssh_authorized_keys": list(node.ssh_keys),
            }
        ],
    }
    if node.ntp_servers:
        doc["ntp"] = {"enabled": True, "servers": list(node.ntp_servers)}
    doc["write_files"] = files
    upgrade = (
        [f"kubeadm upgrade apply v{node.kubernetes_version.lstrip('v')} --yes"]
        if node.upgrade_control_plane and node.role == "join-control-plane"
        else []
    )
    doc["runcmd"] = [
        "set -e",
        kubeadm,
        *after_kubeadm,
        *upgrade,
        f"mkdir -p {SUCCESS_MARK.rsplit('/', 1)[0]}",
        f"touch {SUCCESS_MARK}",
    ]
    return "#cloud-config\n" + _yaml(doc)


# -- guestinfo ----------------------------------------------------------------------------


def encode(document: str) -> str:
    """gzip (mtime 0, so the same document gives the same bytes) then base64."""
    return base64.b64encode(gzip.compress(document.encode(), compresslevel=9, mtime=0)).decode()


def decode(value: str) -> str:
    """The inverse of encode()."""
    return gzip.decompress(base64.b64decode(value)).decode()


def _entries(userdata: str, metadata: str) -> dict[str, str]:
    return {
        "guestinfo.metadata": encode(metadata),
        "guestinfo.metadata.encoding": ENCODING,
        "guestinfo.userdata": encode(userdata),
        "guestinfo.userdata.encoding": ENCODING,
    }


def guestinfo(node: NodeBootstrap, secrets: ClusterSecrets) -> dict[str, str]:
    """The VM's extraConfig entries that carry its cloud-init data (VMware datasource)."""
    return _entries(render_userdata(node, secrets), render_metadata(node))


def digest(entries: dict[str, str]) -> str:
    """Hex SHA-256 of the entries (sorted by key), for the step history."""
    h = hashlib.sha256()
    for key in sorted(entries):
        h.update(key.encode() + b"=" + entries[key].encode() + b"\n")
    return h.hexdigest()


def rendered(node: NodeBootstrap, secrets: ClusterSecrets) -> tuple[dict[str, str], RenderedNode]:
    """The node's guestinfo entries and a content-free account of them."""
    userdata = render_userdata(node, secrets)
    metadata = render_metadata(node)
    entries = _entries(userdata, metadata)
    summary = RenderedNode(
        hostname=node.hostname,
        role=node.role,
        digest=digest(entries),
        userdata_bytes=len(userdata.encode()),
        metadata_bytes=len(metadata.encode()),
        extra_config_bytes=sum(len(k) + len(v) for k, v in entries.items()),
    )
    return entries, summary
