"""The gateway agent: the on-premises side of a gateway, the only process that talks to its vCenter.

It connects outbound to Temporal, pairs with its gateway once (a proof of the pairing code,
by Update; only its public keys leave this machine), shows its key fingerprint for the
operator to approve, then polls `kubegate-gateway-<name>`. Its key pair lives in
`<home>/agents/<name>/agent.key` (private, 0600), its policy in `policy.yaml` beside it (the
datacenter operator's file: see docs/security.md) and its log beside them. Every task is
checked by the guard (activities/guard.py) and every result signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import socket
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from activities.bootstrap import BootstrapActivities
from activities.guard import (
    AgentGuard,
    GuardInterceptor,
    PolicyError,
    PolicyFile,
    load_policy,
    pin_gateway,
)
from activities.kube import KubeActivities
from activities.preflight import PreflightActivities
from activities.presence import agent_presence
from activities.vsphere.audit import AuditActivities
from activities.vsphere.drift import DriftActivities
from activities.vsphere.events import EventActivities
from activities.vsphere.session import SessionPool
from activities.vsphere.tags import TagActivities
from activities.vsphere.vm import VmActivities
from domain.names import gateway_task_queue, presence_task_queue
from domain.sealing import AgentKey
from plumbing import logformat, profiling
from plumbing.connect import connect
from plumbing.errors import KubegateError, RequestRefused
from plumbing.metrics import process_runtime
from plumbing.settings import Settings, settings_with
from starters.client import KubegateClient
from workers.run import run_until_signalled

log = logging.getLogger("kubegate.agent")


def load_key(settings: Settings, gateway: str) -> AgentKey:
    """The agent's key pair, created on first start (the private half never leaves)."""
    key = AgentKey.load_or_create(settings.agent_key_path(gateway))
    key.gateway = gateway
    return key


async def rekey(settings: Settings, gateway: str) -> AgentKey:
    """Give the agent new keys: the next key is written first, the gateway takes it (signed
    by the current one), then it becomes the agent's key and the old one is kept, retired,
    to open what clusters sealed to it. Restart the agent afterwards."""
    path = settings.agent_key_path(gateway)
    if not path.exists():
        raise RequestRefused(f"no agent key at {path}: run rekey on the agent's machine")
    old = AgentKey.load(path)
    following = path.with_name(path.name + ".next")
    new = AgentKey.load(following) if following.exists() else AgentKey.generate()
    new.save(following)  # a crash after the gateway took it must not lose it
    client = KubegateClient(await connect(settings), settings)
    state = await client.gateway_state(gateway)
    if state.agent is None or state.agent.key_id != new.key_id:
        await client.rekey_agent(gateway, old, new)
    old.save(path.with_name(f"{path.name}.retired-{old.key_id}"))
    following.replace(path)
    return new


#: beside the agent's key: the first run id of the gateway workflow it paired with
PIN_FILE = "gateway.pin"


def pin_path(settings: Settings, gateway: str) -> Path:
    return settings.agent_dir(gateway) / PIN_FILE


def policy_path(settings: Settings, gateway: str) -> Path:
    """The agent's local policy file, beside its key."""
    return settings.agent_dir(gateway) / "policy.yaml"


def build_agent(
    client: Client,
    gateway: str,
    key: AgentKey,
    sessions: SessionPool,
    executor: ThreadPoolExecutor,
    max_concurrent: int,
    task_queue: str | None = None,
    *,
    policy: Path,
    shutdown_grace: float = 10.0,
    max_ops_per_host: int = 8,
    max_ops_per_datastore: int = 128,
    request_threads: int = 8,
) -> AgentWorkers:
    """The agent's workers: every vSphere activity, on the gateway's task queue, behind the
    guard (policy, gateway authorization, signed results).

    `max_concurrent` is the agent's cap on tasks at once (KUBEGATE_AGENT_MAX_TASKS). The
    activities that wait on vCenter are coroutines: a wait holds no thread, their requests
    run on a pool of `request_threads` (KUBEGATE_AGENT_THREADS) of their own, the
    synchronous activities on `executor`, so the cap may exceed the threads (tasks beyond
    the cap wait in Temporal's queue)."""
    key.gateway = gateway
    policy_file = PolicyFile(policy)
    key.policy = policy_file.current
    guard = AgentGuard(client, gateway, key, policy_file, pin=policy.parent / PIN_FILE)
    preflight = PreflightActivities(key, sessions)
    bootstrap = BootstrapActivities(key)
    # the waiting activities' vCenter requests on threads of their own: a synchronous
    # activity that holds its thread long (a drain, an audit's removal) never delays them
    requests = ThreadPoolExecutor(
        max_workers=request_threads, thread_name_prefix="kubegate-vcenter"
    )
    vms = VmActivities(
        key,
        sessions,
        max_ops_per_host=max_ops_per_host,
        max_ops_per_datastore=max_ops_per_datastore,
        executor=requests,
        max_waits=max_concurrent,
    )
    events = EventActivities(key, sessions)
    drift = DriftActivities(key, sessions)
    tags = TagActivities(key, sessions)
    audit = AuditActivities(vms)
    kube = KubeActivities(key)
    # presence (domain/presence.py) on a queue and slots of its own: work never delays it
    presence = Worker(
        client,
        task_queue=presence_task_queue(gateway),
        activities=[agent_presence],
        max_concurrent_activities=4,
        interceptors=[GuardInterceptor(guard)],
        graceful_shutdown_timeout=timedelta(seconds=shutdown_grace),
    )
    with warnings.catch_warnings():
        # (the SDK warns when the executor has fewer threads than the cap: intended here)
        warnings.filterwarnings("ignore", message="Worker max_concurrent_activities is")
        work = _work_worker(
            client,
            task_queue or gateway_task_queue(gateway),
            [
                preflight.connection,
                preflight.inventory,
                preflight.privileges,
                preflight.hosts,
                preflight.all_checks,
                bootstrap.secrets,
                bootstrap.render,
                bootstrap.kubeconfig,
                *vms.all(),
                *tags.all(),
                *events.all(),
                drift.inspect,
                *audit.all(),
                *kube.all(),
            ],
            executor,
            max_concurrent,
            GuardInterceptor(guard),
            shutdown_grace,
        )
    return AgentWorkers(work, presence)


