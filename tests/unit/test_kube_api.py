"""The agent talks to a cluster's Kubernetes API and etcd (activities/kube.py): a node's
leave and the readiness wait, against local HTTPS servers that stand in for them.

Each server has a certificate from a CA made for the test and requires client certificates
chained to it (the API: the cluster CA; etcd: the etcd CA), as a kubeadm cluster does; each
implements exactly the endpoints the agent uses. What only a real cluster shows (RBAC on the
admin group, the pod garbage collector, etcd's own quorum rule) is in docs/clusters.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import http.client
import ipaddress
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import activities.kube as kube
import activities.vsphere.vm as vm
from activities.bootstrap import generate_secrets
from activities.kube import KubeActivities, client_context
from activities.secrets import secrets_binding
from activities.vsphere.session import SessionPool
from activities.vsphere.vm import VmActivities
from domain import errors
from domain.account import SealedSecret, VCenterCredentials, VCenterEndpoint
from domain.bootstrap import ClusterSecrets
from domain.certs import client_certificate, self_signed
from domain.kube import (
    NodeLeaveRequest,
    NodesStatusRequest,
    etcd_removal,
    leaving_member,
    not_ready_nodes,
    pods_to_evict,
)
from domain.requests import SINCE_0_3
from domain.sealing import AgentKey, seal
from domain.trust import canonical_json, released_request
from domain.vm import ReadinessRequest

WORKFLOW = "cluster/demo"
HOST = "127.0.0.1"
#: an address on the loopback network where nothing listens (the etcd server binds HOST)
SILENT = "127.0.0.2"


# -- certificates -----------------------------------------------------------------------------


def server_certificate(ca_cert_pem: str, ca_key_pem: str, *hosts: str) -> tuple[str, str]:
    """A serving certificate for `hosts` signed by the CA: (certificate PEM, key PEM)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    ca_key = serialization.load_pem_private_key(ca_key_pem.encode(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(h)) for h in hosts]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


# -- the servers ------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """HTTPS that requires a client certificate of `client_ca`; the handshake happens in the
    request's thread, and a refused one is counted."""

    daemon_threads = True

    def __init__(self, app: Any, context: ssl.SSLContext) -> None:
        super().__init__((HOST, 0), _Handler)
        self.app, self.context, self.rejected = app, context, 0
        #: when each client certificate presented expires (seconds since the epoch)
        self.client_expiry: list[float] = []

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.rejected += 1
            return
        try:
            _Handler(tls, client_address, self)
        except (ssl.SSLError, OSError):  # a client certificate refused after the handshake
            self.rejected += 1
        finally:
            tls.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        cert = self.connection.getpeercert()
        if cert:
            self.server.client_expiry.append(ssl.cert_time_to_seconds(str(cert["notAfter"])))
        subject = [pair for rdn in (cert or {}).get("subject", ()) for pair in rdn]
        who = (
            next((v for k, v in subject if k == "commonName"), ""),
            [v for k, v in subject if k == "organizationName"],
        )
        status, answer = self.server.app.handle(
            self.command, self.path, body, self.headers.get("Content-Type", ""), who
        )
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _serve


@contextlib.contextmanager
def serve(
    app: Any,
    ca_cert_pem: str,
    ca_key_pem: str,
    tmp: Path,
    client_ca: str | None = None,
    tls: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> Iterator[_Server]:
    """`app` over HTTPS on HOST: a serving certificate of the CA, client certificates of
    the CA (or of `client_ca`) required, TLS up to `tls`."""
    cert_pem, key_pem = server_certificate(ca_cert_pem, ca_key_pem, HOST)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "server.pem").write_text(cert_pem + key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp / "server.pem")
    context.load_verify_locations(cadata=client_ca or ca_cert_pem)
    context.verify_mode = ssl.CERT_REQUIRED
    context.maximum_version = tls
    server = _Server(app, context)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def status(code: int, reason: str, message: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    """A Kubernetes Status answer."""
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message}
    return code, {**body, "reason": reason, "code": code, **extra}


def node(name: str, ready: str = "True") -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": ready, "reason": "KubeletReady"}]},
    }


