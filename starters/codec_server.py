"""`kubegate codec-server`: Temporal's codec server protocol over the payload keys.

POST .../encode and .../decode take and return `{"payloads": [...]}` (the Payloads protobuf
as JSON: metadata values and data in base64). Only the last part of the path counts. A request
naming another namespace in its X-Namespace header is refused. CORS answers only the origins
given (the Web UI's), so a page from elsewhere cannot read what it decodes. Whoever reaches the
port can decode: it listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from plumbing.codec import CodecKey, EncryptionCodec, PayloadDecryptError

MAX_BODY = 64 * 1024 * 1024


class CodecServer(ThreadingHTTPServer):
    """Serves the codec of one namespace to the given CORS origins."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        keys: Sequence[CodecKey],
        namespace: str,
        origins: Sequence[str] = (),
    ) -> None:
        super().__init__(address, _Handler)
        self.codec = EncryptionCodec(keys)
        self.namespace = namespace
        self.origins = {o.rstrip("/") for o in origins}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests); `shutdown()` stops it."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: CodecServer
    protocol_version = "HTTP/1.1"

    def do_OPTIONS(self) -> None:  # the browser's CORS preflight
        allowed = self._cors_origin() is not None
        self._reply(HTTPStatus.NO_CONTENT if allowed else HTTPStatus.FORBIDDEN, b"")

    def do_POST(self) -> None:
        action = self.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if action not in ("encode", "decode"):
            return self._error(HTTPStatus.NOT_FOUND, "POST .../encode or .../decode")
        namespace = self.headers.get("X-Namespace")
        if namespace and namespace != self.server.namespace:
            return self._error(
                HTTPStatus.FORBIDDEN,
                f"this codec server serves namespace {self.server.namespace!r}, not {namespace!r}",
            )
        if self.headers.get_content_type() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "want application/json")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
        payloads = Payloads()
        try:
            json_format.Parse(self.rfile.read(length), payloads)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            return self._error(HTTPStatus.BAD_REQUEST, f"not Payloads as JSON: {exc}")
        codec = self.server.codec
        try:
            out = (
                codec.encode_payloads(payloads.payloads)
                if action == "encode"
                else codec.decode_payloads(payloads.payloads)
            )
        except PayloadDecryptError as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        body = json_format.MessageToJson(Payloads(payloads=out)).encode()
        self._reply(HTTPStatus.OK, body, "application/json")

    def _cors_origin(self) -> str | None:
        origin = (self.headers.get("Origin") or "").rstrip("/")
        return origin if origin and origin in self.server.origins else None

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._reply(status, json.dumps({"error": message}).encode(), "application/json")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str | None = None) -> None:
        self.send_response(status)
        origin = self._cors_origin()
        if origin is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            self.send_header(
                "Access-Control-Allow-Headers", "Content-Type, X-Namespace, Authorization"
            )
            self.send_header("Access-Control-Allow-Credentials", "true")
            self.send_header("Vary", "Origin")
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are not logged: nothing of a payload reaches a log
