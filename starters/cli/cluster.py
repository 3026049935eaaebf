"""`kubegate cluster …`: deploy, watch, change and delete clusters.

Registers on the `cluster` app of starters/cli/common.py. Exit codes as there.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from domain.cluster import MAX_POOL_NODES, ClusterProfile, ClusterSpec, ProfileFile, WorkerPool
from domain.errors import field_errors
from domain.events import EventsResult
from domain.kubeconfig import MAX_TTL_SECONDS, MIN_TTL_SECONDS, USER
from domain.lifecycle import (
    ChangeResult,
    ClusterState,
    ClusterStatus,
    ClusterSummary,
    operations,
)
from domain.plan import ChangePlan
from domain.preflight import PreflightReport
from domain.sealing import AgentKey
from plumbing.settings import Settings
from starters.cli.common import (
    EXIT_FAILED,
    GatewayOption,
    Output,
    OutputOption,
    WaitOption,
    YesOption,
    _bad_input,
    _invalid_fields,
    _Progress,
    _run,
    _short,
    age,
    app,
    cluster_app,
    confirm,
    err,
    load_spec,
    out,
    print_data,
    print_report,
    show_health,
)
from starters.client import InFlight, KubegateClient, KubegateError, RequestRefused, existing

NameArg = Annotated[str, typer.Argument(help="Cluster name.")]


def load_cluster(path: Path) -> ClusterSpec:
    """A cluster spec with its profile file resolved (relative to the spec); exits 2 if bad."""
    spec = load_spec(path, ClusterSpec, from_get=True)
    if isinstance(spec.profile, ProfileFile):
        profile_path = Path(spec.profile.file)
        if not profile_path.is_absolute():
            profile_path = path.parent / profile_path
        profile = load_spec(profile_path, ClusterProfile)
        data = spec.model_dump(mode="json")
        data["profile"] = profile.model_dump(mode="json")
        try:
            spec = ClusterSpec.model_validate(data)
        except ValidationError as exc:
            _invalid_fields(path, exc)
    return spec


def _follow(client: KubegateClient, name: str, done: Any) -> ClusterState:
    async def run() -> ClusterState:
        return await client.wait_cluster(name, done, on_change=_Progress(), interval=0.25)

    state: ClusterState = _run(run())
    return state


def _settled(state: ClusterState) -> bool:
    return state.status in (
        ClusterStatus.RUNNING,
        ClusterStatus.DEGRADED,
        ClusterStatus.FAILED,
        ClusterStatus.DELETED,
    )


def _state_json(state: ClusterState) -> str:
    """The state as JSON; its `spec` is the cluster's spec as a file gives it (`apply -f` and
    `deploy -f` take this document whole, as kubectl's apply takes `get -o yaml`)."""
    return state.model_dump_json()


@cluster_app.command("deploy")
def cluster_deploy(
    file: Annotated[Path, typer.Option("--file", "-f", help="Cluster YAML.")],
    readiness: Annotated[
        str, typer.Option(help="guest (VMware Tools report address and hostname) or kubernetes.")
    ] = "guest",
    wait: WaitOption = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan and the preflight of its placement; create nothing."
        ),
    ] = False,
    output: OutputOption = Output.table,
) -> None:
    """Deploy a cluster through its cloud account's gateway; --wait follows each step.

    While the gateway upgrades, the cluster is accepted and waits (Queued) in order.
    """
    if readiness not in ("guest", "kubernetes"):
        _bad_input("--readiness: guest or kubernetes")
    spec = load_cluster(file)
    if dry_run:
        _deploy_dry_run(spec, output)
        return

    async def start() -> tuple[KubegateClient, ClusterState]:
        client = await KubegateClient.connect()
        return client, await client.deploy_cluster(spec, readiness=readiness)

    client, state = _run(start())
    if not wait:
        if output.data:
            print_data(output, _state_json(state))
        else:
            out.print(f"cluster {spec.name}: {state.status.value}", highlight=False)
        return
    state = _follow(client, spec.name, _settled)
    _show_cluster(state, output, describe=True)
    if state.status is not ClusterStatus.RUNNING:
        raise typer.Exit(EXIT_FAILED)


