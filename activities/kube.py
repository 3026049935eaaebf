"""The gateway agent talks to a cluster's Kubernetes API and etcd: a node leaving the
cluster (`cluster_node_leave`), and the wait for the API and its nodes in readiness mode
`kubernetes` (called by `vm_wait_ready`).

A tiny HTTPS client on the standard library, mutual TLS both ways: the server must present a
certificate of the cluster's CA (the API) or its etcd CA (etcd), and the agent presents a
client certificate it mints from that CA in memory for this call only (10 minutes; minted
again while a long wait goes on). The key goes to OpenSSL through a memfd, never a file on
disk, and into no log, message or heartbeat.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.secrets import open_cluster_secrets
from domain import errors
from domain.bootstrap import ClusterSecrets
from domain.certs import client_certificate
from domain.kube import (
    NodeLeaveRequest,
    NodeLeaveResult,
    NodesStatus,
    NodesStatusRequest,
    Pod,
    etcd_removal,
    eviction,
    leave_detail,
    namespace_terminating,
    not_ready_nodes,
    pods_to_evict,
)
from domain.kubeconfig import API_PORT, admin_groups
from domain.sealing import AgentKey
from domain.vm import ReadinessRequest

#: who the agent is to the API server (O = the admin group of the cluster's release)
API_USER = "kubegate-agent"
#: who the agent is to etcd (as kubeadm's kube-apiserver-etcd-client; etcd checks the CA only)
ETCD_USER = "kubegate-etcd-client"
#: the life of a minted client certificate
CREDENTIAL_LIFE = timedelta(minutes=10)
#: a wait longer than this mints a fresh one
REMINT_AFTER = 5 * 60.0
#: one request's bound (connect, TLS, answer)
REQUEST_TIMEOUT = 10.0
#: how often a wait asks again
POLL_SECONDS = 2.0
#: the largest answer read (a node's pod list fits many times over)
MAX_ANSWER = 64 * 1024 * 1024
#: names a heartbeat lists at most
HEARTBEAT_NAMES = 10
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


class KubeActivities:
    """The activities of one gateway agent that talk to its clusters (its key opens their
    secrets, for the lifecycle the task serves only)."""

    def __init__(self, key: AgentKey) -> None:
        self.key = key

    @activity.defn(name="cluster_node_leave")
    def node_leave(self, request: NodeLeaveRequest) -> NodeLeaveResult:
        """Cordon the node, evict its pods, delete its Node and, for a control-plane node,
        remove its etcd member. Idempotent: what is gone already counts as done."""
        secrets = open_cluster_secrets(self.key, request.secrets)
        with activity.shield_thread_cancel_exception():
            result = leave_cluster(request, secrets)
        activity.logger.info(
            "node %s left cluster %s: %s", request.node, request.cluster, result.detail
        )
        return result

    @activity.defn(name="cluster_nodes_status")
    def nodes_status(self, request: NodesStatusRequest) -> NodesStatus:
        """One listing of the cluster's Nodes through its API (a server of the cluster's CA
        only): the listed nodes that are not Ready, and why. An API that does not answer is
        a result (answered False), not an error: the reconcile decides on what it knows."""
        secrets = open_cluster_secrets(self.key, request.secrets)
        api = api_server(request.server, secrets, request.kubernetes_version, timeout=10)
        try:
            answer = api.request("GET", "/api/v1/nodes")
        except Unreachable as exc:
            return NodesStatus(answered=False, detail=f"{api.url}: {exc}")
        except Untrusted as exc:
            return NodesStatus(
                answered=False,
                detail=f"{api.url}: its certificate is not of the cluster's CA ({exc})",
            )
        except Rejected as exc:
            return NodesStatus(
                answered=False, detail=f"{api.url} refuses the cluster CA's certificate ({exc})"
            )
        if answer.status != 200:
            return NodesStatus(answered=False, detail=f"/api/v1/nodes: {answer.describe()}")
        return NodesStatus(answered=True, not_ready=not_ready_nodes(answer.body, request.nodes))

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for the agent's worker."""
        return [self.node_leave, self.nodes_status]


# -- the client -------------------------------------------------------------------------------


class Unreachable(Exception):
    """No answer from the server (refused, timed out, reset): worth trying again."""


class Untrusted(Exception):
    """The server's certificate is not of the expected CA (or not for its address)."""


class Rejected(Exception):
    """The server refused the agent's certificate during the TLS handshake."""


