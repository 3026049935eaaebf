"""Cloud accounts (vCenter endpoint and credentials) and placement specs."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from domain.names import DnsLabel, is_host

_HEX = re.compile(r"^[0-9a-f]+$")


class SealBinding(BaseModel):
    """Everything a sealed secret is for: the agent opens it only for exactly this use.

    Kept beside the ciphertext in clear (it names no secret) and authenticated as the
    ciphertext's associated data, so it cannot be changed without the seal failing.
    """

    model_config = ConfigDict(frozen=True)

    purpose: str = Field(description="What the secret is: a vCenter password, cluster secrets.")
    gateway: str = Field(default="", description="The gateway whose agent may open it.")
    account: str = Field(default="", description="The cloud account it belongs to.")
    cluster: str = Field(default="", description="The cluster it belongs to (cluster secrets).")
    server: str = Field(default="", description="vCenter host it may be sent to.")
    port: int = Field(default=0, description="vCenter port it may be sent to.")
    user: str = Field(default="", description="vCenter user it logs in as.")
    trust: str = Field(
        default="", description="How the vCenter is trusted: ca, thumbprint:<SHA>, insecure."
    )

    def associated_data(self, key_id: str) -> bytes:
        """The bytes AES-GCM authenticates: every field, in a fixed order, and the key id."""
        fields = [f"{name}={getattr(self, name)}" for name in sorted(type(self).model_fields)]
        return ("kubegate-seal-v2|" + "|".join(fields) + f"|key={key_id}").encode()

    def differences(self, other: SealBinding) -> list[str]:
        """Fields in which `other` (a use) differs from this binding, as 'field: a, not b'."""
        return [
            f"{name}: sealed for {getattr(self, name)!r}, used for {getattr(other, name)!r}"
            for name in type(self).model_fields
            if getattr(self, name) != getattr(other, name)
        ]


class SealedSecret(BaseModel):
    """A secret encrypted to one gateway agent's public key; only that agent can open it."""

    model_config = ConfigDict(frozen=True)

    key_id: str = Field(description="Fingerprint of the recipient's public key.")
    ephemeral_public_key: str = Field(description="Sender's one-time X25519 key, base64.")
    nonce: str = Field(description="AES-GCM nonce, base64.")
    ciphertext: str = Field(description="AES-GCM ciphertext and tag, base64.")
    binding: SealBinding | None = Field(
        default=None, description="The one use it was sealed for (absent: an old seal)."
    )

    @property
    def digest(self) -> str:
        """A short fingerprint of this seal (which password, without revealing it)."""
        return hashlib.sha256(self.ciphertext.encode()).hexdigest()[:32]


def normalize_thumbprint(value: str) -> str:
    """Upper-case colon-separated hex; accepts SHA-1 or SHA-256, with or without colons."""
    raw = value.strip().replace(":", "").lower()
    if not _HEX.match(raw) or len(raw) not in (40, 64):
        raise ValueError("must be a SHA-256 (64 hex digits) or SHA-1 (40 hex digits) thumbprint")
    return ":".join(raw[i : i + 2] for i in range(0, len(raw), 2)).upper()


class VCenterEndpoint(BaseModel):
    """How to reach and trust a vCenter. No credentials here."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field(description="vCenter host name or IP, optionally with :port.")
    port: int = Field(default=443, ge=1, le=65535, description="HTTPS port of the vCenter.")
    thumbprint: str | None = Field(
        default=None,
        description="Pinned SHA-256 (or SHA-1) thumbprint of the vCenter certificate; "
        "trusted instead of a CA chain.",
    )
    insecure: bool = Field(
        default=False, description="Skip certificate verification entirely (lab use only)."
    )

    @field_validator("server")
    @classmethod
    def _strip_server(cls, value: str) -> str:
        value = value.strip()
        for prefix in ("https://", "http://"):
            if value.lower().startswith(prefix):
                value = value[len(prefix) :]
        value = value.rstrip("/")
        if value.endswith("/sdk"):
            value = value[: -len("/sdk")]
        if not value or "/" in value or " " in value:
            raise ValueError("must be a host name or address, optionally with :port")
        return value

    @field_validator("thumbprint")
    @classmethod
    def _thumbprint(cls, value: str | None) -> str | None:
        return None if value in (None, "") else normalize_thumbprint(value)

    @model_validator(mode="after")
    def _split_port_and_check_trust(self) -> VCenterEndpoint:
        if self.server.startswith("["):  # [IPv6] or [IPv6]:port
            host, _, rest = self.server[1:].partition("]")
            self.server = host
            if rest.startswith(":") and rest[1:].isdigit():
                self.port = int(rest[1:])
        elif self.server.count(":") == 1:  # host:port (a bare IPv6 address has several)
            host, _, port = self.server.partition(":")
            if not port.isdigit():
                raise ValueError(f"server: port {port!r} is not a number")
            self.server, self.port = host, int(port)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"server: port {self.port} is not between 1 and 65535")
        if not is_host(self.server):
            raise ValueError(f"server: {self.server!r} is not a host name or IP address")
        if self.thumbprint and self.insecure:
            raise ValueError(
                "thumbprint and insecure exclude each other: pin, or skip verification"
            )
        return self

    @property
    def address(self) -> str:
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"{host}:{self.port}"


def trust_mode(endpoint: VCenterEndpoint) -> str:
    """How a vCenter's certificate is trusted: 'insecure', 'thumbprint:<SHA>' or 'ca'."""
    if endpoint.insecure:
        return "insecure"
    if endpoint.thumbprint:
        return f"thumbprint:{endpoint.thumbprint}"
    return "ca"


