"""The gateway agent's trust model: its local policy, what its gateway authorizes, and the
signed results workflows verify. Pure and deterministic (workflows verify signatures here).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from domain.account import VCenterEndpoint, normalize_thumbprint, trust_mode
from domain.lifecycle import ClusterAccount
from domain.sealing import verify_signature

# -- the agent's local policy ------------------------------------------------------------------


class PolicyVCenter(BaseModel):
    """One vCenter the agent may reach, and how it trusts it."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field(min_length=1, description="vCenter host name or address (no port).")
    port: int = Field(default=443, ge=1, le=65535, description="HTTPS port.")
    trust: Literal["thumbprint", "ca", "insecure"] = Field(
        default="thumbprint",
        description="thumbprint: only a certificate with `thumbprint`; ca: a CA-verified "
        "certificate; insecure: no verification (needs allow_insecure).",
    )
    thumbprint: str | None = Field(
        default=None, description="SHA-256 (or SHA-1) thumbprint, with trust: thumbprint."
    )

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        value = value.strip().lower()
        if not value or any(c in value for c in "/ \t"):
            raise ValueError("must be a host name or address without scheme, path or port")
        return value.strip("[]")

    @field_validator("thumbprint")
    @classmethod
    def _thumbprint(cls, value: str | None) -> str | None:
        return None if value in (None, "") else normalize_thumbprint(value)

    @model_validator(mode="after")
    def _trust(self) -> PolicyVCenter:
        if self.trust == "thumbprint" and self.thumbprint is None:
            raise ValueError("thumbprint: required with trust: thumbprint")
        if self.trust != "thumbprint" and self.thumbprint is not None:
            raise ValueError(f"thumbprint: only with trust: thumbprint, not {self.trust}")
        return self


class AgentPolicy(BaseModel):
    """What the datacenter's operator allows this agent to do, whatever a task asks.

    Kept beside the agent's key (policy.yaml); written and changed on that machine only.
    """

    model_config = ConfigDict(extra="forbid")

    gateway: str = Field(min_length=1, description="The gateway this agent serves.")
    vcenters: list[PolicyVCenter] = Field(
        default_factory=list, description="The only vCenters the agent logs in to."
    )
    allow_insecure: bool = Field(
        default=False, description="Whether any vCenter may be reached without verification."
    )
    datacenters: list[str] = Field(
        default_factory=list, description="If set, the only datacenters the agent touches."
    )
    operators: list[str] = Field(
        default_factory=list,
        description="Signing keys (base64) of the operators whose signed requests for a "
        "cluster's kubeconfig this agent honours; none: no kubeconfig is minted.",
    )
    folders: list[str] = Field(
        default_factory=list,
        description="If set, the only VM folders (paths below a datacenter's VM folder, "
        "e.g. 'kubegate', and what is below them) that placements may name and the agent may "
        "create or remove folders in. Tasks naming a VM by reference are bounded by the "
        "vCenter account's role instead.",
    )

    @field_validator("datacenters", "folders")
    @classmethod
    def _paths(cls, values: list[str]) -> list[str]:
        return [v.strip().strip("/") for v in values]

    @model_validator(mode="after")
    def _insecure(self) -> AgentPolicy:
        for vc in self.vcenters:
            if vc.trust == "insecure" and not self.allow_insecure:
                raise ValueError(f"vcenters: {vc.server} is insecure but allow_insecure is false")
        return self

    def endpoint_problem(self, endpoint: VCenterEndpoint) -> str | None:
        """Why the agent must not reach this endpoint with this trust, or None."""
        server = endpoint.server.lower().strip("[]")
        mode = trust_mode(endpoint)
        for vc in self.vcenters:
            if vc.server != server or vc.port != endpoint.port:
                continue
            allowed = (
                "insecure"
                if vc.trust == "insecure"
                else (f"thumbprint:{vc.thumbprint}" if vc.trust == "thumbprint" else "ca")
            )
            if mode == "insecure" and not self.allow_insecure:
                return f"{endpoint.address}: insecure connections are not allowed by the policy"
            if mode != allowed:
                return (
                    f"{endpoint.address}: the policy trusts it as {allowed}, the task asks {mode}"
                )
            return None
        return f"{endpoint.address}: not a vCenter this agent's policy allows"

    def datacenter_problem(self, datacenter: str) -> str | None:
        name = datacenter.strip().strip("/")
        if self.datacenters and name not in self.datacenters:
            return f"datacenter {name}: not one the agent's policy allows"
        return None

    def folder_problem(self, folder: str) -> str | None:
        """`folder` is a path below the datacenter's VM folder."""
        path = folder.strip().strip("/")
        if not self.folders:
            return None
        for allowed in self.folders:
            if path == allowed or path.startswith(allowed + "/") or allowed == "":
                return None
        return f"folder {path or '/'}: not below a folder the agent's policy allows"


