"""Opening sealed secrets on the gateway agent; the errors never quote what was sealed."""

from __future__ import annotations

from pydantic import ValidationError
from temporalio.exceptions import ApplicationError

from domain import errors
from domain.account import SealedSecret, VCenterCredentials
from domain.bootstrap import SECRETS_PURPOSE, ClusterSecrets
from domain.sealing import PASSWORD_PURPOSE, AgentKey, SealError


def _unreadable(message: str) -> ApplicationError:
    return ApplicationError(message, type=errors.SECRET_UNREADABLE, non_retryable=True)


def open_password(key: AgentKey, credentials: VCenterCredentials) -> str:
    """The vCenter password sealed to this agent."""
    try:
        return key.open(credentials.password, PASSWORD_PURPOSE)
    except SealError as exc:
        raise _unreadable(
            f"cannot open the sealed vCenter password: {exc}; seal it again to this "
            "gateway's current key"
        ) from None


def open_cluster_secrets(key: AgentKey, sealed: SealedSecret) -> ClusterSecrets:
    """A cluster's secrets sealed to this agent."""
    try:
        return ClusterSecrets.model_validate_json(key.open(sealed, SECRETS_PURPOSE))
    except SealError as exc:
        problem = str(exc)
    except ValidationError:  # its message would quote the secrets: say less
        problem = "the opened bundle is not a cluster secrets document"
    raise _unreadable(f"cluster secrets cannot be used by this agent: {problem}")
