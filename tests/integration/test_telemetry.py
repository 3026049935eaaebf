"""Metrics, traces and logs of real workers: the session's control worker and agent serve
Prometheus metrics and are traced (tests/conftest.py `telemetry`); a small cluster deploy on
the simulator shows up in both. `kubegate worker control` and `kubegate gateway agent` run as
processes with --metrics-address and --log-format json."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from pyVmomi import vim
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from activities.vsphere.session import open_session
from domain.account import VCenterEndpoint
from domain.cluster import ClusterSpec
from domain.ipam import IpPoolSpec
from domain.lifecycle import ClusterStatus, Timing
from domain.names import GATEWAY as GATEWAY_ATTRIBUTE
from domain.names import KIND, STATUS
from plumbing.settings import Settings
from starters.client import KubegateClient
from tests.conftest import GATEWAY, Telemetry
from tests.integration.test_cluster import PROFILE
from tests.support import ADMIN, Vcsim, ensure_account, explained
from workers.census import Census

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "starters.cli"]

Sample = tuple[dict[str, str], float]
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str, **labels: str) -> list[Sample]:
    """The samples of one metric (Prometheus text format) whose labels include `labels`."""
    found = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None or match.group(1) != name:
            continue
        have = dict(_LABEL.findall(match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append((have, float(match.group(3))))
    return found


def value(text: str, name: str, **labels: str) -> float:
    """The one sample of a metric with these labels."""
    found = samples(text, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0][1]


def spec(name: str, pool: str, account: str) -> ClusterSpec:
    placement = {"compute_cluster": "DC0_C0", "datastore": "LocalDS_0", "network": "VM Network"}
    return ClusterSpec.model_validate(
        {
            "name": name,
            "profile": PROFILE,
            "cloud_account": account,
            "placement": {"datacenter": "DC0", "ip_allocation": "static"},
            "control_plane": {"size": 1, "placement": [{**placement, "ip_pool": pool}]},
            "workers": [{"name": "w", "size": 1, "placement": [{**placement, "ip_pool": pool}]}],
        }
    )


async def test_a_deploy_shows_in_the_metrics_and_traces(
    vcsim: Vcsim, kubegate: KubegateClient, telemetry: Telemetry, settings: Settings
) -> None:
    pool = IpPoolSpec.model_validate(
        {
            "name": "metered",
            "gateway": GATEWAY,
            "kind": "range",
            "first": "10.77.0.10",
            "last": "10.77.0.29",
            "prefix": 24,
            "network_gateway": "10.77.0.1",
        }
    )
    await kubegate.create_pool(pool)
    account = await ensure_account(kubegate, vcsim, GATEWAY)
    await kubegate.deploy_cluster(
        spec("metered", pool.name, account), timing=Timing(heartbeat_seconds=5)
    )
    state = await explained(
        kubegate,
        kubegate.wait_cluster(
            "metered", lambda s: s.status in (ClusterStatus.RUNNING, ClusterStatus.FAILED)
        ),
    )
    assert state.status is ClusterStatus.RUNNING, state.error
    await Census(telemetry.client, settings).count()
    text = telemetry.scrape()

    # the Temporal SDK's own metrics, on the same endpoint
    assert samples(text, "temporal_activity_schedule_to_start_latency_count")
    assert samples(text, "temporal_workflow_task_execution_latency_count")
    assert samples(text, "temporal_worker_task_slots_available", worker_type="ActivityWorker")

    # vCenter requests and faults by method (the agent's SOAP calls)
    server = vcsim.address.rsplit(":", 1)[0]
    assert (
        value(text, "kubegate_vcenter_requests_total", vcenter=server, method="CloneVM_Task") >= 2
    )
    assert value(text, "kubegate_vcenter_requests_total", vcenter=server, method="Login") >= 1
    for labels, _ in samples(text, "kubegate_vcenter_faults_total"):
        assert set(labels) >= {"vcenter", "method", "fault"}

    # a fault: the request and its fault, by method (never the password)
    endpoint = VCenterEndpoint(server=server, port=int(vcsim.info["port"]), insecure=True)
    with pytest.raises(vim.fault.InvalidLogin):
        await asyncio.to_thread(open_session, endpoint, ADMIN, "not-the-password")
    text = telemetry.scrape()
    faults = samples(text, "kubegate_vcenter_faults_total", vcenter=server, method="Login")
    assert "vim.fault.InvalidLogin" in {labels["fault"] for labels, _ in faults}
    assert "not-the-password" not in text

    # step durations, recorded by the cluster workflow
    created = samples(
        text,
        "kubegate_step_duration_seconds_count",
        step="create-vms",
        state="done",
        workflow_type="ClusterWorkflow",
    )
    assert created and created[0][1] >= 1
    assert samples(text, "kubegate_step_duration_seconds_bucket", step="create-vms", le="+Inf")

    # the host slots the clones held: all given back, out of the limit
    hosts = samples(text, "kubegate_vcenter_task_slots", kind="host", vcenter=server)
    assert hosts and all(limit == 8 for _, limit in hosts)
    in_flight = samples(text, "kubegate_vcenter_tasks_in_flight", kind="host", vcenter=server)
    assert {labels["object"] for labels, _ in in_flight} == {h["object"] for h, _ in hosts}
    assert all(0 <= v <= 8 for _, v in in_flight)  # (other tests' work may hold some)

    # the control worker's census: lifecycles by status, the pool's usage, the agent
    lifecycles = {"status": "Running", "gateway": GATEWAY}
    assert value(text, "kubegate_lifecycles", kind="cluster", **lifecycles) >= 1
    assert value(text, "kubegate_lifecycles", kind="gateway", **lifecycles) == 1
    used = len(await kubegate.pool_allocations(GATEWAY, pool.name))
    assert used == 3  # the VIP and two nodes
    assert value(text, "kubegate_ip_pool_used", gateway=GATEWAY, pool=pool.name) == used
    assert value(text, "kubegate_ip_pool_capacity", gateway=GATEWAY, pool=pool.name) == 20
    assert value(text, "kubegate_agent_connected", gateway=GATEWAY) == 1
    assert value(text, "kubegate_agent_last_seen_seconds", gateway=GATEWAY) == 0

    # anyone may start a workflow with kubegate's search attributes set: it is not counted,
    # and its words never become labels (no forged "Failed" clusters, no unbounded series)
    forged = await kubegate.client.start_workflow(
        "ForgedWorkflow",
        id="forged/census",
        task_queue="nobody-polls-this",
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(KIND, "cluster"),
                SearchAttributePair(STATUS, "Forged-42"),
                SearchAttributePair(GATEWAY_ATTRIBUTE, "no-such-gateway"),
            ]
        ),
    )
    try:
        await Census(telemetry.client, settings).count()
        text = telemetry.scrape()
        labels = [labels for labels, _ in samples(text, "kubegate_lifecycles")]
        assert all(seen["status"] != "Forged-42" for seen in labels), labels
        assert all(seen["gateway"] != "no-such-gateway" for seen in labels), labels
    finally:
        await forged.terminate()

    # traces: the workflow, its activities on the agent and the control worker; no secret
    spans = telemetry.spans.get_finished_spans()
    names = {span.name for span in spans}
    assert "RunWorkflow:ClusterWorkflow" in names
    assert "RunActivity:vm_create" in names
    assert "RunActivity:describe_pool" in names
    attributes = json.dumps([dict(span.attributes or {}) for span in spans])
    assert "temporalWorkflowID" in attributes
    assert vcsim.password not in attributes


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def process_env(settings: Settings, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KUBEGATE_HOME": str(home),
        "KUBEGATE_TEMPORAL_ADDRESS": settings.temporal_address,
    }


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line parsed as one JSON object with the fields every line has."""
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    return entries


