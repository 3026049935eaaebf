"""ClusterWorkflow's own logic with stand-in activities (tests/workflows/world.py) on a
Temporal dev server of its own: step order, refusals, retries, abort, settle points, forged
results. No simulator: each runs in about a second.

(Temporal's time-skipping server was tried first: with Updates, queries and continue-as-new
it stalled or timed out a query in about one run of four; the dev server does not.)"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any, Literal

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from domain import names
from domain.cluster import ClusterSpec
from domain.health import ReconcileRequest
from domain.lifecycle import (
    AddPoolRequest,
    ChangeResult,
    ClusterInput,
    ClusterState,
    ClusterStatus,
    ClusterUpgradeRequest,
    DeleteRequest,
    ScaleRequest,
    Timing,
    operations,
)
from domain.sealing import AgentKey
from plumbing.updates import send_update
from tests.workflows.world import TEMPLATE, World, fail, forever, unique
from workflows.cluster import ClusterWorkflow
from workflows.nodes import RETRY_ATTEMPTS

PROFILE: dict[str, Any] = {
    "name": "ubuntu-k8s",
    "layers": [
        {
            "layer": "os",
            "pack": {"name": "ubuntu", "version": "22.04", "values": {"template": TEMPLATE}},
        },
        {"layer": "kubernetes", "pack": {"name": "kubernetes", "version": "1.30.4"}},
        {"layer": "network", "pack": {"name": "cni-calico", "version": "3.28.0"}},
    ],
}


def spec(name: str, cp: int = 1, workers: int = 2) -> ClusterSpec:
    domain = {
        "compute_cluster": "DC0_C0",
        "datastore": "LocalDS_0",
        "network": "VM Network",
        "ip_pool": "pool",
    }
    return ClusterSpec.model_validate(
        {
            "name": name,
            "profile": PROFILE,
            "cloud_account": "acct",
            "placement": {"datacenter": "DC0", "ip_allocation": "static"},
            "control_plane": {"size": cp, "placement": [domain]},
            "workers": [{"name": "w", "size": workers, "placement": [domain]}],
        }
    )


class Running:
    """One test's world and workers (a gateway name and task queue of its own)."""

    def __init__(self, env: WorkflowEnvironment) -> None:
        self.env = env
        self.world = World(gateway=unique("gw"))
        self.queue = unique("wf")
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Running:
        for worker in self.world.workers(self.env.client, self.queue):
            await self._stack.enter_async_context(worker)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.aclose()

    async def deploy(
        self,
        cluster: ClusterSpec,
        gateway: bool = True,
        readiness: Literal["guest", "kubernetes"] = "guest",
        **account: Any,
    ) -> WorkflowHandle[Any, Any]:
        """Start the cluster as its gateway would (credentials then come from the stand-in
        `gateway_account`; the gateway itself is not there: its notices go nowhere)."""
        started = await self.env.client.start_workflow(
            ClusterWorkflow.run,
            ClusterInput(
                spec=cluster,
                account=self.world.account().model_copy(update=account),
                timing=Timing(heartbeat_seconds=5),
                readiness=readiness,
                gateway_workflow=f"gateway/{self.world.gateway}" if gateway else None,
            ),
            id=names.cluster_workflow_id(cluster.name),
            task_queue=self.queue,
        )
        # not pinned to the first run: a settled cluster continues as new
        return self.env.client.get_workflow_handle(started.id)

    async def update(self, handle: WorkflowHandle[Any, Any], *args: Any) -> Any:
        """An Update to the cluster's current run (retried while a settling run closes)."""
        return await send_update(handle.id, lambda: handle.execute_update(*args))

    async def until(self, name: str, *statuses: ClusterStatus) -> ClusterState:
        handle = self.env.client.get_workflow_handle(names.cluster_workflow_id(name))
        for _ in range(400):
            state: ClusterState = await handle.query(ClusterWorkflow.state_query)
            if state.status in statuses:
                return state
            await asyncio.sleep(0.05)
        pending = (await handle.describe()).raw_description.pending_activities
        raise AssertionError(
            f"cluster {name}: still {state.status}; steps "
            + ", ".join(f"{s.name} {s.state.value}" for s in state.steps)
            + "; pending: "
            + ", ".join(f"{a.activity_type.name} {a.state} attempt {a.attempt}" for a in pending)
        )