def _get(name: str) -> tuple[KubegateClient, ClusterState]:
    async def run() -> tuple[KubegateClient, ClusterState]:
        client = await KubegateClient.connect()
        return client, await client.cluster_state(name)

    result: tuple[KubegateClient, ClusterState] = _run(run())
    return result


WatchOption = Annotated[
    bool,
    typer.Option(
        "--watch", "-w", help="Print it again at every change, until it is Deleted or Ctrl-C."
    ),
]


def _watch(name: str, show: Any) -> None:
    """Print the cluster at every change (status, step, step state or detail) until it is
    Deleted; Ctrl-C ends it (exit 0)."""

    async def run() -> ClusterState:
        client = await KubegateClient.connect()
        return await client.wait_cluster(
            name,
            lambda s: s.status is ClusterStatus.DELETED,
            on_change=show,
            timeout=10.0**9,
            interval=1.0,
        )

    try:
        _run(run())
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@cluster_app.command("get")
def cluster_get(
    name: NameArg, watch: WatchOption = False, output: OutputOption = Output.table
) -> None:
    """A cluster's status, current step and nodes count (--watch: again at every change)."""
    if watch:
        _watch(name, lambda state: _show_cluster(state, output, describe=False))
        return
    _, state = _get(name)
    _show_cluster(state, output, describe=False)


@cluster_app.command("describe")
def cluster_describe(
    name: NameArg, watch: WatchOption = False, output: OutputOption = Output.table
) -> None:
    """A cluster's step history (with durations), its nodes, and what it waits on now (each
    activity in flight with its last heartbeat: the vCenter task, the VM, what it waits for).
    --watch: again at every change."""
    if watch:
        _watch(name, lambda state: _show_cluster(state, output, describe=True))
        return

    async def run() -> tuple[ClusterState, list[InFlight]]:
        client = await KubegateClient.connect()
        state = await client.cluster_state(name)
        try:
            flying = await client.in_flight(name)
        except Exception:  # (Temporal's description is extra: the state is the answer)
            flying = []
        return state, flying

    state, flying = _run(run())
    if output.data:
        data = json.loads(_state_json(state))
        data["in_flight"] = [f.model_dump(mode="json") for f in flying]
        print_data(output, json.dumps(data))
        return
    _show_cluster(state, output, describe=True)
    if flying:
        table = Table(title="In flight")
        for column in ("activity", "attempt", "last heartbeat", "says", "last failure"):
            table.add_column(column)
        for f in flying:
            at = f"{f.heartbeat_at:%H:%M:%S}" if f.heartbeat_at else ""
            table.add_row(
                f.activity, str(f.attempt), at, _short(f.said(), 80), _short(f.last_failure, 60)
            )
        out.print(table)


@cluster_app.command("list")
def cluster_list(
    gateway: GatewayOption = None,
    all_: Annotated[bool, typer.Option("--all", help="Include deleted clusters.")] = False,
    output: OutputOption = Output.table,
) -> None:
    """Clusters with their status and current step."""

    async def run() -> list[ClusterSummary]:
        client = await KubegateClient.connect()
        return await client.list_clusters(gateway, include_deleted=all_)

    rows: list[ClusterSummary] = _run(run())
    if output.data:
        print_data(output, json.dumps([r.model_dump(mode="json") for r in rows]))
        return
    wide = output is Output.wide
    table = Table()
    columns = ["name", "status", "version", "gateway", "nodes", "age", "step"]
    if wide:  # (kubectl's -o wide: more columns, same rows)
        columns += ["account", "VIP", "spec (cp+workers)", "reason"]
    for column in columns:
        table.add_column(column)
    now = datetime.now(UTC)
    for row in rows:
        cells = [
            row.name,
            row.status,
            row.version,
            row.gateway,
            str(row.nodes),
            age(now - row.created_at) if row.created_at else "",
            row.step,
        ]
        if wide:
            cells += [
                row.account,
                row.vip or "",
                f"{row.control_plane}+{row.workers}",
                _short(row.reason, 60),
            ]
        table.add_row(*cells)
    out.print(table)


_WAIT_GOALS = {
    "running": (ClusterStatus.RUNNING, ClusterStatus.DEGRADED),
    "deleted": (ClusterStatus.DELETED,),
}


