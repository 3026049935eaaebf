"""Cluster deploy: wall time against the critical-path bound, vCenter requests per node, memory.

    uv run python -m bench.deploy [--clusters 10] [--delays clone=2000,...] [--keep] [--json]

Starts its own stack: vcsim over plain HTTP with task delays, the counting proxy in front of
it (TLS, thumbprint pinned by the account), a Temporal dev server, the control worker and the
gateway agent as separate processes (`kubegate worker control`, `kubegate gateway agent
bench`). Deploys 1 cluster of 3 control-plane + 3 worker nodes (static addresses, workers over
two compute clusters), then --clusters of them at once, then deletes them; last, runs the
sequential pyvmomi script (bench/sequential.py) through the same proxy.

Critical-path bound of a deploy, as the workflow runs it: every node is cloned at once; the
first control-plane node's vm_create then reconfigures it (only if something still differs,
e.g. a disk to grow; customization is in the clone spec) and powers it on; the joining nodes
stay off until the readiness step starts them all with one PowerOnMultiVM_Task. So

    bound = CloneVM_Task [+ ReconfigVM_Task] [+ CustomizeVM_Task] + PowerOnVM_Task   (first
            control-plane node: the task methods the proxy saw on its VM, in the configured
            delays)
          + PowerOnMultiVM_Task   (the joiners; PowerOnVM_Task if they were started one by one)

and "bound + calls" adds the server time of the other vCenter calls on that path (all before
the first clone, and those between the path's tasks that are not on a joiner's VM; long polls
excluded). For comparison the older phase-by-phase bound, where the first node and then the
others each do clone + reconfigure + customize + power-on: 2 x 3.1 s = 6.2 s with the default
delays. Delete: every VM at once (power-off + destroy), then the folder (destroy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from activities.guard import write_policy
from bench.sequential import run_sequential
from bench.vcproxy import (
    DEFAULT_DELAYS,
    Counts,
    ProxyProcess,
    parse_delays,
    start_proxy,
    start_simulator,
)
from domain import names
from domain.account import CloudAccountSpec
from domain.cluster import ClusterSpec
from domain.gateway import GatewayFile
from domain.ipam import IpPoolSpec
from domain.lifecycle import ClusterState, ClusterStatus, Step
from domain.trust import policy_for
from plumbing.codec import ReadableMetadata, data_converter
from plumbing.settings import Settings, tool_path
from starters.client import KubegateClient
from tests.support import ADMIN, PLACEMENT, TEMPLATE, Vcsim
from workers.gateway_agent import load_key, policy_path

GATEWAY = "bench"
POOL = "bench-pool"
#: the per-node chain the requirement names, in order (the phase-by-phase bound: 2 x CHAIN)
CHAIN = ["CloneVM_Task", "ReconfigVM_Task", "CustomizeVM_Task", "PowerOnVM_Task"]
#: vCenter task methods with a configured run time
TASKS = {*CHAIN, "PowerOnMultiVM_Task", "PowerOffVM_Task", "Destroy_Task"}
#: how often the harness reads each cluster's state (a query: a workflow task on the control
#: worker, so its CPU counts there; wall times come from the state's updated_at, not from it)
POLL_SECONDS = [1.0]
#: requests that wait rather than work (not counted as call time on the path)
LONG_POLLS = {"WaitForUpdatesEx", "WaitForUpdates"}

Log = list[tuple[float, str, str, float | None]]

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


def cluster_spec(name: str, workers: int = 3) -> ClusterSpec:
    """3 control-plane nodes on DC0_C0, `workers` over DC0_C0 and DC0_C1; static addresses."""

    def domain(cluster: str) -> dict[str, str]:
        return {
            "compute_cluster": cluster,
            "datastore": "LocalDS_0",
            "network": "VM Network",
            "ip_pool": POOL,
        }

    return ClusterSpec.model_validate(
        {
            "name": name,
            "profile": PROFILE,
            "cloud_account": "bench",
            "placement": {"datacenter": "DC0", "ip_allocation": "static"},
            "control_plane": {
                "size": 3,
                "cpu": 2,
                "memory_gb": 4,
                "disk_gb": 40,
                "placement": [domain("DC0_C0")],
            },
            "workers": [
                {
                    "name": "workers",
                    "size": workers,
                    "cpu": 4,
                    "memory_gb": 8,
                    "disk_gb": 60,
                    "placement": [domain("DC0_C0"), domain("DC0_C1")],
                }
            ],
        }
    )


# -- processes ------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """Peak and current RSS (KiB) and CPU clock ticks (user + system) of a process, from /proc."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_ticks"] = int(fields[11]) + int(fields[12])  # utime + stime
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def child_named(name: str) -> int | None:
    """The pid of this process's child whose command name is `name` (the Temporal server)."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            comm = (entry / "comm").read_text().strip()
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if comm == name and ppid == me:
                return int(entry.name)
    return None


@dataclass
class Stack:
    """Everything the benchmark started; `stop` ends each process it started."""

    work: Path
    sim: Vcsim
    proxy: ProxyProcess
    env: WorkflowEnvironment
    control: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]
    client: KubegateClient
    delays: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def usage(self) -> dict[str, dict[str, int]]:
        return {name: proc_status(pid) for name, pid in self.pids.items()}

    async def stop_workers(self) -> None:
        """End the agent and the control worker (their idle long polls would be counted)."""
        for process in (self.agent, self.control):
            if process.poll() is None:
                process.terminate()
                try:
                    await asyncio.to_thread(process.wait, 15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await asyncio.to_thread(process.wait, 5)

    async def stop(self) -> None:
        await self.stop_workers()
        await self.env.shutdown()
        self.proxy.stop()
        self.sim.stop()


def _spawn(args: list[str], environ: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m starters.cli ARGS` with its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "starters.cli", *args],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def start_stack(work: Path, delays: dict[str, int]) -> Stack:
    sim = start_simulator(work, delays)
    proxy = start_proxy(sim.address)
    # the dev server prints a banner on the stdout it inherits: keep stdout for --json
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(tool_path("temporal")),
            search_attributes=names.SEARCH_ATTRIBUTES,
            data_converter=data_converter(),
            interceptors=[ReadableMetadata()],
            dev_server_log_level="error",
        )
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    address = env.client.service_client.config.target_host
    home = work / "home"
    settings = Settings(home=home, temporal_address=address)
    environ = {
        **os.environ,
        "KUBEGATE_HOME": str(home),
        "KUBEGATE_TEMPORAL_ADDRESS": address,
    }
    control = _spawn(["worker", "control"], environ, work / "control.log")
    # the gateway's vCenter is the counting proxy: the agent's policy allows exactly it (its
    # address, its pinned thumbprint)
    gateway_file = GatewayFile.model_validate(
        {
            "vcenter": {
                "server": proxy.address,
                "username": ADMIN,
                "thumbprint": proxy.thumbprint,
            },
            "placement": PLACEMENT,
        }
    )
    # the agent's key made first (on its machine: this one), so the system gateway is created
    # with its fingerprint and approved as the agent pairs at its first start; the code reaches
    # the agent in a 0600 file only, removed once it paired
    key = load_key(settings, GATEWAY)
    write_policy(
        policy_path(settings, GATEWAY), policy_for(GATEWAY, gateway_file.vcenter.endpoint())
    )
    _, code = await KubegateClient(env.client, settings).create_gateway(
        GATEWAY, system=True, fingerprint=key.fingerprint
    )
    code_file = settings.agent_dir(GATEWAY) / "pairing-code"
    fd = os.open(code_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(code + "\n")
    agent = _spawn(
        ["gateway", "agent", GATEWAY],
        {**environ, "KUBEGATE_PAIRING_CODE_FILE": str(code_file)},
        work / "agent.log",
    )
    stack = Stack(work, sim, proxy, env, control, agent, KubegateClient(env.client, settings))
    stack.delays = delays
    stack.pids = {"agent": agent.pid, "control": control.pid, "vcsim": sim.info["pid"]}
    stack.pids["proxy"] = proxy.process.pid
    stack.pids["harness"] = os.getpid()
    temporal = child_named("temporal")
    if temporal is not None:
        stack.pids["temporal"] = temporal
    try:
        polling = await stack.client.agent_is_polling(GATEWAY, wait=60)
        code_file.unlink(missing_ok=True)  # paired (or failed): the code is of no more use
        if not polling:
            raise RuntimeError(f"the agent does not poll; see {work / 'agent.log'}")
        await stack.client.configure_gateway(GATEWAY, gateway_file, sim.password)
        ready = await stack.client.wait_gateway(
            GATEWAY, lambda s: s.status.value in ("Running", "Failed"), timeout=120
        )
        if ready.status.value != "Running":
            raise RuntimeError(f"the gateway did not come up: {ready.error}")
        await stack.client.create_pool(
            IpPoolSpec.model_validate(
                {
                    "name": POOL,
                    "gateway": GATEWAY,
                    "kind": "range",
                    "first": "10.50.0.10",
                    "last": "10.50.3.250",
                    "prefix": 22,
                    "network_gateway": "10.50.0.1",
                    "nameservers": ["10.0.0.53"],
                }
            )
        )
        account = CloudAccountSpec.model_validate(
            {
                "name": "bench",
                "gateway": GATEWAY,
                "vcenter": {
                    "server": proxy.address,
                    "username": ADMIN,
                    "thumbprint": proxy.thumbprint,
                },
            }
        )
        await stack.client.create_account(account, sim.password)
    except BaseException:
        await stack.stop()
        raise
    return stack


# -- one phase ------------------------------------------------------------------------------


@dataclass
class Phase:
    """What one deploy or delete of some clusters cost."""

    label: str
    clusters: int
    nodes: int
    wall: float
    per_cluster: list[float]
    bound: float
    requests: Counts
    states: list[ClusterState]
    activities: dict[str, list[tuple[float, float]]]
    usage: dict[str, dict[str, int]]
    cpu: dict[str, float]
    since: datetime
    waits: dict[str, list[float]]
    log: list[tuple[float, str, str, float | None]]
    metered: int
    submitted: dict[str, datetime] = field(default_factory=dict)
    path: dict[str, Any] = field(default_factory=dict)
    old_bound: float = 0.0

    def steps(self, state: ClusterState) -> list[Step]:
        """The cluster's steps of this phase."""
        return [s for s in state.steps if s.started is not None and s.started >= self.since]

    @property
    def overhead(self) -> float:
        return self.wall / self.bound - 1 if self.bound else 0.0

    @property
    def bound_calls(self) -> float:
        """The bound plus the server time of the non-task calls on the path."""
        return self.bound + float(self.path.get("calls_seconds", 0.0))

    def timeline(self, state: ClusterState) -> list[dict[str, Any]]:
        """The cluster's steps of this phase: start offset from the request, seconds."""
        origin = self.submitted.get(state.name, self.since)
        return [
            {
                "step": st.name,
                "start": round((st.started - origin).total_seconds(), 3),
                "seconds": st.seconds,
                "state": st.state.value,
            }
            for st in self.steps(state)
            if st.started is not None
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "clusters": self.clusters,
            "nodes": self.nodes,
            "wall_seconds": round(self.wall, 3),
            "per_cluster_seconds": [round(w, 3) for w in self.per_cluster],
            "bound_seconds": self.bound,
            "overhead": round(self.overhead, 4),
            "critical_path": self.path,
            "bound_with_calls_seconds": round(self.bound_calls, 3),
            "overhead_with_calls": round(self.wall / self.bound_calls - 1, 4)
            if self.bound_calls
            else 0.0,
            "phase_by_phase_bound_seconds": self.old_bound,
            "overhead_phase_by_phase": round(self.wall / self.old_bound - 1, 4)
            if self.old_bound
            else None,
            "step_timeline": self.timeline(self.states[0]) if self.clusters == 1 else None,
            "requests": self.requests.total,
            "requests_per_node": round(self.requests.total / max(self.nodes, 1), 2),
            "tls_connections": self.requests.connections,
            "requests_by_method": dict(self.requests.counts.most_common()),
            "server_seconds_by_method": {
                k: round(v, 3)
                for k, v in sorted(self.requests.seconds.items(), key=lambda kv: -kv[1])
            },
            "kubegate_metered_requests": self.metered,
            "statuses": [s.status.value for s in self.states],
            "errors": [s.error for s in self.states if s.error],
            "steps": {
                s.name: [
                    {"step": st.name, "state": st.state.value, "seconds": st.seconds}
                    for st in self.steps(s)
                ]
                for s in self.states
            },
            "activities": {
                name: {
                    "count": len(v),
                    "queue_mean": round(statistics.mean(q for q, _ in v), 3),
                    "queue_max": round(max(q for q, _ in v), 3),
                    "run_mean": round(statistics.mean(r for _, r in v), 3),
                    "run_max": round(max(r for _, r in v), 3),
                }
                for name, v in self.activities.items()
            },
            "task_waits": {
                k: {"n": len(v), "mean": round(statistics.mean(v), 3), "max": round(max(v), 3)}
                for k, v in self.waits.items()
                if v
            },
            "process_kib": self.usage,
            "cpu_seconds": {k: round(v, 2) for k, v in self.cpu.items()},
        }


