"""Gateways: pairing codes, installer properties, sizes, releases, configuration and state.

Pure models and rules. Code generation uses `secrets` and is for starters and activities
only; workflows keep and compare hashes (`pairing_hash`, `pairing_matches`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    ValidationError,
    field_validator,
    model_validator,
)

from domain.account import Placement, SealedSecret, VCenterAccess, VCenterCredentials
from domain.audit import AuditRecord
from domain.cluster import (
    ClusterPlacement,
    ClusterProfile,
    ClusterSpec,
    Healing,
    NodeLayout,
    NodePlan,
    NodeSpec,
    PlacementDomain,
    distinct_domains,
    node_name,
)
from domain.errors import field_errors
from domain.health import ClusterHealth
from domain.ipam import IpPoolSpec
from domain.lifecycle import NodeSetState, Step, Timing
from domain.names import DnsLabel, HostName, is_host

#: How long a pairing code can be used, and when a gateway that has not registered is overdue.
PAIRING_CODE_LIFETIME = timedelta(hours=24)
REGISTRATION_OVERDUE_AFTER = timedelta(minutes=10)

#: Pairing codes: 10 characters from an alphabet without look-alikes (no 0/O, 1/I/L).
_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
PAIRING_CODE_LENGTH = 10

#: What to check when an installer does not register (shown with an overdue gateway).
TROUBLESHOOTING_HINTS = (
    "check the console endpoint for typos; it must not end with a slash",
    "check the pairing code: it is single use and expires",
    "the installer needs outbound HTTPS to the console, directly or through the proxy "
    "(HTTP proxy, HTTPS proxy and NO_PROXY all set)",
    "read /var/log/cloud-init-output.log on the installer VM (SSH as 'ubuntu' with the key "
    "given at import); if a property was wrong, delete the VM and import the OVA again",
)


class GatewayStatus(StrEnum):
    PENDING = "Pending"
    REGISTERED = "Registered"
    PROVISIONING = "Provisioning"
    RUNNING = "Running"
    UPGRADING = "Upgrading"
    FAILED = "Failed"
    DELETING = "Deleting"
    DELETED = "Deleted"


class GatewaySize(BaseModel):
    """Nodes of a gateway and the minimum capacity they need in total (product document)."""

    nodes: Literal[1, 3]
    vcpus: int
    memory_gb: int
    storage_gb: int


GATEWAY_SIZES = {
    1: GatewaySize(nodes=1, vcpus=2, memory_gb=4, storage_gb=30),
    3: GatewaySize(nodes=3, vcpus=6, memory_gb=12, storage_gb=70),
}


def can_resize(current: int, wanted: int) -> str | None:
    """None if the resize is allowed, else the reason (only 1 -> 3 is)."""
    if current == wanted:
        return f"the gateway already has {current} node(s)"
    if (current, wanted) == (1, 3):
        return None
    if wanted < current:
        return (
            f"a gateway cannot shrink from {current} to {wanted} nodes (its control plane "
            "would lose quorum); create a new gateway instead"
        )
    return f"a gateway has 1 or 3 nodes, not {wanted}"


def new_pairing_code() -> str:
    """A fresh random pairing code (starters only: never inside a workflow)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(PAIRING_CODE_LENGTH))


def normalize_pairing_code(code: str) -> str:
    """Upper-case, without spaces or dashes (people type codes as they read them)."""
    return code.strip().replace("-", "").replace(" ", "").upper()


#: scrypt cost: ~50 ms and 16 MiB per guess, so the 31^10 codes cannot be tried within a
#: code's lifetime by someone who reads the hash and salt from a workflow history
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32, "maxmem": 64 * 1024 * 1024}


def pairing_hash(code: str, salt: str) -> str:
    """What the gateway keeps instead of the code: scrypt over the code with the salt."""
    return hashlib.scrypt(
        normalize_pairing_code(code).encode(), salt=salt.encode(), **_SCRYPT
    ).hex()


def pairing_matches(code: str, salt: str, expected_hash: str) -> bool:
    """Constant-time comparison of a presented code with the kept hash."""
    return hmac.compare_digest(pairing_hash(code, salt), expected_hash)