@cluster_app.command("wait")
def cluster_wait(
    name: NameArg,
    for_: Annotated[
        str,
        typer.Option("--for", help="running (Running or Degraded) or deleted.", show_default=True),
    ] = "running",
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait at most (then exit 1).", min=1)
    ] = 3600.0,
    output: OutputOption = Output.table,
) -> None:
    """Follow a cluster (each step as it happens) until it is Running or Deleted; re-attach
    to a deploy, change or delete after Ctrl-C. Exit 1 when it fails or the time runs out."""
    goal = _WAIT_GOALS.get(for_)
    if goal is None:
        _bad_input(f"--for: {for_!r} must be one of {', '.join(_WAIT_GOALS)}")
    ends = {*goal, ClusterStatus.FAILED, ClusterStatus.DELETED}

    async def run() -> ClusterState:
        client = await KubegateClient.connect()
        return await client.wait_cluster(
            name, lambda s: s.status in ends, on_change=_Progress(), timeout=timeout
        )

    state: ClusterState = _run(run())
    _show_cluster(state, output, describe=False)
    if state.status not in goal:
        raise typer.Exit(EXIT_FAILED)


EventRow = tuple[datetime, str, str, str]


def _event_rows(state: ClusterState, events: EventsResult | None) -> list[EventRow]:
    """The cluster's steps and its VMs' vCenter events and tasks, oldest first."""
    rows: list[EventRow] = []
    for step in state.steps:
        if step.started is not None:
            what = f"{step.title} ({step.state.value})"
            rows.append((step.started, "step", step.operation, what + _tail(step)))
    for event in events.events if events else []:
        rows.append((event.time, "event", event.object_name or event.object, event.message))
    for task in events.tasks if events else []:
        what = f"{task.name} {task.state}" + (f": {task.error}" if task.error else "")
        rows.append((task.time, "task", task.object_name or task.object, what))
    rows.sort(key=lambda r: r[0])
    return rows


def _event_data(row: EventRow) -> dict[str, str]:
    t, k, o, w = row
    return {"time": t.isoformat(), "kind": k, "object": o, "what": w}


@cluster_app.command("events")
def cluster_events(
    name: NameArg,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Then print each new one as it comes, until the cluster is Deleted or Ctrl-C.",
        ),
    ] = False,
    vcenter_every: Annotated[
        float,
        typer.Option(
            help="With --watch: seconds between reads of vCenter's events (each is one read "
            "by the agent, kept in the cluster's history); steps are followed every second.",
            min=5,
        ),
    ] = 30.0,
    output: OutputOption = Output.table,
) -> None:
    """What happened to a cluster, newest last: its steps, and the vCenter events and tasks
    of its VMs and folder (read by the gateway's agent)."""
    if watch:
        _watch_events(name, vcenter_every, output)
        return

    async def run() -> tuple[ClusterState, EventsResult]:
        client = await KubegateClient.connect()
        state = await client.cluster_state(name)
        return state, await client.cluster_events(name)

    state, events = _run(run())
    rows = _event_rows(state, events)
    if output.data:
        print_data(output, [_event_data(r) for r in rows])
        return
    table = Table(title=f"cluster {name}: steps, vCenter events and tasks, newest last")
    for column in ("time", "kind", "object", "what"):
        table.add_column(column)
    for t, k, o, w in rows:
        table.add_row(f"{t:%Y-%m-%d %H:%M:%S}", k, o, w)
    out.print(table)
    if events.missing:
        err.print(f"no longer in vCenter (skipped): {', '.join(events.missing)}")


