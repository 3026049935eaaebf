"""The one table that maps vSphere faults and connection errors to ApplicationErrors.

Every vSphere activity lets `classify` turn an exception into an `ApplicationError` whose
`type` is stable (domain.errors) and whose message tells the user what to fix. Messages
never include credentials: they are built from the table, the fault's own message and
the context string the caller gives (object names only).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from http.client import HTTPException

from pyVmomi import Security, vim, vmodl
from temporalio.exceptions import ApplicationError

from activities.vsphere.rest import RestError
from domain import errors


@dataclass(frozen=True)
class FaultRule:
    type: str
    retryable: bool
    hint: str


#: vSphere fault class name -> rule. Looked up along the fault's class hierarchy.
FAULT_TABLE: dict[str, FaultRule] = {
    "InvalidLogin": FaultRule(
        errors.INVALID_CREDENTIALS, False, "check the vCenter user name and password"
    ),
    "NoPermission": FaultRule(
        errors.MISSING_PRIVILEGE,
        False,
        "grant the user the privileges listed in docs/vsphere-errors.md on this object",
    ),
    "NotAuthenticated": FaultRule(
        errors.VCENTER_BUSY, True, "the vCenter session expired; kubegate logs in again"
    ),
    "ManagedObjectNotFound": FaultRule(
        errors.OBJECT_NOT_FOUND, False, "the object was removed from vCenter"
    ),
    "NotFound": FaultRule(errors.OBJECT_NOT_FOUND, False, "check the name or path in the spec"),
    "InvalidName": FaultRule(errors.INVALID_SPEC, False, "use a name vSphere accepts"),
    "DuplicateName": FaultRule(
        errors.INVALID_SPEC, False, "an object of that name already exists and is not ours"
    ),
    "InvalidArgument": FaultRule(errors.INVALID_SPEC, False, "the request was malformed"),
    "InvalidRequest": FaultRule(errors.INVALID_SPEC, False, "the request was malformed"),
    "NotSupported": FaultRule(
        errors.UNSUPPORTED_VERSION, False, "this vCenter does not support the operation"
    ),
    "InvalidState": FaultRule(errors.INVALID_STATE, True, "the object is busy; retrying"),
    "TaskInProgress": FaultRule(errors.INVALID_STATE, True, "another task holds the object"),
    "InsufficientResourcesFault": FaultRule(
        errors.VCENTER_BUSY, True, "not enough CPU, memory or slots; retrying"
    ),
    "HostCommunication": FaultRule(
        errors.VCENTER_BUSY, True, "vCenter cannot reach the host; retrying"
    ),
    "RequestCanceled": FaultRule(errors.VCENTER_BUSY, True, "vCenter canceled the request"),
    "SystemError": FaultRule(errors.VCENTER_BUSY, True, "vCenter reported an internal error"),
    "FileFault": FaultRule(errors.VCENTER_FAULT, True, "a datastore file operation failed"),
}


def classify(exc: BaseException, context: str) -> ApplicationError:
    """Turn any exception from talking to vCenter into a classified ApplicationError."""
    if isinstance(exc, ApplicationError):
        return exc
    if isinstance(exc, RestError):
        return _classify_rest(exc, context)
    if isinstance(exc, Security.ThumbprintMismatchException | ssl.SSLError):
        return ApplicationError(
            f"{context}: TLS verification failed ({_ssl_reason(exc)}); pin the vCenter "
            "certificate's SHA-256 thumbprint or install its CA",
            type=errors.TLS_VERIFICATION_FAILED,
            non_retryable=True,
        )
    if isinstance(exc, ConnectionRefusedError | socket.gaierror | TimeoutError):
        return ApplicationError(
            f"{context}: vCenter unreachable ({_os_reason(exc)}); check the address and "
            "that the gateway can reach it on port 443",
            type=errors.VCENTER_UNREACHABLE,
        )
    if isinstance(exc, OSError | HTTPException):
        return ApplicationError(
            f"{context}: connection to vCenter failed ({_os_reason(exc)})",
            type=errors.VCENTER_UNREACHABLE,
        )
    if isinstance(exc, vmodl.MethodFault):
        rule = _rule_for(type(exc))
        fault = type(exc).__name__
        text = _fault_text(exc)
        if rule is None:
            return ApplicationError(
                f"{context}: vCenter fault {fault}: {text}", type=errors.VCENTER_FAULT
            )
        return ApplicationError(
            f"{context}: {fault}: {text} ({rule.hint})",
            type=rule.type,
            non_retryable=not rule.retryable,
        )
    return ApplicationError(
        f"{context}: unexpected {type(exc).__name__}: {exc}", type=errors.VCENTER_FAULT
    )


def _classify_rest(exc: RestError, context: str) -> ApplicationError:
    """A vAPI REST error (tagging): by HTTP status and vAPI error type."""
    text = f"{exc.kind}" + (f": {exc.message}" if exc.message else "")
    if exc.status == 401:
        kind, retry, hint = errors.INVALID_CREDENTIALS, False, "check the user name and password"
    elif exc.status == 403:
        kind, retry, hint = (
            errors.MISSING_PRIVILEGE,
            False,
            "grant the tagging privileges listed in docs/vsphere-errors.md",
        )
    elif exc.status == 404:
        kind, retry, hint = errors.OBJECT_NOT_FOUND, False, "the object is not in vCenter"
    elif exc.status == 400:
        kind, retry, hint = errors.INVALID_SPEC, False, "vCenter refused the request"
    elif exc.status in (429, 500, 502, 503, 504):
        kind, retry, hint = errors.VCENTER_BUSY, True, "retrying"
    else:
        kind, retry, hint = errors.VCENTER_FAULT, True, "unexpected answer"
    return ApplicationError(
        f"{context}: vAPI HTTP {exc.status} {text} ({hint})", type=kind, non_retryable=not retry
    )


def _rule_for(fault_type: type) -> FaultRule | None:
    for klass in fault_type.__mro__:
        rule = FAULT_TABLE.get(klass.__name__.rsplit(".", 1)[-1])
        if rule:
            return rule
    return None


def _fault_text(exc: vmodl.MethodFault) -> str:
    msg = getattr(exc, "msg", "") or ""
    if not msg and getattr(exc, "faultMessage", None):
        msg = "; ".join(m.message for m in exc.faultMessage if m.message)
    if isinstance(exc, vim.fault.NoPermission) and exc.privilegeId:
        msg = f"{msg} (privilege {exc.privilegeId})".strip()
    return msg or "no details"


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, Security.ThumbprintMismatchException):
        return "the certificate's thumbprint is not the pinned one"
    return getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "name does not resolve"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or type(exc).__name__
