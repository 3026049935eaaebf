"""Worker versioning of the control worker (Temporal worker deployments).

The control worker registers as version `<deployment>.<build id>` (build id: the release by
default). A deployment's task queue sends new runs to its *current* version, and every
kubegate workflow is AUTO_UPGRADE: it moves to the current version at its next task. Entity
workflows (clusters, gateways, IP pools) live for months, so pinning them would keep an old
release's workers alive as long; they rely on every release's histories replaying
(`workflow.patched()`) instead. (A behaviour per workflow type would need `@workflow.defn(
versioning_behavior=...)`, which the server refuses from an unversioned worker, so the
default is set on the versioned worker only.) Agents stay unversioned: their queues carry
activities only, and the control side's agent window (N and N-1) governs them.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from temporalio.api.enums.v1 import VersionDrainageStatus, WorkerDeploymentVersionStatus
from temporalio.api.workflowservice.v1 import (
    DescribeWorkerDeploymentRequest,
    SetWorkerDeploymentCurrentVersionRequest,
)
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import WorkerDeploymentConfig

from domain.version import VERSION
from plumbing.errors import KubegateError, RequestRefused
from plumbing.settings import Settings

IDENTITY = "kubegate"
#: what a build id may be (the release, or KUBEGATE_WORKER_BUILD_ID)
BUILD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,62}")
_STATUS = "WORKER_DEPLOYMENT_VERSION_STATUS_"
_DRAINAGE = "VERSION_DRAINAGE_STATUS_"


def deployment_version(settings: Settings) -> WorkerDeploymentVersion | None:
    """This process's version in its deployment, or None when versioning is off."""
    if settings.worker_deployment is None:
        return None
    return WorkerDeploymentVersion(
        deployment_name=settings.worker_deployment,
        build_id=settings.worker_build_id or VERSION,
    )


def deployment_config(settings: Settings) -> WorkerDeploymentConfig | None:
    """The control worker's versioning options (None: an unversioned worker)."""
    version = deployment_version(settings)
    if version is None:
        return None
    return WorkerDeploymentConfig(
        version=version,
        use_worker_versioning=True,
        default_versioning_behavior=VersioningBehavior.AUTO_UPGRADE,
    )


@dataclass(frozen=True)
class DeploymentVersion:
    """One version of a deployment as the server knows it."""

    build_id: str
    status: str
    drainage: str
    current: bool


async def versions(client: Client, deployment: str) -> list[DeploymentVersion]:
    """Every version of `deployment` the server knows, newest first (refused when none)."""
    try:
        answer = await client.workflow_service.describe_worker_deployment(
            DescribeWorkerDeploymentRequest(namespace=client.namespace, deployment_name=deployment)
        )
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise RequestRefused(
                f"worker deployment {deployment!r} does not exist (no versioned worker has "
                "polled yet)"
            ) from None
        raise
    info = answer.worker_deployment_info
    current = info.routing_config.current_deployment_version.build_id
    summaries = sorted(
        info.version_summaries, key=lambda v: v.create_time.ToDatetime(), reverse=True
    )
    return [
        DeploymentVersion(
            build_id=v.deployment_version.build_id,
            status=_enum_name(v.status, _STATUS),
            drainage=_enum_name(v.drainage_status, _DRAINAGE),
            current=v.deployment_version.build_id == current,
        )
        for v in summaries
    ]


async def current_build_id(client: Client, deployment: str) -> str | None:
    """The deployment's current build id; None when it has none (or does not exist)."""
    try:
        found = await versions(client, deployment)
    except RequestRefused:
        return None
    return next((v.build_id for v in found if v.current), None)


async def promote(client: Client, deployment: str, build_id: str, patience: float = 30.0) -> None:
    """Make `build_id` the deployment's current version: new runs go to it, entity
    workflows move to it at their next task. Waits (up to `patience` s) until a worker of
    that version has polled, since the server knows a version only from its pollers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            await client.workflow_service.set_worker_deployment_current_version(
                SetWorkerDeploymentCurrentVersionRequest(
                    namespace=client.namespace,
                    deployment_name=deployment,
                    build_id=build_id,
                    identity=IDENTITY,
                )
            )
            return
        except RPCError as exc:
            unknown = exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION)
            if not unknown:
                raise
            if loop.time() > deadline:
                raise KubegateError(
                    f"version {build_id!r} of worker deployment {deployment!r} is not known to "
                    f"Temporal: start a control worker of that version first ({exc.message})"
                ) from None
        await asyncio.sleep(0.25)


async def promote_if_first(
    client: Client, version: WorkerDeploymentVersion, always: bool = False
) -> str:
    """Make `version` current if its deployment has no current version yet (the first
    release installed), or with `always` (a worker replaced in place: its predecessor is
    gone, and nothing would take new tasks until someone promoted it). Otherwise a later
    version waits for `kubegate worker promote`. Returns the current build id."""
    current = await current_build_id(client, version.deployment_name)
    if current is None or (always and current != version.build_id):
        await promote(client, version.deployment_name, version.build_id)
        return version.build_id
    return current


def _enum_name(value: int, prefix: str) -> str:
    """'draining' for VERSION_DRAINAGE_STATUS_DRAINING; '' for unspecified."""
    enum = VersionDrainageStatus if prefix == _DRAINAGE else WorkerDeploymentVersionStatus
    name = enum.Name(value).removeprefix(prefix).lower()  # type: ignore[arg-type]
    return "" if name == "unspecified" else name
