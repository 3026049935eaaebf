"""Worker versioning of the control worker on the real Temporal dev server: the first version
becomes current by itself, a later one only when promoted; entity workflows move to the
current version at their next task."""

from __future__ import annotations

import uuid

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import WorkerDeploymentConfig

from domain.ipam import AllocateRequest, IpPoolInput, IpPoolSpec
from domain.version import VERSION
from plumbing.errors import KubegateError
from plumbing.settings import Settings
from plumbing.versioning import deployment_config, promote, promote_if_first, versions
from workers.control import build_worker
from workflows.ip_pool import IpPoolWorkflow


def test_a_versioned_worker_moves_every_workflow_to_the_current_version() -> None:
    config = deployment_config(Settings(worker_deployment="kubegate", worker_build_id=None))
    assert config is not None and config.use_worker_versioning
    assert config.version == WorkerDeploymentVersion("kubegate", VERSION)
    assert config.default_versioning_behavior is VersioningBehavior.AUTO_UPGRADE
    assert deployment_config(Settings(worker_deployment=None)) is None  # unless asked


async def _build_id_of(handle: WorkflowHandle[IpPoolWorkflow, object]) -> str:
    info = (await handle.describe()).raw_description.workflow_execution_info
    return info.versioning_info.deployment_version.build_id


def _version(deployment: str, build_id: str) -> WorkerDeploymentConfig | None:
    settings = Settings(worker_deployment=deployment, worker_build_id=build_id)
    return deployment_config(settings)


async def test_a_promoted_release_takes_over_running_entity_workflows(
    temporal: WorkflowEnvironment,
) -> None:
    client: Client = temporal.client
    deployment = f"kubegate-{uuid.uuid4().hex[:8]}"
    queue = f"versioned-{uuid.uuid4().hex[:8]}"
    old = WorkerDeploymentVersion(deployment, "0.1.0")
    new = WorkerDeploymentVersion(deployment, "0.2.0")
    spec = IpPoolSpec(
        name="versioned",
        gateway="versioning",
        kind="range",
        first="10.9.0.10",
        last="10.9.0.20",
        prefix=24,
        network_gateway="10.9.0.1",
    )
    async with build_worker(client, queue, _version(deployment, old.build_id)):
        assert await promote_if_first(client, old) == old.build_id  # the first: current
        pool = await client.start_workflow(
            IpPoolWorkflow.run, IpPoolInput(spec=spec), id=f"ippool/{queue}", task_queue=queue
        )
        first = await pool.execute_update(
            IpPoolWorkflow.allocate, AllocateRequest(owner="cluster/a", slots=["a-cp-0"])
        )
        assert await _build_id_of(pool) == old.build_id

        async with build_worker(client, queue, _version(deployment, new.build_id)):
            # a later release does not take over by itself
            assert await promote_if_first(client, new) == old.build_id
            # unless it replaces its predecessor in place (KUBEGATE_WORKER_PROMOTE)
            assert await promote_if_first(client, new, always=True) == new.build_id
            await promote(client, deployment, old.build_id)
            await promote(client, deployment, new.build_id)
            found = {v.build_id: v for v in await versions(client, deployment)}
            assert found[new.build_id].current and not found[old.build_id].current

            # the pool (an entity) moves at its next task, with its state
            again = await pool.execute_update(
                IpPoolWorkflow.allocate, AllocateRequest(owner="cluster/a", slots=["a-cp-0"])
            )
            assert again.addresses == first.addresses
            assert await _build_id_of(pool) == new.build_id
            await pool.terminate("test over")


async def test_promoting_an_unknown_version_says_what_to_do(temporal: WorkflowEnvironment) -> None:
    deployment = f"kubegate-{uuid.uuid4().hex[:8]}"
    with pytest.raises(KubegateError, match="start a control worker of that version first"):
        await promote(temporal.client, deployment, "9.9.9", patience=0.5)