PASSWORD_PURPOSE = "vcenter-password"


def password_binding(
    gateway: str, account: str, endpoint: VCenterEndpoint, username: str
) -> SealBinding:
    """What a vCenter password is sealed for: this gateway, account, server, user and trust."""
    return SealBinding(
        purpose=PASSWORD_PURPOSE,
        gateway=gateway,
        account=account,
        server=endpoint.server.lower(),
        port=endpoint.port,
        user=username,
        trust=trust_mode(endpoint),
    )


class VCenterCredentials(BaseModel):
    """A vCenter endpoint with a user and that user's sealed password."""

    model_config = ConfigDict(extra="forbid")

    endpoint: VCenterEndpoint
    username: str = Field(min_length=1, description="vCenter user, e.g. kubegate@vsphere.local.")
    password: SealedSecret = Field(description="The password sealed to the gateway agent.")

    def binding(self, gateway: str, account: str) -> SealBinding:
        """The use these credentials stand for, as the agent checks it against the seal."""
        return password_binding(gateway, account, self.endpoint, self.username)


Name = Annotated[str, Field(min_length=1, max_length=255)]


class Placement(BaseModel):
    """Where workloads go in one datacenter. Paths are relative to the datacenter's folders."""

    model_config = ConfigDict(extra="forbid")

    datacenter: Name = Field(description="Datacenter name (or folder path to it).")
    compute_cluster: Name = Field(description="Compute cluster, relative to the host folder.")
    resource_pool: str = Field(
        default="Resources",
        description="Resource pool path inside the compute cluster; 'Resources' is its root pool.",
    )
    datastore: Name = Field(description="Datastore, relative to the datastore folder.")
    network: Name = Field(description="Network or port group, relative to the network folder.")
    folder: str = Field(
        default="",
        description="VM folder for the nodes, relative to the datacenter's VM folder "
        "('' is the VM folder itself).",
    )
    template: Name | None = Field(
        default=None, description="VM template to clone, relative to the VM folder."
    )

    @field_validator("datacenter", "compute_cluster", "datastore", "network", "template")
    @classmethod
    def _trim_slashes(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().strip("/")
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str) -> str:
        return value.strip().strip("/")

    @field_validator("resource_pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        value = value.strip().strip("/")
        return value or "Resources"

    def inventory_paths(self) -> dict[str, str]:
        """Full inventory paths of every object, keyed by role (as FindByInventoryPath wants)."""
        dc = self.datacenter
        pool = self.resource_pool
        if pool != "Resources" and not pool.startswith("Resources/"):
            pool = f"Resources/{pool}"
        paths = {
            "datacenter": f"/{dc}",
            "compute_cluster": f"/{dc}/host/{self.compute_cluster}",
            "resource_pool": f"/{dc}/host/{self.compute_cluster}/{pool}",
            "datastore": f"/{dc}/datastore/{self.datastore}",
            "network": f"/{dc}/network/{self.network}",
            "folder": f"/{dc}/vm/{self.folder}".rstrip("/"),
        }
        if self.template:
            paths["template"] = f"/{dc}/vm/{self.template}"
        return paths


class PasswordSource(BaseModel):
    """Where the CLI reads a password from. Exactly one source; never sent anywhere in clear."""

    model_config = ConfigDict(extra="forbid")

    password: str | None = Field(default=None, description="The password itself (avoid).")
    password_env: str | None = Field(default=None, description="Environment variable holding it.")
    password_file: str | None = Field(default=None, description="File holding it (first line).")

    @model_validator(mode="after")
    def _one_source(self) -> PasswordSource:
        given = [n for n in ("password", "password_env", "password_file") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"give one of password, password_env, password_file, not {given}")
        return self


class VCenterAccess(VCenterEndpoint, PasswordSource):
    """The vcenter block of a cloud account file."""

    username: str = Field(min_length=1, description="vCenter user, e.g. kubegate@vsphere.local.")

    def endpoint(self) -> VCenterEndpoint:
        """Where the vCenter is and how to trust it, without the user or password source."""
        return VCenterEndpoint.model_validate(
            self.model_dump(include=set(VCenterEndpoint.model_fields))
        )


class CloudAccountSpec(BaseModel):
    """A cloud account file as the user writes it (account.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: DnsLabel = Field(description="Account name, a DNS label.")
    gateway: DnsLabel = Field(description="Gateway whose agent reaches this vCenter.")
    vcenter: VCenterAccess
    placement: Placement | None = Field(
        default=None, description="Placement to check; without it only access is checked."
    )