def pairing_proof(code: str, salt: str) -> str:
    """What an agent presents instead of the code (the code itself never leaves the agent)."""
    return pairing_hash(code, salt)


def pairing_verifier(proof: str) -> str:
    """What the gateway keeps: a hash of the proof, so its history cannot be replayed."""
    return hashlib.sha256(("kubegate-pairing|" + proof).encode()).hexdigest()


#: wrong pairing attempts allowed before a lockout; each further run doubles it
PAIRING_ATTEMPTS = 5
PAIRING_LOCKOUT = timedelta(minutes=1)
PAIRING_LOCKOUT_MAX = timedelta(hours=1)


class PairingState(BaseModel):
    """A gateway's pairing: a verifier of its single-use code, expiry, use, wrong attempts."""

    code_hash: str = Field(default="", description="Old form (scrypt of the code); kept empty.")
    salt: str
    expires_at: datetime
    used: bool = False
    verifier: str = Field(default="", description="SHA-256 of the agent's proof.")
    fingerprint: str | None = Field(
        default=None, description="The agent fingerprint approved in advance (gateway create)."
    )
    failures: int = Field(default=0, description="Wrong codes presented so far.")
    locked_until: datetime | None = None

    def check(self, code: str, now: datetime) -> str | None:
        """None if the code may register the gateway now, else why not (for the agent)."""
        problem = self.usable(now)
        if problem is None and not self.proof_matches(pairing_proof(code, self.salt)):
            return "wrong pairing code for this gateway (check for typos)"
        return problem

    def usable(self, now: datetime) -> str | None:
        """Why no code can pair now (used, expired, locked out), or None."""
        if self.used:
            return "this pairing code was already used; create a new one (gateway reset)"
        if now >= self.expires_at:
            return "this pairing code has expired; create a new one (gateway reset)"
        if self.locked_until is not None and now < self.locked_until:
            return (
                f"{self.failures} wrong pairing codes: locked until "
                f"{self.locked_until:%H:%M:%S} UTC"
            )
        return None

    def proof_matches(self, proof: str) -> bool:
        if self.verifier:
            return hmac.compare_digest(pairing_verifier(proof), self.verifier)
        return bool(self.code_hash) and hmac.compare_digest(proof, self.code_hash)

    def count_failure(self, now: datetime) -> None:
        """One more wrong code; every PAIRING_ATTEMPTS of them lock pairing for a while."""
        self.failures += 1
        if self.failures % PAIRING_ATTEMPTS == 0:
            runs = self.failures // PAIRING_ATTEMPTS
            wait = min(PAIRING_LOCKOUT * 2 ** (runs - 1), PAIRING_LOCKOUT_MAX)
            self.locked_until = now + wait


