"""Kubeconfigs for a cluster's users: what is asked, what the agent mints, what is recorded.

The client certificate is minted on the gateway agent from the cluster's CA and sealed, with
its key, to a key the requester generated for this one request: a history holds only
ciphertext and the record of the issue (who, when, until when, which certificate).
"""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import datetime
from typing import Any

import yaml
from pydantic import BaseModel, Field

from domain.account import SealedSecret
from domain.requests import AgentRequest

#: shortest and longest lifetime of a kubeconfig's certificate
MIN_TTL_SECONDS = 10 * 60
MAX_TTL_SECONDS = 7 * 24 * 3600
#: issues a cluster's state keeps (the newest)
ISSUES_KEPT = 50
#: a user name as it goes into the certificate's subject (CN) and the kubeconfig
USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
#: the API server's port on the VIP (kubeadm's default)
API_PORT = 6443


class KubeconfigRequest(BaseModel):
    """Ask a cluster for a kubeconfig (Update `kubeconfig`)."""

    user: str = Field(pattern=rf"^{USER.pattern}$", description="Name in the certificate (CN).")
    ttl_seconds: int = Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)
    recipient_key: str = Field(
        pattern=r"^[A-Za-z0-9+/]{43}=$",
        description="X25519 public key (base64) the requester made for this request; the "
        "kubeconfig is sealed to it.",
    )
    request_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="Names this request.")
    operator_key: str = Field(
        pattern=r"^[A-Za-z0-9+/]{43}=$",
        description="The requesting operator's signing key (Ed25519, base64); the agent "
        "mints only for operators its policy lists.",
    )
    signature: str = Field(description="The operator's signature over kubeconfig_statement.")


class KubeconfigIssue(BaseModel):
    """The record of one kubeconfig issued (kept in the cluster's state; no key material)."""

    request_id: str
    user: str
    groups: list[str]
    serial: str = Field(description="The certificate's serial number (hex).")
    fingerprint: str = Field(description="SHA-256 of the certificate (hex).")
    issued_at: datetime
    expires_at: datetime


class MintKubeconfig(AgentRequest):
    """Mint a kubeconfig from the cluster's CA and seal it to the requester's key. The agent
    holds it to the same bounds as the request (it does not take a workflow's word for them)
    and picks the group itself."""

    cluster: str
    server: str = Field(
        pattern=r"^https://[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$", description="The API server's URL."
    )
    secrets: SealedSecret = Field(description="The cluster's secrets, sealed to the agent.")
    user: str = Field(pattern=rf"^{USER.pattern}$")
    kubernetes_version: str = Field(description="Picks kubeadm's admin group (admin_groups).")
    ttl_seconds: int = Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)
    recipient_key: str = Field(pattern=r"^[A-Za-z0-9+/]{43}=$")
    request_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    operator_key: str = Field(pattern=r"^[A-Za-z0-9+/]{43}=$")
    signature: str


class KubeconfigResult(BaseModel):
    """A kubeconfig for its requester only: the record and the sealed file, signed by the
    agent (the requester checks it: the file reaches them through workflows and workers)."""

    issue: KubeconfigIssue
    sealed: SealedSecret = Field(description="The kubeconfig file, sealed to the requester.")
    signature: str = Field(description="The agent's signature over issued_statement().")


def issued_statement(
    gateway: str, cluster: str, recipient_key: str, issue: KubeconfigIssue, sealed: SealedSecret
) -> bytes:
    """What the agent signs when it hands out a kubeconfig: which gateway's agent, for which
    cluster, to which key, the whole record of the issue (request, user, groups, certificate,
    times) and exactly which ciphertext."""
    record = hashlib.sha256(issue.model_dump_json().encode()).hexdigest()
    ciphertext = hashlib.sha256(
        "\n".join([sealed.ephemeral_public_key, sealed.nonce, sealed.ciphertext]).encode()
    ).hexdigest()
    parts = ["kubegate-kubeconfig-issued-v1", gateway, cluster, recipient_key, record, ciphertext]
    return "\n".join(parts).encode()


def kubeconfig_statement(
    cluster: str, user: str, ttl_seconds: int, recipient_key: str, request_id: str
) -> bytes:
    """What an operator signs to ask for a kubeconfig: which cluster, for whom, how long,
    sealed to which key, which request. The agent checks it against its policy's operators,
    so no one who merely reaches Temporal can have one minted."""
    parts = ["kubegate-kubeconfig-v1", cluster, user, str(ttl_seconds), recipient_key, request_id]
    return "\n".join(parts).encode()


def kubeconfig_binding(cluster: str, request_id: str) -> str:
    """The one use a kubeconfig is sealed for."""
    return f"kubeconfig:{cluster}:{request_id}"


def admin_groups(kubernetes_version: str) -> list[str]:
    """The group that makes a certificate cluster-admin: kubeadm binds `kubeadm:cluster-admins`
    from 1.29 on (and keeps `system:masters` for its break-glass super-admin only)."""
    try:
        major, minor = (int(p) for p in kubernetes_version.lstrip("v").split(".")[:2])
    except ValueError:
        return ["kubeadm:cluster-admins"]
    return ["kubeadm:cluster-admins"] if (major, minor) >= (1, 29) else ["system:masters"]


def kubeconfig_file(
    cluster: str, server: str, ca_pem: str, user: str, cert_pem: str, key_pem: str
) -> str:
    """A kubeconfig kubectl reads as it is: the CA, the client certificate and key embedded."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    context = f"{user}@{cluster}"
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": context,
                "user": {
                    "client-certificate-data": b64(cert_pem),
                    "client-key-data": b64(key_pem),
                },
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": context}}],
        "current-context": context,
        "preferences": {},
    }
    # libyaml's emitter where PyYAML has it (the same text; the agent renders one per node)
    dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return str(yaml.dump(document, Dumper=dumper, sort_keys=False))
