"""The control worker: hosts every workflow and the activities that need no vCenter."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from temporalio.client import Client
from temporalio.worker import (
    UnsandboxedWorkflowRunner,
    Worker,
    WorkerDeploymentConfig,
    WorkflowRunner,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.ipam import IpamActivities
from activities.lifecycles import LifecycleActivities
from domain.names import CONTROL_TASK_QUEUE
from plumbing import profiling
from plumbing.connect import connect
from plumbing.errors import KubegateError
from plumbing.logformat import setup_logging
from plumbing.metrics import process_runtime
from plumbing.settings import Settings, settings_with
from plumbing.versioning import deployment_config, promote_if_first
from workers.census import census_running
from workers.run import run_until_signalled
from workflows.audit import AuditWorkflow
from workflows.cluster import ClusterWorkflow
from workflows.gateway import GatewayWorkflow
from workflows.ip_pool import IpPoolWorkflow
from workflows.preflight import PreflightWorkflow

WORKFLOWS = [PreflightWorkflow, IpPoolWorkflow, ClusterWorkflow, GatewayWorkflow, AuditWorkflow]


def workflow_runner(sandbox: bool = True) -> WorkflowRunner:
    """The sandbox, with `cryptography` passed through: workflows verify the agent's
    signatures with it, and its native module can be loaded only once per process.

    Without the sandbox (`KUBEGATE_WORKFLOW_SANDBOX=false`) the worker spends much less CPU
    per workflow task (the SDK enters the sandbox for every payload it converts) but nothing
    stops a non-deterministic call at run time: the tests run every workflow in the sandbox
    and replay the kept histories, which is what keeps that safe."""
    if not sandbox:
        return UnsandboxedWorkflowRunner()
    return SandboxedWorkflowRunner(
        # opentelemetry: the tracing interceptor's spans, when tracing is on
        restrictions=SandboxRestrictions.default.with_passthrough_modules(
            "cryptography", "opentelemetry"
        )
    )


def build_worker(
    client: Client,
    task_queue: str = CONTROL_TASK_QUEUE,
    deployment: WorkerDeploymentConfig | None = None,
    sandbox: bool = True,
) -> Worker:
    """The control worker on its task queue (tests pass their own queue), a version of a
    worker deployment when `deployment` is given."""
    ipam = IpamActivities(client)
    facts = LifecycleActivities(client)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        workflow_runner=workflow_runner(sandbox),
        activities=[
            ipam.allocate_addresses,
            ipam.release_addresses,
            ipam.list_addresses,
            ipam.describe_pool,
            facts.gateway_account,
            facts.lifecycle_fact,
            facts.confirm_release,
            facts.audit_owners,
            facts.audit_allocations,
        ],
        deployment_config=deployment,
    )


async def serve(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    log = logging.getLogger("kubegate")
    runtime = process_runtime(settings)
    if settings.metrics_address:
        log.info("metrics on http://%s/metrics", settings.metrics_address)
    client = await connect(settings, worker=True, runtime=runtime, service="kubegate-control")
    async with contextlib.AsyncExitStack() as running:
        if settings.metrics_address:
            await running.enter_async_context(census_running(client, settings))
        await _serve(client, settings, log)


async def _serve(client: Client, settings: Settings, log: logging.Logger) -> None:
    config = deployment_config(settings)
    worker = build_worker(client, deployment=config, sandbox=settings.workflow_sandbox)
    log.info("control worker polling %s", CONTROL_TASK_QUEUE)
    if config is None:
        await run_until_signalled(worker)
        return
    version = config.version

    async def started() -> None:
        current = await promote_if_first(client, version, always=settings.worker_promote)
        if current != version.build_id:
            log.warning(
                "worker deployment %s: current version is %s; this worker (%s) takes new "
                "runs once promoted: kubegate worker promote %s",
                version.deployment_name,
                current,
                version.build_id,
                version.build_id,
            )
        else:
            log.info(
                "worker deployment %s: %s is current", version.deployment_name, version.build_id
            )

    await run_until_signalled(worker, started=started)


def main(metrics_address: str | None = None, log_format: str | None = None) -> None:
    """Run the control worker; the CLI's options win over the settings."""
    settings = settings_with(metrics_address=metrics_address, log_format=log_format)
    setup_logging(settings.log_format)
    profiling.start("control")
    try:
        asyncio.run(serve(settings))
    except KubegateError as exc:
        logging.getLogger("kubegate").error("control worker stopped: %s", exc)
        raise
    finally:
        profiling.finish()


if __name__ == "__main__":
    main()