def _url_host_ok(url: str) -> bool:
    """True if the URL's host is a host name or an IP address (and its port a number)."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return False
    host = parts.hostname
    return host is not None and is_host(host) and all(ch not in url for ch in " \t\n\"'`$;|<>")


def _cidr(value: str, field: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{field}: {value!r} is not a network in CIDR form ({exc})") from None


class InstallerProperties(BaseModel):
    """The vApp properties of the installer OVA, as the installer VM reads them."""

    model_config = ConfigDict(extra="forbid")

    installer_name: DnsLabel = Field(description="The gateway's name.")
    console_endpoint: str = Field(description="URL of the kubegate endpoint, no trailing slash.")
    pairing_code: str = Field(description="The code `kubegate gateway create` printed.")
    ssh_public_key: str | None = Field(
        default=None, description="Key for SSH as 'ubuntu' to the installer (troubleshooting)."
    )
    pod_cidr: str | None = Field(default=None, description="Pods' range (optional).")
    service_cidr: str | None = Field(default=None, description="Services' range (optional).")
    node_network: str | None = Field(
        default=None, description="The installer's network, for the overlap rule."
    )
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = Field(default=None, description="Comma-separated hosts/CIDRs/domains.")

    @field_validator("console_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value.endswith("/"):
            raise ValueError("must not end with a slash (the installer appends paths to it)")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not _url_host_ok(value):
            raise ValueError("must be a URL like https://kubegate.example.com or host:port URL")
        return value

    @field_validator("pairing_code")
    @classmethod
    def _code(cls, value: str) -> str:
        code = normalize_pairing_code(value)
        if len(code) != PAIRING_CODE_LENGTH or any(ch not in _ALPHABET for ch in code):
            raise ValueError(
                f"must be the {PAIRING_CODE_LENGTH}-character code `kubegate gateway create` "
                "printed"
            )
        return code

    @field_validator("http_proxy", "https_proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not _url_host_ok(value):
            raise ValueError("must be a URL like http://proxy.example.com:3128")
        return value

    @field_validator("no_proxy")
    @classmethod
    def _no_proxy(cls, value: str | None) -> str | None:
        for entry in (value or "").split(","):
            entry = entry.strip()
            bare = entry.removeprefix("*").removeprefix(".")
            if not entry or entry == "*":
                continue
            try:
                ipaddress.ip_network(bare, strict=False)
            except ValueError:
                if not is_host(bare):
                    raise ValueError(
                        f"{entry!r} is not a host name, domain, address or CIDR"
                    ) from None
        return value

    @field_validator("ssh_public_key")
    @classmethod
    def _ssh_key(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        return ClusterPlacement.model_validate(
            {"datacenter": "x", "ip_allocation": "dhcp", "ssh_keys": [value]}
        ).ssh_keys[0]

    @model_validator(mode="after")
    def _rules(self) -> InstallerProperties:
        proxies = {
            "http_proxy": self.http_proxy,
            "https_proxy": self.https_proxy,
            "no_proxy": self.no_proxy or None,
        }
        given = [name for name, value in proxies.items() if value]
        if given and len(given) != len(proxies):
            missing = [name for name in proxies if name not in given]
            raise ValueError(
                f"{', '.join(missing)}: required with {', '.join(given)} (give all three proxy "
                "settings, or none)"
            )
        networks = {
            name: _cidr(value, name)
            for name, value in (
                ("pod_cidr", self.pod_cidr),
                ("service_cidr", self.service_cidr),
                ("node_network", self.node_network),
            )
            if value
        }
        names = list(networks)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                a, b = networks[first], networks[second]
                if a.version == b.version and a.overlaps(b):
                    raise ValueError(f"{second}: {b} overlaps {first} {a}; they must not overlap")
        return self

    def ovf_properties(self) -> dict[str, str]:
        """The properties as keys of the OVF descriptor (kubegate.*); unset ones are empty."""
        return {
            f"kubegate.{name}": "" if value is None else str(value)
            for name, value in self.model_dump().items()
        }


# -- releases -------------------------------------------------------------------------------


class GatewayRelease(BaseModel):
    """A version of the gateway: what its nodes run."""

    version: str
    kubernetes: str = Field(description="Kubernetes version of the gateway's own nodes.")
    notes: str = ""


#: Every gateway release this kubegate knows, oldest first. New gateways get the first one
#: unless asked otherwise; a newer one shows as available and `gateway upgrade` rolls to it.
GATEWAY_RELEASES = (
    GatewayRelease(version="1.0.0", kubernetes="1.30.4", notes="first release"),
    GatewayRelease(
        version="1.1.0", kubernetes="1.30.6", notes="OS security fixes; Kubernetes 1.30.6"
    ),
)


def release(version: str) -> GatewayRelease | None:
    return next((r for r in GATEWAY_RELEASES if r.version == version), None)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def newest_release_after(version: str) -> GatewayRelease | None:
    """The newest release above `version` (what `gateway get` shows as available)."""
    newer = [r for r in GATEWAY_RELEASES if _version_key(r.version) > _version_key(version)]
    return max(newer, key=lambda r: _version_key(r.version)) if newer else None


def can_upgrade(current: str, wanted: str) -> str | None:
    """None if an upgrade from `current` to `wanted` is allowed, else the reason."""
    if release(wanted) is None:
        known = ", ".join(r.version for r in GATEWAY_RELEASES)
        return f"version: {wanted!r} is not a gateway release (known: {known})"
    if _version_key(wanted) <= _version_key(current):
        return f"version: {wanted} is not newer than the installed {current}"
    return None


# -- configuration --------------------------------------------------------------------------

#: each gateway node's size: 1 node meets the 1-node minimum, 3 together exceed the 3-node one
NODE_CPU = 2
NODE_MEMORY_GB = 4
NODE_DISK_GB = 30


class GatewayConfig(BaseModel):
    """What `gateway configure` gives: vCenter access (password sealed) and placement."""

    model_config = ConfigDict(extra="forbid")

    credentials: VCenterCredentials
    placement: Placement = Field(description="Where the gateway's nodes go; template required.")
    ssh_keys: list[str] = Field(default_factory=list)
    ntp_servers: list[HostName] = Field(default_factory=list, max_length=16)
    ip_allocation: Literal["static", "dhcp"] = "dhcp"
    ip_pool: DnsLabel | None = Field(
        default=None, description="IP pool of this gateway (static): nodes and the VIP."
    )
    vip: IPvAnyAddress | None = Field(
        default=None, description="Load-balancer address with DHCP (always, even for one node)."
    )
    size: Literal[1, 3] = 1
    healing: Healing = Field(
        default_factory=Healing,
        description="How its own nodes reconcile (as a cluster's `healing`).",
    )

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        return ClusterPlacement.model_validate(
            {"datacenter": "x", "ip_allocation": "dhcp", "ssh_keys": keys}
        ).ssh_keys

    @model_validator(mode="after")
    def _rules(self) -> GatewayConfig:
        _addressing_rules(self.placement, self.ip_allocation, self.vip, self.ip_pool)
        return self


def _addressing_rules(
    placement: Placement, ip_allocation: str, vip: object, ip_pool: str | None
) -> None:
    """A template to clone; with static addressing the VIP comes from the pool, with DHCP
    there is no pool."""
    if placement.template is None:
        raise ValueError("placement.template: required (the gateway nodes' VM template)")
    if ip_allocation == "static" and vip is not None:
        raise ValueError("vip: with static addressing it comes from the IP pool")
    if ip_allocation == "dhcp" and ip_pool is not None:
        raise ValueError("ip_pool: not allowed with DHCP (remove it)")


class GatewayFile(BaseModel):
    """gateway.yaml as the user writes it (the password comes from a source, never inline)."""

    model_config = ConfigDict(extra="forbid")

    vcenter: VCenterAccess
    placement: Placement
    ssh_keys: list[str] = Field(default_factory=list)
    ntp_servers: list[HostName] = Field(default_factory=list, max_length=16)
    ip_allocation: Literal["static", "dhcp"] = "dhcp"
    ip_pool: DnsLabel | None = None
    create_ip_pool: dict[str, Any] | None = Field(
        default=None,
        description="An IP pool to create for the gateway first (the fields of ippool.yaml, "
        "without gateway); ip_pool then defaults to its name.",
    )
    vip: IPvAnyAddress | None = None
    size: Literal[1, 3] = 1
    healing: Healing = Field(
        default_factory=Healing,
        description="How its own nodes reconcile: reconcile_seconds, powered_off, "
        "repair_attempts (as a cluster's `healing`).",
    )

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        return GatewayConfig._keys(keys)

    @model_validator(mode="after")
    def _rules(self) -> GatewayFile:
        """The rules GatewayConfig keeps, checked before anything is sent or created."""
        _addressing_rules(self.placement, self.ip_allocation, self.vip, self.ip_pool)
        if self.ip_allocation == "dhcp" and self.create_ip_pool is not None:
            raise ValueError("create_ip_pool: only with static IP allocation (remove it)")
        if self.create_ip_pool is not None:
            if "gateway" in self.create_ip_pool:
                raise ValueError("create_ip_pool.gateway: not allowed (it is this gateway)")
            pool = self.pool_to_create("placeholder")
            if self.ip_pool is not None and self.ip_pool != pool.name:
                raise ValueError(
                    f"ip_pool: {self.ip_pool!r} differs from create_ip_pool.name {pool.name!r}"
                )
        return self

    def pool_to_create(self, gateway: str) -> IpPoolSpec:
        """create_ip_pool as a pool of the gateway; ValueError naming each bad field."""
        assert self.create_ip_pool is not None
        try:
            return IpPoolSpec.model_validate({**self.create_ip_pool, "gateway": gateway})
        except ValidationError as exc:
            raise ValueError(
                "; ".join(f"create_ip_pool.{line}" for line in field_errors(exc))
            ) from None


#: the end of the name of a gateway's own nodes (their folder); no user cluster may end so
GATEWAY_NODES_SUFFIX = "-pcg"


def gateway_nodes_name(gateway: str) -> str:
    """The name of the gateway's own nodes: their folder's, and their names start with it."""
    return f"{gateway}{GATEWAY_NODES_SUFFIX}"


class GatewayNodeSpec(BaseModel):
    """The gateway's own nodes: 1 or 3 control-plane nodes that also run its workloads, behind
    a VIP, booting the gateway release's packs."""

    model_config = ConfigDict(extra="forbid")

    name: DnsLabel = Field(description="'<gateway>-pcg': the folder's name, the nodes' prefix.")
    version: str = Field(description="The gateway release the nodes run.")
    size: Literal[1, 3] = 1
    template: str = Field(min_length=1, description="The nodes' VM template.")
    placement: ClusterPlacement = Field(description="Datacenter, folder, keys, NTP, addressing.")
    domain: PlacementDomain = Field(description="Where the nodes go; ip_pool when static.")
    vip: IPvAnyAddress | None = Field(default=None, description="The VIP with DHCP.")

    @model_validator(mode="before")
    @classmethod
    def _from_cluster_spec(cls, data: Any) -> Any:
        """A gateway's nodes recorded before GatewayNodeSpec were a ClusterSpec (a one-pool
        "kubegate-gateway" cluster): the same nodes, said in this shape."""
        if not isinstance(data, dict) or "control_plane" not in data:
            return data
        control_plane = data["control_plane"]
        os_pack = next(e["pack"] for e in data["profile"]["layers"] if e["layer"] == "os")
        return {
            "name": data["name"],
            "version": data["profile"]["version"],
            "size": control_plane["size"],
            "template": os_pack["values"]["template"],
            "placement": data["placement"],
            "domain": control_plane["placement"][0],
            "vip": control_plane.get("vip"),
        }

    def check(self) -> None:
        """Validate the spec again as a whole (ValueError naming the field otherwise)."""
        GatewayNodeSpec.model_validate(self.model_dump(mode="json"))

    def layout(self) -> NodeLayout:
        """The nodes: `<name>-cp-N`, each NODE_CPU/NODE_MEMORY_GB/NODE_DISK_GB, booting the
        release's os, Kubernetes, CNI and gateway packs."""
        rel = release(self.version) or GATEWAY_RELEASES[0]
        return NodeLayout(
            name=self.name,
            placement=self.placement,
            plans=[
                NodePlan(
                    name=node_name(self.name, "cp", index),
                    pool="cp",
                    index=index,
                    control_plane=True,
                    cpu=NODE_CPU,
                    memory_gb=NODE_MEMORY_GB,
                    disk_gb=NODE_DISK_GB,
                    domain_index=0,
                    domain=self.domain,
                )
                for index in range(self.size)
            ],
            domains=[self.domain],
            vip=str(self.vip) if self.vip is not None else None,
            profile=_gateway_profile(rel, self.template),
            allow_worker_capability=True,
        )


