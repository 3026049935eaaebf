"""The kubegate command.

Exit codes (docs/cli.md): 0 success; 1 the request ran and failed (e.g. a check failed) or
kubegate could not carry it out; 2 bad input or refused (nothing was started or changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import sys
import traceback
import urllib.parse
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from domain import errors, names
from domain.account import CloudAccountSpec, VCenterAccess
from domain.cluster import MAX_POOL_NODES, ClusterProfile, ClusterSpec, ProfileFile, WorkerPool
from domain.gateway import GatewayState
from domain.ipam import Allocation, IpPoolSpec, PoolStatus
from domain.lifecycle import ClusterState, ClusterStatus, ClusterSummary, operations
from domain.preflight import CheckStatus, PreflightReport
from domain.version import VERSION, accepted_agents
from starters.client import KubegateClient, KubegateError, RequestRefused
from starters.settings import Settings
from starters.yamlfile import YamlFileError, read_yaml

app = typer.Typer(
    help="kubegate: Kubernetes clusters on vSphere through private cloud gateways.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
account_app = typer.Typer(
    help="Cloud accounts: vCenter credentials a gateway uses.", no_args_is_help=True
)
dev_app = typer.Typer(
    help="The local stack: Temporal, vCenter simulator, workers.", no_args_is_help=True
)
worker_app = typer.Typer(help="Run worker processes.", no_args_is_help=True)
gateway_app = typer.Typer(help="Private cloud gateways.", no_args_is_help=True)
ippool_app = typer.Typer(
    help="IP pools linked to gateways: static addresses for nodes.", no_args_is_help=True
)
app.add_typer(account_app, name="account")
app.add_typer(dev_app, name="dev")
app.add_typer(worker_app, name="worker")
app.add_typer(gateway_app, name="gateway")
app.add_typer(ippool_app, name="ippool")

M = TypeVar("M", bound=BaseModel)


def _print_version(wanted: bool) -> None:
    if wanted:
        print(f"kubegate {VERSION} (works with gateway agents {accepted_agents()})")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """kubegate: Kubernetes clusters on vSphere through private cloud gateways."""


@app.command("version")
def show_version() -> None:
    """Print kubegate's version and the gateway agent releases it works with."""
    _print_version(True)


out = Console()
err = Console(stderr=True)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table or json.")]
PairingCodeFileOption = Annotated[
    Path | None,
    typer.Option(
        help="File holding the code `gateway create` printed (first start; or "
        "KUBEGATE_PAIRING_CODE_FILE). Never on the command line."
    ),
]