def policy_for(gateway: str, endpoint: VCenterEndpoint) -> AgentPolicy:
    """A policy allowing exactly one vCenter with the trust the endpoint names."""
    mode = trust_mode(endpoint)
    trust: Literal["thumbprint", "ca", "insecure"] = "ca"
    if mode.startswith("thumbprint:"):
        trust = "thumbprint"
    elif mode == "insecure":
        trust = "insecure"
    return AgentPolicy(
        gateway=gateway,
        vcenters=[
            PolicyVCenter(
                server=endpoint.server,
                port=endpoint.port,
                trust=trust,
                thumbprint=endpoint.thumbprint,
            )
        ],
        allow_insecure=endpoint.insecure,
    )


# -- what the gateway authorizes ----------------------------------------------------------------


class AccountCheck(BaseModel):
    """Credentials a lifecycle of the gateway is checking before they are kept."""

    workflow_id: str
    account: str
    digest: str


class AgentAuthorization(BaseModel):
    """What the gateway lets its agent work for (its `authorization` query)."""

    gateway: str
    status: str
    agent_key_id: str | None = Field(default=None, description="The approved agent's key id.")
    agent_signing_key: str | None = Field(
        default=None, description="The approved agent's signing key (base64)."
    )
    lifecycles: list[str] = Field(
        default_factory=list, description="Workflow ids the agent may work for."
    )
    accounts: dict[str, str] = Field(
        default_factory=dict, description="Live cloud accounts: name -> seal digest."
    )
    checking: list[AccountCheck] = Field(default_factory=list)

    def credentials_problem(self, workflow_id: str, account: str, digest: str) -> str | None:
        """Why these credentials are not live for this workflow, or None."""
        if self.accounts.get(account) == digest:
            return None
        for check in self.checking:
            if (check.workflow_id, check.account, check.digest) == (workflow_id, account, digest):
                return None
        if account in self.accounts:
            return f"cloud account {account}: these are not its current credentials (rotated)"
        return f"cloud account {account}: not a live account of gateway {self.gateway}"


# -- signed results -----------------------------------------------------------------------------


class SignedResult(BaseModel):
    """An agent activity's result with the agent's signature over it and its request."""

    body: str = Field(description="The result, as JSON.")
    key_id: str = Field(description="The signing agent's key id.")
    signature: str = Field(description="Ed25519 over the statement, base64.")
    compact_signature: str | None = Field(
        default=None,
        description="Ed25519 over the compact statement (compact_request), base64; agents from "
        "0.2.0 on add it, so a later release may add request fields an earlier agent lacks.",
    )
    attempt: int = Field(
        default=1,
        description="The activity attempt that produced it (for step histories; not signed: "
        "it decides nothing).",
    )