async def test_the_control_worker_serves_metrics_and_logs_json(
    settings: Settings, tmp_path: Path, sessions: object
) -> None:
    address = free_address()
    argv = ["worker", "control", "--metrics-address", address, "--log-format", "json"]
    worker = await asyncio.create_subprocess_exec(
        *CLI,
        *argv,
        env={**process_env(settings, tmp_path), "KUBEGATE_METRICS_INTERVAL": "0.5"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        text, deadline = "", time.monotonic() + 30
        while "kubegate_lifecycles{" not in text and time.monotonic() < deadline:
            assert worker.returncode is None
            await asyncio.sleep(0.3)
            with contextlib.suppress(OSError):
                text = await asyncio.to_thread(scrape, address)
        assert samples(text, "kubegate_lifecycles", kind="gateway", status="Running")
        assert samples(text, "temporal_worker_task_slots_available")
    finally:
        worker.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(worker.communicate(), timeout=30)
    json_lines(stdout.decode())  # (the SDK core's lines, if any, are forwarded as JSON)
    entries = json_lines(stderr.decode())
    messages = [str(e["message"]) for e in entries]
    assert any(m.startswith("control worker polling kubegate-control") for m in messages)
    assert any(m == f"metrics on http://{address}/metrics" for m in messages)


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


async def test_the_agent_logs_json_to_stderr_and_its_file(
    settings: Settings, tmp_path: Path
) -> None:
    """An agent of a gateway that does not exist stops at pairing: its lines say so as JSON
    (the refusal too, exit 2), in its log file too."""
    agent = await asyncio.create_subprocess_exec(
        *CLI,
        *("gateway", "agent", "nowhere", "--log-format", "json"),
        env=process_env(settings, tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(agent.communicate(), timeout=60)
    assert agent.returncode == 2
    logged = json_lines(stderr.decode())
    assert any("connecting to" in str(e["message"]) for e in logged)
    stopped = [e for e in logged if e["level"] == "ERROR"]
    assert [e["message"] for e in stopped] == [
        "gateway agent nowhere stopped: gateway nowhere does not exist"
    ]
    in_file = json_lines((tmp_path / "agents" / "nowhere" / "agent.log").read_text())
    assert any("key fingerprint" in str(e["message"]) for e in in_file)


def test_bad_metrics_address_is_refused() -> None:
    done = subprocess.run(
        [*CLI, "worker", "control", "--metrics-address", "nope"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--metrics-address" in done.stderr.decode()


async def test_a_command_sends_its_spans_to_the_otlp_endpoint(
    settings: Settings, tmp_path: Path, sessions: object
) -> None:
    """With KUBEGATE_OTEL_ENDPOINT set the CLI's client is traced, and its spans leave (over
    OTLP/HTTP) before the command ends."""
    received: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        command = await asyncio.create_subprocess_exec(  # (the workers answer meanwhile)
            *CLI,
            "gateway",
            "get",
            GATEWAY,
            env={
                **process_env(settings, tmp_path),
                "KUBEGATE_OTEL_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
            },
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(command.communicate(), timeout=60)
    finally:
        server.shutdown()
    assert command.returncode == 0, stderr
    assert [path for path, _ in received] == ["/v1/traces"]
    body = received[0][1]
    assert b"QueryWorkflow:state" in body and b"kubegate" in body  # span, service name