def _gateway_profile(rel: GatewayRelease, template: str) -> ClusterProfile:
    """What a gateway release's nodes boot."""
    return ClusterProfile.model_validate(
        {
            "name": "kubegate-gateway",
            "version": rel.version,
            "layers": [
                {
                    "layer": "os",
                    "pack": {
                        "name": "ubuntu",
                        "version": "22.04",
                        "values": {"template": template},
                    },
                },
                {"layer": "kubernetes", "pack": {"name": "kubernetes", "version": rel.kubernetes}},
                {"layer": "network", "pack": {"name": "cni-calico", "version": "3.28.0"}},
                {"layer": "addon", "pack": {"name": "kubegate-gateway", "version": rel.version}},
            ],
        }
    )


def gateway_node_spec(gateway: str, config: GatewayConfig, version: str) -> GatewayNodeSpec:
    """The gateway's nodes as its configuration and release say."""
    placement = config.placement
    return GatewayNodeSpec(
        name=gateway_nodes_name(gateway),
        version=version,
        size=config.size,
        template=placement.template or "",  # required by GatewayConfig
        placement=ClusterPlacement(
            datacenter=placement.datacenter,
            folder=placement.folder,
            ssh_keys=config.ssh_keys,
            ntp_servers=config.ntp_servers,
            ip_allocation=config.ip_allocation,
        ),
        domain=PlacementDomain(
            compute_cluster=placement.compute_cluster,
            resource_pool=placement.resource_pool,
            datastore=placement.datastore,
            network=placement.network,
            ip_pool=config.ip_pool,
        ),
        vip=config.vip,
    )