def pod(
    name: str,
    on: str,
    *,
    namespace: str = "default",
    owner: str | None = "ReplicaSet",
    mirror: bool = False,
    phase: str = "Running",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-{name}"}
    if owner:
        meta["ownerReferences"] = [{"kind": owner, "name": f"{name}-owner", "controller": True}]
    if mirror:
        meta["annotations"] = {"kubernetes.io/config.mirror": "abc"}
    return {"metadata": meta, "spec": {"nodeName": on}, "status": {"phase": phase}}


class FakeApi:
    """The Kubernetes API endpoints the agent uses, over an in-memory cluster."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodes = {n: node(n) for n in ("cp-0", "cp-1", "cp-2", "w-0")}
        self.pods = {
            p["metadata"]["uid"]: p
            for p in (
                pod("web-1", "cp-2"),
                pod("web-2", "cp-2"),
                pod("lonely", "cp-2", namespace="tools", owner=None),
                pod("kube-proxy-x", "cp-2", namespace="kube-system", owner="DaemonSet"),
                pod("kube-apiserver-cp-2", "cp-2", namespace="kube-system", mirror=True),
                pod("job-done", "cp-2", owner="Job", phase="Succeeded"),
                pod("web-3", "w-0"),
                pod("web-4", "cp-0"),
            )
        }
        #: pod -> how many more evictions its PodDisruptionBudget refuses (-1: always)
        self.budget: dict[str, int] = {"default/web-1": 2}
        self.forbidden = False
        self.readyz = True
        #: node -> how many node listings it stays unregistered / not Ready
        self.registers_after: dict[str, int] = {}
        self.ready_after: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.who: set[tuple[str, tuple[str, ...]]] = set()
        self.evictions: list[str] = []

    def handle(
        self, method: str, target: str, body: Any, content_type: str, who: tuple[str, list[str]]
    ) -> tuple[int, Any]:
        with self.lock:
            self.calls.append((method, target))
            self.who.add((who[0], tuple(who[1])))
            url = urlsplit(target)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if url.path == "/readyz":
                return (200, "ok") if self.readyz else (500, "[-]etcd failed")
            if self.forbidden:
                return status(
                    403,
                    "Forbidden",
                    f'{parts[-1]} is forbidden: User "{who[0]}" cannot {method.lower()} it',
                )
            if parts[:3] == ["api", "v1", "nodes"]:
                return self._nodes(method, parts[3:], body, content_type)
            if parts == ["api", "v1", "pods"] and method == "GET":
                (selector,) = parse_qs(url.query)["fieldSelector"]
                field, _, value = selector.partition("=")
                assert field == "spec.nodeName"
                return 200, {"kind": "PodList", "items": self._pods_on(value)}
            if len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] and method == "POST":
                assert parts[4] == "pods" and parts[6] == "eviction"
                return self._evict(parts[3], parts[5], body)
            raise AssertionError(f"unexpected request {method} {target}")

    def _nodes(self, method: str, rest: list[str], body: Any, content_type: str) -> tuple[int, Any]:
        if not rest and method == "GET":
            items = []
            for name, item in self.nodes.items():
                if self.registers_after.get(name, 0) > 0:
                    self.registers_after[name] -= 1
                    continue
                if self.ready_after.get(name, 0) > 0:
                    self.ready_after[name] -= 1
                    item = node(name, "False")
                items.append(item)
            return 200, {"kind": "NodeList", "items": items}
        (name,) = rest
        if name not in self.nodes:
            return status(404, "NotFound", f'nodes "{name}" not found')
        if method == "PATCH":
            assert content_type == "application/strategic-merge-patch+json"
            assert body == {"spec": {"unschedulable": True}}
            self.nodes[name]["spec"]["unschedulable"] = True
            return 200, self.nodes[name]
        if method == "DELETE":
            del self.nodes[name]
            return 200, {"kind": "Status", "status": "Success"}
        return 200, self.nodes[name]

    def _pods_on(self, name: str) -> list[dict[str, Any]]:
        on = [p for p in self.pods.values() if p["spec"]["nodeName"] == name]
        for item in on:  # an evicted pod terminates: listed once more, then gone
            if item["metadata"].get("deletionTimestamp"):
                item["metadata"]["_listed"] = item["metadata"].get("_listed", 0) + 1
        for item in [p for p in on if p["metadata"].get("_listed", 0) > 1]:
            del self.pods[item["metadata"]["uid"]]
        copied: list[dict[str, Any]] = json.loads(json.dumps(on))
        return copied

    def _evict(self, namespace: str, name: str, body: Any) -> tuple[int, Any]:
        assert body == {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        key = f"{namespace}/{name}"
        found = [
            p
            for p in self.pods.values()
            if (p["metadata"]["namespace"], p["metadata"]["name"]) == (namespace, name)
        ]
        if not found:
            return status(404, "NotFound", f'pods "{name}" not found')
        if self.budget.get(key, 0) != 0:
            self.budget[key] -= 1
            return status(
                429,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.",
                details={"causes": [{"reason": "DisruptionBudget"}]},
            )
        self.evictions.append(key)
        found[0]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return 201, {"kind": "Status", "status": "Success"}


class FakeEtcd:
    """etcd's v3 JSON gateway: member list and remove."""

    def __init__(self, members: dict[int, tuple[str, str]]) -> None:
        self.lock = threading.Lock()
        self.members = dict(members)
        self.refuse = False
        self.calls: list[tuple[str, Any]] = []
        self.who: set[str] = set()

    def listed(self) -> list[dict[str, Any]]:
        return [
            {
                "ID": str(member_id),
                "name": name,
                "peerURLs": [f"https://{address}:2380"],
                "clientURLs": [f"https://{address}:2379"],
            }
            for member_id, (name, address) in self.members.items()
        ]

    def handle(
        self, method: str, target: str, body: Any, content_type: str, who: tuple[str, list[str]]
    ) -> tuple[int, Any]:
        with self.lock:
            assert method == "POST"
            self.calls.append((target, body))
            self.who.add(who[0])
            header = {"cluster_id": "14841639068965178418", "member_id": "1", "revision": "9"}
            if target == "/v3/cluster/member/list":
                return 200, {"header": header, "members": self.listed()}
            assert target == "/v3/cluster/member/remove"
            member_id = int(body["ID"])
            if self.refuse:
                message = "etcdserver: re-configuration failed due to not enough started members"
                return 400, {"error": message, "code": 9, "message": message}
            if member_id not in self.members:
                message = "etcdserver: member not found"
                return 404, {"error": message, "code": 5, "message": message}
            del self.members[member_id]
            return 200, {"header": header, "members": self.listed()}


def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """The condition holds within `seconds` (a server's thread counts after the client)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- fixtures ---------------------------------------------------------------------------------

#: etcd members of the cluster: the leaving cp-2 is 8e9e05c52164694d
MEMBERS = {
    0x8E9E05C52164694D: ("cp-2", "10.0.0.7"),
    0x1A2B3C4D5E6F7081: ("cp-0", "10.0.0.5"),
    0x2B3C4D5E6F708192: ("cp-1", "10.0.0.6"),
}


@pytest.fixture(scope="module")
def secrets() -> ClusterSecrets:
    return generate_secrets()


@pytest.fixture
def api(secrets: ClusterSecrets, tmp_path: Path) -> Iterator[tuple[FakeApi, _Server]]:
    app = FakeApi()
    with serve(app, secrets.ca_cert_pem, secrets.ca_key_pem, tmp_path) as server:
        yield app, server


@pytest.fixture
def etcd(secrets: ClusterSecrets, tmp_path: Path) -> Iterator[tuple[FakeEtcd, _Server]]:
    shared = secrets.shared
    assert shared is not None
    app = FakeEtcd(MEMBERS)
    with serve(app, shared.etcd_ca_cert_pem, shared.etcd_ca_key_pem, tmp_path / "etcd") as server:
        yield app, server


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "POLL_SECONDS", 0.02)


class Agent:
    """The agent's activity, called as the worker calls it, in the cluster's own lifecycle;
    its heartbeats are kept."""

    def __init__(self, secrets: ClusterSecrets) -> None:
        self.key = AgentKey.generate()
        self.sealed: SealedSecret = seal(
            secrets.model_dump_json(),
            self.key.public_bytes,
            secrets_binding(self.key.gateway, WORKFLOW, shared=secrets.shared is not None),
        )
        self.env = ActivityEnvironment()
        self.env.info = dataclasses.replace(self.env.info, workflow_id=WORKFLOW)
        self.beats: list[Any] = []
        self.env.on_heartbeat = lambda *details: self.beats.extend(details)

    def leave(self, **fields: Any) -> Any:
        request = NodeLeaveRequest(**{"secrets": self.sealed, **fields})
        return self.env.run(KubeActivities(self.key).node_leave, request)


def leave_of(server: _Server, etcd_server: _Server | None = None, **fields: Any) -> dict[str, Any]:
    """A control-plane leave of cp-2 (10.0.0.7), asking etcd through cp-0 and cp-1."""
    port = server.server_address[1]
    base: dict[str, Any] = {
        "cluster": "demo",
        "server": f"https://{HOST}:{port}",
        "node": "cp-2",
        "control_plane": True,
        "address": "10.0.0.7",
        "etcd_endpoints": [SILENT, HOST],
        "etcd_port": etcd_server.server_address[1] if etcd_server else 2379,
        "kubernetes_version": "1.30.4",
        "drain_timeout_seconds": 30,
    }
    return {**base, **fields}


# -- a node leaves ----------------------------------------------------------------------------


def test_a_control_plane_node_leaves_and_a_second_leave_changes_nothing(
    secrets: ClusterSecrets,
    api: tuple[FakeApi, _Server],
    etcd: tuple[FakeEtcd, _Server],
) -> None:
    (cluster, server), (members, etcd_server) = api, etcd
    agent = Agent(secrets)
    result = agent.leave(**leave_of(server, etcd_server))

    assert result.cordoned and result.node_deleted and result.etcd_member_removed
    assert result.evicted == 3
    assert result.detail == (
        "cordoned, 3 pods evicted, Node deleted, etcd member 8e9e05c52164694d removed"
    )
    # evicted through the Eviction API; the budget's refusals were asked again
    assert sorted(cluster.evictions) == ["default/web-1", "default/web-2", "tools/lonely"]
    assert cluster.budget["default/web-1"] == 0
    asked = [path for method, path in cluster.calls if path.endswith("/eviction")]
    assert asked.count("/api/v1/namespaces/default/pods/web-1/eviction") == 3
    # DaemonSet, mirror and finished pods were left alone, and so were other nodes' pods
    assert not [p for p in asked if "kube-proxy" in p or "apiserver" in p or "job" in p]
    assert {p["metadata"]["name"] for p in cluster.pods.values()} == {
        "kube-proxy-x",
        "kube-apiserver-cp-2",
        "job-done",
        "web-3",
        "web-4",
    }
    assert "cp-2" not in cluster.nodes and {"cp-0", "cp-1", "w-0"} <= cluster.nodes.keys()
    # etcd through the member that answered (127.0.0.2 does not): the right member went
    assert sorted(n for n, _ in members.members.values()) == ["cp-0", "cp-1"]
    assert members.calls[-1] == ("/v3/cluster/member/remove", {"ID": str(0x8E9E05C52164694D)})
    # who the agent was: the API's admin group of 1.30, etcd's client
    assert cluster.who == {("kubegate-agent", ("kubeadm:cluster-admins",))}
    assert members.who == {"kubegate-etcd-client"}
    # with certificates minted for the call: ten minutes
    for expiry in server.client_expiry + etcd_server.client_expiry:
        assert 0 < expiry - time.time() <= 600
    # it said what it waited for
    assert any(b.get("stage") == "drain" and b.get("blocked") for b in agent.beats)

    again = agent.leave(**leave_of(server, etcd_server))
    assert (again.cordoned, again.evicted, again.node_deleted, again.etcd_member_removed) == (
        False,
        0,
        True,
        True,
    )
    assert again.detail == "Node already gone, etcd member already removed"
    assert len(members.members) == 2 and "cp-2" not in cluster.nodes


def test_a_worker_leaves_without_etcd(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server], etcd: tuple[FakeEtcd, _Server]
) -> None:
    (cluster, server), (members, _) = api, etcd
    result = Agent(secrets).leave(
        **leave_of(server, node="w-0", control_plane=False, address="10.0.0.9", etcd_endpoints=[])
    )
    assert (result.cordoned, result.evicted, result.node_deleted) == (True, 1, True)
    assert not result.etcd_member_removed
    assert result.detail == "cordoned, 1 pod evicted, Node deleted"
    assert cluster.evictions == ["default/web-3"] and "w-0" not in cluster.nodes
    assert members.calls == [] and len(members.members) == 3


def test_a_budget_that_never_yields_holds_the_drain_until_its_timeout_only(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server], etcd: tuple[FakeEtcd, _Server]
) -> None:
    (cluster, server), (_, etcd_server) = api, etcd
    cluster.budget["default/web-1"] = -1
    agent = Agent(secrets)
    result = agent.leave(**leave_of(server, etcd_server, drain_timeout_seconds=1))
    assert result.node_deleted and result.evicted == 2
    assert "1 blocked by a PodDisruptionBudget until the drain timeout (default/web-1)" in (
        result.detail
    )
    assert "Node deleted anyway" in result.detail and "cp-2" not in cluster.nodes
    blocked = [b["blocked"] for b in agent.beats if b.get("blocked")]
    assert blocked and "default/web-1: blocked by a PodDisruptionBudget" in blocked[-1]


def test_a_refusal_is_for_good_and_names_the_node(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server], etcd: tuple[FakeEtcd, _Server]
) -> None:
    (cluster, server), (members, etcd_server) = api, etcd
    cluster.forbidden = True
    with pytest.raises(ApplicationError) as refused:
        Agent(secrets).leave(**leave_of(server, etcd_server))
    assert refused.value.type == errors.CLUSTER_REFUSED and refused.value.non_retryable
    assert "node cp-2 of cluster demo" in refused.value.message
    assert "refuses to cordon: HTTP 403" in refused.value.message
    # etcd refusing the removal (quorum) is for good too; the Kubernetes part is done
    cluster.forbidden = False
    members.refuse = True
    with pytest.raises(ApplicationError) as quorum:
        Agent(secrets).leave(**leave_of(server, etcd_server))
    assert quorum.value.type == errors.CLUSTER_REFUSED and quorum.value.non_retryable
    assert "node cp-2" in quorum.value.message and "quorum" in quorum.value.message
    assert len(members.members) == 3 and "cp-2" not in cluster.nodes


def test_an_unreachable_cluster_is_tried_again(secrets: ClusterSecrets, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    fields = {
        "cluster": "demo",
        "server": f"https://{HOST}:{port}",
        "node": "w-0",
        "control_plane": False,
        "kubernetes_version": "1.30.4",
    }
    with pytest.raises(ApplicationError) as unreachable:
        Agent(secrets).leave(**fields)
    assert unreachable.value.type == errors.CLUSTER_UNREACHABLE
    assert not unreachable.value.non_retryable
    assert "node w-0 of cluster demo: cannot cordon" in unreachable.value.message


def test_etcd_unreachable_everywhere_is_tried_again(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server]
) -> None:
    _, server = api
    with pytest.raises(ApplicationError) as unreachable:
        Agent(secrets).leave(**leave_of(server, etcd_endpoints=[SILENT]))
    assert unreachable.value.type == errors.CLUSTER_UNREACHABLE
    assert not unreachable.value.non_retryable
    assert f"https://{SILENT}:2379" in unreachable.value.message


def test_a_control_plane_leave_that_cannot_reach_etcd_changes_nothing(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server]
) -> None:
    cluster, server = api
    cases: list[tuple[dict[str, Any], str]] = [
        ({"etcd_endpoints": ["10.0.0.7"]}, errors.INVALID_SPEC),  # only the leaving node
        ({}, errors.INVALID_STATE),  # a cluster made before 0.3.0: no etcd CA kept
    ]
    for fields, kind in cases:
        agent = Agent(secrets if fields else secrets.model_copy(update={"shared": None}))
        with pytest.raises(ApplicationError) as refused:
            agent.leave(**leave_of(server, **fields))
        assert refused.value.type == kind and refused.value.non_retryable
    assert cluster.calls == [] and "cp-2" in cluster.nodes


def test_servers_of_another_ca_are_not_believed_and_refuse_its_certificates(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server], tmp_path: Path
) -> None:
    cluster, server = api
    other_ca, other_key = self_signed("kubernetes", datetime.timedelta(days=1), ca=True)
    # the agent believes no server of another CA (here: another cluster's API)
    impostor = FakeApi()
    with (
        serve(impostor, other_ca, other_key, tmp_path / "other") as other,
        pytest.raises(ApplicationError) as untrusted,
    ):
        Agent(secrets).leave(**leave_of(other, control_plane=False, etcd_endpoints=[]))
    assert untrusted.value.type == errors.TLS_VERIFICATION_FAILED
    assert untrusted.value.non_retryable and impostor.calls == []
    # and the cluster's API takes no certificate of another CA
    cert_pem, key_pem, _ = client_certificate(
        other_ca, other_key, "mallory", ["system:masters"], datetime.timedelta(minutes=10)
    )
    conn = http.client.HTTPSConnection(
        HOST,
        server.server_address[1],
        timeout=5,
        context=client_context(secrets.ca_cert_pem, cert_pem, key_pem),
    )
    with pytest.raises((ssl.SSLError, OSError)):
        conn.request("GET", "/api/v1/nodes")
        conn.getresponse().read()
    conn.close()
    assert eventually(lambda: server.rejected >= 1) and cluster.calls == []
    # an API of the cluster's CA that takes no certificate of it refuses the agent for good
    # (TLS 1.2 refuses during the handshake; under 1.3 the refusal can come after it and
    # the agent may see only a reset connection: retried, as any reset)
    with (
        serve(
            FakeApi(),
            secrets.ca_cert_pem,
            secrets.ca_key_pem,
            tmp_path / "picky",
            other_ca,
            ssl.TLSVersion.TLSv1_2,
        ) as picky,
        pytest.raises(ApplicationError) as rejected,
    ):
        Agent(secrets).leave(**leave_of(picky, control_plane=False, etcd_endpoints=[]))
    assert rejected.value.type == errors.CLUSTER_REFUSED and rejected.value.non_retryable
    assert "refuses a certificate of the cluster's CA" in rejected.value.message


def test_the_client_key_never_touches_the_disk(
    secrets: ClusterSecrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[str] = []
    original = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: Any, *args: Any, **kwargs: Any) -> None:
        loaded.append(str(certfile))
        target = os.readlink(certfile)
        assert target.startswith("/memfd:kubegate-client-credential"), target
        original(self, certfile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    cert_pem, key_pem, _ = client_certificate(
        secrets.ca_cert_pem, secrets.ca_key_pem, "a", [], datetime.timedelta(minutes=10)
    )
    client_context(secrets.ca_cert_pem, cert_pem, key_pem)
    (path,) = loaded
    assert path.startswith("/proc/self/fd/")
    with contextlib.suppress(FileNotFoundError):  # closed right after: gone, or another file
        assert not os.readlink(path).startswith("/memfd:kubegate-client-credential")


def test_a_long_wait_mints_a_fresh_credential(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, server = api
    client = kube.ClusterServer(
        HOST, server.server_address[1], secrets.ca_cert_pem, secrets.ca_key_pem, "a", []
    )
    first = client._tls()
    assert client._tls() is first
    monkeypatch.setattr(kube, "REMINT_AFTER", 0.0)
    assert client._tls() is not first
    assert client.request("GET", "/api/v1/nodes").status == 200


def test_no_secret_reaches_a_log_a_heartbeat_or_an_error(
    secrets: ClusterSecrets,
    api: tuple[FakeApi, _Server],
    etcd: tuple[FakeEtcd, _Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    (cluster, server), (members, etcd_server) = api, etcd
    caplog.set_level(logging.DEBUG)
    agent = Agent(secrets)
    said: list[str] = []
    agent.leave(**leave_of(server, etcd_server))
    for change in (
        lambda: setattr(cluster, "forbidden", True),
        lambda: setattr(members, "refuse", True),
    ):
        cluster.nodes.setdefault("cp-2", node("cp-2"))
        members.members.setdefault(0x8E9E05C52164694D, ("cp-2", "10.0.0.7"))
        change()
        with pytest.raises(ApplicationError) as failed:
            agent.leave(**leave_of(server, etcd_server))
        said += [str(failed.value), failed.value.message, repr(failed.value.details)]
        cluster.forbidden = members.refuse = False
    with pytest.raises(ApplicationError) as failed:
        agent.leave(**leave_of(server, etcd_server, etcd_endpoints=[SILENT]))
    said.append(str(failed.value))
    said.append(caplog.text)
    said.append(json.dumps(agent.beats))
    text = "\n".join(said)
    shared = secrets.shared
    assert shared is not None
    for secret in (
        secrets.ca_key_pem,
        shared.etcd_ca_key_pem,
        shared.sa_key_pem,
        secrets.bootstrap_token,
        secrets.certificate_key,
    ):
        body = [line for line in secret.splitlines() if "-----" not in line]
        assert not any(line in text for line in body)
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
    assert "node cp-2 left cluster demo" in caplog.text  # the log says what happened


# -- readiness --------------------------------------------------------------------------------


def readiness(server: _Server, secrets: SealedSecret, **fields: Any) -> ReadinessRequest:
    credentials = VCenterCredentials(
        endpoint=VCenterEndpoint(server="vc.example", thumbprint="AA" * 32),
        username="kubegate@vsphere.local",
        password=secrets,
    )
    return ReadinessRequest(
        credentials=credentials,
        mode="kubernetes",
        vip=HOST,
        nodes=[("vm-1", "cp-0", "10.0.0.5"), ("vm-2", "cp-1", None), ("vm-3", "w-0", None)],
        secrets=secrets,
        kubernetes_version="1.28.9",
        **fields,
    )


def test_readiness_waits_until_the_api_answers_and_every_node_is_ready(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through vm_wait_ready, which opens the sealed secrets (the API's port is the test's)."""
    cluster, server = api
    cluster.readyz = False
    cluster.registers_after = {"cp-1": 2}
    cluster.ready_after = {"w-0": 4}
    agent = Agent(secrets)
    port = server.server_address[1]
    monkeypatch.setattr(
        vm, "wait_kubernetes_ready", lambda r, s: kube.wait_kubernetes_ready(r, s, port)
    )
    request = readiness(server, agent.sealed, timeout_seconds=30)
    timer = threading.Timer(0.1, lambda: setattr(cluster, "readyz", True))
    timer.start()
    result = asyncio.run(agent.env.run(VmActivities(agent.key, SessionPool()).wait_ready, request))
    timer.join()
    assert result.nodes == [] and result.vcenter_requests == 0
    stages = [b["stage"] for b in agent.beats]
    assert stages[0] == "kubernetes" and "nodes" in stages
    waited = [b["not_ready"] for b in agent.beats if b["stage"] == "nodes"]
    assert ["cp-1", "w-0"] in waited and ["w-0"] in waited
    assert cluster.registers_after["cp-1"] == 0 and cluster.ready_after["w-0"] == 0
    # the admin group of a release before 1.29
    assert ("kubegate-agent", ("system:masters",)) in cluster.who


def test_readiness_gives_up_naming_the_nodes_not_ready(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server]
) -> None:
    cluster, server = api
    cluster.ready_after = {"w-0": 10**6}
    agent = Agent(secrets)
    with pytest.raises(ApplicationError) as late:
        agent.env.run(
            kube.wait_kubernetes_ready,
            readiness(server, agent.sealed, timeout_seconds=0),
            secrets,
            server.server_address[1],
        )
    assert late.value.type == errors.NOT_READY and not late.value.non_retryable
    assert "1 node(s) not Ready" in late.value.message
    assert "w-0 Ready=False (KubeletReady)" in late.value.message