def _watch_events(name: str, vcenter_every: float, output: Output) -> None:
    """`events --watch`: what is there, then each new row as it comes, one line each (a JSON
    object a line with -o json, a YAML document each with -o yaml), until Deleted or Ctrl-C."""
    printed: set[EventRow] = set()

    def emit(rows: list[EventRow]) -> None:
        for row in rows:
            if row in printed:
                continue
            printed.add(row)
            if output is Output.json:
                sys.stdout.write(json.dumps(_event_data(row)) + "\n")
            elif output is Output.yaml:
                sys.stdout.write("---\n" + yaml.safe_dump(_event_data(row), sort_keys=False))
            else:
                t, k, o, w = row
                sys.stdout.write(f"{t:%Y-%m-%d %H:%M:%S}  {k:<5}  {o:<28}  {w}\n")
            sys.stdout.flush()

    async def run() -> None:
        client = await KubegateClient.connect()
        events: EventsResult | None = None
        read_at = -vcenter_every
        loop = asyncio.get_running_loop()
        while True:
            state = await client.cluster_state(name)
            if loop.time() - read_at >= vcenter_every and state.status is not ClusterStatus.DELETED:
                read_at = loop.time()
                try:
                    events = await client.cluster_events(name)
                except (KubegateError, RequestRefused) as exc:  # (e.g. no agent: steps go on)
                    err.print(f"vCenter events not read: {exc}", markup=False, highlight=False)
            emit(_event_rows(state, events))
            if state.status is ClusterStatus.DELETED:
                return
            await asyncio.sleep(1.0)

    try:
        _run(run())
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _tail(step: Any) -> str:
    said = step.error or step.detail
    return f": {_short(said, 80)}" if said else ""


@cluster_app.command("abort")
def cluster_abort(
    name: NameArg, wait: WaitOption = False, output: OutputOption = Output.table
) -> None:
    """Stop a provisioning cluster and remove everything it created."""
    _lifecycle(name, lambda c: c.abort_cluster(name), "abort", ClusterStatus.DELETED, wait, output)


@cluster_app.command("delete")
def cluster_delete(
    name: NameArg,
    wait: WaitOption = False,
    yes: YesOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Delete a Running or Failed cluster: its VMs, addresses and folder (asks first on a
    terminal; --yes does not ask)."""
    confirm(f"Delete cluster {name}, its VMs, addresses and folder?", yes)
    _lifecycle(
        name, lambda c: c.delete_cluster(name), "delete", ClusterStatus.DELETED, wait, output
    )


@cluster_app.command("retry")
def cluster_retry(
    name: NameArg, wait: WaitOption = False, output: OutputOption = Output.table
) -> None:
    """Run a Failed cluster's steps again."""
    _lifecycle(name, lambda c: c.retry_cluster(name), "retry", ClusterStatus.RUNNING, wait, output)


def _lifecycle(
    name: str, call: Any, verb: str, goal: ClusterStatus, wait: bool, output: Output
) -> None:
    """Send abort/delete/retry; with --wait follow it and exit 1 unless it reaches `goal`."""
    client, state = _update(name, call)
    if not wait:
        if output.data:
            print_data(output, _state_json(state))
        else:
            out.print(f"cluster {name}: {verb} accepted", highlight=False)
        return
    ends = (
        ClusterStatus.DELETED,
        ClusterStatus.FAILED,
        ClusterStatus.RUNNING,
        ClusterStatus.DEGRADED,
    )
    state = _follow(client, name, lambda s: s.status in ends and s.status is not state.status)
    _show_cluster(state, output, describe=True)
    if state.status is not goal:
        raise typer.Exit(EXIT_FAILED)


def _update(name: str, call: Any) -> tuple[KubegateClient, Any]:
    async def run() -> tuple[KubegateClient, Any]:
        client = await KubegateClient.connect()
        return client, await call(client)

    result: tuple[KubegateClient, Any] = _run(run())  # a refusal exits 2
    return result


def _change(name: str, call: Any, output: Output) -> None:
    _, result = _update(name, call)
    _, state = _get(name)
    if output.data:
        print_data(
            output,
            json.dumps(
                {
                    "change": result.model_dump(mode="json"),
                    "cluster": json.loads(_state_json(state)),
                }
            ),
        )
        return
    if result.status == ClusterStatus.UPDATING.value:  # --no-wait
        out.print(
            f"cluster {name}: Updating (operation {result.operation}: {state.reason}); follow "
            f"with: kubegate cluster describe {name}",
            highlight=False,
            markup=False,
        )
        return
    added = ", ".join(result.added) or "none"
    removed = ", ".join(result.removed) or "none"
    out.print(
        f"cluster {name}: {state.status.value}; added {added}; removed {removed}", highlight=False
    )


ChangeWaitOption = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="Follow the change until it ends (default), or return once it is accepted.",
    ),
]


