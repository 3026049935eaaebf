"""The vAPI REST client (activities/vsphere/rest.py): errors classified, a stale session
renewed once, the pinned thumbprint checked, requests counted, no secret in a message.
Against a small TLS server in a thread."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError

from activities.vsphere.faults import classify
from activities.vsphere.rest import RestError, RestPool, RestSession, _error
from activities.vsphere.session import request_meter
from activities.vsphere.tags import attach, ensure_tag
from bench.vcproxy import self_signed
from domain import errors
from domain.account import VCenterEndpoint

PASSWORD = "pw-never-shown-3f9a"


class Fake:
    """What the server answers: a route -> (status, body) table; the calls it got."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, Any]] = {}
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []
        self.sessions = 0
        self.valid: set[str] = set()


def _handler(fake: Fake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            fake.calls.append((self.command, self.path, dict(self.headers), body))
            if self.path == "/rest/com/vmware/cis/session" and self.command == "POST":
                fake.sessions += 1
                session = f"session-{fake.sessions}"
                fake.valid.add(session)
                status, answer = fake.routes.get("login", (200, {"value": session}))
            elif self.headers.get("vmware-api-session-id") not in fake.valid:
                status, answer = 401, None
            else:
                status, answer = fake.routes.get(f"{self.command} {self.path}", (404, None))
            data = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Fake, VCenterEndpoint]]:
    cert, key, thumbprint = self_signed(tmp_path)
    fake = Fake()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    endpoint = VCenterEndpoint(
        server="127.0.0.1", port=httpd.server_address[1], thumbprint=thumbprint
    )
    yield fake, endpoint
    httpd.shutdown()
    httpd.server_close()


def test_vapi_errors_are_classified_without_secrets() -> None:
    body = json.dumps(
        {
            "type": "com.vmware.vapi.std.errors.unauthorized",
            "value": {"messages": [{"default_message": "Permission denied on tag"}]},
        }
    )
    refused = classify(_error(403, body), "tag VMs")
    assert isinstance(refused, ApplicationError)
    assert refused.type == errors.MISSING_PRIVILEGE and refused.non_retryable
    assert "Permission denied on tag" in refused.message and "tag VMs" in refused.message
    login = classify(_error(401, ""), "tag VMs")
    assert login.type == errors.INVALID_CREDENTIALS and login.non_retryable
    busy = classify(_error(503, "<html>down</html>"), "tag VMs")
    assert busy.type == errors.VCENTER_BUSY and not busy.non_retryable
    gone = classify(_error(404, ""), "tag VMs")
    assert gone.type == errors.OBJECT_NOT_FOUND
    exists = _error(400, json.dumps({"type": "com.vmware.vapi.std.errors.already_exists"}))
    assert exists.already_exists


def categories(session: RestSession) -> Any:
    return session.request("GET", "/com/vmware/cis/tagging/category")


def test_a_stale_session_is_renewed_once_and_every_request_counted(
    server: tuple[Fake, VCenterEndpoint],
) -> None:
    fake, endpoint = server
    fake.routes["GET /rest/com/vmware/cis/tagging/category"] = (200, {"value": ["c1"]})
    pool = RestPool()
    with request_meter() as meter:
        found = pool.run(
            endpoint, "u", PASSWORD, lambda s: s.request("GET", "/com/vmware/cis/tagging/category")
        )
    assert found == ["c1"] and meter[0] == 2  # login + the call
    fake.valid.clear()  # vCenter forgot the session
    with request_meter() as meter:
        found = pool.run(
            endpoint, "u", PASSWORD, lambda s: s.request("GET", "/com/vmware/cis/tagging/category")
        )
    assert found == ["c1"] and meter[0] == 3  # refused, login, again
    assert fake.sessions == 2
    # basic auth only at login; the session id in its header after
    logins = [h for m, p, h, _ in fake.calls if p.endswith("/session")]
    assert all("Authorization" in h for h in logins)
    others = [h for m, p, h, _ in fake.calls if not p.endswith("/session")]
    assert all("Authorization" not in h for h in others)
    pool.close_all()
    assert fake.calls[-1][0] == "DELETE"  # logged out


def test_bad_credentials_and_a_wrong_certificate_fail_for_good(
    server: tuple[Fake, VCenterEndpoint],
) -> None:
    fake, endpoint = server
    fake.routes["login"] = (401, None)
    with pytest.raises(RestError) as refused:
        RestPool().get(endpoint, "u", PASSWORD)
    failure = classify(refused.value, "tag VMs")
    assert failure.type == errors.INVALID_CREDENTIALS
    assert PASSWORD not in failure.message
    other = endpoint.model_copy(update={"thumbprint": "AB" * 32})
    with pytest.raises(Exception) as mismatch:
        RestPool().get(other, "u", PASSWORD)
    assert classify(mismatch.value, "tag VMs").type == errors.TLS_VERIFICATION_FAILED


def test_an_existing_tag_is_found_and_a_refused_batch_attach_raises(
    server: tuple[Fake, VCenterEndpoint],
) -> None:
    fake, endpoint = server
    base = "/rest/com/vmware/cis/tagging"
    exists = {"type": "com.vmware.vapi.std.errors.already_exists"}
    fake.routes[f"POST {base}/tag"] = (400, exists)
    fake.routes[f"POST {base}/tag/id:cat-1?~action=list-tags-for-category"] = (
        200,
        {"value": ["t-1", "t-2"]},
    )
    fake.routes[f"GET {base}/tag/id:t-1"] = (200, {"value": {"name": "pool:a"}})
    fake.routes[f"GET {base}/tag/id:t-2"] = (200, {"value": {"name": "pool:b"}})
    fake.routes[f"POST {base}/tag-association/id:t-2?~action=attach-tag-to-multiple-objects"] = (
        200,
        {"value": {"success": False, "error_messages": [{"default_message": "no permission"}]}},
    )
    session = RestPool().get(endpoint, "u", PASSWORD)
    known = {"kubegate": "cat-1"}
    assert ensure_tag(session, known, "kubegate", "pool:b") == "t-2"
    assert known["kubegate/pool:a"] == "t-1"  # seen on the way: no lookup next time
    with pytest.raises(RestError) as refused:
        attach(session, "t-2", ["VirtualMachine:vm-1"])
    assert classify(refused.value, "tag VMs").type == errors.MISSING_PRIVILEGE
