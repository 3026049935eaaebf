"""Preflight of several placement domains in one pass, and reuse of the pooled session.

Real vcsim, real Temporal, the real workflow, agent and activities (as the cluster workflow
will run them: PreflightWorkflow with more_placements and fresh_login=False).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.guard import AgentGuard, GuardInterceptor, PolicyFile
from activities.preflight import PreflightActivities
from activities.vsphere.session import SessionPool
from domain import names
from domain.account import Placement, VCenterCredentials, VCenterEndpoint, password_binding
from domain.preflight import CheckStatus, PreflightReport, PreflightRequest
from domain.sealing import AgentKey, seal
from plumbing.settings import Settings
from starters.client import KubegateClient
from tests.conftest import GATEWAY
from tests.support import ADMIN, INVENTORY, PLACEMENT, Vcsim
from workers.gateway_agent import load_key
from workflows.preflight import PreflightWorkflow

pytestmark = pytest.mark.integration

#: A 2-domain cluster placement in the simulator: DC0_C0 and DC0_C1, shared datastore etc.
C0 = Placement.model_validate(PLACEMENT)
C1 = C0.model_copy(update={"compute_cluster": "DC0_C1"})

#: Upper bounds of a 2-domain preflight with fresh_login=False (measured: 12 warm, 15 cold).
WARM_BOUND = 13
COLD_BOUND = 16


@pytest.fixture(scope="module")
def ntp_vcsim(workdir: Path) -> Iterator[Vcsim]:
    """A simulator like the shared one, but with NTP on every host and no extra users."""
    sim = Vcsim(workdir, args=INVENTORY).start()
    yield sim
    sim.stop()


def endpoint(sim: Vcsim) -> VCenterEndpoint:
    return VCenterEndpoint(server=sim.address, thumbprint=sim.thumbprint)


#: a gateway whose agent runs in this module: the workflow is started directly, which the
#: real agent's guard refuses (tests/integration/test_trust.py); this one signs its results
#: but asks no gateway
DOMAINS = "pfdomains"
AGENT: dict[str, AgentKey] = {}


class SigningOnly(AgentGuard):
    async def check(self, info: Any, args: Any) -> None:
        return None


@pytest.fixture(autouse=True)
async def domains_agent(
    temporal: WorkflowEnvironment, sessions: SessionPool
) -> AsyncIterator[AgentKey]:
    key = AGENT.setdefault("key", AgentKey.generate())
    key.gateway = DOMAINS
    checks = PreflightActivities(key, sessions)
    guard = SigningOnly(temporal.client, DOMAINS, key, PolicyFile(Path("/nonexistent")))
    with ThreadPoolExecutor(max_workers=8) as executor:
        async with Worker(
            temporal.client,
            task_queue=names.gateway_task_queue(DOMAINS),
            activities=[checks.connection, checks.inventory, checks.privileges, checks.hosts],
            activity_executor=executor,
            interceptors=[GuardInterceptor(guard)],
        ):
            yield key


async def preflight(
    kubegate: KubegateClient,
    sim: Vcsim,
    placement: Placement,
    *more: Placement,
    fresh_login: bool = False,
) -> PreflightReport:
    key = AGENT["key"]
    use = password_binding(DOMAINS, "cluster-preflight", endpoint(sim), ADMIN)
    request = PreflightRequest(
        account="cluster-preflight",
        gateway=DOMAINS,
        credentials=VCenterCredentials(
            endpoint=endpoint(sim),
            username=ADMIN,
            password=seal(sim.password, key.public_bytes, use),
        ),
        placement=placement,
        more_placements=list(more),
        fresh_login=fresh_login,
        agent_signing_key=key.signing_key_b64,
    )
    return await kubegate.client.execute_workflow(
        PreflightWorkflow.run,
        request,
        id=names.preflight_workflow_id(str(uuid.uuid4())),
        task_queue=names.CONTROL_TASK_QUEUE,
    )


def failures(report: PreflightReport) -> list[tuple[str, str]]:
    return [(r.check, r.object) for r in report.results if r.status is CheckStatus.FAIL]


async def test_two_domains_pass_each_object_checked_once(
    ntp_vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    report = await preflight(kubegate, ntp_vcsim, C0, C1)

    assert report.passed, failures(report)
    exists = [r.object for r in report.results if r.check.startswith("exists.")]
    assert len(exists) == len(set(exists)) == 9  # 7 paths of C0, cluster and pool of C1
    assert "/DC0/host/DC0_C1/Resources" in exists
    privileges = [r.object for r in report.results if r.check.startswith("privileges.")]
    assert sorted(privileges) == sorted(["/", *exists])
    ntp = sorted(r.object for r in report.results if r.check == "hosts.ntp")
    assert ntp == sorted(
        f"host DC0_C{c}_H{h} (compute cluster DC0_C{c})" for c in (0, 1) for h in range(3)
    )
    storage = sorted(r.object for r in report.results if r.check == "storage.shared")
    assert storage == [
        "datastore LocalDS_0 for compute cluster DC0_C0",
        "datastore LocalDS_0 for compute cluster DC0_C1",
    ]
    # the refs the cluster workflow reuses instead of looking the objects up again
    assert set(report.refs) == set(exists)
    assert report.refs_of(C1)["compute_cluster"].startswith("ClusterComputeResource:")
    assert report.refs_of(C0)["datastore"] == report.refs_of(C1)["datastore"]
    assert report.refs_of(C0)["compute_cluster"] != report.refs_of(C1)["compute_cluster"]


async def test_request_count_of_a_two_domain_preflight_is_bounded(
    workdir: Path, kubegate: KubegateClient, sessions: SessionPool
) -> None:
    # a simulator of its own, so that the pool holds no session for it yet
    sim = Vcsim(workdir, args=INVENTORY).start()
    try:
        logins = sessions.logins
        cold = await preflight(kubegate, sim, C0, C1)
        warm = await preflight(kubegate, sim, C0, C1)
    finally:
        sim.stop()

    assert cold.passed and warm.passed
    assert sessions.logins - logins == 1  # the first logs in, the second reuses the session
    assert cold.vcenter_requests <= COLD_BOUND, cold.vcenter_requests
    assert warm.vcenter_requests <= WARM_BOUND, warm.vcenter_requests


async def test_missing_object_in_second_domain_fails_naming_it(
    ntp_vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    broken = C1.model_copy(update={"resource_pool": "nope-pool"})
    report = await preflight(kubegate, ntp_vcsim, C0, broken)

    assert failures(report) == [("exists.resource_pool", "/DC0/host/DC0_C1/Resources/nope-pool")]
    (failed,) = [r for r in report.results if r.status is CheckStatus.FAIL]
    assert "no resource pool at /DC0/host/DC0_C1/Resources/nope-pool" in failed.detail
    assert "/DC0/host/DC0_C1/Resources/nope-pool" not in report.refs
    # the rest of the second domain is still checked
    assert "privileges.compute_cluster" in {r.check for r in report.results}
    assert any("DC0_C1_H0" in r.object for r in report.results if r.check == "hosts.ntp")


async def test_host_without_ntp_fails_for_its_domain_only(
    vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    report = await preflight(kubegate, vcsim, C0, C1)

    assert failures(report) == [("hosts.ntp", "host DC0_C1_H1 (compute cluster DC0_C1)")]
    ntp_c0 = [r for r in report.results if r.object.endswith("(compute cluster DC0_C0)")]
    assert len(ntp_c0) == 3 and all(r.status is CheckStatus.PASS for r in ntp_c0)


async def test_pooled_session_survives_unless_fresh_login(
    vcsim: Vcsim, kubegate: KubegateClient, sessions: SessionPool
) -> None:
    def pooled() -> Any:
        return sessions.get(endpoint(vcsim), ADMIN, vcsim.password)

    before = await asyncio.to_thread(pooled)
    report = await preflight(kubegate, vcsim, C0, fresh_login=False)

    assert [r.detail for r in report.results if r.check == "vcenter.login"] == [
        f"reused this gateway's session on {endpoint(vcsim).address}"
    ]
    assert await asyncio.to_thread(before.alive)
    assert await asyncio.to_thread(pooled) is before

    # the default still logs in anew and logs the pooled session out
    report = await preflight(kubegate, vcsim, C0, fresh_login=True)
    assert [r.detail for r in report.results if r.check == "vcenter.login"] == [
        f"logged in to {endpoint(vcsim).address}"
    ]
    assert not await asyncio.to_thread(before.alive)


async def test_more_placements_must_share_the_datacenter(kubegate: KubegateClient) -> None:
    other = C1.model_copy(update={"datacenter": "DC1"})
    base: dict[str, Any] = {
        "account": "a",
        "gateway": GATEWAY,
        "credentials": await kubegate.seal_credentials(
            GATEWAY, VCenterEndpoint(server="vc.example", insecure=True), ADMIN, "pw"
        ),
    }
    with pytest.raises(ValidationError, match=r"more_placements\.0\.datacenter"):
        PreflightRequest(**base, placement=C0, more_placements=[other])
    with pytest.raises(ValidationError, match="needs placement"):
        PreflightRequest(**base, more_placements=[C1])
    assert PreflightRequest(**base, placement=C0).placements() == [C0]


async def test_one_activity_gives_the_workflows_results(
    vcsim: Vcsim, kubegate: KubegateClient, sessions: SessionPool, settings: Settings
) -> None:
    """preflight_all (the cluster's preflight, one round trip) = PreflightWorkflow's checks."""
    by_workflow = await preflight(kubegate, vcsim, C0, C1)
    request = PreflightRequest(
        account="cluster-preflight",
        gateway=GATEWAY,
        credentials=await kubegate.seal_credentials(
            GATEWAY, endpoint(vcsim), ADMIN, vcsim.password
        ),
        placement=C0,
        more_placements=[C1],
        fresh_login=False,
    )
    activities = PreflightActivities(load_key(settings, GATEWAY), sessions)
    by_activity = await asyncio.to_thread(ActivityEnvironment().run, activities.all_checks, request)

    def outcome(report: PreflightReport) -> list[tuple[str, str, str]]:
        return [(r.check, r.status.value, r.object) for r in report.results]

    assert outcome(by_activity) == outcome(by_workflow)
    assert not by_activity.passed  # the shared simulator's DC0_C1_H1 keeps no time
    assert by_activity.refs == by_workflow.refs
    assert 0 < by_activity.vcenter_requests <= 13
