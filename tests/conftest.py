"""Session fixtures: a real vcsim, a real Temporal dev server, the real workers in-process."""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.vsphere.session import SessionPool
from domain.names import SEARCH_ATTRIBUTES
from domain.privileges import CLUSTER_ROLE
from domain.sealing import AgentKey
from plumbing.codec import ReadableMetadata, data_converter
from plumbing.metrics import metrics_runtime
from plumbing.settings import Settings, tool_path
from plumbing.tracing import interceptor_for
from starters.client import KubegateClient
from tests.support import OPERATORS, Vcsim, agent_policy, grant_roles, system_gateway
from workers.control import build_worker
from workers.gateway_agent import build_agent, load_key

GATEWAY = "test"

# the tests never read the config file of whoever runs them (plumbing/contexts.py)
os.environ["KUBEGATE_CONFIG"] = "/nonexistent/kubegate-tests/config.yaml"
os.environ.pop("KUBEGATE_CONTEXT", None)

#: Users the shared simulator accepts besides the administrator.
RESTRICTED = ("restricted@vsphere.local", "restricted-pw-7f3a")
OPERATOR = ("operator@vsphere.local", "operator-pw-91c2")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kubegate")


@pytest.fixture(scope="session")
def vcsim(workdir: Path) -> Iterator[Vcsim]:
    """The shared simulator: 2 clusters x 3 hosts; DC0_C1_H1 has no NTP; LocalOnly on one host."""
    sim = Vcsim(
        workdir,
        args=[
            "-clusters",
            "2",
            "-hosts",
            "3",
            "-ntp",
            "0.pool.ntp.org,1.pool.ntp.org",
            "-no-ntp-host",
            "DC0_C1_H1",
            "-local-datastore",
            "LocalOnly@DC0_C0_H0",
            "-users",
            f"{RESTRICTED[0]}:{RESTRICTED[1]},{OPERATOR[0]}:{OPERATOR[1]}",
        ],
    ).start()
    yield sim
    sim.stop()


@pytest_asyncio.fixture(scope="session")
async def temporal() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(tool_path("temporal")),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(strict=False),  # it hosts the workers
        interceptors=[ReadableMetadata()],
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


@dataclass
class Telemetry:
    """What the session's workers report: their metrics endpoint, and the spans they and
    their client made (kept in memory)."""

    metrics_address: str
    spans: InMemorySpanExporter
    client: Client

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as r:
            return str(r.read().decode())


@pytest_asyncio.fixture(scope="session")
async def telemetry(temporal: WorkflowEnvironment) -> Telemetry:
    """A client for the session's workers, as `kubegate worker control --metrics-address`
    and an agent with tracing on would have: on a runtime serving Prometheus metrics on a
    free port, traced by the SDK's interceptor into memory."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    runtime = metrics_runtime(address)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    client = await Client.connect(
        temporal.client.service_client.config.target_host,
        namespace=temporal.client.namespace,
        data_converter=temporal.client.data_converter,
        interceptors=[ReadableMetadata(), interceptor_for(provider.get_tracer("kubegate"))],
        runtime=runtime,
    )
    return Telemetry(address, spans, client)


@pytest.fixture(scope="session")
def settings(workdir: Path, temporal: WorkflowEnvironment) -> Settings:
    return Settings(
        home=workdir / "home",
        temporal_address=temporal.client.service_client.config.target_host,
        gateway=GATEWAY,
    )


@pytest_asyncio.fixture(scope="session")
async def sessions(
    temporal: WorkflowEnvironment, settings: Settings, vcsim: Vcsim, telemetry: Telemetry
) -> AsyncIterator[SessionPool]:
    """The control worker and the agent of gateway 'test' (a system gateway, Running on the
    shared simulator), running in this process, with metrics and traces (`telemetry`)."""
    key = load_key(settings, GATEWAY)
    # the tests' operator (their home's key) may have kubeconfigs minted
    OPERATORS.append(AgentKey.load_or_create(settings.home / "operator.key").signing_key_b64)
    pool = SessionPool()
    executor = ThreadPoolExecutor(max_workers=16)
    control = build_worker(telemetry.client)
    policy = agent_policy(settings.agent_dir(GATEWAY) / "policy.yaml", GATEWAY, operators=True)
    agent = build_agent(telemetry.client, GATEWAY, key, pool, executor, 16, policy=policy)
    async with control, agent:
        await system_gateway(KubegateClient(temporal.client, settings), GATEWAY, vcsim, key)
        yield pool
    pool.close_all()
    executor.shutdown()


@pytest_asyncio.fixture
async def kubegate(
    temporal: WorkflowEnvironment, settings: Settings, sessions: SessionPool
) -> KubegateClient:
    return KubegateClient(temporal.client, settings)


@pytest.fixture(scope="session")
def restricted_user(vcsim: Vcsim) -> tuple[str, str]:
    """A user whose cluster role lacks VirtualMachine.Provisioning.Clone."""
    grant_roles(
        vcsim,
        RESTRICTED[0],
        [p for p, _ in CLUSTER_ROLE if p != "VirtualMachine.Provisioning.Clone"],
    )
    return RESTRICTED


@pytest.fixture(scope="session")
def operator_user(vcsim: Vcsim) -> tuple[str, str]:
    """A non-administrator holding exactly the documented roles."""
    grant_roles(vcsim, OPERATOR[0], [p for p, _ in CLUSTER_ROLE])
    return OPERATOR
