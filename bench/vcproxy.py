"""A counting proxy in front of the simulator: vCenter requests measured outside kubegate.

    python -m bench.vcproxy --upstream 127.0.0.1:8989 [--listen 127.0.0.1:0] [--watch-pid PID]

It terminates TLS with its own self-signed certificate (clients pin its thumbprint, printed in
the ready line) and forwards every byte to a simulator running plain HTTP (`vcsim -tls=false`).
Each request is counted by its SOAP method, the first element inside the envelope's `Body`
(`GET <path>` for other requests), together with the time until the first byte of its answer.
`GET /_vcproxy/counts` (on a connection of its own) answers the totals as JSON,
`GET /_vcproxy/log` the same with every request (sent at, method, `_this` object, seconds; for
CloneVM_Task the object is `TEMPLATE>NAME`, the template and the new VM's name).

The module also starts the pieces the deploy benchmarks share: the simulator with task delays
and this proxy in its own process (`start_simulator`, `start_proxy`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.support import Vcsim

#: the first element inside the SOAP Body (namespace prefix optional)
_BODY = re.compile(rb"<(?:[\w.-]+:)?Body\b[^>]*>\s*<(?:[\w.-]+:)?([\w.-]+)")

#: the managed object a call is made on
_THIS = re.compile(rb"<_this\b[^>]*>([^<]*)</_this>")

#: a CloneVM_Task's `name` argument (after `_this` and `folder`, before the spec)
_NAME = re.compile(rb"<(?:[\w.-]+:)?name\b[^>]*>([^<]*)</(?:[\w.-]+:)?name>")

#: short names accepted by --delays, and the vCenter methods they delay
METHODS = {
    "clone": "CloneVM_Task",
    "reconfigure": "ReconfigVM_Task",
    "customize": "CustomizeVM_Task",
    "poweron": "PowerOnVM_Task",
    "poweronmulti": "PowerOnMultiVM_Task",
    "poweroff": "PowerOffVM_Task",
    "destroy": "Destroy_Task",
}
#: delays (ms) resembling a real vCenter; clone + reconfigure + customize + power-on = 3.1 s.
#: kubegate starts the joining nodes with one PowerOnMultiVM_Task (a datacenter's method).
DEFAULT_DELAYS = (
    "clone=2000,reconfigure=300,customize=300,poweron=500,poweronmulti=500,poweroff=500,destroy=500"
)


def parse_delays(text: str) -> dict[str, int]:
    """'clone=2000,PowerOnVM_Task=500' -> {vCenter method: ms}; short names or method names."""
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, ms = item.partition("=")
        if not sep or not ms.strip().isdigit():
            raise ValueError(f"--delays: {item!r} is not NAME=MS")
        out[METHODS.get(name.strip().lower(), name.strip())] = int(ms)
    return out


# -- the proxy (server side) ----------------------------------------------------------------


@dataclass
class Tally:
    """Requests and time to first answer byte, by method."""

    counts: Counter[str] = field(default_factory=Counter)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    connections: int = 0
    #: every request: [wall clock sent, method, object, seconds to the first answer byte]
    log: list[list[Any]] = field(default_factory=list)

    def as_json(self, with_log: bool) -> bytes:
        return json.dumps(
            {
                "counts": dict(self.counts),
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "connections": self.connections,
                "log": self.log if with_log else [],
            }
        ).encode()


class Proxy:
    """TLS in, plain HTTP out; parses the request stream only, pipes answers untouched."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.tally = Tally()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tally.connections += 1
        pending: deque[tuple[str, float, list[Any]]] = deque()
        up_writer: asyncio.StreamWriter | None = None
        answers: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                verb, path, headers = _parse_head(head)
                try:
                    body = await _read_body(reader, headers)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client went away mid-request (e.g. a killed agent)
                if path.startswith("/_vcproxy/"):
                    payload = self.tally.as_json(with_log=path.startswith("/_vcproxy/log"))
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
                    )
                    await writer.drain()
                    continue
                if up_writer is None:
                    up_reader, up_writer = await asyncio.open_connection(*self.upstream)
                    answers = asyncio.create_task(self._answers(up_reader, writer, pending))
                match = _BODY.search(body) if verb == "POST" else None
                method = match.group(1).decode() if match else f"{verb} {path.split('?')[0]}"
                this = _THIS.search(body) if match else None
                obj = this.group(1).decode() if this else ""
                if method == "CloneVM_Task" and (name := _NAME.search(body)):
                    obj += ">" + name.group(1).decode()  # template>new VM's name
                entry = [time.time(), method, obj, None]
                self.tally.counts[method] += 1
                self.tally.log.append(entry)
                pending.append((method, time.perf_counter(), entry))
                up_writer.write(head + body)
                await up_writer.drain()
        finally:
            if answers is not None:
                answers.cancel()
            for w in (up_writer, writer):
                if w is not None:
                    w.close()

    async def _answers(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: deque[tuple[str, float, list[Any]]],
    ) -> None:
        """Pipe the simulator's answers back (no pipelining: a new chunk answers the oldest)."""
        try:
            while chunk := await reader.read(65536):
                if pending:
                    method, sent, entry = pending.popleft()
                    entry[3] = time.perf_counter() - sent
                    self.tally.seconds[method] += entry[3]
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    verb, path, _ = [*lines[0].split(" ", 2), "", ""][:3]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return verb, path, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The request body as sent (Content-Length or chunked, chunk framing kept)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    parts.append(line)
                parts.append(line)
                return b"".join(parts)
            parts.append(await reader.readexactly(size + 2))
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


