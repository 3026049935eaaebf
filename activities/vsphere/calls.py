"""One way for an agent activity to run a call on vCenter with sealed credentials."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.secrets import open_password
from activities.vsphere.faults import classify
from activities.vsphere.session import SessionPool, VSphereSession
from domain.account import VCenterCredentials
from domain.sealing import AgentKey

T = TypeVar("T")


def shielded() -> AbstractContextManager[None]:
    """Within an activity: a cancellation is raised only once the block is done."""
    try:
        return activity.shield_thread_cancel_exception()
    except RuntimeError:  # not in an activity (a direct call): nothing to shield from
        return contextlib.nullcontext()


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
        # a cancellation waits for the call to return: never cut a SOAP exchange on a pooled
        # session in half (calls that wait on vCenter check for cancellation themselves)
        with shielded():
            return sessions.run(credentials.endpoint, credentials.username, password, call)
    except (ApplicationError, CancelledError):
        raise
    except Exception as exc:
        raise classify(exc, context) from None
