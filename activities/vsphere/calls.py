"""One way for an agent activity to run a call on vCenter with sealed credentials."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from temporalio.exceptions import ApplicationError, CancelledError

from activities.secrets import open_password
from activities.vsphere.faults import classify
from activities.vsphere.session import SessionPool, VSphereSession
from domain.account import VCenterCredentials
from domain.sealing import AgentKey

T = TypeVar("T")


def call_vcenter(
    key: AgentKey,
    sessions: SessionPool,
    credentials: VCenterCredentials,
    context: str,
    call: Callable[[VSphereSession], T],
) -> T:
    """Open the sealed password, run call with a live session, classify what vCenter raises."""
    password = open_password(key, credentials)
    try:
        return sessions.run(credentials.endpoint, credentials.username, password, call)
    except (ApplicationError, CancelledError):
        raise
    except Exception as exc:
        raise classify(exc, context) from None
