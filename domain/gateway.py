"""Gateway groundwork (issue 5): pairing codes, installer properties, sizes, statuses.

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
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from domain.names import DnsLabel

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


def pairing_hash(code: str, salt: str) -> str:
    """What the gateway keeps instead of the code: SHA-256 over the salt and the code."""
    return hashlib.sha256(f"{salt}:{normalize_pairing_code(code)}".encode()).hexdigest()


def pairing_matches(code: str, salt: str, expected_hash: str) -> bool:
    """Constant-time comparison of a presented code with the kept hash."""
    return hmac.compare_digest(pairing_hash(code, salt), expected_hash)


class PairingState(BaseModel):
    """A gateway's pairing: the hash of its single-use code, when it expires, if it was used."""

    code_hash: str
    salt: str
    expires_at: datetime
    used: bool = False

    def check(self, code: str, now: datetime) -> str | None:
        """None if the code may register the gateway now, else why not (for the agent)."""
        if self.used:
            return "this pairing code was already used; create a new one (gateway reset)"
        if now >= self.expires_at:
            return "this pairing code has expired; create a new one (gateway reset)"
        if not pairing_matches(code, self.salt, self.code_hash):
            return "wrong pairing code for this gateway (check for typos)"
        return None


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
        if parts.scheme not in ("http", "https") or not parts.hostname:
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
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be a URL like http://proxy.example.com:3128")
        return value

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