async def activity_times(
    stack: Stack, workflow_ids: list[str], since: datetime
) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    """(queue wait, run time) by type of the activities scheduled after `since`; and a
    timeline of the first workflow's."""
    by_type: dict[str, list[tuple[float, float]]] = {}
    timeline: list[str] = []
    for n, wid in enumerate(workflow_ids):
        history = await stack.env.client.get_workflow_handle(wid).fetch_history()
        origin = since.replace(tzinfo=None)
        scheduled: dict[int, tuple[str, datetime]] = {}
        started: dict[int, datetime] = {}
        for event in history.events:
            at = event.event_time.ToDatetime()
            if at < origin:
                continue
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attrs = event.activity_task_scheduled_event_attributes
                scheduled[event.event_id] = (attrs.activity_type.name, at)
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started[event.activity_task_started_event_attributes.scheduled_event_id] = at
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                sid = event.activity_task_completed_event_attributes.scheduled_event_id
                if sid not in scheduled:
                    continue
                kind, sched = scheduled[sid]
                start = started.get(sid, sched)
                queue, run = (start - sched).total_seconds(), (at - start).total_seconds()
                by_type.setdefault(kind, []).append((queue, run))
                if n == 0:
                    timeline.append(
                        f"  {(sched - origin).total_seconds():6.2f}s  {kind:22} "
                        f"queue {queue * 1000:5.0f} ms  run {run:6.2f} s"
                    )
    return by_type, timeline