def test_readiness_without_secrets_is_signed_as_before() -> None:
    """The new fields are marked: kept histories of older agents still verify."""
    for name in ("secrets", "kubernetes_version"):
        assert ReadinessRequest.model_fields[name].json_schema_extra == SINCE_0_3
    key = AgentKey.generate()
    sealed = seal("pw", key.public_bytes, "x")
    request = ReadinessRequest(
        credentials=VCenterCredentials(
            endpoint=VCenterEndpoint(server="vc.example", insecure=True),
            username="u",
            password=sealed,
        ),
        mode="kubernetes",
        vip="10.0.0.100",
        nodes=[("vm-1", "cp-0", None)],
    )
    plain = json.loads(request.model_dump_json())
    del plain["secrets"], plain["kubernetes_version"]
    assert released_request([request]) == canonical_json([plain])


# -- the pure parts ---------------------------------------------------------------------------


def test_what_a_drain_evicts() -> None:
    pods = {
        "items": [
            pod("a", "n"),
            pod("static", "n", mirror=True),
            pod("ds", "n", owner="DaemonSet"),
            pod("done", "n", phase="Succeeded"),
            pod("failed", "n", phase="Failed"),
            {
                **pod("going", "n"),
                "metadata": {**pod("going", "n")["metadata"], "deletionTimestamp": "t"},
            },
        ]
    }
    assert [(p.key, p.terminating) for p in pods_to_evict(pods)] == [
        ("default/a", False),
        ("default/going", True),
    ]