class GatewayNodes(NodeSetState):
    """The gateway's own nodes and the steps that made them (recorded before GatewayNodeSpec
    as a ClusterState: its other fields are dropped, its spec converted)."""

    spec: GatewayNodeSpec

    def node_spec(self) -> NodeSpec:
        return self.spec


def default_account_name(gateway: str) -> str:
    return f"{gateway}-default"


# -- state ----------------------------------------------------------------------------------


#: the status shown for a Running gateway whose agent is away (not a state of its own: the
#: gateway still takes requests, which wait for the agent)
DISCONNECTED = "Disconnected"
#: the status shown for a Running gateway one of whose nodes' repair was given up
DEGRADED = "Degraded"


class AgentInfo(BaseModel):
    """The registered agent: its public key (secrets are sealed to it) and where it runs."""

    public_key: str = Field(description="X25519 public key, base64.")
    key_id: str
    signing_key: str | None = Field(default=None, description="Ed25519 public key, base64.")
    fingerprint: str = Field(default="", description="What the operator approves.")
    approved: bool = Field(default=False, description="The operator approved this agent.")
    approved_at: datetime | None = None
    version: str = Field(default="", description="The kubegate release the agent runs.")
    host: str = ""
    installer_vm: str | None = Field(default=None, description="Inventory path of the installer.")
    installer_address: str | None = None
    registered_at: datetime | None = None