async def run_phase(
    stack: Stack,
    label: str,
    cluster_names: list[str],
    bound: float | None,
    delete: bool,
    old_bound: float = 0.0,
    spec: Callable[[str], ClusterSpec] = cluster_spec,
) -> tuple[Phase, list[str]]:
    """Deploy (or delete) the clusters at once and wait until each is Running (Deleted)."""
    client = stack.client
    want = ClusterStatus.DELETED if delete else ClusterStatus.RUNNING
    before = await asyncio.to_thread(stack.proxy.snapshot)
    usage_before = stack.usage()
    metered = (
        sum([(await client.cluster_state(n)).vcenter_requests for n in cluster_names])
        if delete
        else 0
    )
    submitted: dict[str, datetime] = {}

    async def one(name: str) -> ClusterState:
        submitted[name] = datetime.now(UTC)
        if delete:
            await client.delete_cluster(name)
        else:
            await client.deploy_cluster(spec(name), gateway=GATEWAY)
        return await client.wait_cluster(
            name,
            lambda s: s.status in (want, ClusterStatus.FAILED),
            timeout=900,
            interval=POLL_SECONDS[0],
        )

    start = datetime.now(UTC)
    states = await asyncio.gather(*(one(n) for n in cluster_names))
    after = await asyncio.to_thread(stack.proxy.snapshot)
    usage = stack.usage()
    per_cluster = [((s.updated_at or start) - submitted[s.name]).total_seconds() for s in states]
    wall = max((s.updated_at or start) for s in states) - start
    cpu = {
        name: (u.get("cpu_ticks", 0) - usage_before.get(name, {}).get("cpu_ticks", 0))
        / os.sysconf("SC_CLK_TCK")
        for name, u in usage.items()
    }
    activities, timeline = await activity_times(
        stack, [names.cluster_workflow_id(n) for n in cluster_names], start
    )
    origin = start.timestamp()
    log = await asyncio.to_thread(stack.proxy.log, origin)
    waits = task_waits(log, stack.delays)
    path = (
        critical_path(states[0], log, stack.delays, origin)
        if bound is None and states[0].status is ClusterStatus.RUNNING
        else {}
    )
    if len(cluster_names) == 1:
        timeline.append("vCenter requests (sent at, since phase start; server time):")
        for sent, method, obj, secs in log:
            took = f"{secs * 1000:7.1f} ms" if secs is not None else "      -   "
            timeline.append(f"  {sent - origin:6.2f}s  {method:28} {obj:18} {took}")
    nodes = sum(len(s.nodes) for s in states)
    phase = Phase(
        label=label,
        clusters=len(cluster_names),
        nodes=nodes,
        wall=wall.total_seconds(),
        per_cluster=per_cluster,
        bound=bound if bound is not None else float(path.get("tasks_seconds", 0.0)),
        requests=after - before,
        states=list(states),
        activities=activities,
        usage=usage,
        cpu=cpu,
        since=start,
        waits=waits,
        log=log,
        metered=sum(s.vcenter_requests for s in states) - metered,
        submitted=submitted,
        path=path,
        old_bound=old_bound,
    )
    return phase, timeline


