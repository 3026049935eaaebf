"""GatewayWorkflow's own logic with stand-in activities (tests/workflows/world.py) on a
Temporal dev server of its own: pairing and approval, configure, failure and reset, the
cluster queue during an upgrade, delete and the installer VM, refusals, settle points.

The agent's stand-ins sign with the key the gateway pairs with, so every result is verified
as in production; the operator's side goes through the real client (KubegateClient)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from domain import errors, names
from domain.gateway import (
    TROUBLESHOOTING_HINTS,
    ApproveRequest,
    ClusterRequest,
    GatewayInput,
    GatewayState,
    GatewayStatus,
    ResetRequest,
    ResizeRequest,
    UpgradeRequest,
    default_account_name,
)
from domain.lifecycle import ClusterStatus, operations
from domain.sealing import AgentKey
from starters.client import RequestRefused, _new_pairing
from tests.workflows.test_cluster_workflow import spec
from tests.workflows.world import (
    FAST,
    Gateway,
    Stage,
    accepted_updates,
    runs,
    unique,
    until,
)
from workflows.cluster import ClusterWorkflow
from workflows.gateway import GatewayWorkflow


@pytest_asyncio.fixture
async def gw(env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway of its own (not created yet), its stand-in agent and workers running."""
    async with Stage(env) as stage:
        yield Gateway(stage, tmp_path)


async def test_pairing_takes_a_proof_of_the_code_and_work_waits_for_approval(gw: Gateway) -> None:
    code = await gw.create(approved=False)
    with pytest.raises(RequestRefused, match=r"wrong pairing code .*1 wrong so far"):
        await gw.pair("ABCDE-FGHJK")
    state = await gw.pair(code)
    assert state.status is GatewayStatus.PENDING and state.agent is not None
    assert not state.agent.approved and state.agent.installer_vm == gw.installer
    assert gw.key.fingerprint in state.reason and state.pairing.failures == 1

    # paired once: another agent with the same code is refused
    with pytest.raises(RequestRefused, match="paired with another agent"):
        await gw.pair(code, AgentKey.generate())
    # nothing is sealed to, or done by, an agent nobody approved
    refused = await gw.refused(GatewayWorkflow.configure, gw.config())
    assert "not approved" in refused.message and refused.type == errors.INVALID_STATE
    refused = await gw.refused(
        GatewayWorkflow.approve, ApproveRequest(fingerprint=AgentKey.generate().fingerprint)
    )
    assert "not the paired agent's" in refused.message

    state = await gw.kubegate.approve_agent(gw.name, gw.key.fingerprint)
    assert state.status is GatewayStatus.REGISTERED and state.agent is not None
    assert state.agent.approved
    # the wrong code was taken (and counted); every refusal above left no trace
    assert await accepted_updates(gw.stage.client, gw.handle.id) == [
        "register",
        "register",
        "approve",
    ]


async def test_configure_provisions_the_nodes_runs_and_settles_into_a_new_run(gw: Gateway) -> None:
    await gw.registered()
    first_run = (await gw.handle.describe()).run_id
    state = await gw.update(GatewayWorkflow.configure, gw.config())
    assert state.status is GatewayStatus.PROVISIONING  # its checks passed in the Update
    state = await gw.until(GatewayStatus.RUNNING)

    steps = [s.name for s in state.steps]
    assert steps[:2] == ["validate", "preflight"]
    assert set(steps[2:4]) == {"folder", "addresses"}  # these two run at once
    assert steps[4:] == ["bootstrap", "create-vms", "readiness", "default-account", "installer"]
    assert all(s.state.value in ("done", "skipped") for s in state.steps)
    assert [op for op, _, _ in operations(state.steps)] == ["configure"]
    assert state.nodes is not None and [n.phase for n in state.nodes.nodes] == ["ready"]
    assert len(gw.world.vms) == 1
    assert [(a.name, a.default) for a in state.accounts] == [(f"{gw.name}-default", True)]
    assert gw.installer_calls() == [("power_off", gw.installer)]

    # settled: the run continued as new, and the new run keeps the whole state
    await gw.next_run(first_run)
    again = await gw.state()
    assert again.status is GatewayStatus.RUNNING
    assert again.steps == state.steps and again.operations_run == state.operations_run == 1
    assert again.nodes == state.nodes and again.accounts == state.accounts
    assert again.agent == state.agent and again.config == state.config