class CloudAccount(BaseModel):
    """A cloud account kept by its gateway: vCenter, user, sealed password."""

    name: DnsLabel
    gateway: DnsLabel
    credentials: VCenterCredentials
    placement: Placement | None = Field(
        default=None, description="Default placement (its template is the default template)."
    )
    default: bool = Field(default=False, description="Created with the gateway.")
    created_at: datetime | None = None


class AccountSummary(BaseModel):
    """An account as `account list` shows it (no sealed secret)."""

    name: str
    gateway: str
    server: str
    username: str
    default: bool
    clusters: list[str] = Field(default_factory=list)


class ClusterRecord(BaseModel):
    """A cluster of the gateway as the gateway knows it."""

    name: str
    account: str
    status: str
    queued: bool = False
    first_run: str = Field(default="", description="The first run of its workflow.")


class GatewayState(BaseModel):
    """Everything the gateway workflow knows; returned by its `state` query."""

    name: str
    status: GatewayStatus = GatewayStatus.PENDING
    reason: str = ""
    error: str | None = None
    failed_operation: str | None = Field(
        default=None, description="What failed (provision, reset, resize, upgrade, delete)."
    )
    system: bool = Field(default=False, description="Runs no nodes of its own (system gateway).")
    overdue: bool = False
    hints: list[str] = Field(default_factory=list)
    pairing: PairingState
    pairing_issued_at: datetime | None = None
    agent: AgentInfo | None = None
    agent_connected: bool | None = Field(
        default=None,
        description="Whether the approved agent is there (None: not watched yet).",
    )
    agent_seen_at: datetime | None = Field(
        default=None, description="When the agent was last known to be there."
    )
    config: GatewayConfig | None = None
    version: str = GATEWAY_RELEASES[0].version
    target_version: str | None = None
    nodes: GatewayNodes | None = Field(
        default=None, description="The gateway's nodes and the steps that made them."
    )
    history: list[Step] = Field(
        default_factory=list, description="Steps of earlier attempts (before a reset)."
    )
    #: operations run so far (numbers the steps' operations: configure, resize, upgrade, ...)
    operations_run: int = 0
    accounts: list[CloudAccount] = Field(default_factory=list)
    clusters: list[ClusterRecord] = Field(default_factory=list)
    queue: list[str] = Field(default_factory=list, description="Clusters waiting, in order.")
    audits: list[AuditRecord] = Field(
        default_factory=list,
        description="Orphan audits it started that have not ended (its agent works for them).",
    )
    agent_problem: str | None = Field(
        default=None,
        description="Why the agent cannot take new work (its release), as the state query "
        "reports it.",
    )
    health: ClusterHealth = Field(
        default_factory=ClusterHealth,
        description="What the last reconcile of its nodes saw and did.",
    )
    woken_release: str = Field(
        default="",
        description="The kubegate release that last woke its clusters' runs (so that runs "
        "begun under an earlier release take up what this one added, e.g. reconciles).",
    )
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def shown_status(self) -> str:
        """The status as `get`, `list` and the Web UI show it: `Disconnected` while Running
        with its agent away, `Degraded` while Running with a node's repair given up."""
        if self.status is GatewayStatus.RUNNING and self.agent_connected is False:
            return DISCONNECTED
        if self.status is GatewayStatus.RUNNING and self.health.degraded:
            return DEGRADED
        return self.status.value

    def account(self, name: str) -> CloudAccount | None:
        return next((a for a in self.accounts if a.name == name), None)

    def cluster(self, name: str) -> ClusterRecord | None:
        return next((c for c in self.clusters if c.name == name), None)

    def live_clusters(self, account: str | None = None) -> list[str]:
        return [
            c.name
            for c in self.clusters
            if c.status != "Deleted" and (account is None or c.account == account)
        ]

    @property
    def steps(self) -> list[Step]:
        return self.history + (self.nodes.steps if self.nodes else [])

    @property
    def available_version(self) -> str | None:
        newer = newest_release_after(self.version)
        return newer.version if newer else None