def _vm(ref: str | None) -> str:
    """'VirtualMachine:vm-57' -> 'vm-57' (the proxy logs the `_this` value)."""
    return (ref or "").rpartition(":")[2]


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def critical_path(
    state: ClusterState, log: Log, delays: dict[str, int], origin: float
) -> dict[str, Any]:
    """The deploy's critical path from the tasks the proxy saw: the first control-plane node's
    chain (its clone, then the tasks on its VM) and the joiners' start; the bound in the
    configured delays, the non-task call time on the path, and the path's events."""
    first = next((n for n in state.nodes if n.control_plane and n.index == 0), None)
    if first is None or not first.vm:
        return {}
    first_vm = _vm(first.vm)
    joiners = {_vm(n.vm) for n in state.nodes if n is not first and n.vm}
    clones = [t for t, m, _, _ in log if m == "CloneVM_Task"]
    mine = [t for t, m, o, _ in log if m == "CloneVM_Task" and o.endswith(f">{first.name}")]
    if not clones or not mine:
        return {}
    own = [(t, m) for t, m, o, _ in log if o == first_vm and m in TASKS]
    chain: list[tuple[str, float]] = [("CloneVM_Task", mine[-1])] + [(m, t) for t, m in own]
    multi = [(m, t) for t, m, o, _ in log if m == "PowerOnMultiVM_Task"]
    singles = [(m, t) for t, m, o, _ in log if m == "PowerOnVM_Task" and o in joiners]
    start = multi[:1] or singles[-1:]  # one multi call, else the last single power-on
    path = chain + start
    tasks_seconds = sum(delays.get(m, 0) for m, _ in path) / 1000
    windows = [(t, t + delays.get(m, 0) / 1000) for m, t in path]
    calls: list[tuple[float, float]] = []
    for sent, method, obj, secs in log:
        if secs is None or method in LONG_POLLS or obj in joiners:
            continue
        if sent >= clones[0] and method in TASKS and (method, sent) not in path:
            continue  # another node's task call
        a, b = sent, sent + secs
        for w0, w1 in windows:  # the parts outside the path's running tasks
            if a < w1 and b > w0:
                a, b = (a, min(b, w0)) if a < w0 else (max(a, w1), max(b, w1))
        if b > a:
            calls.append((a, b))
    events = []
    for m, t in path:
        events.append((f"{m} sent", t - origin))
        events.append((f"{m} ends (sent + delay)", t - origin + delays.get(m, 0) / 1000))
    formula = " + ".join(m for m, _ in path)
    return {
        "formula": formula,
        "tasks": [m for m, _ in path],
        "tasks_seconds": round(tasks_seconds, 3),
        "calls_seconds": round(_union(calls), 3),
        "calls": len(calls),
        "events": [(label, round(at, 3)) for label, at in events],
    }