@cluster_app.command("scale")
def cluster_scale(
    name: NameArg,
    pool: Annotated[str, typer.Argument(help="Worker pool name.")],
    size: Annotated[int, typer.Option("--size", help="New number of nodes.")],
    wait: ChangeWaitOption = True,
    output: OutputOption = Output.table,
) -> None:
    """Resize a worker pool (down removes the newest nodes first), or the control plane
    ('cp': 1, 3 or 5 members, added or removed one at a time); waits until done."""
    if pool == "cp" and size not in (1, 3, 5):
        _bad_input(f"--size: a control plane has 1, 3 or 5 members (etcd quorum), not {size}")
    if not 0 <= size <= MAX_POOL_NODES:
        _bad_input(f"--size: between 0 and {MAX_POOL_NODES} (nodes per worker pool), not {size}")
    _change(name, lambda c: c.scale_pool(name, pool, size, wait=wait), output)


@cluster_app.command("add-pool")
def cluster_add_pool(
    name: NameArg,
    file: Annotated[Path, typer.Option("--file", "-f", help="Worker pool YAML.")],
    wait: ChangeWaitOption = True,
    output: OutputOption = Output.table,
) -> None:
    """Add a worker pool; waits until its nodes are ready."""
    pool = load_spec(file, WorkerPool)
    _change(name, lambda c: c.add_pool(name, pool, wait=wait), output)