def test_which_nodes_are_not_ready() -> None:
    listing = {"items": [node("a"), node("b", "Unknown"), {"metadata": {"name": "c"}}]}
    assert not_ready_nodes(listing, ["a", "b", "c", "d"]) == {
        "b": "Ready=Unknown (KubeletReady)",
        "c": "no Ready condition yet",
        "d": "not registered",
    }


def test_the_leaving_member_is_found_by_name_else_by_peer_address() -> None:
    answer = {
        "members": [
            {"ID": "10", "name": "cp-0", "peerURLs": ["https://10.0.0.5:2380"]},
            {"ID": "11", "name": "", "peerURLs": ["https://[fd00::7]:2380"]},
        ]
    }
    assert leaving_member(answer, "cp-0", None) == (10, "cp-0", ("https://10.0.0.5:2380",))
    assert leaving_member(answer, "cp-9", "fd00:0::7") is not None
    assert leaving_member(answer, "cp-9", "10.0.0.9") is None  # removed before: done
    assert leaving_member(answer, "cp-9", None) is None
    with pytest.raises(ValueError, match="last one"):
        etcd_removal({"members": answer["members"][:1]}, "cp-0", None)


def test_a_leave_request_is_bounded() -> None:
    sealed = seal("x", AgentKey.generate().public_bytes, "x")
    ok = {
        "cluster": "demo",
        "server": "https://[fd00::5]:6443",
        "secrets": sealed,
        "node": "cp-2",
        "control_plane": True,
        "address": "fd00::7",
        "etcd_endpoints": ["fd00::5"],
        "kubernetes_version": "1.30.4",
    }
    assert NodeLeaveRequest(**ok).drain_timeout_seconds == 300
    for bad in (
        {"drain_timeout_seconds": 3601},
        {"drain_timeout_seconds": -1},
        {"node": "../nodes"},
        {"address": "cp-2"},
        {"etcd_endpoints": ["https://10.0.0.5:2379"]},
        {"server": "http://10.0.0.5:6443"},
        {"surprise": 1},
    ):
        with pytest.raises(ValidationError):
            NodeLeaveRequest(**{**ok, **bad})