async def test_a_deploy_runs_its_steps_in_order_and_settles(env: WorkflowEnvironment) -> None:
    async with Running(env) as run:
        name = unique("order")
        handle = await run.deploy(spec(name, cp=1, workers=2))
        first_run = (await handle.describe()).run_id
        state = await run.until(name, ClusterStatus.RUNNING)

        steps = [s.name for s in state.steps]
        assert steps[:2] == ["validate", "preflight"]
        assert set(steps[2:4]) == {"folder", "addresses"}  # these two run at once
        assert steps[4:] == ["bootstrap", "create-vms", "readiness", "tags"]
        assert [op for op, _, _ in operations(state.steps)] == ["deploy"]
        calls = run.world.calls
        assert calls.index("preflight_all") < calls.index("vm_ensure_folder")
        # the CA and tokens are made once; cloud-init is rendered once, by vm_create
        assert calls.count("bootstrap_secrets") == 1 and "bootstrap_render" not in calls
        assert calls.index("bootstrap_secrets") < calls.index("vm_create")
        assert all(n.bootstrap_digest for n in state.nodes)
        assert len(run.world.vms) == 3 and all(n.phase == "ready" for n in state.nodes)
        assert len(run.world.allocations) == 4  # three nodes and the VIP

        for _ in range(100):  # settled: continued as new with its state
            if (await handle.describe()).run_id != first_run:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no continue-as-new after Running")
        again = await run.until(name, ClusterStatus.RUNNING)
        assert again.steps == state.steps and again.nodes == state.nodes


async def test_requests_the_status_does_not_allow_are_refused_and_abort_cleans_up(
    env: WorkflowEnvironment,
) -> None:
    async with Running(env) as run:
        name = unique("refuse")
        run.world.hooks["vm_create"] = forever  # clones that do not end
        handle = await run.deploy(spec(name))
        for _ in range(200):
            if "vm_create" in run.world.calls:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await run.update(handle, ClusterWorkflow.delete, DeleteRequest())
        assert "use abort" in str(refused.value.cause)
        with pytest.raises(WorkflowUpdateFailedError):
            await run.update(handle, ClusterWorkflow.scale, ScaleRequest(pool="w", size=3))
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await run.update(handle, ClusterWorkflow.retry)
        assert "only a Failed cluster" in str(refused.value.cause)

        aborting = await run.update(handle, ClusterWorkflow.abort)
        assert aborting.status is ClusterStatus.DELETING and aborting.reason == "aborting"
        state = await run.until(name, ClusterStatus.DELETED)
        assert state.reason == "aborted"
        assert [op for op, _, _ in operations(state.steps)] == ["deploy", "abort"]
        assert run.world.allocations == {}  # every address given back
        assert "vm_sweep" in run.world.calls and "vm_remove_folder" in run.world.calls


async def test_failing_attempts_are_retried_and_a_permanent_failure_names_its_step(
    env: WorkflowEnvironment,
) -> None:
    async with Running(env) as run:
        name = unique("fails")
        run.world.hooks["vm_ensure_folder"] = fail("vCenter is not answering", times=2)
        run.world.hooks["vm_power_on"] = fail(
            "guest never reported", kind="GuestTimeout", non_retryable=True
        )
        handle = await run.deploy(spec(name))
        state = await run.until(name, ClusterStatus.FAILED)
        folder = next(s for s in state.steps if s.name == "folder")
        assert folder.state.value == "done" and folder.attempts == 3  # two failed, then done
        readiness = next(s for s in state.steps if s.name == "readiness")
        assert readiness.state.value == "failed" and readiness.attempts == 1  # not retried
        assert "guest never reported" in (state.error or "")
        assert "Start nodes" in (state.error or "")  # the step, in the user's words

        del run.world.hooks["vm_power_on"]  # fixed: retry runs the steps again
        await run.update(handle, ClusterWorkflow.retry)
        state = await run.until(name, ClusterStatus.RUNNING)
        seen = [(s.operation, s.operation_number, s.name, s.state.value) for s in state.steps]
        ops = [op for op, _, _ in operations(state.steps)]
        # (known, rare under load, being investigated: a second `deploy` operation may appear
        # before the retry's; the retry's own steps and the VMs are what this test holds)
        assert ops[0] == "deploy" and ops[-1] == "retry", seen
        retried = [s for s in state.steps if s.operation == "retry"]
        assert retried and all(s.state.value in ("done", "skipped") for s in retried), seen
        assert len(run.world.vms) == 3  # each VM once: the retry found them


