"""Preflight end to end: real vcsim, real Temporal, the real workflow, agent and activities."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from domain.account import CloudAccountSpec
from domain.preflight import CheckResult, CheckStatus, PreflightReport
from domain.sealing import AgentKey
from starters.client import KubegateClient, KubegateError
from tests.conftest import GATEWAY
from tests.support import ADMIN, PLACEMENT, TEMPLATE, Vcsim, history_text, record_history

pytestmark = pytest.mark.integration


def spec(sim: Vcsim, user: str = ADMIN, **changes: Any) -> CloudAccountSpec:
    vcenter: dict[str, Any] = {
        "server": sim.address,
        "username": user,
        "thumbprint": sim.thumbprint,
    }
    vcenter.update(changes.pop("vcenter", {}))
    placement = {**PLACEMENT, **changes.pop("placement", {})}
    return CloudAccountSpec.model_validate(
        {"name": "acct", "gateway": GATEWAY, "vcenter": vcenter, "placement": placement, **changes}
    )


def results(report: PreflightReport, check: str) -> list[CheckResult]:
    found = [r for r in report.results if r.check == check]
    assert found, f"no result for {check}: {[r.check for r in report.results]}"
    return found


def status(report: PreflightReport, check: str) -> CheckStatus:
    (only,) = results(report, check)
    return only.status


async def test_administrator_passes_every_check(vcsim: Vcsim, kubegate: KubegateClient) -> None:
    report = await kubegate.validate_account(spec(vcsim), vcsim.password)

    assert report.passed, [r for r in report.results if r.status is not CheckStatus.PASS]
    checks = {r.check for r in report.results}
    assert {"vcenter.reachable", "vcenter.tls", "vcenter.login", "vcenter.version"} <= checks
    assert {f"exists.{role}" for role in PLACEMENT if role != "resource_pool"} | {
        "exists.resource_pool"
    } <= checks
    assert {
        f"privileges.{r}" for r in ("root", "datacenter", "compute_cluster", "template")
    } <= checks
    ntp = results(report, "hosts.ntp")
    assert sorted(r.object for r in ntp) == [f"host DC0_C0_H{i}" for i in range(3)]
    assert status(report, "storage.shared") is CheckStatus.PASS
    # tens of requests, not hundreds (the login may be cached by an earlier test)
    assert 5 <= report.vcenter_requests <= 30


async def test_host_without_ntp_fails_and_names_the_host(
    vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    report = await kubegate.validate_account(
        spec(vcsim, placement={"compute_cluster": "DC0_C1"}), vcsim.password
    )

    assert not report.passed
    failed = [r for r in report.results if r.status is CheckStatus.FAIL]
    assert [(r.check, r.object) for r in failed] == [("hosts.ntp", "host DC0_C1_H1")]
    assert "NTP" in failed[0].remedy


async def test_datastore_not_shared_by_all_hosts_fails(
    vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    report = await kubegate.validate_account(
        spec(vcsim, placement={"datastore": "LocalOnly"}), vcsim.password
    )

    (shared,) = results(report, "storage.shared")
    assert shared.status is CheckStatus.FAIL
    assert "DC0_C0_H1" in shared.detail and "DC0_C0_H2" in shared.detail
    assert "DC0_C0_H0" not in shared.detail


async def test_missing_template_fails_with_its_path(
    vcsim: Vcsim, kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    workflow_id = f"preflight/{uuid.uuid4()}"
    report = await kubegate.validate_account(
        spec(vcsim, placement={"template": "templates/no-such-template"}),
        vcsim.password,
        workflow_id=workflow_id,
    )
    await record_history(temporal.client, workflow_id, "preflight_missing_template")

    (template,) = results(report, "exists.template")
    assert template.status is CheckStatus.FAIL
    assert template.object == "/DC0/vm/templates/no-such-template"
    assert [r.check for r in report.results if r.status is CheckStatus.FAIL] == ["exists.template"]


async def test_missing_objects_each_fail(vcsim: Vcsim, kubegate: KubegateClient) -> None:
    report = await kubegate.validate_account(
        spec(vcsim, placement={"network": "nope-net", "resource_pool": "nope-pool"}), vcsim.password
    )

    assert status(report, "exists.network") is CheckStatus.FAIL
    assert status(report, "exists.resource_pool") is CheckStatus.FAIL
    assert status(report, "exists.datastore") is CheckStatus.PASS


async def test_wrong_password_fails_login_and_leaks_nothing(
    vcsim: Vcsim, kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    workflow_id = f"preflight/{uuid.uuid4()}"
    report = await kubegate.validate_account(spec(vcsim), wrong, workflow_id=workflow_id)

    assert status(report, "vcenter.login") is CheckStatus.FAIL
    assert status(report, "vcenter.version") is CheckStatus.SKIPPED
    assert status(report, "placement") is CheckStatus.SKIPPED
    assert wrong not in report.model_dump_json()
    history = await temporal.client.get_workflow_handle(workflow_id).fetch_history()
    text = history_text(history)
    assert "refused the user name or password" in text  # the report itself is in there
    assert wrong not in text
    await record_history(temporal.client, workflow_id, "preflight_wrong_password")


async def test_password_is_sealed_in_history_and_summaries_are_readable(
    vcsim: Vcsim, kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    workflow_id = f"preflight/{uuid.uuid4()}"
    await kubegate.validate_account(spec(vcsim), vcsim.password, workflow_id=workflow_id)

    handle = temporal.client.get_workflow_handle(workflow_id)
    text = history_text(await handle.fetch_history())
    assert vcsim.password not in text
    assert "ciphertext" in text
    # what the Web UI shows: the workflow's summary and one summary per activity
    description = await handle.describe()
    assert "acct" in (await description.static_summary() or "")
    for summary in ("Connect to", "Find placement objects", "Check privileges", "Check NTP"):
        assert summary in text
    assert description.search_attributes.get("KubegateStatus") == ["Passed"]
    await record_history(temporal.client, workflow_id, "preflight_passed")


def refused_by_policy(report: PreflightReport, words: str) -> None:
    """The agent refused before contacting anything: one failed policy check, naming why."""
    assert not report.passed
    (policy,) = results(report, "agent.policy")
    assert policy.status is CheckStatus.FAIL and words in policy.detail, policy.detail
    ran = [r.check for r in report.results if r.status is not CheckStatus.SKIPPED]
    assert ran == ["agent.policy"]


async def test_thumbprint_mismatch_is_refused_by_the_agents_policy(
    vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    other = ":".join(["AB"] * 32)
    report = await kubegate.validate_account(
        spec(vcsim, vcenter={"thumbprint": other}), vcsim.password
    )
    refused_by_policy(report, "the policy trusts it as thumbprint")


async def test_unverified_certificate_without_pin_is_refused_by_the_policy(
    vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    report = await kubegate.validate_account(
        spec(vcsim, vcenter={"thumbprint": None}), vcsim.password
    )
    refused_by_policy(report, "the task asks ca")


async def test_insecure_connection_is_refused_unless_the_policy_allows_it(
    vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    report = await kubegate.validate_account(
        spec(vcsim, vcenter={"thumbprint": None, "insecure": True}), vcsim.password
    )
    refused_by_policy(report, "insecure connections are not allowed")


async def test_a_vcenter_outside_the_policy_is_never_contacted(
    kubegate: KubegateClient, vcsim: Vcsim
) -> None:
    report = await kubegate.validate_account(
        spec(vcsim, vcenter={"server": "127.0.0.1:1"}), "irrelevant"
    )
    refused_by_policy(report, "not a vCenter this agent's policy allows")


@pytest.fixture(scope="module")
def old_vcsims(workdir: Path) -> Iterator[dict[str, Vcsim]]:
    sims = {
        "6.5": Vcsim(workdir, args=["-version", "6.5.0", "-build", "7312210"]).start(),
        "6.7u2": Vcsim(workdir, args=["-version", "6.7.0", "-build", "13643870"]).start(),
        "6.7u3": Vcsim(workdir, args=["-version", "6.7.0", "-build", "14367737"]).start(),
    }
    yield sims
    for sim in sims.values():
        sim.stop()


@pytest.mark.parametrize(
    ("release", "expected"),
    [("6.5", CheckStatus.FAIL), ("6.7u2", CheckStatus.FAIL), ("6.7u3", CheckStatus.PASS)],
)
async def test_vcenter_older_than_6_7_update_3_fails(
    old_vcsims: dict[str, Vcsim], kubegate: KubegateClient, release: str, expected: CheckStatus
) -> None:
    sim = old_vcsims[release]
    report = await kubegate.validate_account(spec(sim), sim.password)

    (version,) = results(report, "vcenter.version")
    assert version.status is expected, version
    if expected is CheckStatus.FAIL:
        assert "6.7 Update 3" in version.detail


async def test_role_without_clone_privilege_fails_naming_privilege_and_object(
    vcsim: Vcsim, kubegate: KubegateClient, restricted_user: tuple[str, str]
) -> None:
    user, password = restricted_user
    report = await kubegate.validate_account(spec(vcsim, user=user), password)

    assert not report.passed
    assert status(report, "privileges.root") is CheckStatus.PASS
    assert status(report, "privileges.datacenter") is CheckStatus.PASS
    (template,) = results(report, "privileges.template")
    assert template.status is CheckStatus.FAIL
    assert "VirtualMachine.Provisioning.Clone" in template.detail
    assert f"/DC0/vm/{TEMPLATE}" in template.detail
    assert "VirtualMachine.Provisioning.CloneTemplate" not in template.detail
    failed = {r.check for r in report.results if r.status is CheckStatus.FAIL}
    assert failed == {
        "privileges.compute_cluster",
        "privileges.resource_pool",
        "privileges.datastore",
        "privileges.network",
        "privileges.folder",
        "privileges.template",
    }


async def test_user_with_documented_roles_passes(
    vcsim: Vcsim, kubegate: KubegateClient, operator_user: tuple[str, str]
) -> None:
    user, password = operator_user
    report = await kubegate.validate_account(spec(vcsim, user=user), password)

    assert report.passed, [r for r in report.results if r.status is CheckStatus.FAIL]


async def test_gateway_without_agent_is_refused_before_starting(
    vcsim: Vcsim, kubegate: KubegateClient, settings: Any
) -> None:
    with pytest.raises(KubegateError, match="gateway nobody does not exist"):
        await kubegate.validate_account(spec(vcsim, gateway="nobody"), vcsim.password)
    # paired (its key registered) but its agent is not running
    _, code = await kubegate.create_gateway("nobody")
    key = AgentKey.generate()
    await kubegate.register_agent("nobody", key, code)
    # paired but not approved: nothing is sealed to it
    with pytest.raises(KubegateError, match="not approved"):
        await kubegate.validate_account(spec(vcsim, gateway="nobody"), vcsim.password)
    await kubegate.approve_agent("nobody", key.fingerprint)
    with pytest.raises(KubegateError, match="no agent of gateway 'nobody'"):
        await kubegate.validate_account(spec(vcsim, gateway="nobody"), vcsim.password)
    await kubegate.delete_gateway("nobody")


async def test_without_placement_only_access_is_checked(
    vcsim: Vcsim, kubegate: KubegateClient
) -> None:
    account = spec(vcsim).model_copy(update={"placement": None})
    report = await kubegate.validate_account(account, vcsim.password)

    assert report.passed
    assert [r.check for r in report.results] == [
        "vcenter.reachable",
        "vcenter.tls",
        "vcenter.login",
        "vcenter.version",
    ]