def self_signed(directory: Path) -> tuple[Path, Path, str]:
    """A fresh self-signed certificate: (cert file, key file, SHA-256 thumbprint).

    Clients pin the thumbprint and check nothing else.
    """
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from domain.certs import self_signed

    cert_pem, key_pem = self_signed("kubegate bench proxy", timedelta(days=1), hosts=["127.0.0.1"])
    cert_path, key_path = directory / "vcproxy.crt", directory / "vcproxy.key"
    cert_path.write_text(cert_pem)
    key_path.write_text(key_pem)
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return cert_path, key_path, ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


async def serve(upstream: str, listen: str, watch_pid: int | None) -> None:
    host, _, port = upstream.rpartition(":")
    proxy = Proxy((host, int(port)))
    with tempfile.TemporaryDirectory(prefix="vcproxy-") as tmp:
        cert, key, thumbprint = self_signed(Path(tmp))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        lhost, _, lport = listen.rpartition(":")
        server = await asyncio.start_server(proxy.handle, lhost, int(lport), ssl=context)
        bound = server.sockets[0].getsockname()[1]
        print(json.dumps({"port": bound, "thumbprint_sha256": thumbprint}), flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        async with server:
            while not stop.is_set() and (watch_pid is None or _alive(watch_pid)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the harness side -----------------------------------------------------------------------


@dataclass
class Counts:
    """A snapshot of the proxy's totals; subtract two to get one phase's requests."""

    counts: Counter[str]
    seconds: dict[str, float]
    connections: int = 0

    def __sub__(self, other: Counts) -> Counts:
        counts = Counter(self.counts)
        counts.subtract(other.counts)
        return Counts(
            Counter({k: v for k, v in counts.items() if v}),
            {
                k: self.seconds.get(k, 0.0) - other.seconds.get(k, 0.0)
                for k, v in counts.items()
                if v
            },
            self.connections - other.connections,
        )

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class ProxyProcess:
    """The proxy running in its own process (so it never competes with the harness's loop)."""

    process: subprocess.Popen[str]
    port: int
    thumbprint: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _get(self, path: str) -> dict[str, Any]:
        context = ssl._create_unverified_context()  # noqa: S323 - our own proxy, read-only
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=10)
        try:
            conn.request("GET", path)
            data: dict[str, Any] = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        return data

    def snapshot(self) -> Counts:
        data = self._get("/_vcproxy/counts")
        return Counts(Counter(data["counts"]), dict(data["seconds"]), int(data["connections"]))

    def log(self, since: float) -> list[tuple[float, str, str, float | None]]:
        """Requests sent at or after `since` (wall clock): (sent, method, object, seconds)."""
        return [
            (float(t), str(m), str(o), s)
            for t, m, o, s in self._get("/_vcproxy/log")["log"]
            if t >= since
        ]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_proxy(upstream: str) -> ProxyProcess:
    """Start `python -m bench.vcproxy` for this upstream; returns once it listens."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.vcproxy",
            "--upstream",
            upstream,
            "--watch-pid",
            str(os.getpid()),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(5)
        raise RuntimeError("vcproxy did not start")
    ready = json.loads(line)
    return ProxyProcess(process, int(ready["port"]), str(ready["thumbprint_sha256"]))


def start_simulator(workdir: Path, delays: dict[str, int], extra: list[str] | None = None) -> Vcsim:
    """vcsim over plain HTTP (the proxy adds TLS): 2 clusters x 3 hosts, NTP, task delays."""
    from tests.support import Vcsim  # not in the proxy process: it needs none of pyVmomi

    task_delay = ",".join(f"{m}={ms}" for m, ms in delays.items())
    args = ["-tls=false", "-clusters", "2", "-hosts", "3", "-ntp", "0.pool.ntp.org"]
    if task_delay:
        args += ["-task-delay", task_delay]
    return Vcsim(workdir, args=args + (extra or [])).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="host:port of a plain-HTTP vcsim")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--watch-pid", type=int, default=None, help="exit when this pid is gone")
    args = parser.parse_args()
    asyncio.run(serve(args.upstream, args.listen, args.watch_pid))


if __name__ == "__main__":
    main()