async def test_a_failed_provisioning_names_its_step_and_reset_clears_it_for_another_try(
    gw: Gateway,
) -> None:
    state = await gw.failed()
    assert state.failed_operation == "provision"
    assert "Power off the installer VM" in (state.error or "")  # the step, in the user's words
    assert "the installer VM is locked" in (state.error or "")
    installer = state.steps[-1]
    assert (installer.name, installer.state.value, installer.attempts) == (
        "installer",
        "failed",
        1,  # not retried
    )
    assert len(gw.world.vms) == 1 and state.accounts[0].default
    refused = await gw.refused(GatewayWorkflow.request_cluster, cluster_request(gw))
    assert "clusters need a Running gateway" in refused.message

    await gw.update(GatewayWorkflow.reset, ResetRequest())
    state = await gw.until(GatewayStatus.PENDING)
    assert state.agent is not None and state.agent.approved  # kept: configure again
    assert state.config is None and state.nodes is None and state.accounts == []
    assert gw.world.vms == {}  # the node it made is gone
    assert "readiness" in [s.name for s in state.history]  # the failed attempt stays

    await gw.update(GatewayWorkflow.configure, gw.config())
    state = await gw.until(GatewayStatus.RUNNING)
    assert [op for op, _, _ in operations(state.steps)] == ["configure", "reset", "configure"]
    assert len(gw.world.vms) == 1


def cluster_request(gw: Gateway, name: str | None = None) -> ClusterRequest:
    cluster = spec(name or unique("c"), cp=1, workers=0)
    return ClusterRequest(
        spec=cluster.model_copy(update={"cloud_account": default_account_name(gw.name)}),
        timing=FAST,
    )


async def cluster_running(client: Client, name: str) -> None:
    cluster = client.get_workflow_handle(names.cluster_workflow_id(name))
    await until(
        client,
        lambda: cluster.query(ClusterWorkflow.state_query),
        lambda s: s.status is ClusterStatus.RUNNING,
        f"cluster {name} Running",
    )


async def test_clusters_requested_during_an_upgrade_wait_queued_and_proceed_in_order(
    gw: Gateway,
) -> None:
    await gw.running()
    held = asyncio.Event()

    async def until_released(_: Any) -> None:
        await held.wait()

    gw.world.hooks["vm_create"] = until_released  # the upgrade's new node: not yet
    await gw.update(GatewayWorkflow.upgrade, UpgradeRequest(version="1.1.0"))
    first, second = unique("first"), unique("second")
    for name in (first, second):
        admission = await gw.update(GatewayWorkflow.request_cluster, cluster_request(gw, name))
        assert admission.queued
    state = await gw.state()
    assert state.status is GatewayStatus.UPGRADING and state.queue == [first, second]
    assert [(c.name, c.status) for c in state.clusters] == [
        (first, "Queued"),
        (second, "Queued"),
    ]
    refused = await gw.refused(GatewayWorkflow.delete)
    assert f"still has clusters: {first}, {second}" in refused.message
    assert refused.type == errors.IN_USE
    cluster = gw.stage.client.get_workflow_handle(names.cluster_workflow_id(first))
    queued = await cluster.query(ClusterWorkflow.state_query)
    assert queued.status is ClusterStatus.QUEUED and queued.steps == []

    held.set()  # Running again, then the queue drains in order
    state = await until(
        gw.stage.client,
        gw.state,
        lambda s: s.status is GatewayStatus.RUNNING and not s.queue,
        "upgraded, queue drained",
    )
    assert state.version == "1.1.0" and not any(c.queued for c in state.clusters)
    for name in (first, second):
        await cluster_running(gw.stage.client, name)
    told = [
        event.signal_external_workflow_execution_initiated_event_attributes
        for history in await runs(gw.stage.client, gw.handle.id)
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
    ]
    told = [t for t in told if t.signal_name == "proceed"]  # (presence notices, wake-ups)
    assert [(t.signal_name, t.workflow_execution.workflow_id) for t in told] == [
        ("proceed", names.cluster_workflow_id(first)),
        ("proceed", names.cluster_workflow_id(second)),
    ]
    # Running again: the next request is not queued
    request = cluster_request(gw)
    admission = await gw.update(GatewayWorkflow.request_cluster, request)
    assert not admission.queued
    await cluster_running(gw.stage.client, request.spec.name)


@pytest.mark.parametrize("before", ["Running", "Failed", "Registered", "Pending after a reset"])
async def test_delete_removes_the_installer_vm_when_it_holds_vcenter_credentials(
    gw: Gateway, before: str
) -> None:
    """A configured gateway (Running, Failed) destroys its installer VM itself; one without
    credentials (Registered, or Pending after a reset dropped them) cannot, and says how."""
    if before == "Running":
        await gw.running()
    elif before == "Registered":
        await gw.registered()
    else:
        await gw.failed()
        if before == "Pending after a reset":
            await gw.update(GatewayWorkflow.reset, ResetRequest())
            await gw.until(GatewayStatus.PENDING)
    assert (await gw.state()).status.value == before.split()[0]
    await gw.update(GatewayWorkflow.delete)
    final = await gw.handle.result()  # the workflow ends, Deleted
    assert final.status is GatewayStatus.DELETED and final.accounts == []
    assert gw.world.vms == {}
    destroyed = [vm for action, vm in gw.installer_calls() if action == "destroy"]
    if before in ("Running", "Failed"):
        assert destroyed == [gw.installer]
        assert final.reason == "deleted"
    else:
        assert destroyed == []
        assert f"kubegate-installer-{gw.name}" in final.reason
        assert "--vcenter install.yaml" in final.reason