class GatewayInput(BaseModel):
    """Input of GatewayWorkflow (also carries the state across continue-as-new)."""

    name: DnsLabel
    pairing: PairingState
    system: bool = False
    timing: Timing = Field(default_factory=Timing)
    state: GatewayState | None = None
    secrets: SealedSecret | None = Field(default=None, description="The node cluster's secrets.")


class RegisterRequest(BaseModel):
    """What an agent presents to pair: proof of the code, its public keys, where it runs."""

    pairing_code: str = Field(default="", description="Never sent (old agents sent it).")
    pairing_proof: str = Field(
        default="", description="scrypt of the code with the gateway's salt (single use)."
    )
    public_key: str
    key_id: str
    signing_key: str = Field(default="", description="Ed25519 public key, base64.")
    version: str = Field(default="", description="The kubegate release the agent runs.")
    host: str = ""
    installer_vm: str | None = None
    installer_address: str | None = None


class ClusterRequest(BaseModel):
    """A cluster deploy request sent to its gateway."""

    spec: ClusterSpec
    readiness: Literal["guest", "kubernetes"] = "guest"
    timing: Timing = Field(default_factory=Timing)


class ClusterAdmission(BaseModel):
    """The gateway's answer to a cluster request."""

    cluster: str
    workflow_id: str
    queued: bool


class ClusterChanged(BaseModel):
    """A cluster tells its gateway its new status (signal)."""

    name: str
    account: str
    status: str