async def test_a_result_signed_by_another_key_is_refused(env: WorkflowEnvironment) -> None:
    """The stand-in agent signs with its key; the cluster trusts another: every result is a
    forgery, retried and then refused, and nothing after it runs."""
    async with Running(env) as run:
        name = unique("forged")
        other = AgentKey.generate().signing_key_b64
        trusted = run.world.account().model_copy(update={"agent_signing_key": other})
        run.world.hooks["gateway_account"] = lambda _: trusted  # the gateway says so too
        await run.deploy(spec(name), agent_signing_key=other)
        state = await run.until(name, ClusterStatus.FAILED)
        preflight = next(s for s in state.steps if s.name == "preflight")
        assert preflight.state.value == "failed"
        assert "forged result" in (state.error or "")
        assert run.world.calls.count("preflight_all") == RETRY_ATTEMPTS
        assert "vm_ensure_folder" not in run.world.calls


async def test_a_lifecycle_without_a_gateway_fails_cleanly_once_its_credentials_are_gone(
    env: WorkflowEnvironment,
) -> None:
    """Credentials are not carried across continue-as-new; a cluster nobody's gateway started
    cannot fetch them again: its next step fails saying so (the workflow is not wedged)."""
    async with Running(env) as run:
        name = unique("orphan")
        run.world.hooks["vm_ensure_folder"] = fail("folder refused", non_retryable=True)
        handle = await run.deploy(spec(name), gateway=False)
        await run.until(name, ClusterStatus.FAILED)
        del run.world.hooks["vm_ensure_folder"]
        await asyncio.sleep(0.5)  # (settled: continued as new without credentials)
        await run.update(handle, ClusterWorkflow.retry)
        state = await run.until(name, ClusterStatus.FAILED)  # (retry made it Provisioning)
        assert "no credentials for cloud account acct" in (state.error or "")


async def test_a_change_returns_its_operation_at_once_and_runs_in_the_main_loop(
    env: WorkflowEnvironment,
) -> None:
    async with Running(env) as run:
        name = unique("change")
        handle = await run.deploy(spec(name, cp=1, workers=1))
        deployed = await run.until(name, ClusterStatus.RUNNING)
        cloned = asyncio.Event()

        async def held(_: Any) -> None:  # the new node's clone ends when the test says
            await cloned.wait()

        run.world.hooks["vm_create"] = held

        accepted: ChangeResult = await asyncio.wait_for(
            run.update(handle, ClusterWorkflow.scale, ScaleRequest(pool="w", size=2)), 10
        )
        assert accepted.status == ClusterStatus.UPDATING.value
        assert accepted.operation == deployed.operations_run + 1
        assert accepted.added == [] and accepted.removed == []  # nothing done yet
        state = await run.until(name, ClusterStatus.UPDATING)
        assert state.changes == []
        steps = operations(state.steps)
        assert [op for op, _, _ in steps][-1] == "Scale w to 2"

        # one change at a time: another is refused, with the reason
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await run.update(handle, ClusterWorkflow.scale, ScaleRequest(pool="w", size=3))
        assert "changes need Running" in str(refused.value.cause)

        cloned.set()
        done = await run.until(name, ClusterStatus.RUNNING, ClusterStatus.FAILED)
        assert done.status is ClusterStatus.RUNNING, done.error
        (change,) = done.changes
        assert change.operation == accepted.operation
        assert len(change.added) == 1 and change.removed == []


async def test_a_change_checked_while_another_is_carried_out_is_refused_not_applied(
    env: WorkflowEnvironment,
) -> None:
    """A change's spec is computed when it arrives; one accepted while it waited for its
    address check would be undone by it: it is refused instead."""
    async with Running(env) as run:
        name = unique("race")
        handle = await run.deploy(spec(name, cp=1, workers=1))
        deployed = await run.until(name, ClusterStatus.RUNNING)
        checked, held = asyncio.Event(), asyncio.Event()

        async def hold_first(_: Any) -> None:  # the scale's address check waits
            if not held.is_set():
                held.set()
                await checked.wait()

        run.world.hooks["describe_pool"] = hold_first
        scale = asyncio.create_task(
            run.update(handle, ClusterWorkflow.scale, ScaleRequest(pool="w", size=2))
        )
        await asyncio.wait_for(held.wait(), 10)
        pool = deployed.spec.workers[0].model_copy(update={"name": "x", "size": 1})
        added: ChangeResult = await run.update(
            handle, ClusterWorkflow.add_pool, AddPoolRequest(pool=pool)
        )
        await run.until(name, ClusterStatus.RUNNING)
        checked.set()
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await scale
        assert "send it again" in str(refused.value.cause)
        state = await run.until(name, ClusterStatus.RUNNING)
        assert [p.name for p in state.spec.workers] == ["w", "x"]  # the add-pool stands
        assert [c.operation for c in state.changes] == [added.operation]