@cluster_app.command("remove-pool")
def cluster_remove_pool(
    name: NameArg,
    pool: Annotated[str, typer.Argument(help="Worker pool name.")],
    wait: ChangeWaitOption = True,
    yes: YesOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Remove a worker pool: its VMs and addresses (asks first on a terminal; --yes does not
    ask)."""
    confirm(f"Remove worker pool {pool} of cluster {name}, its VMs and addresses?", yes)
    _change(name, lambda c: c.remove_pool(name, pool, wait=wait), output)


DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")]


@cluster_app.command("apply")
def cluster_apply(
    file: Annotated[Path, typer.Option("--file", "-f", help="The cluster's spec, edited.")],
    dry_run: DryRunOption = False,
    wait: ChangeWaitOption = True,
    output: OutputOption = Output.table,
) -> None:
    """Make a running cluster match its edited spec as one operation: pools added, removed
    or resized, nodes replaced one at a time when what builds them changed, the control
    plane resized. Prints the plan first (which nodes are created, replaced and removed,
    which addresses taken); fields that cannot change in place are refused with the reason
    (exit 2)."""
    spec = load_cluster(file)

    async def plan_it() -> ChangePlan:
        return await (await KubegateClient.connect()).plan_apply(spec)

    plan: ChangePlan = _run(plan_it())
    if output.data and (dry_run or plan.refused or plan.empty):
        print_data(output, plan.model_dump_json())
    else:  # (before a change's JSON: the plan to stderr, stdout holds the data alone)
        _show_plan(spec.name, plan, to_stderr=output.data)
    if plan.refused:
        _bad_input("; ".join(plan.refused))
    if plan.empty or dry_run:
        return

    async def apply_it() -> ChangeResult:
        client = await KubegateClient.connect()
        return await client.apply_cluster(spec, plan=plan, wait=wait)

    result: ChangeResult = _run(apply_it())
    if output.data:
        print_data(output, result.model_dump_json())
        return
    if result.status == ClusterStatus.UPDATING.value:
        out.print(
            f"cluster {spec.name}: Updating (operation {result.operation}); follow with: "
            f"kubegate cluster describe {spec.name}",
            highlight=False,
            markup=False,
        )
        return
    out.print(
        f"cluster {spec.name}: {result.status}; added {', '.join(result.added) or 'none'}; "
        f"removed {', '.join(result.removed) or 'none'}",
        highlight=False,
        markup=False,
    )


@cluster_app.command("upgrade")
def cluster_upgrade(
    name: NameArg,
    kubernetes: Annotated[
        str | None, typer.Option("--kubernetes", help="Kubernetes version, e.g. 1.31.2.")
    ] = None,
    template: Annotated[
        str | None, typer.Option("--template", help="VM template path for the nodes.")
    ] = None,
    dry_run: DryRunOption = False,
    wait: ChangeWaitOption = True,
    output: OutputOption = Output.table,
) -> None:
    """Replace every node with one on another Kubernetes version and/or template, one at a
    time: the control plane first (the new member joins before the old one leaves), then
    each worker pool by its rollout policy (max_surge, max_unavailable). Prints the plan
    first; a skipped minor version is refused (exit 2). Pause, resume or abort it with
    `kubegate cluster rollout`."""
    if kubernetes is None and template is None:
        _bad_input("--kubernetes, --template: name a version, a template or both")

    async def plan_it() -> tuple[ClusterSpec, ChangePlan]:
        client = await KubegateClient.connect()
        try:
            spec = await client.upgraded_spec(name, kubernetes, template)
        except ValidationError as exc:
            _bad_input("; ".join(field_errors(exc)))
        except ValueError as exc:
            _bad_input(str(exc))
        return spec, await client.plan_apply(spec)

    _, plan = _run(plan_it())
    if output.data and (dry_run or plan.refused):
        print_data(output, plan.model_dump_json())
    else:
        _show_plan(name, plan, to_stderr=output.data)
    if plan.refused:
        _bad_input("; ".join(plan.refused))
    if dry_run:
        return
    _change(
        name,
        lambda c: c.upgrade_cluster(name, kubernetes=kubernetes, template=template, wait=wait),
        output,
    )


rollout_app = typer.Typer(
    help="Pause, resume or abort a cluster's rollout (an upgrade replacing its nodes).",
    no_args_is_help=True,
)
cluster_app.add_typer(rollout_app, name="rollout")


def _rollout(name: str, call: Any, verb: str, output: Output) -> None:
    _, rollout = _update(name, call)
    if output.data:
        print_data(output, rollout.model_dump_json())
        return
    done = f"{len(rollout.replaced)} of {rollout.total} replaced"
    out.print(
        f"cluster {name}: rollout {verb} ({rollout.target}; {done})",
        highlight=False,
        markup=False,
    )


@rollout_app.command("pause")
def rollout_pause(name: NameArg, output: OutputOption = Output.table) -> None:
    """Hold the rollout once the replacement in progress is done."""
    _rollout(
        name, lambda c: c.pause_rollout(name), "pauses after the replacement in progress", output
    )


@rollout_app.command("resume")
def rollout_resume(name: NameArg, output: OutputOption = Output.table) -> None:
    """Go on with a paused rollout."""
    _rollout(name, lambda c: c.resume_rollout(name), "resumed", output)


@rollout_app.command("abort")
def rollout_abort(name: NameArg, output: OutputOption = Output.table) -> None:
    """Stop the rollout once the replacement in progress is done (nodes left on their old
    build keep serving; upgrade or apply again to finish)."""
    _rollout(
        name, lambda c: c.abort_rollout(name), "stops after the replacement in progress", output
    )


RetryGivenUpOption = Annotated[
    bool,
    typer.Option(
        "--retry-given-up",
        help="Repairs given up get their attempts again (a backoff in progress stays).",
    ),
]


@cluster_app.command("reconcile")
def cluster_reconcile(
    name: NameArg, retry_given_up: RetryGivenUpOption = False, output: OutputOption = Output.table
) -> None:
    """Compare the cluster's VMs in vCenter with its record now and repair what its healing
    policy repairs; prints what it found. Exit 1 if Degraded or vCenter could not be read."""
    _, health = _update(name, lambda c: c.reconcile_cluster(name, retry_given_up))
    _, state = _get(name)
    if output.data:
        print_data(output, health.model_dump_json())
    else:
        out.print(
            f"cluster {name}: {state.status.value}; {len(health.findings)} finding(s); "
            f"{health.repairs_made} repair(s) made so far",
            highlight=False,
            markup=False,
        )
        show_health(health)
    if state.status is ClusterStatus.DEGRADED or health.error:
        raise typer.Exit(EXIT_FAILED)


remediation_app = typer.Typer(
    help="Pause or resume a cluster's remediation (replacing nodes whose guest stopped reporting).",
    no_args_is_help=True,
)
cluster_app.add_typer(remediation_app, name="remediation")


def _remediation(name: str, call: Any, output: Output) -> None:
    _, health = _update(name, call)
    if output.data:
        print_data(output, health.model_dump_json())
        return
    word = "paused: unhealthy nodes are reported" if health.remediation_paused else "on"
    out.print(f"cluster {name}: remediation {word}", highlight=False, markup=False)


@remediation_app.command("pause")
def remediation_pause(name: NameArg, output: OutputOption = Output.table) -> None:
    """Report unhealthy nodes instead of replacing them (drift is still repaired)."""
    _remediation(name, lambda c: c.pause_remediation(name), output)


@remediation_app.command("resume")
def remediation_resume(name: NameArg, output: OutputOption = Output.table) -> None:
    """Replace unhealthy nodes again."""
    _remediation(name, lambda c: c.resume_remediation(name), output)


def _deploy_dry_run(spec: ClusterSpec, output: Output) -> None:
    """The plan and the preflight of a deploy; exit 1 when a check failed."""

    async def check() -> tuple[ChangePlan, PreflightReport, str]:
        return await (await KubegateClient.connect()).plan_deploy(spec)

    plan, report, workflow_id = _run(check())
    if output.data:
        document = {
            "plan": plan.model_dump(mode="json"),
            "preflight": report.model_dump(mode="json"),
        }
        print_data(output, json.dumps(document))
    else:
        _show_plan(spec.name, plan)
        print_report(report, workflow_id)
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)


def _show_plan(name: str, plan: ChangePlan, *, to_stderr: bool = False) -> None:
    console = err if to_stderr else out
    if plan.empty:
        console.print(f"cluster {name}: the spec asks for no change", highlight=False, markup=False)
        return
    lines = [f"cluster {name}: plan"]
    lines += [f"  {change}" for change in plan.changes]
    lines.append(f"  create: {', '.join(plan.create) or 'none'}")
    lines.append(f"  remove: {', '.join(plan.remove) or 'none'}")
    if plan.replace:
        lines.append("  replace (rolling, in this order):")
        lines += [f"    {old} -> {new}" for old, new in plan.replace.items()]
    if plan.addresses:
        taken = ", ".join(f"{n} from {pool}" for pool, n in sorted(plan.addresses.items()))
        lines.append(f"  addresses: {taken}")
    lines += [f"  refused: {reason}" for reason in plan.refused]
    lines += [f"  warning: {warning}" for warning in plan.warnings]
    console.print("\n".join(lines), highlight=False, markup=False)


_TTL = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> timedelta:
    """'8h', '30m', '2d', '900s' as a lifetime within the kubeconfig bounds; exits 2 if not."""
    found = _TTL.match(text.strip())
    seconds = int(found.group(1)) * _TTL_UNITS[found.group(2)] if found else -1
    if not MIN_TTL_SECONDS <= seconds <= MAX_TTL_SECONDS:
        _bad_input(
            f"--ttl: {text!r} must be a number with s, m, h or d, between "
            f"{MIN_TTL_SECONDS // 60}m and {MAX_TTL_SECONDS // 86400}d"
        )
    return timedelta(seconds=seconds)


@cluster_app.command("kubeconfig")
def cluster_kubeconfig(
    name: NameArg,
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime, e.g. 8h, 30m, 2d.")] = "8h",
    user: Annotated[
        str | None, typer.Option("--user", help="Name in the certificate; default: you.")
    ] = None,
    output_file: Annotated[
        Path | None,
        typer.Option(
            "--output-file",
            help="Where to write it (mode 0600); default <home>/kubeconfig/NAME-USER.yaml.",
        ),
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """A cluster-admin kubeconfig for a Running cluster: minted by the gateway's agent from
    the cluster's CA, sealed to a key made for this request; written to a file, never
    printed. `describe` lists every kubeconfig issued."""
    lifetime = parse_ttl(ttl)
    who = user or getpass.getuser()
    if not USER.fullmatch(who):
        _bad_input(f"--user: {who!r} must be letters, digits and . _ @ + - (at most 64)")
    target = output_file or Settings().home / "kubeconfig" / f"{name}-{who}.yaml"
    if target.is_dir():
        _bad_input(f"--output-file: {target} is a directory")
    _, (text, issue) = _update(name, lambda c: c.kubeconfig(name, who, lifetime))
    write_private(target, text)
    if output.data:
        print_data(output, json.dumps({"file": str(target), **issue.model_dump(mode="json")}))
        return
    out.print(
        f"wrote {target}: cluster {name}, user {issue.user} ({', '.join(issue.groups)}), "
        f"valid until {issue.expires_at:%Y-%m-%d %H:%M:%S} UTC (serial {issue.serial})\n"
        f"use it: kubectl --kubeconfig {target} get nodes",
        highlight=False,
        markup=False,
    )


@app.command("operator-key")
def operator_key() -> None:
    """Your operator key's public half (`<home>/operator.key`, made on first use): list it
    under `operators:` in a gateway agent's policy.yaml to let you have kubeconfigs minted."""
    key = AgentKey.load_or_create(Settings().home / "operator.key")
    out.print(key.signing_key_b64, highlight=False, markup=False)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (its folder made 0700 if new)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)


