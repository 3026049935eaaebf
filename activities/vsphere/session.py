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
import functools
import hashlib
import hmac
import http.client
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyVim import connect as pyvim_connect
from pyVmomi import Security, vim
from pyVmomi.SoapAdapter import SoapStubAdapter
from pyVmomi.VmomiSupport import GetServiceVersions

from domain.account import VCenterEndpoint
from plumbing import metrics

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
    """CA verification by default; none when insecure, or when a pinned thumbprint replaces it
    (then PinnedHTTPSConnection checks the certificate on every connection)."""
    context = ssl.create_default_context()
    if endpoint.insecure or endpoint.thumbprint:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that accepts only a certificate with the pinned thumbprint.

    pyVmomi checks a pinned thumbprint only on a session's first connection and then leaves
    its shared context verifying nothing; this checks every connection the session opens.
    """

    def __init__(self, *args: Any, pin: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pin = pin.replace(":", "").lower()

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        algorithm = hashlib.sha1 if len(self.pin) == 40 else hashlib.sha256
        actual = algorithm(der).hexdigest()
        if not hmac.compare_digest(actual, self.pin):
            self.close()
            raise Security.ThumbprintMismatchException(self.pin, actual)


def open_session(
    endpoint: VCenterEndpoint, username: str, password: str, timeout: float = 30.0
) -> VSphereSession:
    """Connect and log in. Raises pyVmomi faults, ssl errors or OSError (see faults.classify)."""
    context = ssl_context(endpoint)
    # Version discovery is a plain GET of the version list; with a pinned thumbprint it runs
    # unverified, and every SOAP connection below checks the pin.
    find_version = getattr(pyvim_connect, "__FindSupportedVersion")
    version = find_version(
        "https",
        endpoint.server,
        endpoint.port,
        "/sdk",
        _PREFERRED_VERSIONS,
        context,
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
        httpConnectionTimeout=timeout,
    )
    if endpoint.thumbprint:
        # pyVmomi calls scheme(host=, port=, context=, timeout=) for each new connection
        stub.scheme = functools.partial(  # type: ignore[assignment]
            PinnedHTTPSConnection, pin=endpoint.thumbprint
        )
    session = VSphereSession(endpoint=endpoint, username=username, stub=stub, content=None, key="")
    session.requests = 1  # the version discovery
    _meter_add(1)
    metrics.vcenter_request(endpoint.server, "versions")
    original = stub.InvokeMethod

    def counted_invoke(mo: Any, info: Any, *args: Any, **kwargs: Any) -> Any:
        _count(session)
        method = str(getattr(info, "wsdlName", None) or "unknown")
        try:
            result = original(mo, info, *args, **kwargs)
        except Exception as exc:
            metrics.vcenter_request(endpoint.server, method, fault=type(exc).__name__)
            raise
        metrics.vcenter_request(endpoint.server, method)
        return result

    stub.InvokeMethod = counted_invoke  # type: ignore[method-assign]
    session.content = session.service_instance.RetrieveContent()
    user_session = session.content.sessionManager.Login(username, password, None)
    session.key = user_session.key
    return session


def meter_add(n: int) -> None:
    """Count n requests made outside a SOAP session (e.g. vAPI REST) in the caller's meter."""
    meter = _meter.get()
    if meter is not None:
        meter[0] += n


_meter_add = meter_add


class SessionPool:
    """Sessions shared by all activities of one worker process."""

    def __init__(self, check_after: float = 120.0, timeout: float = 30.0) -> None:
        self.check_after = check_after
        self.timeout = timeout
        self._sessions: dict[tuple[str, int, str, str], VSphereSession] = {}
        self._locks: dict[tuple[str, int, str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self.logins = 0
        #: called by close_all (e.g. the vAPI sessions' logout)
        self.on_close: list[Callable[[], None]] = []

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

    def renew(self, endpoint: VCenterEndpoint, username: str, password: str) -> VSphereSession:
        """Log in now, whatever is cached (a cached session outlives a password change);
        the new session replaces the cached one, which is logged out."""
        key = self._key(endpoint, username, password)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            session = open_session(endpoint, username, password, self.timeout)
            self.logins += 1
            old = self._sessions.get(key)
            self._sessions[key] = session
        if old is not None:
            old.logout()
        return session

    def forget(
        self, endpoint: VCenterEndpoint, username: str, password: str, failed: VSphereSession
    ) -> None:
        """Drop the cached session if it is still the one that failed (another thread may
        already have replaced it with a fresh one)."""
        key = self._key(endpoint, username, password)
        with self._guard:
            if self._sessions.get(key) is failed:
                del self._sessions[key]

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
            self.forget(endpoint, username, password, session)
            return call(self.get(endpoint, username, password))

    def close_all(self) -> None:
        """Log out of every session (worker shutdown)."""
        with self._guard:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.logout()
        for close in self.on_close:
            with contextlib.suppress(Exception):  # best effort at shutdown
                close()