def _work_worker(
    client: Client,
    task_queue: str,
    activities: list[Callable[..., Any]],
    executor: ThreadPoolExecutor,
    max_concurrent: int,
    guard: GuardInterceptor,
    shutdown_grace: float,
) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        activities=activities,
        activity_executor=executor,
        max_concurrent_activities=max_concurrent,
        interceptors=[guard],
        # SIGTERM: running activities stop waiting at once and leave vCenter's tasks running
        # (activities/vsphere/vm.py); short ones may finish meanwhile
        graceful_shutdown_timeout=timedelta(seconds=shutdown_grace),
    )


class AgentWorkers:
    """The agent's two workers, run together: its work, and its presence."""

    def __init__(self, work: Worker, presence: Worker) -> None:
        self.work, self.presence = work, presence
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> AgentWorkers:
        self._stack = contextlib.AsyncExitStack()
        await self._stack.enter_async_context(self.presence)
        await self._stack.enter_async_context(self.work)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


async def serve(
    gateway: str,
    settings: Settings | None = None,
    *,
    pairing_code: str | None = None,
    installer_vm: str | None = None,
) -> None:
    """Pair (first start), then run the agent until SIGTERM/SIGINT."""
    settings = settings or Settings()
    key = load_key(settings, gateway)
    policy = policy_path(settings, gateway)
    show_fingerprint(gateway, key, console=settings.log_format == "text")
    try:
        load_policy(policy)
    except PolicyError as exc:
        log.warning("%s: every vSphere task is refused until the policy is written", exc)
    client = await connect(settings, runtime=process_runtime(settings), service="kubegate-agent")
    state = await KubegateClient(client, settings).register_agent(
        gateway,
        key,
        pairing_code or None,
        host=socket.gethostname(),
        installer_vm=installer_vm,
    )
    await pin_gateway(client, gateway, pin_path(settings, gateway))
    approved = state.agent is not None and state.agent.approved
    log.info(
        "gateway agent %s paired (key %s, fingerprint %s, %s), gateway is %s",
        gateway,
        key.key_id,
        key.fingerprint,
        "approved" if approved else "waiting for approval",
        state.status,
    )
    sessions = SessionPool()
    with ThreadPoolExecutor(max_workers=settings.agent_threads) as executor:
        worker = build_agent(
            client,
            gateway,
            key,
            sessions,
            executor,
            settings.agent_max_tasks,
            policy=policy,
            shutdown_grace=settings.agent_shutdown_grace,
            max_ops_per_host=settings.max_ops_per_host,
            max_ops_per_datastore=settings.max_ops_per_datastore,
            request_threads=settings.agent_threads,
        )
        log.info("gateway agent %s polling %s", gateway, gateway_task_queue(gateway))
        try:
            await run_until_signalled(worker)
        finally:
            sessions.close_all()


def show_fingerprint(gateway: str, key: AgentKey, console: bool = True) -> None:
    """The fingerprint the operator approves, on the console (unless it takes JSON lines
    only) and in the log."""
    line = f"gateway agent {gateway}: key fingerprint {key.fingerprint}"
    if console:
        print(line, file=sys.stderr, flush=True)
    log.info("%s (approve: kubegate gateway approve %s %s)", line, gateway, key.fingerprint)


def setup_logging(settings: Settings, gateway: str) -> None:
    """Log to stderr and to the agent's log file (what `gateway logs` bundles)."""
    path = settings.agent_log_path(gateway)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.handlers.RotatingFileHandler(path, maxBytes=5_000_000, backupCount=3)
    logformat.setup_logging(settings.log_format, to_file)


def main(
    gateway: str,
    temporal_address: str | None = None,
    *,
    metrics_address: str | None = None,
    log_format: str | None = None,
    **kwargs: str | None,
) -> None:
    """Run the agent; `temporal_address` (the installer's console endpoint) and the CLI's
    options win over settings."""
    settings = settings_with(
        temporal_address=temporal_address, metrics_address=metrics_address, log_format=log_format
    )
    setup_logging(settings, gateway)
    if settings.metrics_address:
        log.info("metrics on http://%s/metrics", settings.metrics_address)
    profiling.start("agent")
    log.info("gateway agent %s connecting to %s", gateway, settings.temporal_address)
    try:
        asyncio.run(serve(gateway, settings, **kwargs))
    except KubegateError as exc:  # (its log file says why it stopped)
        log.error("gateway agent %s stopped: %s", gateway, exc)
        raise
    finally:
        profiling.finish()
