"""PreflightWorkflow: checks a cloud account and placement on the gateway's agent."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain import errors, names
    from domain.preflight import (
        CheckBatch,
        CheckResult,
        CheckStatus,
        InventoryBatch,
        ObjectChecksRequest,
        PreflightReport,
        PreflightRequest,
        skipped,
    )
    from workflows.nodes import (
        RETRY_ATTEMPTS,
        SIGNED_RESULTS,
        decoded,
        unsigned_result,
        verify_result,
    )

_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_attempts=3,
    non_retryable_error_types=errors.NON_RETRYABLE,
)


@workflow.defn(name="PreflightWorkflow")
class PreflightWorkflow:
    """Connection, version, inventory, privileges, NTP and shared storage, in that order.

    With more_placements, each distinct object of all placements is checked once, in the same
    activities as a single placement (no extra workflow commands).
    """

    def __init__(self) -> None:
        self._results: list[CheckResult] = []
        self._refs: dict[str, str] = {}
        self._phase = "starting"

    @workflow.run
    async def run(self, request: PreflightRequest) -> PreflightReport:
        queue = names.gateway_task_queue(request.gateway)
        requests = 0

        async def step(
            activity: str, arg: Any, summary: str, result: type[CheckBatch] = CheckBatch
        ) -> CheckBatch:
            nonlocal requests
            signed = workflow.patched(SIGNED_RESULTS)
            for _ in range(RETRY_ATTEMPTS):
                activity_id = str(workflow.uuid4()) if signed else None
                raw = await workflow.execute_activity(
                    activity,
                    arg,
                    activity_id=activity_id,
                    result_type=RawValue,
                    task_queue=queue,
                    start_to_close_timeout=timedelta(seconds=90),
                    schedule_to_start_timeout=timedelta(minutes=2),
                    heartbeat_timeout=timedelta(seconds=15),
                    retry_policy=_RETRY,
                    summary=summary,
                )
                value = decoded(raw)
                batch = (
                    verify_result(
                        value, arg, activity, request.agent_signing_key, result, activity_id or ""
                    )
                    if signed
                    else unsigned_result(value, activity, result)
                )
                if batch is not None:
                    requests += batch.vcenter_requests
                    return batch
                workflow.logger.warning("%s: forged result (not the gateway's agent)", activity)
            raise ApplicationError(
                f"{activity}: results not signed by the gateway's approved agent",
                type=errors.FORGED_RESULT,
                non_retryable=True,
            )

        endpoint, user = request.credentials.endpoint, request.credentials.username
        self._phase = "connecting"
        self._show(request)
        try:
            connection = await step(
                "preflight_connection", request, f"Connect to {endpoint.address} as {user}"
            )
        except ActivityError as exc:
            cause = exc.cause
            if not (isinstance(cause, ApplicationError) and cause.type == errors.POLICY_REFUSED):
                raise
            # the agent's local policy forbids this vCenter or trust: nothing was contacted
            connection = CheckBatch(
                results=[
                    CheckResult(
                        check="agent.policy",
                        title="Allowed by the gateway agent's policy",
                        status=CheckStatus.FAIL,
                        object=endpoint.address,
                        detail=cause.message,
                        remedy="use a vCenter and trust the agent's policy lists, or have the "
                        "datacenter operator add it to policy.yaml beside the agent's key",
                    )
                ]
            )
        self._results += connection.results
        failed = any(r.status is CheckStatus.FAIL for r in connection.results)
        placement = request.placement
        if placement is not None and failed:
            self._results.append(
                skipped("placement", "Placement checks", "not checked: cannot log in to vCenter")
            )
        elif placement is not None:
            self._phase = "finding placement objects"
            self._show(request)
            inventory = await step(
                "preflight_inventory",
                request,
                f"Find placement objects in datacenter {placement.datacenter}",
                InventoryBatch,
            )
            self._results += inventory.results
            found = getattr(inventory, "found", {})
            refs = getattr(inventory, "refs", {})
            objects = ObjectChecksRequest(
                credentials=request.credentials,
                placement=placement,
                found=found,
                more_placements=request.more_placements,
                refs=refs,
            )
            # the compute clusters found; with one placement, exactly as before more_placements
            clusters = [placement.compute_cluster] if "compute_cluster" in found else []
            for more in request.more_placements:
                path = more.inventory_paths()["compute_cluster"]
                if path in refs and more.compute_cluster not in clusters:
                    clusters.append(more.compute_cluster)
            self._phase = "checking privileges, NTP and shared storage"
            self._show(request)
            # independent checks: run them at the same time, report in a fixed order
            checks = [step("preflight_privileges", objects, f"Check privileges of {user}")]
            if clusters:
                checks.append(
                    step(
                        "preflight_hosts",
                        objects,
                        f"Check NTP and shared storage on {', '.join(clusters)}",
                    )
                )
            for batch in await asyncio.gather(*checks):
                self._results += batch.results
            self._refs = refs
            if not clusters:
                self._results.append(
                    skipped("hosts", "NTP and shared storage", "not checked: no compute cluster")
                )

        report = PreflightReport(
            account=request.account,
            gateway=request.gateway,
            server=request.credentials.endpoint.address,
            username=request.credentials.username,
            results=self._results,
            vcenter_requests=requests,
            refs=self._refs,
        )
        self._phase = "passed" if report.passed else "failed"
        workflow.upsert_search_attributes(
            [names.STATUS.value_set("Passed" if report.passed else "Failed")]
        )
        self._show(request)
        return report

    @workflow.query
    def results(self) -> list[CheckResult]:
        """Results so far, while the checks run."""
        return self._results

    def _show(self, request: PreflightRequest) -> None:
        """Current details for the Web UI: phase and a results table."""
        lines = [
            f"## Preflight of `{request.account}` — {self._phase}",
            "",
            "| check | status | object | detail |",
            "| --- | --- | --- | --- |",
        ]
        for r in self._results:
            lines.append(f"| {r.title} | {r.status.value} | {r.object} | {r.detail} |")
        workflow.set_current_details("\n".join(lines))
