"""The control worker's count, for its metrics, of what only Temporal knows as a whole: open
lifecycles by kind and status (visibility), each IP pool's usage and each gateway's agent
(their workflows' queries). Every `interval` seconds while the worker runs with metrics on.

Counting from visibility (rather than each workflow reporting itself) keeps the numbers
right whichever control worker runs a workflow, after restarts and without replays; every
control worker reports the same numbers (take `max` over them, docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from temporalio.client import Client

from domain import names
from domain.audit import AuditStatus
from domain.gateway import DEGRADED, DISCONNECTED, GatewayState, GatewayStatus
from domain.lifecycle import ClusterStatus
from plumbing import metrics
from plumbing.settings import Settings
from starters.client import KubegateClient

log = logging.getLogger("kubegate.census")

#: kubegate's workflow types and the kind each is (the label comes from the type, which
#: Temporal sets, not from a search attribute anyone starting a workflow may set)
KINDS = {
    "ClusterWorkflow": "cluster",
    "GatewayWorkflow": "gateway",
    "IpPoolWorkflow": "ippool",
    "AuditWorkflow": "audit",
    "PreflightWorkflow": "preflight",
}
#: lifecycles that are open (entities and running one-offs): closed ones are history
OPEN = (
    "ExecutionStatus = 'Running' AND WorkflowType IN (" + ", ".join(f"'{t}'" for t in KINDS) + ")"
)
#: the statuses kubegate's workflows say; any other word (a workflow someone else started
#: with the attribute set) is counted as `other`: the label sets stay few
STATUSES = frozenset(
    {s.value for s in ClusterStatus}
    | {s.value for s in GatewayStatus}
    | {s.value for s in AuditStatus}
    | {DISCONNECTED, DEGRADED, "Active", "Deleted", "Passed", "Failed", "Running"}
)


class Census:
    """One count after another; label sets seen before and gone now are set to 0."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.kubegate = KubegateClient(client, settings)
        self._statuses: set[tuple[str, str, str]] = set()
        self._pools: set[tuple[str, str]] = set()
        self._gateways: set[str] = set()

    async def count(self) -> None:
        states = await self.kubegate.list_gateways()
        await asyncio.gather(
            self.lifecycles({g.name for g in states}), self.pools(), self.agents(states)
        )

    async def lifecycles(self, gateways: set[str]) -> None:
        counts: Counter[tuple[str, str, str]] = Counter()
        async for execution in self.kubegate.client.list_workflows(OPEN):
            kind = KINDS.get(execution.workflow_type)
            if kind is None:
                continue
            attributes = execution.typed_search_attributes
            status = attributes.get(names.STATUS) or "unknown"
            status = status if status in STATUSES else "other"
            gateway = attributes.get(names.GATEWAY) or ""
            gateway = gateway if gateway in gateways else ""  # (only gateways that exist)
            counts[(kind, status, gateway)] += 1
        gauge = metrics.instruments().lifecycles
        for kind, status, gateway in self._statuses | set(counts):
            labels = {"kind": kind, "status": status, "gateway": gateway}
            gauge.set(counts.get((kind, status, gateway), 0), labels)
        self._statuses |= set(counts)

    async def pools(self) -> None:
        found = await self.kubegate.list_pools()
        seen = {(p.spec.gateway, p.spec.name): (p.capacity, p.used) for p in found}
        instruments = metrics.instruments()
        for gateway, pool in self._pools | set(seen):
            capacity, used = seen.get((gateway, pool), (0, 0))
            labels = {"gateway": gateway, "pool": pool}
            instruments.pool_capacity.set(capacity, labels)
            instruments.pool_used.set(used, labels)
        self._pools |= set(seen)

    async def agents(self, states: list[GatewayState]) -> None:
        now = datetime.now(UTC)
        instruments = metrics.instruments()
        watched = set()
        for state in states:
            if state.agent_connected is None:  # not watched yet (e.g. waiting for pairing)
                continue
            watched.add(state.name)
            labels = {"gateway": state.name}
            instruments.agent_connected.set(1 if state.agent_connected else 0, labels)
            silent = 0.0
            if not state.agent_connected and state.agent_seen_at is not None:
                silent = max((now - state.agent_seen_at).total_seconds(), 0.0)
            instruments.agent_last_seen.set(silent, labels)
        for gone in self._gateways - watched:  # deleted, or no longer watched
            instruments.agent_connected.set(0, {"gateway": gone})
            instruments.agent_last_seen.set(0, {"gateway": gone})
        self._gateways |= watched


async def run_census(client: Client, settings: Settings) -> None:
    """Count every `settings.metrics_interval` seconds until cancelled (a failed count is
    logged once until one succeeds again)."""
    census = Census(client, settings)
    failing = False
    while True:
        try:
            await census.count()
        except Exception as exc:
            if not failing:
                log.warning("metrics: counting lifecycles failed (%s); trying again", exc)
            failing = True
        else:
            failing = False
        await asyncio.sleep(settings.metrics_interval)


@contextlib.asynccontextmanager
async def census_running(client: Client, settings: Settings) -> AsyncIterator[None]:
    """Run the census beside the block."""
    task = asyncio.create_task(run_census(client, settings))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