def main() -> None:
    """Run the command and exit with its code.

    The process ends with os._exit once the command is done: the Temporal client's native
    threads can abort interpreter finalization (temporalio/sdk-python#300), which would turn
    a finished command's exit code into SIGABRT.
    """
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:
        traceback.print_exc()
        code = 1
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Flush what was written and end the process without interpreter teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _bad_input(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(EXIT_BAD_INPUT)


def _failed(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(EXIT_FAILED)


def load_spec(path: Path, model: type[M]) -> M:
    """Read a YAML spec; bad input exits 2 naming the field and the rule."""
    try:
        data = read_yaml(path)
    except YamlFileError as exc:
        _bad_input(str(exc))
    if data is None:
        _bad_input(f"{path}: the file is empty; expected a mapping of fields")
    if not isinstance(data, dict):
        _bad_input(
            f"{path}: expected a mapping of fields at the top level, not a "
            f"{'list' if isinstance(data, list) else 'single value'}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        _invalid_fields(path, exc)


def _invalid_fields(path: Path, exc: ValidationError) -> NoReturn:
    lines = [f"{path}: {exc.error_count()} invalid field(s)"]
    _bad_input("\n".join(lines + [f"  {line}" for line in errors.field_errors(exc)]))


def read_password(access: VCenterAccess, base: Path) -> str:
    """The password from the account file's source, or a prompt; never echoed."""
    if access.password:
        return access.password
    if access.password_env:
        value = os.environ.get(access.password_env)
        if not value:
            _bad_input(
                f"vcenter.password_env: environment variable {access.password_env} is not set"
            )
        return value
    if access.password_file:
        path = Path(access.password_file)
        path = path if path.is_absolute() else base / path
        try:
            return path.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            _bad_input(f"vcenter.password_file: cannot read a password from {path}")
    if sys.stdin.isatty():
        return getpass.getpass(f"Password for {access.username}: ")
    _bad_input("vcenter: give one of password, password_env or password_file")


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except RequestRefused as exc:
        _bad_input(str(exc))
    except KubegateError as exc:
        _failed(str(exc))
    except WorkflowFailureError as exc:
        cause = exc.cause
        _failed(f"{getattr(cause, 'message', None) or cause}")
    except RPCError as exc:
        _failed(f"Temporal refused the request ({exc.status.name}): {exc.message}")
    except RuntimeError as exc:
        if "connect" in str(exc).lower():
            _failed(
                f"cannot reach Temporal at {Settings().temporal_address}: start it "
                "(kubegate dev up) or set KUBEGATE_TEMPORAL_ADDRESS"
            )
        raise


# -- account --------------------------------------------------------------------------------


@account_app.command("validate")
def account_validate(
    file: Annotated[Path, typer.Option("--file", "-f", help="Cloud account YAML.")],
    output: OutputOption = Output.table,
) -> None:
    """Run the preflight checks of a cloud account and its placement on its gateway."""
    spec = load_spec(file, CloudAccountSpec)
    password = read_password(spec.vcenter, file.parent)
    workflow_id = names.preflight_workflow_id(str(uuid.uuid4()))

    async def run() -> PreflightReport:
        client = await KubegateClient.connect()
        return await client.validate_account(spec, password, workflow_id=workflow_id)

    if output is Output.table:
        err.print(f"preflight {workflow_id} on gateway {spec.gateway} …", highlight=False)
    report: PreflightReport = _run(run())
    if output is Output.json:
        data = report.model_dump(mode="json")
        data["passed"] = report.passed
        data["workflow_id"] = workflow_id
        out.print_json(json.dumps(data))
    else:
        print_report(report, workflow_id)
    raise typer.Exit(0 if report.passed else EXIT_FAILED)


_STYLE = {
    CheckStatus.PASS: "green",
    CheckStatus.WARN: "yellow",
    CheckStatus.FAIL: "bold red",
    CheckStatus.SKIPPED: "dim",
}


def print_report(report: PreflightReport, workflow_id: str) -> None:
    table = Table(
        title=f"Preflight of {report.account} — {report.username} @ {report.server}",
        show_lines=False,
        expand=False,
    )
    with_remedy = any(r.remedy for r in report.results)
    for column in ("status", "check", "object", "detail", *(["remedy"] if with_remedy else [])):
        table.add_column(column, overflow="fold")
    for r in report.results:
        style = _STYLE[r.status]
        row = [f"[{style}]{r.status.value}[/{style}]", r.title, r.object, r.detail]
        table.add_row(*row, *([r.remedy] if with_remedy else []))
    out.print(table)
    verdict = "[green]passed[/green]" if report.passed else "[bold red]failed[/bold red]"
    out.print(
        f"{verdict}: {report.count(CheckStatus.PASS)} passed, {report.count(CheckStatus.WARN)} "
        f"warnings, {report.count(CheckStatus.FAIL)} failed, "
        f"{report.count(CheckStatus.SKIPPED)} skipped; {report.vcenter_requests} vCenter requests",
        highlight=False,
    )
    out.print(
        f"workflow: {workflow_link(workflow_id)}",
        highlight=False,
    )


def workflow_link(workflow_id: str) -> str:
    """The Web UI page of a workflow's latest run."""
    settings = Settings()
    quoted = urllib.parse.quote(workflow_id, safe="")
    return f"{settings.ui_address}/namespaces/{settings.temporal_namespace}/workflows/{quoted}"


# -- ippool -------------------------------------------------------------------------------

GatewayOption = Annotated[
    str | None,
    typer.Option(
        "--gateway", "-g", help="Gateway the pool is linked to (default: KUBEGATE_GATEWAY)."
    ),
]


def _pool_row(status: PoolStatus) -> dict[str, Any]:
    spec = status.spec
    return {
        "name": spec.name,
        "gateway": spec.gateway,
        "kind": spec.kind,
        "addresses": spec.describe_range(),
        "prefix": spec.prefix_length,
        "network_gateway": spec.network_gateway,
        "used": status.used,
        "free": status.free,
        "capacity": status.capacity,
        "restricted": spec.restrict_to_single_cluster,
        "claimed_by": status.claimed_by,
    }


@ippool_app.command("create")
def ippool_create(
    file: Annotated[Path, typer.Option("--file", "-f", help="IP pool YAML.")],
    output: OutputOption = Output.table,
) -> None:
    """Create an IP pool linked to a gateway."""
    spec = load_spec(file, IpPoolSpec)

    async def run() -> PoolStatus:
        client = await KubegateClient.connect()
        gateway = await client.gateway_state(spec.gateway)  # refused if there is none
        if gateway.status.value == "Deleted":
            raise RequestRefused(f"gateway: gateway {spec.gateway} is deleted")
        return await client.create_pool(spec)

    status: PoolStatus = _run(run())
    if output is Output.json:
        out.print_json(json.dumps(_pool_row(status)))
    else:
        out.print(
            f"created IP pool {spec.name} ({spec.describe_range()}) on gateway "
            f"{spec.gateway}: {status.capacity} allocatable addresses",
            highlight=False,
        )


@ippool_app.command("list")
def ippool_list(gateway: GatewayOption = None, output: OutputOption = Output.table) -> None:
    """IP pools with used and free addresses (all gateways unless --gateway)."""

    async def run() -> list[PoolStatus]:
        return await (await KubegateClient.connect()).list_pools(gateway)

    rows = [_pool_row(s) for s in _run(run())]
    if output is Output.json:
        out.print_json(json.dumps(rows))
        return
    table = Table()
    for column in ("name", "gateway", "addresses", "prefix", "used", "free", "restricted"):
        table.add_column(column)
    for row in rows:
        restricted = (row["claimed_by"] or "yes") if row["restricted"] else "no"
        table.add_row(
            row["name"],
            row["gateway"],
            row["addresses"],
            f"/{row['prefix']}",
            str(row["used"]),
            str(row["free"]),
            restricted,
        )
    out.print(table)


@ippool_app.command("get")
def ippool_get(
    name: Annotated[str, typer.Argument(help="Pool name.")],
    gateway: GatewayOption = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's addresses.")] = None,
    output: OutputOption = Output.table,
) -> None:
    """A pool's definition and its allocations."""
    gw = gateway or Settings().gateway

    async def run() -> tuple[PoolStatus, list[Allocation]]:
        client = await KubegateClient.connect()
        status = await client.pool_status(gw, name)
        return status, await client.pool_allocations(gw, name, owner)

    status, allocations = _run(run())
    if output is Output.json:
        data = {
            **_pool_row(status),
            "spec": status.spec.model_dump(mode="json"),
            "allocations": [a.model_dump(mode="json") for a in allocations],
        }
        out.print_json(json.dumps(data))
        return
    spec = status.spec
    out.print(
        f"IP pool {spec.name} on gateway {spec.gateway}: {spec.describe_range()}, "
        f"/{spec.prefix_length}, gateway {spec.network_gateway}, "
        f"name servers {', '.join(spec.nameservers) or '-'}",
        highlight=False,
    )
    out.print(
        f"{status.used} used, {status.free} free of {status.capacity}"
        + (
            f"; restricted to {status.claimed_by or 'the first cluster'}"
            if spec.restrict_to_single_cluster
            else ""
        ),
        highlight=False,
    )
    table = Table()
    for column in ("owner", "slot", "address", "allocated"):
        table.add_column(column)
    for a in allocations:
        table.add_row(a.owner, a.slot, a.address, a.allocated_at.strftime("%Y-%m-%d %H:%M:%S"))
    out.print(table)


@ippool_app.command("delete")
def ippool_delete(
    name: Annotated[str, typer.Argument(help="Pool name.")],
    gateway: GatewayOption = None,
) -> None:
    """Delete a pool; refused while any address is allocated."""
    gw = gateway or Settings().gateway

    async def run() -> PoolStatus:
        return await (await KubegateClient.connect()).delete_pool(gw, name)

    _run(run())
    out.print(f"deleted IP pool {name} of gateway {gw}", highlight=False)


# -- dev ------------------------------------------------------------------------------------


@dev_app.command("up")
def dev_up() -> None:
    """Start the local stack (idempotent)."""
    from starters.dev import DevStack, DevStackError

    stack = DevStack()
    try:
        outcome = asyncio.run(stack.up())
    except DevStackError as exc:
        _failed(str(exc))
    for name, state in outcome:
        out.print(f"{name:15} {state}", highlight=False)
    settings = stack.settings
    out.print(
        f"Temporal      {settings.temporal_address}  (namespace {settings.temporal_namespace})"
    )
    out.print(f"Web UI        {settings.ui_address}")
    out.print(
        f"vCenter sim   https://{settings.vcsim_address}/sdk  thumbprint {stack.thumbprint()}"
    )
    out.print(f"account file  {stack.account_file}")
    out.print("stop with     make down  (or kubegate dev down)")


@dev_app.command("down")
def dev_down() -> None:
    """Stop the processes `dev up` started."""
    from starters.dev import DevStack

    for name, state in DevStack().down():
        out.print(f"{name:15} {state}", highlight=False)


@dev_app.command("status")
def dev_status(output: OutputOption = Output.table) -> None:
    """Show which components of the local stack run."""
    from starters.dev import DevStack

    rows = DevStack().status()
    if output is Output.json:
        out.print_json(json.dumps(rows))
        return
    table = Table()
    for column in ("component", "state", "pid", "address", "log"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    out.print(table)


# -- processes ------------------------------------------------------------------------------


@worker_app.command("control")
def worker_control() -> None:
    """Run the control worker (all workflows)."""
    from workers import control

    control.main()


# -- cluster --------------------------------------------------------------------------------

cluster_app = typer.Typer(
    help="Kubernetes clusters: deploy, watch, change and delete.", no_args_is_help=True
)
app.add_typer(cluster_app, name="cluster")

NameArg = Annotated[str, typer.Argument(help="Cluster name.")]
WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="Follow until it is done.")]


def load_cluster(path: Path) -> ClusterSpec:
    """A cluster spec with its profile file resolved (relative to the spec); exits 2 if bad."""
    spec = load_spec(path, ClusterSpec)
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


class _Progress:
    """Prints each step once when it starts and once when it ends (live --wait output)."""

    def __init__(self) -> None:
        self.printed: set[tuple[int, str]] = set()
        self.status = ""

    def __call__(self, state: ClusterState | GatewayState) -> None:
        if state.status.value != self.status and not self.status:
            self.status = state.status.value
            err.print(f"[bold]{self.status}[/bold]", highlight=False)
        self._steps(state)
        if state.status.value != self.status:
            self.status = state.status.value
            err.print(f"[bold]{self.status}[/bold]", highlight=False)

    def _steps(self, state: ClusterState | GatewayState) -> None:
        for i, step in enumerate(state.steps):
            if (i, step.state.value) in self.printed:
                continue
            self.printed.add((i, step.state.value))
            if step.state.value == "running":
                err.print(f"  … {step.title}", highlight=False)
                continue
            seconds = f" {step.seconds:.1f}s" if step.seconds is not None else ""
            detail = (
                f" — {_short(step.error or step.detail, 90)}" if step.error or step.detail else ""
            )
            err.print(f"  {step.state.value:<9} {step.title}{seconds}{detail}", highlight=False)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _follow(client: KubegateClient, name: str, done: Any) -> ClusterState:
    async def run() -> ClusterState:
        return await client.wait_cluster(name, done, on_change=_Progress(), interval=0.25)

    state: ClusterState = _run(run())
    return state


def _settled(state: ClusterState) -> bool:
    return state.status in (ClusterStatus.RUNNING, ClusterStatus.FAILED, ClusterStatus.DELETED)


def _state_json(state: ClusterState) -> str:
    return state.model_dump_json(exclude={"spec"})


@cluster_app.command("deploy")
def cluster_deploy(
    file: Annotated[Path, typer.Option("--file", "-f", help="Cluster YAML.")],
    readiness: Annotated[
        str, typer.Option(help="guest (VMware Tools report address and hostname) or kubernetes.")
    ] = "guest",
    wait: WaitOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Deploy a cluster through its cloud account's gateway; --wait follows each step.

    While the gateway upgrades, the cluster is accepted and waits (Queued) in order.
    """
    if readiness not in ("guest", "kubernetes"):
        _bad_input("--readiness: guest or kubernetes")
    spec = load_cluster(file)

    async def start() -> tuple[KubegateClient, ClusterState]:
        client = await KubegateClient.connect()
        return client, await client.deploy_cluster(spec, readiness=readiness)

    client, state = _run(start())
    if not wait:
        if output is Output.json:
            out.print_json(_state_json(state))
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


@cluster_app.command("get")
def cluster_get(name: NameArg, output: OutputOption = Output.table) -> None:
    """A cluster's status, current step and nodes count."""
    _, state = _get(name)
    _show_cluster(state, output, describe=False)


@cluster_app.command("describe")
def cluster_describe(name: NameArg, output: OutputOption = Output.table) -> None:
    """A cluster's step history (with durations) and its nodes."""
    _, state = _get(name)
    _show_cluster(state, output, describe=True)


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
    if output is Output.json:
        out.print_json(json.dumps([r.model_dump(mode="json") for r in rows]))
        return
    table = Table()
    for column in ("name", "status", "gateway", "nodes", "step"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, row.status, row.gateway, str(row.nodes), row.step)
    out.print(table)


@cluster_app.command("abort")
def cluster_abort(
    name: NameArg, wait: WaitOption = False, output: OutputOption = Output.table
) -> None:
    """Stop a provisioning cluster and remove everything it created."""
    _lifecycle(name, lambda c: c.abort_cluster(name), "abort", ClusterStatus.DELETED, wait, output)


@cluster_app.command("delete")
def cluster_delete(
    name: NameArg, wait: WaitOption = False, output: OutputOption = Output.table
) -> None:
    """Delete a Running or Failed cluster: its VMs, addresses and folder."""
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
        if output is Output.json:
            out.print_json(_state_json(state))
        else:
            out.print(f"cluster {name}: {verb} accepted", highlight=False)
        return
    ends = (ClusterStatus.DELETED, ClusterStatus.FAILED, ClusterStatus.RUNNING)
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
    if output is Output.json:
        out.print_json(
            json.dumps(
                {
                    "change": result.model_dump(mode="json"),
                    "cluster": json.loads(_state_json(state)),
                }
            )
        )
        return
    added = ", ".join(result.added) or "none"
    removed = ", ".join(result.removed) or "none"
    out.print(
        f"cluster {name}: {state.status.value}; added {added}; removed {removed}", highlight=False
    )


@cluster_app.command("scale")
def cluster_scale(
    name: NameArg,
    pool: Annotated[str, typer.Argument(help="Worker pool name.")],
    size: Annotated[int, typer.Option("--size", help="New number of nodes.")],
    output: OutputOption = Output.table,
) -> None:
    """Resize a worker pool (down removes the newest nodes first); waits until done."""
    if not 0 <= size <= MAX_POOL_NODES:
        _bad_input(f"--size: between 0 and {MAX_POOL_NODES} (nodes per worker pool), not {size}")
    _change(name, lambda c: c.scale_pool(name, pool, size), output)


@cluster_app.command("add-pool")
def cluster_add_pool(
    name: NameArg,
    file: Annotated[Path, typer.Option("--file", "-f", help="Worker pool YAML.")],
    output: OutputOption = Output.table,
) -> None:
    """Add a worker pool; waits until its nodes are ready."""
    pool = load_spec(file, WorkerPool)
    _change(name, lambda c: c.add_pool(name, pool), output)


@cluster_app.command("remove-pool")
def cluster_remove_pool(
    name: NameArg,
    pool: Annotated[str, typer.Argument(help="Worker pool name.")],
    output: OutputOption = Output.table,
) -> None:
    """Remove a worker pool: its VMs and addresses."""
    _change(name, lambda c: c.remove_pool(name, pool), output)


def _show_cluster(state: ClusterState, output: Output, describe: bool) -> None:
    if output is Output.json:
        out.print_json(_state_json(state))
        return
    step = state.current_step()
    out.print(
        f"cluster {state.name}  status {state.status.value}"
        + (f" ({state.reason})" if state.reason and state.status is ClusterStatus.DELETED else "")
        + f"  gateway {state.gateway}  nodes {len(state.nodes)}"
        + (f"  VIP {state.vip}" if state.vip else ""),
        highlight=False,
    )
    if step is not None:
        out.print(f"step: {step.title} ({step.state.value})", highlight=False)
    if state.error:
        out.print(f"[red]error:[/red] {state.error}", highlight=False)
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
    nodes = Table(title="Nodes")
    for column in ("name", "pool", "domain", "VM", "address", "power", "phase"):
        nodes.add_column(column)
    for n in state.nodes:
        nodes.add_row(
            n.name,
            n.pool,
            f"{n.domain_index}: {n.compute_cluster}",
            (n.vm or "").partition(":")[2],
            n.address or "",
            n.power_state.removeprefix("powered"),
            n.phase,
        )
    out.print(nodes)


# the gateway and account commands live in their own module and register on the apps above
from starters import codec_cli, dev_cli, gateway_cli  # noqa: E402, F401

if __name__ == "__main__":
    # run as `python -m starters.cli`: use the module the commands registered on
    from starters.cli import main as registered_main

    registered_main()