async def test_nodes_leave_kubernetes_before_their_vms_go_one_member_at_a_time(
    env: WorkflowEnvironment,
) -> None:
    """Readiness `kubernetes`: every readiness wait carries the cluster's secrets (nodes Ready
    through the API); a node removed is drained (a control-plane member also leaves etcd,
    asked through the members that stay) before its VM is destroyed, and its Node deleted
    after; control-plane members go one at a time."""
    async with Running(env) as run:
        name = unique("leave")
        handle = await run.deploy(spec(name, cp=3, workers=2), readiness="kubernetes")
        await run.until(name, ClusterStatus.RUNNING)
        waits = [r for a, r in run.world.requests if a == "vm_wait_ready"]
        assert waits and all(r.secrets is not None for r in waits)
        assert all(r.kubernetes_version == "1.30.4" for r in waits)

        before = len(run.world.requests)
        await run.update(handle, ClusterWorkflow.scale, ScaleRequest(pool="cp", size=1))
        state = await run.until(name, ClusterStatus.RUNNING, ClusterStatus.FAILED)
        assert state.status is ClusterStatus.RUNNING, state.error
        calls = [
            (a, getattr(r, "node", None) or getattr(r, "name", ""), getattr(r, "drain", None))
            for a, r in run.world.requests[before:]
            if a in ("cluster_node_leave", "vm_destroy")
        ]
        assert calls == [
            ("cluster_node_leave", f"{name}-cp-2", True),
            ("vm_destroy", f"{name}-cp-2", None),
            ("cluster_node_leave", f"{name}-cp-2", False),
            ("cluster_node_leave", f"{name}-cp-1", True),
            ("vm_destroy", f"{name}-cp-1", None),
            ("cluster_node_leave", f"{name}-cp-1", False),
        ]
        leaves = [r for a, r in run.world.requests[before:] if a == "cluster_node_leave"]
        first_drain = leaves[0]
        assert first_drain.control_plane and len(first_drain.etcd_endpoints) == 2
        assert leaves[2].etcd_endpoints == [
            n.address for n in state.nodes if n.name == f"{name}-cp-0"
        ]
        assert {n.name for n in state.nodes if n.control_plane} == {f"{name}-cp-0"}


def created_and_destroyed(run: Running, since: int) -> list[tuple[str, str]]:
    """('create'|'destroy', node) for every VM call since request `since`, in order."""
    out = []
    for activity_name, request in run.world.requests[since:]:
        if activity_name == "vm_create":
            out.append(("create", request.name))
        elif activity_name == "vm_destroy":
            out.append(("destroy", request.name))
    return out


def fail_for(node: str) -> Any:
    """A vm_create hook failing (for good) for one node only."""

    def hook(request: Any) -> Any:
        if request.name == node:
            raise ApplicationError("clone refused", type="InvalidSpec", non_retryable=True)
        return None

    return hook


async def test_a_failed_replacement_keeps_the_old_node_until_its_successor_is_ready(
    env: WorkflowEnvironment,
) -> None:
    """The only control-plane member's replacement fails: the old member stays; changes that
    would make or remove other nodes meanwhile are refused with the reason (also retry);
    the same upgrade again makes the new member first and only then removes the old one."""
    async with Running(env) as run:
        name = unique("halfdone")
        handle = await run.deploy(spec(name, cp=1, workers=1))
        await run.until(name, ClusterStatus.RUNNING)
        run.world.hooks["vm_create"] = fail_for(f"{name}-cp-0-r1")
        upgrade = ClusterUpgradeRequest(kubernetes="1.31.0")
        await run.update(handle, ClusterWorkflow.upgrade, upgrade)
        state = await run.until(name, ClusterStatus.FAILED)
        assert f"{name}-cp-0-r1" in (state.error or "") or "clone refused" in (state.error or "")
        assert {n.name for n in state.nodes if n.phase == "ready"} >= {f"{name}-cp-0"}
        assert state.rollout is not None and state.rollout.state == "failed"

        for refused_update, args in (
            (ClusterWorkflow.scale, (ScaleRequest(pool="w", size=2),)),
            (ClusterWorkflow.retry, ()),
        ):
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                await run.update(handle, refused_update, *args)
            assert "half done" in str(refused.value.cause), refused.value.cause

        del run.world.hooks["vm_create"]
        since = len(run.world.requests)
        await run.update(handle, ClusterWorkflow.upgrade, upgrade)
        state = await run.until(name, ClusterStatus.RUNNING, ClusterStatus.FAILED)
        assert state.status is ClusterStatus.RUNNING, state.error
        calls = created_and_destroyed(run, since)
        assert calls.index(("create", f"{name}-cp-0-r1")) < calls.index(("destroy", f"{name}-cp-0"))
        assert calls.index(("destroy", f"{name}-cp-0")) < calls.index(("create", f"{name}-w-0-r1"))
        assert {n.kubernetes for n in state.nodes} == {"1.31.0"}


