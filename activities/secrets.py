"""Opening sealed secrets on the gateway agent; the errors never quote what was sealed.

A secret opens only for the use it was sealed for: a vCenter password for its gateway,
account, server, port, user and trust mode (and only for a vCenter the agent's policy
allows); a cluster's secrets for the one lifecycle (workflow) they were generated for.
"""

from __future__ import annotations

from pydantic import ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from domain import errors
from domain.account import SealBinding, SealedSecret, VCenterCredentials
from domain.bootstrap import SECRETS_PURPOSE, SHARED_SECRETS_PURPOSE, ClusterSecrets
from domain.sealing import AgentKey, SealError


def _unreadable(message: str) -> ApplicationError:
    return ApplicationError(message, type=errors.SECRET_UNREADABLE, non_retryable=True)


def open_password(key: AgentKey, credentials: VCenterCredentials) -> str:
    """The vCenter password sealed to this agent, for exactly these credentials' use."""
    policy = key.policy
    if policy is not None:
        problem = policy().endpoint_problem(credentials.endpoint)
        if problem:
            raise ApplicationError(
                f"refused by the agent's policy: {problem}",
                type=errors.POLICY_REFUSED,
                non_retryable=True,
            )
    binding = credentials.password.binding
    account = binding.account if binding is not None else ""
    try:
        return key.open(credentials.password, credentials.binding(key.gateway, account))
    except SealError as exc:
        raise _unreadable(
            f"cannot open the sealed vCenter password: {exc}; seal it again to this "
            "gateway's current key for this account and vCenter"
        ) from None


def secrets_binding(gateway: str, lifecycle: str, shared: bool = False) -> SealBinding:
    """What a cluster's secrets are sealed for: this gateway and this lifecycle's workflow
    (and, for secrets with shared control-plane keys, their own purpose)."""
    purpose = SHARED_SECRETS_PURPOSE if shared else SECRETS_PURPOSE
    return SealBinding(purpose=purpose, gateway=gateway, cluster=lifecycle)


def current_lifecycle() -> str:
    """The workflow the running activity works for."""
    return activity.info().workflow_id or ""


def open_cluster_secrets(key: AgentKey, sealed: SealedSecret) -> ClusterSecrets:
    """A cluster's secrets sealed to this agent, for the lifecycle this activity serves."""
    try:
        lifecycle = current_lifecycle()
        shared = sealed.binding is not None and sealed.binding.purpose == SHARED_SECRETS_PURPOSE
        use = secrets_binding(key.gateway, lifecycle, shared=shared)
        # secrets sealed before bindings (older clusters) still open: only the agent seals them
        return ClusterSecrets.model_validate_json(key.open(sealed, use, legacy=True))
    except SealError as exc:
        problem = str(exc)
    except ValidationError:  # its message would quote the secrets: say less
        problem = "the opened bundle is not a cluster secrets document"
    raise _unreadable(f"cluster secrets cannot be used by this agent: {problem}")