#: TLS alerts a server sends when it does not accept the client's certificate
_REJECTING_ALERTS = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_ACCESS_DENIED",
    "ALERT_CERTIFICATE_EXPIRED",
)


@dataclass
class Answer:
    """An HTTP answer: status and JSON body ({} when there is none or it is not JSON)."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> str:
        """What the server says in one short line (a Kubernetes Status's message, the JSON
        gateway's error); never a whole body."""
        text = self.body.get("message") or self.body.get("error") or ""
        return " ".join(str(text).split())[:200]

    def describe(self) -> str:
        return f"HTTP {self.status}" + (f": {self.message}" if self.message else "")


def client_context(server_ca_pem: str, cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """TLS that trusts only `server_ca_pem` (checking the server's name or address) and
    presents the client certificate. OpenSSL reads the certificate and key from a memfd —
    no path on disk — closed as soon as they are loaded."""
    context = ssl.create_default_context(cadata=server_ca_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    fd = os.memfd_create("kubegate-client-credential", os.MFD_CLOEXEC)
    try:
        data = memoryview((cert_pem + key_pem).encode())
        while data:
            data = data[os.write(fd, data) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


class ClusterServer:
    """One HTTPS server of a cluster — its API, or one etcd member's client port — reached
    with a client certificate minted from `ca` (which must also have signed the server's)."""

    def __init__(
        self,
        host: str,
        port: int,
        ca_cert_pem: str,
        ca_key_pem: str,
        user: str,
        groups: list[str],
        *,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.host, self.port, self.timeout = host.strip("[]"), port, timeout
        self._ca = (ca_cert_pem, ca_key_pem)
        self._who = (user, list(groups))
        self._context: ssl.SSLContext | None = None
        self._minted = 0.0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def _tls(self) -> ssl.SSLContext:
        if self._context is None or time.monotonic() - self._minted > REMINT_AFTER:
            cert_pem, key_pem, _ = client_certificate(
                *self._ca, self._who[0], self._who[1], CREDENTIAL_LIFE
            )
            self._context = client_context(self._ca[0], cert_pem, key_pem)
            self._minted = time.monotonic()
        return self._context

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Answer:
        """One request on its own connection. Unreachable, Untrusted or Rejected when no
        HTTP answer came; any status otherwise."""
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout, context=self._tls()
        )
        headers = {"Accept": "application/json", "User-Agent": "kubegate-agent"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_ANSWER)
            status = response.status
        except ssl.SSLCertVerificationError as exc:
            raise Untrusted(exc.verify_message or "certificate verification failed") from None
        except ssl.SSLError as exc:
            reason = str(exc.reason or type(exc).__name__)
            if any(alert in reason for alert in _REJECTING_ALERTS):
                raise Rejected(f"TLS alert {reason}") from None
            raise Unreachable(f"TLS: {reason}") from None
        except TimeoutError:
            raise Unreachable(f"no answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(_why(exc)) from None
        finally:
            conn.close()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        return Answer(status, parsed if isinstance(parsed, dict) else {})


def api_server(
    server: str, secrets: ClusterSecrets, version: str, timeout: float = REQUEST_TIMEOUT
) -> ClusterServer:
    """The cluster's API server at `server` (a URL), asked as the agent with the admin group
    of Kubernetes `version`."""
    host, port = _host_port(server)
    return ClusterServer(
        host,
        port,
        secrets.ca_cert_pem,
        secrets.ca_key_pem,
        API_USER,
        admin_groups(version),
        timeout=timeout,
    )


def _why(exc: BaseException) -> str:
    """An OS or HTTP error in a few words (its class, and the OS's reason)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


def _try_later(status: int) -> bool:
    """Statuses that say "not now" rather than "no"."""
    return status in (408, 429) or status >= 500


# -- a node leaves ----------------------------------------------------------------------------


def leave_cluster(request: NodeLeaveRequest, secrets: ClusterSecrets) -> NodeLeaveResult:
    """cluster_node_leave's work, with the cluster's secrets opened."""
    leave = _Leave(request, secrets)
    return leave.run()


class _Leave:
    def __init__(self, request: NodeLeaveRequest, secrets: ClusterSecrets) -> None:
        self.request, self.secrets = request, secrets
        self.api = api_server(request.server, secrets, request.kubernetes_version)
        self.who = f"node {request.node} of cluster {request.cluster}"

    def run(self) -> NodeLeaveResult:
        request = self.request
        etcd_hosts = self._etcd_hosts() if request.control_plane and request.drain else []
        node_path = f"/api/v1/nodes/{quote(request.node, safe='')}"
        if request.drain:
            self._beat("cordon")
            cordon = self._api(
                "PATCH", node_path, "cordon", {"spec": {"unschedulable": True}}, STRATEGIC_MERGE
            )
        else:
            cordon = self._api("GET", node_path, "read the Node")
        node_found = cordon.status != 404
        evicted = 0
        left: list[str] = []
        blocked: list[str] = []
        deleted_now = False
        if node_found and request.drain:
            evicted, left, blocked = self._drain()
        if node_found and request.delete_node:
            self._beat("delete Node")
            deleted_now = self._api("DELETE", node_path, "delete the Node").status != 404
        member, removed_now = None, False
        if request.control_plane and request.drain:
            member, removed_now = self._remove_member(etcd_hosts)
        return NodeLeaveResult(
            cordoned=node_found and request.drain,
            evicted=evicted,
            node_deleted=request.delete_node or not node_found,
            etcd_member_removed=request.control_plane and request.drain,
            detail=leave_detail(
                node_found=node_found,
                evicted=evicted,
                left_behind=left,
                blocked=blocked,
                node_deleted_now=deleted_now,
                control_plane=request.control_plane and request.drain,
                member=member,
                member_removed_now=removed_now,
                drained=request.drain,
                deleted=request.delete_node,
            ),
        )

    # -- Kubernetes ------------------------------------------------------------------------

    def _api(
        self,
        method: str,
        path: str,
        what: str,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Answer:
        """A request whose answer is 2xx or 404 (gone); anything else raises, classified."""
        answer = self._ask(method, path, what, body, content_type)
        if answer.status < 300 or answer.status == 404:
            return answer
        raise self._refused_or_later(f"the Kubernetes API at {self.api.url}", what, answer)

    def _ask(
        self,
        method: str,
        path: str,
        what: str,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Answer:
        try:
            return self.api.request(method, path, body, content_type)
        except Unreachable as exc:
            raise ApplicationError(
                f"{self.who}: cannot {what}: the Kubernetes API at {self.api.url} cannot be "
                f"reached ({exc})",
                type=errors.CLUSTER_UNREACHABLE,
            ) from None
        except Untrusted as exc:
            raise ApplicationError(
                f"{self.who}: cannot {what}: the server at {self.api.url} does not present a "
                f"certificate of the cluster's CA ({exc})",
                type=errors.TLS_VERIFICATION_FAILED,
                non_retryable=True,
            ) from None
        except Rejected as exc:
            raise ApplicationError(
                f"{self.who}: cannot {what}: the Kubernetes API at {self.api.url} refuses a "
                f"certificate of the cluster's CA ({exc})",
                type=errors.CLUSTER_REFUSED,
                non_retryable=True,
            ) from None

    def _refused_or_later(self, server: str, what: str, answer: Answer) -> ApplicationError:
        if _try_later(answer.status):
            return ApplicationError(
                f"{self.who}: cannot {what} now: {server} answers {answer.describe()}",
                type=errors.CLUSTER_UNREACHABLE,
            )
        return ApplicationError(
            f"{self.who}: {server} refuses to {what}: {answer.describe()}",
            type=errors.CLUSTER_REFUSED,
            non_retryable=True,
        )

    def _drain(self) -> tuple[int, list[str], list[str]]:
        """Evict the node's pods (PodDisruptionBudgets respected: a 429 is asked again) and
        wait until they are gone, both within the drain timeout: (pods evicted, pods still
        there at the timeout, of which blocked by a budget)."""
        request = self.request
        deadline = time.monotonic() + request.drain_timeout_seconds
        selector = quote(f"spec.nodeName={request.node}", safe="")
        listing = f"/api/v1/pods?fieldSelector={selector}"
        evicted: set[str] = set()  # uids this call evicted
        gone: set[str] = set()
        blocked: dict[str, str] = {}  # pod -> why it may not leave yet
        while True:
            pods = [p for p in self._pods(listing) if p.uid not in gone]
            if not pods:
                return len(evicted), [], []
            for pod in pods:
                if pod.terminating or pod.uid in evicted:
                    continue
                if self._evict(pod, blocked):
                    evicted.add(pod.uid)
                elif pod.key not in blocked:
                    gone.add(pod.uid)
            left = [p.key for p in pods if p.uid not in gone]
            if not left:
                return len(evicted), [], []
            held = [k for k in left if k in blocked]
            if time.monotonic() >= deadline:
                return len(evicted), left, held
            self._beat(
                "drain",
                waiting=[k for k in left if k not in blocked][:HEARTBEAT_NAMES],
                blocked=[f"{k}: {blocked[k]}" for k in held][:HEARTBEAT_NAMES],
            )
            _pause("the drain of " + request.node)

    def _pods(self, listing: str) -> list[Pod]:
        answer = self._api("GET", listing, "list the node's pods")
        return pods_to_evict(answer.body) if answer.status == 200 else []

    def _evict(self, pod: Pod, blocked: dict[str, str]) -> bool:
        """Ask the Eviction API: True once evicted; False when the pod is gone or (recorded
        in `blocked`) may not leave yet."""
        path = (
            f"/api/v1/namespaces/{quote(pod.namespace, safe='')}/pods/"
            f"{quote(pod.name, safe='')}/eviction"
        )
        answer = self._ask("POST", path, f"evict pod {pod.key}", eviction(pod))
        if answer.status < 300:
            blocked.pop(pod.key, None)
            return True
        if answer.status == 404:
            blocked.pop(pod.key, None)
            return False
        if answer.status == 429:
            blocked[pod.key] = "blocked by a PodDisruptionBudget"
            return False
        if answer.status == 403 and namespace_terminating(answer.body):
            blocked.pop(pod.key, None)
            return True  # its namespace's deletion takes it: wait for it like an evicted one
        if _try_later(answer.status):
            blocked[pod.key] = answer.describe()
            return False
        raise self._refused_or_later(
            f"the Kubernetes API at {self.api.url}", f"evict pod {pod.key}", answer
        )

    # -- etcd ------------------------------------------------------------------------------

    def _etcd_hosts(self) -> list[str]:
        """The members etcd is asked through (never the leaving node); checked before
        anything changes, so a request that cannot finish changes nothing."""
        request = self.request
        if self.secrets.shared is None:
            raise ApplicationError(
                f"{self.who}: the cluster was made before kubegate 0.3.0 and kubegate keeps "
                "no etcd CA for it, so the node's etcd member cannot be removed by kubegate",
                type=errors.INVALID_STATE,
                non_retryable=True,
            )
        leaving = ipaddress.ip_address(request.address) if request.address else None
        hosts = [
            h
            for h in request.etcd_endpoints
            if leaving is None or ipaddress.ip_address(h) != leaving
        ]
        if not hosts:
            raise ApplicationError(
                f"{self.who}: a control-plane node leaves through another control-plane "
                "member's etcd; etcd_endpoints names none",
                type=errors.INVALID_SPEC,
                non_retryable=True,
            )
        return hosts

    def _remove_member(self, hosts: list[str]) -> tuple[str | None, bool]:
        """Remove the node's etcd member through the first member that answers: (its ID in
        hex or None when it was not a member any more, whether this call removed it)."""
        request, shared = self.request, self.secrets.shared
        assert shared is not None  # _etcd_hosts checked it
        problems: list[str] = []
        untrusted = 0
        for host in hosts:
            etcd = ClusterServer(
                host,
                request.etcd_port,
                shared.etcd_ca_cert_pem,
                shared.etcd_ca_key_pem,
                ETCD_USER,
                [],
            )
            self._beat("etcd", endpoint=etcd.url)
            try:
                listed = etcd.request("POST", "/v3/cluster/member/list", {})
                if listed.status != 200:
                    self._etcd_refusal(etcd, "list its members", listed)
                    problems.append(f"{etcd.url}: {listed.describe()}")
                    continue
                try:
                    member = etcd_removal(listed.body, request.node, request.address)
                except ValueError as exc:
                    raise ApplicationError(
                        f"{self.who}: refused: {exc}",
                        type=errors.CLUSTER_REFUSED,
                        non_retryable=True,
                    ) from None
                if member is None:
                    return None, False
                removed = etcd.request("POST", "/v3/cluster/member/remove", {"ID": str(member.id)})
                if removed.status == 200:
                    return member.hex_id, True
                if removed.status == 404 or removed.body.get("code") == 5:  # NotFound
                    return member.hex_id, False
                self._etcd_refusal(etcd, f"remove member {member.hex_id}", removed)
                problems.append(f"{etcd.url}: {removed.describe()}")
            except Unreachable as exc:
                problems.append(f"{etcd.url}: {exc}")
            except (Untrusted, Rejected) as exc:
                untrusted += 1
                problems.append(f"{etcd.url}: not the cluster's etcd ({exc})")
        if untrusted == len(hosts):
            raise ApplicationError(
                f"{self.who}: no etcd endpoint is the cluster's: " + "; ".join(problems),
                type=errors.TLS_VERIFICATION_FAILED,
                non_retryable=True,
            )
        raise ApplicationError(
            f"{self.who}: its etcd member cannot be removed now: " + "; ".join(problems),
            type=errors.CLUSTER_UNREACHABLE,
        )

    def _etcd_refusal(self, etcd: ClusterServer, what: str, answer: Answer) -> None:
        """Raise for an answer etcd gives for good (e.g. a removal that would lose quorum);
        return for one worth asking again or elsewhere."""
        code = answer.body.get("code")
        if _try_later(answer.status) or code in (4, 14):  # DeadlineExceeded, Unavailable
            return
        quorum = (
            " (etcd would lose quorum)" if "not enough started members" in answer.message else ""
        )
        raise ApplicationError(
            f"{self.who}: etcd at {etcd.url} refuses to {what}{quorum}: {answer.describe()}",
            type=errors.CLUSTER_REFUSED,
            non_retryable=True,
        )

    def _beat(self, stage: str, **details: Any) -> None:
        activity.heartbeat({"stage": stage, "node": self.request.node, **details})


def _host_port(server: str) -> tuple[str, int]:
    """Host and port of https://HOST:PORT or https://[V6]:PORT."""
    rest = server.removeprefix("https://")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def _pause(what: str) -> None:
    """Wait POLL_SECONDS, unless the agent stops (retryable) or the workflow cancels."""
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        if activity.is_worker_shutdown():
            raise ApplicationError(
                f"the gateway agent is stopping during {what}; the next attempt takes it up",
                type=errors.AGENT_STOPPING,
            )
        if activity.is_cancelled():
            raise CancelledError(f"cancelled during {what}")
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


# -- readiness --------------------------------------------------------------------------------


def wait_kubernetes_ready(
    request: ReadinessRequest, secrets: ClusterSecrets, port: int = API_PORT
) -> None:
    """vm_wait_ready in mode kubernetes with the cluster's secrets: /readyz answers 200 on
    the VIP (a server of the cluster's CA), then every node of the request is Ready
    (GET /api/v1/nodes, as the agent with the admin group). The timeout is a retryable
    NotReady naming what is missing."""
    assert request.vip is not None  # the caller checked
    api = ClusterServer(
        request.vip,
        port,
        secrets.ca_cert_pem,
        secrets.ca_key_pem,
        API_USER,
        admin_groups(request.kubernetes_version),
        timeout=5,
    )
    names = [name for _, name, _ in request.nodes]
    deadline = time.monotonic() + request.timeout_seconds
    api_ready = False
    last = "no answer"
    waiting: dict[str, str] = {}
    while True:
        try:
            if not api_ready:
                answer = api.request("GET", "/readyz")
                api_ready = answer.status == 200
                last = "" if api_ready else f"/readyz: HTTP {answer.status}"
            if api_ready:
                answer = api.request("GET", "/api/v1/nodes")
                if answer.status == 200:
                    waiting = not_ready_nodes(answer.body, names)
                    if not waiting:
                        return
                    last = "; ".join(f"{n} {why}" for n, why in waiting.items())
                else:  # 403 too: kubeadm binds its admin group a moment after /readyz
                    last = f"/api/v1/nodes: {answer.describe()}"
        except Unreachable as exc:
            last = str(exc)
        except Untrusted as exc:
            last = f"the server's certificate is not of the cluster's CA ({exc})"
        except Rejected as exc:
            last = f"the server refuses a certificate of the cluster's CA ({exc})"
        activity.heartbeat(
            {
                "stage": "nodes" if api_ready else "kubernetes",
                "last": last[:300],
                "not_ready": list(waiting)[:HEARTBEAT_NAMES],
            }
        )
        if time.monotonic() > deadline:
            if not api_ready:
                what = f"{api.url}/readyz not ready"
            elif waiting:
                what = f"{len(waiting)} node(s) not Ready through {api.url}"
            else:
                what = f"the nodes not listed by {api.url}"
            raise ApplicationError(
                f"{what} after {request.timeout_seconds}s (last: {last[:500]})",
                type=errors.NOT_READY,
            )
        _pause("the wait for the API server")