# -- a reconcile's look at the nodes ---------------------------------------------------------


def test_nodes_status_names_the_nodes_not_ready_and_an_api_that_does_not_answer(
    secrets: ClusterSecrets, api: tuple[FakeApi, _Server]
) -> None:
    """cluster_nodes_status: one listing; a node not Ready or not registered is named with
    why; an API that is not there, or not of the cluster's CA, is a result saying so (the
    reconcile decides on what it knows), never an error."""
    cluster, server = api
    cluster.ready_after = {"w-0": 99}
    agent = Agent(secrets)
    port = server.server_address[1]
    request = NodesStatusRequest(
        cluster="demo",
        server=f"https://{HOST}:{port}",
        secrets=agent.sealed,
        nodes=["cp-0", "w-0", "w-9"],
        kubernetes_version="1.30.4",
    )
    status = agent.env.run(KubeActivities(agent.key).nodes_status, request)
    assert status.answered
    assert set(status.not_ready) == {"w-0", "w-9"}
    assert status.not_ready["w-9"] == "not registered"
    assert cluster.calls == [("GET", "/api/v1/nodes")]

    gone = request.model_copy(update={"server": f"https://{SILENT}:{port}"})
    status = agent.env.run(KubeActivities(agent.key).nodes_status, gone)
    assert not status.answered and SILENT in status.detail

    other = Agent(generate_secrets())  # a server of another CA is not believed
    request = request.model_copy(update={"secrets": other.sealed})
    status = other.env.run(KubeActivities(other.key).nodes_status, request)
    assert not status.answered and "not of the cluster's CA" in status.detail