def canonical_json(value: Any) -> bytes:
    """The same bytes for the same value, on the agent and in the workflow."""
    return json.dumps(
        json.loads(pydantic_core.to_json(value)),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()


def compact_request(args: Sequence[Any]) -> bytes:
    """A request as the compact statement covers it: each argument without its fields at
    their defaults. A field a later release adds to a request (at its default) then does not
    change what an agent of the release before signs; a field it sets does, and that agent's
    results for it are refused. (So a request field's default never changes.)"""
    return canonical_json(
        [
            a.model_dump(mode="json", exclude_defaults=True) if isinstance(a, BaseModel) else a
            for a in args
        ]
    )


def released_request(args: Sequence[Any]) -> bytes:
    """A request as an agent of 0.1.0 signed it in full: without the fields added since
    (marked `since`) that are at their defaults, so the kept histories of such agents still
    verify once a request model gains a field."""
    return canonical_json([_without_new_defaults(a) for a in args])


def _without_new_defaults(value: Any) -> Any:
    if isinstance(value, BaseModel):
        out = {}
        for name, info in type(value).model_fields.items():
            field = getattr(value, name)
            extra = info.json_schema_extra
            if (
                isinstance(extra, dict)
                and "since" in extra
                and field == info.get_default(call_default_factory=True)
            ):
                continue
            out[name] = _without_new_defaults(field)
        return out
    if isinstance(value, list | tuple):
        return [_without_new_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_new_defaults(v) for k, v in value.items()}
    return json.loads(pydantic_core.to_json(value))


def result_statement(
    workflow_id: str,
    run_id: str,
    activity_id: str,
    activity_type: str,
    request: bytes,
    body: str,
    *,
    compact: bool = False,
) -> bytes:
    """What the agent signs: which request (workflow run, activity id chosen afresh by the
    workflow for each call, activity type, arguments) got which result. A signature cannot
    be moved to another call, request, run or result. `compact`: the statement over a
    compact_request (what SignedResult.compact_signature signs), told apart by its tag."""
    version = "kubegate-result-v3" if compact else "kubegate-result-v2"
    parts = [
        version,
        workflow_id,
        run_id,
        activity_id,
        activity_type,
        hashlib.sha256(request).hexdigest(),
        hashlib.sha256(body.encode()).hexdigest(),
    ]
    return "\n".join(parts).encode()


#: a statement, or how to make it (made only when its signature is checked)
Statement = bytes | Callable[[], bytes]


def verified_body(
    signed: SignedResult,
    signing_key_b64: str | None,
    statement: Statement,
    compact: Statement | None = None,
    released: Statement | None = None,
) -> str | None:
    """The result's JSON when the signature is the agent's over this statement (or its
    compact signature over the `compact` statement, or its full one over the `released`
    statement: the request as 0.1.0 agents knew it), else None. A statement given as a
    callable is made only if the checks before it failed (a current agent's compact
    signature spares the workflow serializing the whole request)."""
    if not signing_key_b64:
        return None
    if (
        compact is not None
        and signed.compact_signature
        and verify_signature(signing_key_b64, _made(compact), signed.compact_signature)
    ):
        return signed.body
    for full in (statement, released):
        if full is not None and verify_signature(signing_key_b64, _made(full), signed.signature):
            return signed.body
    return None


def _made(statement: Statement) -> bytes:
    return statement() if callable(statement) else statement


# -- facts the deciding workflows ask for -------------------------------------------------------


class AccountRef(BaseModel):
    """A cloud account of a gateway, asked for by one of its lifecycles."""

    gateway: str
    account: str


class AccountAnswer(BaseModel):
    """A gateway's answer to `cluster_account`: the account, or None when it has none."""

    account: ClusterAccount | None = None


class LifecycleRef(BaseModel):
    """A lifecycle (workflow id) whose fate a workflow wants to verify."""

    workflow_id: str
    wait_seconds: float = Field(default=30.0, description="How long to wait for it to close.")
    parent: str = Field(default="", description="Its parent workflow, if it must have one.")
    first_run: str = Field(default="", description="Its first run's id, if known.")


class LifecycleFact(BaseModel):
    """What Temporal says of a lifecycle: closed or not, and whether it ended Deleted."""

    workflow_id: str
    status: str = Field(description="Temporal's execution status, e.g. RUNNING, COMPLETED.")
    closed: bool
    deleted: bool = Field(default=False, description="Completed with its state Deleted.")
    replaced: bool = Field(
        default=False,
        description="The workflow under this id is not the one meant (another parent or first "
        "run): the one meant has ended, somehow.",
    )


class ReleaseIntent(BaseModel):
    """An owner's own word on which addresses it is giving back (its `releasing` query)."""

    pools: dict[str, list[str] | None] = Field(
        default_factory=dict, description="pool -> slots being released (None: all of them)."
    )


class ConfirmRelease(BaseModel):
    """Ask whether an owner really gives these addresses back."""

    owner: str
    pool: str
    slots: list[str] | None = None
    gateway: str = Field(default="", description="The pool's gateway (its clusters' parent).")


class ReleaseConfirmation(BaseModel):
    confirmed: bool
    reason: str = ""