def _show_cluster(state: ClusterState, output: Output, describe: bool) -> None:
    if output.data:
        print_data(output, _state_json(state))
        return
    step = state.current_step()
    out.print(
        f"cluster {state.name}  status {state.status.value}"
        + (
            f" ({state.reason})"
            if state.reason and state.status in (ClusterStatus.DELETED, ClusterStatus.DEGRADED)
            else ""
        )
        + f"  gateway {state.gateway}  nodes {len(existing(state))}"
        + (f"  VIP {state.vip}" if state.vip else ""),
        highlight=False,
    )
    if step is not None:
        waiting = f" — {step.detail}" if step.state.value == "running" and step.detail else ""
        out.print(
            f"step: {step.title} ({step.state.value}){waiting}", highlight=False, markup=False
        )
    if state.error:
        out.print(f"[red]error:[/red] {state.error}", highlight=False)
    if state.marks_problem and state.status is not ClusterStatus.DELETED:
        out.print(f"warning: {state.marks_problem}", highlight=False, markup=False)
    if not describe:
        return
    steps = Table(title="Steps")
    for column in ("step", "state", "started", "seconds", "attempts", "detail / error"):
        steps.add_column(column)
    if state.trimmed_operations:
        steps.add_row(f"({state.trimmed_operations} earlier operations not kept)")
    for operation, _, group in operations(state.steps):
        if operation:
            steps.add_row(f"[bold]{escape(operation)}[/bold]")
        for s in group:
            seconds = f"{s.seconds:.1f}" if s.seconds is not None else ""
            started = s.started.strftime("%H:%M:%S") if s.started else ""
            steps.add_row(
                ("  " if operation else "") + s.title,
                s.state.value,
                started,
                seconds,
                str(s.attempts),
                _short(s.error or s.detail, 60),
            )
    out.print(steps)
    rollout = state.rollout
    if rollout is not None:
        done = f"{len(rollout.replaced)} of {rollout.total} replaced"
        line = f"rollout (operation {rollout.operation}): {rollout.target}: {rollout.state}, {done}"
        if rollout.current:
            line += f"; replacing {', '.join(rollout.current)}"
        if rollout.outdated and rollout.state != "running":
            line += f"; on their old build: {', '.join(rollout.outdated)}"
        out.print(line, highlight=False, markup=False)
    health = state.health
    if health.checked_at is not None:
        line = f"reconciled {health.checked_at:%Y-%m-%d %H:%M:%S} UTC ({health.checks} so far"
        line += f", {health.repairs_made} repair(s))"
        if health.remediation_paused:
            line += "; remediation paused"
        out.print(line, highlight=False, markup=False)
        show_health(health)
    nodes = Table(title="Nodes")
    for column in ("name", "pool", "domain", "VM", "address", "version", "power", "phase"):
        nodes.add_column(column)
    for n in state.nodes:
        nodes.add_row(
            n.name,
            n.pool,
            f"{n.domain_index}: {n.compute_cluster}",
            (n.vm or "").partition(":")[2],
            n.address or "",
            n.kubernetes,
            n.power_state.removeprefix("powered"),
            n.phase,
        )
    out.print(nodes)
    if state.kubeconfigs:
        issued = Table(title="Kubeconfigs issued")
        for column in ("user", "groups", "issued", "expires", "serial"):
            issued.add_column(column)
        for k in state.kubeconfigs:
            issued.add_row(
                k.user,
                ", ".join(k.groups),
                f"{k.issued_at:%Y-%m-%d %H:%M}",
                f"{k.expires_at:%Y-%m-%d %H:%M}",
                k.serial,
            )
        out.print(issued)