def task_waits(
    log: list[tuple[float, str, str, float | None]], delays: dict[str, int]
) -> dict[str, list[float]]:
    """Per VM, the time from a task's earliest possible end to the next task call on that VM.

    With a simulator that finishes each task exactly after its delay, this is how late the
    waiter noticed the end (plus anything the activity does in between).
    """
    pairs = {
        "ReconfigVM_Task -> PowerOnVM_Task": ("ReconfigVM_Task", "PowerOnVM_Task"),
        "PowerOffVM_Task -> Destroy_Task": ("PowerOffVM_Task", "Destroy_Task"),
    }
    out: dict[str, list[float]] = {}
    for label, (first, then) in pairs.items():
        started: dict[str, float] = {}
        out[label] = []
        for sent, method, obj, _ in log:
            if method == first:
                started[obj] = sent
            elif method == then and obj in started:
                out[label].append(sent - started.pop(obj) - delays.get(first, 0) / 1000)
    return out


# -- report ---------------------------------------------------------------------------------


def print_phase(phase: Phase, timeline: list[str]) -> None:
    data = phase.as_json()
    failed = [s for s in phase.states if s.status is ClusterStatus.FAILED]
    print(f"\n== {phase.label}: {phase.clusters} cluster(s), {phase.nodes} nodes")
    walls = phase.per_cluster
    print(
        f"wall {phase.wall:.2f} s (per cluster: min {min(walls):.2f}, median "
        f"{statistics.median(walls):.2f}, max {max(walls):.2f}); bound {phase.bound:.2f} s; "
        f"overhead {phase.overhead * 100:+.1f}%"
    )
    if phase.path:
        print(
            f"critical path: {phase.path['formula']} = {phase.bound:.2f} s; + non-task calls on "
            f"it {phase.path['calls_seconds']:.3f} s ({phase.path['calls']}) = "
            f"{phase.bound_calls:.2f} s: overhead "
            f"{(phase.wall / phase.bound_calls - 1) * 100:+.1f}%"
        )
    if phase.old_bound:
        print(
            f"phase-by-phase bound (2 x {' + '.join(CHAIN)}) = {phase.old_bound:.2f} s: "
            f"overhead {(phase.wall / phase.old_bound - 1) * 100:+.1f}%"
        )
    print(
        f"vCenter requests (proxy): {phase.requests.total} = "
        f"{data['requests_per_node']:.1f} per node; kubegate's own meter: "
        f"{data['kubegate_metered_requests']}; new TLS connections: "
        f"{phase.requests.connections}"
    )
    if failed:
        for s in failed:
            print(f"FAILED {s.name}: {s.error}")
    print(f"{'method':32} {'calls':>6} {'per node':>8} {'server s':>9}")
    for method, count in phase.requests.counts.most_common():
        print(
            f"{method:32} {count:>6} {count / max(phase.nodes, 1):>8.2f} "
            f"{phase.requests.seconds.get(method, 0.0):>9.2f}"
        )
    print("steps (seconds; median over clusters, max):")
    by_step: dict[str, list[float]] = {}
    for s in phase.states:
        for st in phase.steps(s):
            if st.seconds is not None:
                by_step.setdefault(st.name, []).append(st.seconds)
    for name, secs in by_step.items():
        print(f"  {name:16} {statistics.median(secs):7.2f} {max(secs):7.2f}")
    print("activities (count, queue wait mean/max ms, run mean/max s):")
    for name, a in data["activities"].items():
        print(
            f"  {name:22} {a['count']:>4}  queue {a['queue_mean'] * 1000:6.0f} / "
            f"{a['queue_max'] * 1000:6.0f}  run {a['run_mean']:6.2f} / {a['run_max']:6.2f}"
        )
    if phase.clusters == 1:
        print("steps (start since the request, seconds):")
        for row in phase.timeline(phase.states[0]):
            took = f"{row['seconds']:6.3f}" if row["seconds"] is not None else "     -"
            print(f"  {row['start']:6.3f}s  {row['step']:16} {took} s  {row['state']}")
        if phase.path:
            print("critical path events (since phase start):")
            for label, at in phase.path["events"]:
                print(f"  {at:6.3f}s  {label}")
    if phase.clusters == 1 and timeline:
        print("timeline of the cluster's activities (scheduled at, since workflow start):")
        print("\n".join(timeline))
    print("seconds from one task's end (sent + delay) to the next call on the same VM:")
    for k, v in phase.waits.items():
        if v:
            print(f"  {k:36} n={len(v):<3} mean {statistics.mean(v):5.2f}  max {max(v):5.2f}")
    calls = [t for t, m, _, _ in phase.log if m in ("CloneVM_Task", "PowerOffVM_Task")]
    if calls:
        first = calls[0] - phase.since.timestamp()
        last = calls[-1] - phase.since.timestamp()
        print(f"first/last clone or power-off request sent at {first:.2f} / {last:.2f} s")
    print("processes (peak RSS MiB, RSS MiB, CPU s in this phase):")
    for name, u in phase.usage.items():
        print(
            f"  {name:9} {u.get('VmHWM', 0) / 1024:7.1f} {u.get('VmRSS', 0) / 1024:7.1f} "
            f"{phase.cpu.get(name, 0.0):7.2f}"
        )