async def test_a_node_a_failed_scale_up_left_is_made_after_the_control_plane_is_upgraded(
    env: WorkflowEnvironment,
) -> None:
    """A scale-up failed on w-1; then an upgrade: w-1 is made (at the new version) only after
    the control plane's new member, and is not replaced a second time."""
    async with Running(env) as run:
        name = unique("leftover")
        handle = await run.deploy(spec(name, cp=1, workers=1))
        await run.until(name, ClusterStatus.RUNNING)
        run.world.hooks["vm_create"] = fail_for(f"{name}-w-1")
        await run.update(handle, ClusterWorkflow.scale, ScaleRequest(pool="w", size=2))
        await run.until(name, ClusterStatus.FAILED)
        del run.world.hooks["vm_create"]
        since = len(run.world.requests)
        await run.update(
            handle, ClusterWorkflow.upgrade, ClusterUpgradeRequest(kubernetes="1.31.0")
        )
        state = await run.until(name, ClusterStatus.RUNNING, ClusterStatus.FAILED)
        assert state.status is ClusterStatus.RUNNING, state.error
        calls = created_and_destroyed(run, since)
        assert calls.index(("create", f"{name}-cp-0-r1")) < calls.index(("create", f"{name}-w-1"))
        assert ("create", f"{name}-w-1-r1") not in calls  # made once, at the new version
        assert state.rollout is not None and state.rollout.done == state.rollout.total == 2
        assert sorted(n.name for n in state.nodes) == sorted(
            [f"{name}-cp-0-r1", f"{name}-w-0-r1", f"{name}-w-1"]
        )


async def test_a_control_plane_scale_stops_only_at_an_odd_number_of_members(
    env: WorkflowEnvironment,
) -> None:
    """1 -> 3 aborted while the second member is made: it goes on to the third (never two
    members at rest), and says what it did."""
    async with Running(env) as run:
        name = unique("odd")
        handle = await run.deploy(spec(name, cp=1, workers=1))
        await run.until(name, ClusterStatus.RUNNING)
        cloned = asyncio.Event()

        async def held(request: Any) -> None:
            if request.name == f"{name}-cp-1":
                await cloned.wait()

        run.world.hooks["vm_create"] = held
        accepted = await run.update(handle, ClusterWorkflow.scale, ScaleRequest(pool="cp", size=3))
        for _ in range(200):
            state: ClusterState = await handle.query(ClusterWorkflow.state_query)
            if any(n.name == f"{name}-cp-1" and n.phase == "creating" for n in state.nodes):
                break
            await asyncio.sleep(0.05)
        await run.update(handle, ClusterWorkflow.abort_rollout)
        cloned.set()
        state = await run.until(name, ClusterStatus.RUNNING, ClusterStatus.FAILED)
        assert state.status is ClusterStatus.RUNNING, state.error
        members = [n.name for n in state.nodes if n.control_plane]
        assert len(members) == 3, members
        (change,) = [c for c in state.changes if c.operation == accepted.operation]
        assert change.error is None  # nothing was left to stop at: it finished
        assert state.rollout is not None and state.rollout.members == [
            f"+{name}-cp-1",
            f"+{name}-cp-2",
        ]


