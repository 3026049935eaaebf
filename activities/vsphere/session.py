"""vCenter sessions: one per (server, port, user, password hash) per worker, checked and renewed.

A session is reused by every activity of the worker. It is checked (one cheap request)
only after it sat idle for `check_after` seconds; a `NotAuthenticated` fault at any time
makes `SessionPool.run` log in again and repeat the call once. `close_all` logs every
session out when the worker stops.

Every SOAP request a session makes is counted, per session and per `RequestMeter`, so
activities can report what they cost on vCenter.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyVim import connect as pyvim_connect
from pyVmomi import vim
from pyVmomi.SoapAdapter import SoapStubAdapter
from pyVmomi.VmomiSupport import GetServiceVersions

from domain.account import VCenterEndpoint

T = TypeVar("T")

#: The newest API version is negotiated per vCenter; these are what kubegate needs at least.
_PREFERRED_VERSIONS = GetServiceVersions("vim25")

_meter: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "kubegate_request_meter", default=None
)


@contextmanager
def request_meter() -> Iterator[list[int]]:
    """Count the vCenter requests made by this thread inside the block: `meter[0]`."""
    meter = [0]
    token = _meter.set(meter)
    try:
        yield meter
    finally:
        _meter.reset(token)


def _count(session: VSphereSession) -> None:
    session.requests += 1
    meter = _meter.get()
    if meter is not None:
        meter[0] += 1


@dataclass
class VSphereSession:
    """A logged-in vCenter session."""

    endpoint: VCenterEndpoint
    username: str
    stub: Any
    content: Any
    key: str
    last_used: float = field(default_factory=time.monotonic)
    requests: int = 0

    @property
    def service_instance(self) -> Any:
        return vim.ServiceInstance("ServiceInstance", self.stub)

    def alive(self) -> bool:
        """One request: is our session still known to vCenter?"""
        try:
            return self.content.sessionManager.currentSession is not None
        except vim.fault.NotAuthenticated:
            return False

    def logout(self) -> None:
        # best effort at shutdown; vCenter expires the session anyway
        with contextlib.suppress(Exception):
            self.content.sessionManager.Logout()


def ssl_context(endpoint: VCenterEndpoint) -> ssl.SSLContext:
    """Verifying context, or an unverified one only when the user asked for insecure."""
    context = ssl.create_default_context()
    if endpoint.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def open_session(
    endpoint: VCenterEndpoint, username: str, password: str, timeout: float = 30.0
) -> VSphereSession:
    """Connect and log in. Raises pyVmomi faults, ssl errors or OSError (see faults.classify)."""
    context = ssl_context(endpoint)
    # Version discovery is a plain GET; with a pinned thumbprint the certificate is checked
    # on the SOAP connection below, so the discovery itself may skip CA verification.
    discovery_context = context
    if endpoint.thumbprint:
        discovery_context = ssl._create_unverified_context()  # noqa: S323
    find_version = getattr(pyvim_connect, "__FindSupportedVersion")
    version = find_version(
        "https",
        endpoint.server,
        endpoint.port,
        "/sdk",
        _PREFERRED_VERSIONS,
        discovery_context,
        None,
        80,
        None,
    )
    if version is None:
        raise OSError(f"{endpoint.address} does not answer as a vCenter (no /sdk)")
    stub = SoapStubAdapter(
        host=endpoint.server,
        port=endpoint.port,
        path="/sdk",
        version=version,
        sslContext=context,
        thumbprint=endpoint.thumbprint,
        httpConnectionTimeout=timeout,
    )
    session = VSphereSession(endpoint=endpoint, username=username, stub=stub, content=None, key="")
    session.requests = 1  # the version discovery
    _meter_add(1)
    original = stub.InvokeMethod

    def counted_invoke(*args: Any, **kwargs: Any) -> Any:
        _count(session)
        return original(*args, **kwargs)

    stub.InvokeMethod = counted_invoke  # type: ignore[method-assign]
    session.content = session.service_instance.RetrieveContent()
    user_session = session.content.sessionManager.Login(username, password, None)
    session.key = user_session.key
    return session


def _meter_add(n: int) -> None:
    meter = _meter.get()
    if meter is not None:
        meter[0] += n


class SessionPool:
    """Sessions shared by all activities of one worker process."""

    def __init__(self, check_after: float = 120.0, timeout: float = 30.0) -> None:
        self.check_after = check_after
        self.timeout = timeout
        self._sessions: dict[tuple[str, int, str, str], VSphereSession] = {}
        self._locks: dict[tuple[str, int, str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self.logins = 0

    @staticmethod
    def _key(endpoint: VCenterEndpoint, username: str, password: str) -> tuple[str, int, str, str]:
        # the trust settings are part of the key: a session opened without verification
        # must never serve a caller who asked for it
        trust = f"{endpoint.thumbprint}|{endpoint.insecure}"
        digest = hashlib.sha256(f"{trust}|{password}".encode()).hexdigest()
        return (endpoint.server.lower(), endpoint.port, username.lower(), digest)

    def get(self, endpoint: VCenterEndpoint, username: str, password: str) -> VSphereSession:
        """A live session for these credentials, logging in if needed."""
        key = self._key(endpoint, username, password)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            session = self._sessions.get(key)
            idle = session is not None and time.monotonic() - session.last_used > self.check_after
            if idle and session is not None and not session.alive():
                session = None
            if session is None:
                session = open_session(endpoint, username, password, self.timeout)
                self.logins += 1
                self._sessions[key] = session
            session.last_used = time.monotonic()
            return session

    def forget(self, endpoint: VCenterEndpoint, username: str, password: str) -> None:
        with self._guard:
            self._sessions.pop(self._key(endpoint, username, password), None)

    def run(
        self,
        endpoint: VCenterEndpoint,
        username: str,
        password: str,
        call: Callable[[VSphereSession], T],
    ) -> T:
        """Call with a live session; on NotAuthenticated log in again and call once more."""
        session = self.get(endpoint, username, password)
        try:
            return call(session)
        except vim.fault.NotAuthenticated:
            self.forget(endpoint, username, password)
            return call(self.get(endpoint, username, password))

    def close_all(self) -> None:
        """Log out of every session (worker shutdown)."""
        with self._guard:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.logout()
