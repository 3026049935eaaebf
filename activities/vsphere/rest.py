"""A small client of vCenter's vAPI REST endpoints (`/rest/...`: tagging), which pyVmomi lacks.

One session per (server, port, user, password hash, trust settings) per worker, like the SOAP
sessions (session.py), with the same TLS settings: CA verification, or the pinned thumbprint
checked on every connection. A 401 on a cached session logs in again and repeats the call
once. Every HTTP request counts in the caller's `request_meter`. Errors are `RestError`s
(faults.classify turns them into ApplicationErrors); nothing here puts the password or the
session id into a message.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from activities.vsphere.session import PinnedHTTPSConnection, meter_add, ssl_context
from domain.account import VCenterEndpoint
from plumbing import metrics

T = TypeVar("T")

REST = "/rest"
SESSION_HEADER = "vmware-api-session-id"


class RestError(Exception):
    """A vAPI call that did not succeed: its HTTP status and the vAPI error type."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"HTTP {status} {kind}: {message}".strip(": "))
        self.status = status
        self.kind = kind
        self.message = message

    @property
    def already_exists(self) -> bool:
        return self.status == 400 and self.kind.endswith("already_exists")


class RestSession:
    """One logged-in vAPI session (requests on it are serialized: one connection)."""

    def __init__(self, endpoint: VCenterEndpoint, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.session_id = ""
        self.requests = 0
        self._conn: http.client.HTTPSConnection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            endpoint = self.endpoint
            context = ssl_context(endpoint)
            if endpoint.thumbprint:
                self._conn = PinnedHTTPSConnection(
                    endpoint.server,
                    endpoint.port,
                    context=context,
                    timeout=self.timeout,
                    pin=endpoint.thumbprint,
                )
            else:
                self._conn = http.client.HTTPSConnection(
                    endpoint.server, endpoint.port, context=context, timeout=self.timeout
                )
        return self._conn

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        action: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The call's `value` (None when it has none); RestError unless 2xx."""
        url = REST + path + (f"?~action={action}" if action else "")
        sent = {"Accept": "application/json", **(headers or {})}
        if self.session_id:
            sent[SESSION_HEADER] = self.session_id
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            sent["Content-Type"] = "application/json"
        counted = _counted_as(method, path, action)
        with self._lock:
            self.requests += 1
            meter_add(1)
            try:
                status, text = self._exchange(method, url, data, sent)
            except Exception as exc:
                metrics.vcenter_request(self.endpoint.server, counted, fault=type(exc).__name__)
                raise
        if not 200 <= status < 300:
            error = _error(status, text)
            metrics.vcenter_request(self.endpoint.server, counted, fault=error.kind)
            raise error
        metrics.vcenter_request(self.endpoint.server, counted)
        if not text.strip():
            return None
        try:
            answer = json.loads(text)
        except ValueError:
            raise RestError(status, "invalid_response", "the answer is not JSON") from None
        return answer.get("value") if isinstance(answer, dict) else answer

    def _exchange(
        self, method: str, url: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, str]:
        for again in (True, False):  # a kept-alive connection the server closed: once more
            conn = self._connection()
            try:
                conn.request(method, url, body=data, headers=headers)
                response = conn.getresponse()
                text = response.read().decode(errors="replace")
                if response.getheader("Connection", "").lower() == "close":
                    self.close_connection()
                return response.status, text
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close_connection()
                if not again:
                    raise
            except BaseException:
                self.close_connection()
                raise
        raise AssertionError("unreachable")

    def login(self, username: str, password: str) -> None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        value = self.request(
            "POST",
            "/com/vmware/cis/session",
            headers={"Authorization": f"Basic {token}", "vmware-use-header-authn": "true"},
        )
        if not isinstance(value, str) or not value:
            raise RestError(200, "invalid_response", "no session id in the login answer")
        self.session_id = value

    def logout(self) -> None:
        try:
            if self.session_id:
                self.request("DELETE", "/com/vmware/cis/session")
        except Exception:  # noqa: S110 - best effort at shutdown; vCenter expires it anyway
            pass
        self.session_id = ""
        self.close_connection()

    def close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def _counted_as(method: str, path: str, action: str | None) -> str:
    """The method label of a vAPI request: verb and path with the ids left out (bounded)."""
    template = "/".join("{id}" if part.startswith("id:") else part for part in path.split("/"))
    return f"{method} {template}" + (f" {action}" if action else "")


def _error(status: int, text: str) -> RestError:
    """The vAPI error of an answer: {"type": "com.vmware.vapi.std.errors.x", "value":
    {"messages": [{"default_message": ...}]}} (or any other body)."""
    kind, message = "", ""
    try:
        body = json.loads(text) if text.strip() else {}
    except ValueError:
        body = {}
    if isinstance(body, dict):
        kind = str(body.get("type") or "").rsplit(".", 1)[-1]
        value = body.get("value")
        messages = value.get("messages") if isinstance(value, dict) else None
        for m in messages or []:
            if isinstance(m, dict) and m.get("default_message"):
                message = str(m["default_message"])[:200]
                break
            if isinstance(m, str) and m:
                message = m[:200]
                break
    if not kind:
        kind = {
            401: "unauthenticated",
            403: "unauthorized",
            404: "not_found",
            503: "service_unavailable",
        }.get(status, "error")
    return RestError(status, kind, message)


class RestPool:
    """vAPI sessions shared by the activities of one worker; tag and category ids it found
    (per vCenter: ids are global there)."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._sessions: dict[tuple[str, int, str, str], RestSession] = {}
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, int, str, str], threading.Lock] = {}
        #: (server, port) -> {'category' or 'category/tag': id}
        self.ids: dict[tuple[str, int], dict[str, str]] = {}
        self.logins = 0

    @staticmethod
    def _key(endpoint: VCenterEndpoint, username: str, password: str) -> tuple[str, int, str, str]:
        trust = f"{endpoint.thumbprint}|{endpoint.insecure}"
        digest = hashlib.sha256(f"{trust}|{password}".encode()).hexdigest()
        return (endpoint.server.lower(), endpoint.port, username.lower(), digest)

    def known(self, endpoint: VCenterEndpoint) -> dict[str, str]:
        """The ids found on this vCenter (callers update it)."""
        with self._guard:
            return self.ids.setdefault((endpoint.server.lower(), endpoint.port), {})

    def get(self, endpoint: VCenterEndpoint, username: str, password: str) -> RestSession:
        key = self._key(endpoint, username, password)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            session = self._sessions.get(key)
            if session is None:
                session = RestSession(endpoint, self.timeout)
                session.login(username, password)
                self.logins += 1
                self._sessions[key] = session
            return session

    def run(
        self,
        endpoint: VCenterEndpoint,
        username: str,
        password: str,
        call: Callable[[RestSession], T],
    ) -> T:
        """Call with a logged-in session; on a 401 log in again and call once more."""
        session = self.get(endpoint, username, password)
        try:
            return call(session)
        except RestError as exc:
            if exc.status != 401:
                raise
            key = self._key(endpoint, username, password)
            with self._guard:
                if self._sessions.get(key) is session:
                    del self._sessions[key]
            session.close_connection()
            return call(self.get(endpoint, username, password))

    def close_all(self) -> None:
        """Log out of every session (worker shutdown)."""
        with self._guard:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.logout()