async def test_a_node_not_ready_in_kubernetes_is_replaced_after_its_timeout_in_order(
    env: WorkflowEnvironment,
) -> None:
    """Readiness `kubernetes`: a reconcile asks the cluster's API too; a worker NotReady
    longer than its pool's timeout is replaced under the same name and address: it leaves
    (drained without waiting), its VM is destroyed, its Node deleted, its VM made anew, and
    it is waited for Ready. A control-plane member NotReady with too few others serving is
    only reported."""
    async with Running(env) as run:
        name = unique("heal")
        cluster = spec(name, cp=3, workers=2)
        data = cluster.model_dump(mode="json")
        data["healing"] = {"reconcile_seconds": 0}
        data["workers"][0]["health"] = {"unhealthy_after_seconds": 5}
        data["control_plane"]["health"] = {"unhealthy_after_seconds": 5}
        handle = await run.deploy(ClusterSpec.model_validate(data), readiness="kubernetes")
        state = await run.until(name, ClusterStatus.RUNNING)
        worker = f"{name}-{cluster.workers[0].name}-0"
        address = next(n.address for n in state.nodes if n.name == worker)
        run.world.not_ready = {
            worker: "Ready=Unknown (NodeStatusUnknown)",
            f"{name}-cp-1": "Ready=False",
            f"{name}-cp-2": "Ready=False",
        }
        health = await run.update(handle, ClusterWorkflow.reconcile, ReconcileRequest())
        assert health.repairs_made == 0
        found = {f.node: f for f in health.findings}
        assert "Kubernetes: Ready=Unknown" in found[worker].detail
        assert found[worker].kind == "unhealthy"
        before = len(run.world.requests)
        await asyncio.sleep(5)
        # (the reconcile scheduled for the end of its timeout may come first and replace it:
        # either way the worker is replaced once, and this reconcile returns after it)
        health = await run.update(handle, ClusterWorkflow.reconcile, ReconcileRequest())
        run.world.not_ready.pop(worker)  # its new VM reports Ready
        state = await run.until(name, ClusterStatus.RUNNING)
        assert [s.title.split(":")[0] for s in state.steps if s.name == "repair"] == [
            f"Replace {worker}"
        ], health.findings
        # cp-1 and cp-2 are NotReady: cp-0 alone does not keep quorum, nothing is done to them
        members = [f for f in health.findings if f.node.startswith(f"{name}-cp")]
        assert len(members) == 2 and all("etcd needs 2" in f.detail for f in members), members
        calls = [
            (a, getattr(r, "node", None) or getattr(r, "name", ""), getattr(r, "drain", None))
            for a, r in run.world.requests[before:]
            if a in ("cluster_node_leave", "vm_destroy", "vm_create", "vm_wait_ready")
        ]
        assert calls == [
            ("cluster_node_leave", worker, True),
            ("vm_destroy", worker, None),
            ("cluster_node_leave", worker, False),
            ("vm_create", worker, None),
            ("vm_wait_ready", "", None),
        ]
        drain = next(r for a, r in run.world.requests[before:] if a == "cluster_node_leave")
        assert drain.drain_timeout_seconds == 0
        create = next(r for a, r in run.world.requests[before:] if a == "vm_create")
        assert create.network.address == address


async def test_tags_are_best_effort_and_the_clusters_tag_goes_after_its_vms(
    env: WorkflowEnvironment,
) -> None:
    async with Running(env) as run:
        name = unique("tags")
        run.world.hooks["vm_tag"] = fail("no tagging privilege", "MissingPrivilege", True)
        handle = await run.deploy(spec(name, cp=1, workers=1))
        state = await run.until(name, ClusterStatus.RUNNING)
        (tags,) = [s for s in state.steps if s.name == "tags"]
        assert tags.state.value == "done" and "not tagged: no tagging privilege" in tags.detail
        assert state.marks_problem == tags.detail and state.marked == []

        del run.world.hooks["vm_tag"]  # granted: the next change tags every VM
        await run.update(handle, ClusterWorkflow.scale, ScaleRequest(pool="w", size=2))
        state = await run.until(name, ClusterStatus.RUNNING)
        request = [r for n, r in run.world.requests if n == "vm_tag"][-1]
        by_name = {t.name: sorted(t.objects) for t in request.tags}
        vms = sorted(n.vm or "" for n in state.nodes)
        assert by_name[f"cluster:{name}"] == vms and len(vms) == 3
        assert by_name["pool:w"] == sorted(n.vm or "" for n in state.nodes if n.pool == "w")
        assert all(v == {"kubegate.cluster": f"cluster/{name}"} for v in request.fields.values())
        assert state.marks_problem is None and state.marked == vms and state.owner_tag

        await run.update(handle, ClusterWorkflow.delete, DeleteRequest())
        state = await run.until(name, ClusterStatus.DELETED)
        calls = run.world.calls
        assert calls.index("vm_sweep") < calls.index("vm_untag")
        sweep = [r for n, r in run.world.requests if n == "vm_sweep"][-1]
        assert sweep.tag_id == f"urn:tag:kubegate/cluster:{name}"
        assert state.owner_tag is None