async def main(clusters: int, delays: dict[str, int], keep: bool, as_json: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="kubegate-bench-deploy-"))
    chain = sum(delays.get(m, 0) for m in CHAIN) / 1000
    old_bound = 2 * chain  # phase by phase: the first node's chain, then the others'
    delete_bound = (delays.get("PowerOffVM_Task", 0) + 2 * delays.get("Destroy_Task", 0)) / 1000
    stack = await start_stack(work, delays)
    report: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "mem_total_kib": _mem_total()},
        "delays_ms": delays,
        "deploy_bound": "first CP node's tasks + joiners' start, per phase (critical_path)",
        "phase_by_phase_bound_seconds": old_bound,
        "sequential_bound_seconds": 6 * chain,
        "delete_bound_seconds": delete_bound,
        "phases": [],
    }
    out = sys.stderr if as_json else sys.stdout
    ok = True
    try:
        with contextlib.redirect_stdout(out):
            print(
                f"machine: {os.cpu_count()} cores, {_mem_total() / 1024 / 1024:.1f} GiB; "
                f"delays {delays}; work dir {work}"
            )
            print(
                "deploy bound = the first control-plane node's tasks (clone [+ reconfigure]"
                " [+ customize] + power-on, as issued) + the joiners' PowerOnMultiVM_Task; "
                f"phase-by-phase bound = 2 x ({' + '.join(CHAIN)}) = {old_bound:.2f} s; "
                "delete bound = PowerOffVM_Task + Destroy_Task (VMs) "
                f"+ Destroy_Task (folder) = {delete_bound:.2f} s"
            )
            groups = [["one-1"]]
            if clusters > 1:
                groups.append([f"many-{i:02d}" for i in range(1, clusters + 1)])
            for group in groups:
                phase, timeline = await run_phase(
                    stack, f"deploy {len(group)}", group, None, delete=False, old_bound=old_bound
                )
                print_phase(phase, timeline)
                report["phases"].append(phase.as_json())
                ok = ok and all(s.status is ClusterStatus.RUNNING for s in phase.states)
            if not keep:
                for group in groups:
                    alive = [
                        n
                        for n in group
                        if (await stack.client.cluster_state(n)).status
                        in (ClusterStatus.RUNNING, ClusterStatus.FAILED)
                    ]
                    if not alive:
                        continue
                    phase, timeline = await run_phase(
                        stack, f"delete {len(alive)}", alive, delete_bound, delete=True
                    )
                    print_phase(phase, timeline)
                    report["phases"].append(phase.as_json())
            await stack.stop_workers()
            seq = await asyncio.to_thread(
                run_sequential,
                stack.proxy,
                stack.sim.password,
                nodes=6,
                delete=not keep,
            )
            report["sequential"] = seq
            print(
                f"\n== sequential pyvmomi, 6 nodes: deploy {seq['deploy_seconds']:.2f} s "
                f"(bound 6 x {chain:.2f} = {6 * chain:.2f} s), "
                f"{seq['deploy_requests']} requests ({seq['deploy_requests'] / 6:.1f} per node)"
                + (
                    f"; delete {seq['delete_seconds']:.2f} s, {seq['delete_requests']} requests"
                    if "delete_seconds" in seq
                    else ""
                )
            )
            print(f"  by method: {seq['deploy_by_method']}")
    finally:
        if keep:
            print(f"--keep: stopping the stack anyway (work dir {work})", file=out)
        await stack.stop()
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    return 0 if ok else 1


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=10, help="clusters deployed at once")
    parser.add_argument(
        "--delays",
        default=DEFAULT_DELAYS,
        help="task delays in ms: clone, reconfigure, customize, poweron, poweronmulti, "
        "poweroff, destroy "
        "or vCenter method names",
    )
    parser.add_argument(
        "--keep", action="store_true", help="skip the delete phases (the stack still stops)"
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout (table on stderr)")
    parser.add_argument(
        "--poll",
        type=float,
        default=1.0,
        help="seconds between the harness's reads of a cluster's state (each is a query the "
        "control worker answers; wall times do not depend on it)",
    )
    args = parser.parse_args()
    POLL_SECONDS[0] = args.poll
    sys.exit(asyncio.run(main(args.clusters, parse_delays(args.delays), args.keep, args.json)))
