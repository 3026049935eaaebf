"""The gateway agent: the on-premises side of a gateway, the only process that talks to its vCenter.

It connects outbound to Temporal and polls `kubegate-gateway-<name>`. Its key pair lives
in `<home>/agents/<name>/agent.key` (private, 0600); the public half is published beside
it as `agent.pub` so clients can seal secrets that only this agent can open.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from temporalio.client import Client
from temporalio.worker import Worker

from activities.bootstrap import BootstrapActivities
from activities.preflight import PreflightActivities
from activities.vsphere.session import SessionPool
from activities.vsphere.vm import VmActivities
from domain.names import gateway_task_queue
from domain.sealing import AgentKey
from starters.client import connect
from starters.settings import Settings
from workers.run import run_until_signalled

log = logging.getLogger("kubegate.agent")


def load_key(settings: Settings, gateway: str) -> AgentKey:
    """The agent's key pair, created on first start; publishes the public key."""
    key = AgentKey.load_or_create(settings.agent_key_path(gateway))
    pub = settings.agent_public_key_path(gateway)
    if not pub.exists() or pub.read_text().strip() != key.public_key_b64:
        pub.write_text(key.public_key_b64 + "\n")
    return key


def build_agent(
    client: Client,
    gateway: str,
    key: AgentKey,
    sessions: SessionPool,
    executor: ThreadPoolExecutor,
    max_concurrent: int,
    task_queue: str | None = None,
    *,
    max_ops_per_host: int = 8,
    max_ops_per_datastore: int = 128,
) -> Worker:
    """The agent's worker: every vSphere activity, on the gateway's task queue."""
    preflight = PreflightActivities(key, sessions)
    bootstrap = BootstrapActivities(key)
    vms = VmActivities(
        key,
        sessions,
        max_ops_per_host=max_ops_per_host,
        max_ops_per_datastore=max_ops_per_datastore,
    )
    return Worker(
        client,
        task_queue=task_queue or gateway_task_queue(gateway),
        activities=[
            preflight.connection,
            preflight.inventory,
            preflight.privileges,
            preflight.hosts,
            preflight.all_checks,
            bootstrap.secrets,
            bootstrap.render,
            *vms.all(),
        ],
        activity_executor=executor,
        max_concurrent_activities=max_concurrent,
    )


async def serve(gateway: str, settings: Settings | None = None) -> None:
    settings = settings or Settings()
    key = load_key(settings, gateway)
    client = await connect(settings)
    sessions = SessionPool()
    with ThreadPoolExecutor(max_workers=settings.agent_threads) as executor:
        worker = build_agent(
            client,
            gateway,
            key,
            sessions,
            executor,
            settings.agent_threads,
            max_ops_per_host=settings.max_ops_per_host,
            max_ops_per_datastore=settings.max_ops_per_datastore,
        )
        log.info(
            "gateway agent %s polling %s (key %s)", gateway, gateway_task_queue(gateway), key.key_id
        )
        try:
            await run_until_signalled(worker)
        finally:
            sessions.close_all()


def main(gateway: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(gateway))
