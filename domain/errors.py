"""Stable error types carried by non-retryable ApplicationErrors (DESIGN §5).

Users and scripts match on these strings; never rename one.
"""

from __future__ import annotations

from pydantic import ValidationError

INVALID_CREDENTIALS = "InvalidCredentials"
MISSING_PRIVILEGE = "MissingPrivilege"
OBJECT_NOT_FOUND = "ObjectNotFound"
TLS_VERIFICATION_FAILED = "TlsVerificationFailed"
VCENTER_UNREACHABLE = "VCenterUnreachable"
VCENTER_BUSY = "VCenterBusy"
INVALID_SPEC = "InvalidSpec"
INVALID_STATE = "InvalidState"
SECRET_UNREADABLE = "SecretUnreadable"
UNSUPPORTED_VERSION = "UnsupportedVersion"
VCENTER_FAULT = "VCenterFault"

#: Error types that retrying cannot fix; passed to every RetryPolicy.
NON_RETRYABLE = [
    INVALID_CREDENTIALS,
    MISSING_PRIVILEGE,
    OBJECT_NOT_FOUND,
    TLS_VERIFICATION_FAILED,
    INVALID_SPEC,
    SECRET_UNREADABLE,
    UNSUPPORTED_VERSION,
]

OUT_OF_ADDRESSES = "OutOfAddresses"
POOL_RESTRICTED = "PoolRestricted"
POOL_NOT_FOUND = "PoolNotFound"
POOL_IN_USE = "PoolInUse"
NON_RETRYABLE += [OUT_OF_ADDRESSES, POOL_RESTRICTED, POOL_NOT_FOUND, POOL_IN_USE]

#: vm_wait_ready gave up waiting (retryable: the workflow decides how long to keep trying).
NOT_READY = "NotReady"


def field_errors(exc: ValidationError) -> list[str]:
    """A pydantic error as 'field.path: rule' lines (what the CLI and Update validators say)."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        hint = " (quote it in YAML)" if error["type"] == "string_type" else ""
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        # a rule over several fields names them itself
        lines.append(f"{where}: {message}{hint}" if where else f"{message}{hint}")
    return lines


#: a cluster request for a gateway that cannot take it, or an agent the gateway refuses
GATEWAY_NOT_READY = "GatewayNotReady"
PAIRING_REFUSED = "PairingRefused"
IN_USE = "InUse"

#: the agent's local policy forbids what a task asks (endpoint, trust, datacenter, folder)
POLICY_REFUSED = "PolicyRefused"
#: the agent works only for lifecycles its gateway authorized, with live accounts
NOT_AUTHORIZED = "NotAuthorized"
#: a result not signed by the gateway's approved agent for this request
FORGED_RESULT = "ForgedResult"
#: credentials that were current when work was scheduled were rotated meanwhile
STALE_CREDENTIALS = "StaleCredentials"
NON_RETRYABLE += [POLICY_REFUSED, NOT_AUTHORIZED, FORGED_RESULT, STALE_CREDENTIALS]

#: the agent stopped (SIGTERM) while vCenter worked: retryable, the next attempt re-attaches
AGENT_STOPPING = "AgentStopping"

#: a cluster's Kubernetes API or etcd cannot be reached or answers "try later" (retryable)
CLUSTER_UNREACHABLE = "ClusterUnreachable"
#: a cluster's Kubernetes API or etcd refuses a request for good (the agent raises it
#: non-retryable): forbidden, invalid, or an etcd removal that would lose quorum
CLUSTER_REFUSED = "ClusterRefused"