class ResizeRequest(BaseModel):
    size: Literal[1, 3]


class UpgradeRequest(BaseModel):
    version: str | None = Field(default=None, description="Default: the newest release.")


class ClusterCheckRequest(BaseModel):
    """Preflight a cluster's placement with its cloud account, creating nothing
    (`cluster deploy --dry-run`)."""

    spec: ClusterSpec
    workflow_id: str = Field(description="Id of the preflight workflow the gateway starts.")


def cluster_placements(spec: ClusterSpec, template: str) -> list[Placement]:
    """Every distinct placement domain of a cluster, as the preflight checks it."""
    return layout_placements(spec.layout(), template)


def layout_placements(layout: NodeLayout, template: str) -> list[Placement]:
    """Every distinct placement domain of a node set, as the preflight checks it."""
    return [
        Placement(
            datacenter=layout.placement.datacenter,
            compute_cluster=names[0],
            resource_pool=names[1],
            datastore=names[2],
            network=names[3],
            folder=layout.placement.folder,
            template=template,
        )
        for names in distinct_domains(layout)
    ]


def cluster_template(spec: ClusterSpec, account: CloudAccount) -> str:
    """The VM template a cluster clones: its os pack's `values.template`, else the account's."""
    os_pack = spec.effective_profile().pack("os")
    template = (os_pack.values.get("template") if os_pack else None) or (
        account.placement.template if account.placement else None
    )
    if not isinstance(template, str) or not template.strip("/"):
        raise ValueError(
            "profile os pack values.template: name the VM template to clone (or set "
            "placement.template in the cloud account)"
        )
    return template.strip("/")


def nodes_config_problem(config: GatewayConfig) -> str | None:
    """What a gateway that runs its own nodes still needs in its config, if anything."""
    if config.ip_allocation == "static" and config.ip_pool is None:
        return "ip_pool: required with static IP allocation"
    if config.ip_allocation == "dhcp" and config.vip is None:
        return "vip: required with DHCP (the gateway's load-balancer address, even for one node)"
    return None


class ResetRequest(BaseModel):
    """Reset a stuck or failed gateway; a new pairing when its installer never registered."""

    pairing: PairingState | None = None


class ApproveRequest(BaseModel):
    """The operator approves the agent whose fingerprint they read on its console."""

    fingerprint: str = Field(min_length=8, max_length=200)


class AccountCheckRequest(BaseModel):
    """Check a cloud account's credentials and placement on the agent, without keeping it."""

    name: DnsLabel
    credentials: VCenterCredentials
    placement: Placement | None = None
    workflow_id: str = Field(description="Id of the preflight workflow the gateway starts.")


class RekeyRequest(BaseModel):
    """The agent's new keys and everything the gateway keeps sealed, sealed again to them;
    signed by the agent's current key (only its holder can re-key it)."""

    public_key: str
    key_id: str
    signing_key: str
    accounts: dict[str, SealedSecret] = Field(
        default_factory=dict, description="Each account's password, sealed to the new key."
    )
    config_password: SealedSecret | None = Field(
        default=None, description="The configuration's password, sealed to the new key."
    )
    signature: str = Field(description="By the current signing key over `statement()`.")

    def statement(self, gateway: str) -> bytes:
        """What the current key signs: the gateway, the new keys, every re-sealed secret."""
        parts = [
            "kubegate-rekey-v1",
            gateway,
            self.public_key,
            self.signing_key,
            *(f"{name}={seal.digest}" for name, seal in sorted(self.accounts.items())),
            f"config={self.config_password.digest if self.config_password else ''}",
        ]
        return "\n".join(parts).encode()


class RotateRequest(BaseModel):
    """A cloud account's new credentials (sealed to the agent); checked before they are kept."""

    name: DnsLabel
    credentials: VCenterCredentials


class AccountRequest(BaseModel):
    """A cloud account to add to a gateway (password sealed to its agent)."""

    name: DnsLabel
    credentials: VCenterCredentials
    placement: Placement | None = None