async def test_reset_of_an_overdue_gateway_issues_a_new_code_and_restarts_its_clock(
    gw: Gateway,
) -> None:
    # created eleven minutes ago (as its state would be carried by continue-as-new)
    old_code, pairing = _new_pairing()
    long_ago = datetime.now(UTC) - timedelta(minutes=11)
    state = GatewayState(
        name=gw.name, pairing=pairing, created_at=long_ago, pairing_issued_at=long_ago
    )
    await gw.stage.client.start_workflow(
        GatewayWorkflow.run,
        GatewayInput(name=gw.name, pairing=pairing, timing=FAST, state=state),
        id=gw.handle.id,
        task_queue=gw.stage.queue,
    )
    state = await until(gw.stage.client, gw.state, lambda s: s.overdue, "overdue")
    assert state.status is GatewayStatus.PENDING and state.hints == list(TROUBLESHOOTING_HINTS)
    assert "not registered 10 minutes" in state.reason

    state, code = await gw.kubegate.reset_gateway(gw.name)
    assert code is not None and code != old_code
    state = await until(
        gw.stage.client, gw.state, lambda s: s.reason.startswith("reset: new pairing"), "reset"
    )
    assert not state.overdue and state.hints == []
    assert state.pairing_issued_at is not None and state.pairing_issued_at > long_ago
    with pytest.raises(RequestRefused, match="wrong pairing code"):
        await gw.pair(old_code)
    # the overdue timer runs again, ten minutes from the new code (in the run after the
    # reset's settle point: waited for, it may not have started yet)

    async def timers() -> list[timedelta]:
        return [
            event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
            for history in await runs(gw.stage.client, gw.handle.id)
            for event in history.events
            if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
        ]

    started = await until(
        gw.stage.client, timers, lambda t: t[-1] > timedelta(minutes=9), "overdue timer again"
    )
    assert started[0] < timedelta(minutes=1)  # the first: overdue already, at once
    state = await gw.pair(code)
    assert state.agent is not None and not state.overdue


async def test_updates_the_state_does_not_allow_are_refused_and_never_enter_the_history(
    gw: Gateway,
) -> None:
    await gw.registered()
    for update, args, says in (
        (GatewayWorkflow.resize, [ResizeRequest(size=3)], "resize needs Running"),
        (GatewayWorkflow.upgrade, [UpgradeRequest()], "upgrade needs Running"),
        (GatewayWorkflow.request_cluster, [cluster_request(gw)], "need a Running gateway"),
        (GatewayWorkflow.reset, [ResetRequest()], "reset is for"),
    ):
        assert says in (await gw.refused(update, *args)).message

    await gw.update(GatewayWorkflow.configure, gw.config())
    await gw.until(GatewayStatus.RUNNING)
    for update, args, says in (
        (GatewayWorkflow.configure, [gw.config()], "configure needs a registered gateway"),
        (GatewayWorkflow.reset, [ResetRequest()], "reset is for"),
        (GatewayWorkflow.resize, [ResizeRequest(size=1)], "already has 1 node(s)"),
    ):
        assert says in (await gw.refused(update, *args)).message

    # its agent restarts on a release this one does not work with: no new work
    await gw.pair(None, version="99.0.0")
    state = await gw.state()
    assert state.agent_problem is not None and "upgrade the agent" in state.agent_problem
    for update, args in (
        (GatewayWorkflow.request_cluster, [cluster_request(gw)]),
        (GatewayWorkflow.resize, [ResizeRequest(size=3)]),
    ):
        refused = await gw.refused(update, *args)
        assert "its agent is 99.0.0" in refused.message, refused.message
        assert refused.type == errors.GATEWAY_NOT_READY
    await gw.pair(None)
    assert (await gw.state()).agent_problem is None

    assert await accepted_updates(gw.stage.client, gw.handle.id) == [
        "register",
        "configure",
        "register",
        "register",
    ]


async def test_configure_is_refused_while_the_agents_release_is_not_accepted(gw: Gateway) -> None:
    await gw.pair(await gw.create(), version="99.0.0")
    assert (await gw.state()).agent_problem is not None
    try:
        await gw.update(GatewayWorkflow.configure, gw.config())
    except WorkflowUpdateFailedError as exc:
        refused = exc.cause
    else:  # accepted: it provisions through the agent it should not use
        await gw.until(GatewayStatus.RUNNING)
        refused = None
    assert isinstance(refused, ApplicationError), "configure was accepted"
    assert "its agent is 99.0.0" in refused.message
    assert refused.type == errors.GATEWAY_NOT_READY
