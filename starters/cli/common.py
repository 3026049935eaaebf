"""The kubegate command: its typer apps, shared options and helpers, `main()`.

Exit codes (docs/cli.md): 0 success; 1 the request ran and failed (e.g. a check failed) or
kubegate could not carry it out; 2 bad input or refused (nothing was started or changed).

The noun modules of starters/cli/ register their commands on the apps defined here; this
module imports none of them.
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
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from domain import errors
from domain.account import VCenterAccess
from domain.gateway import GatewayState
from domain.health import ClusterHealth
from domain.lifecycle import ClusterState
from domain.preflight import CheckStatus, PreflightReport
from domain.version import VERSION, accepted_agents
from plumbing import tracing
from plumbing.contexts import (
    CONTEXT_ENV,
    NO_CONTEXT,
    SOURCE_ENV,
    ContextError,
    active_context,
)
from plumbing.settings import Settings
from starters.client import KubegateClient, KubegateError, RequestRefused
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


@dev_app.callback()
def _dev() -> None:
    """The local stack: Temporal, vCenter simulator, workers (this machine's, whatever
    context is current: `dev` commands and the processes they start use no context)."""
    active = active_context()
    os.environ[CONTEXT_ENV] = NO_CONTEXT
    if active is not None:
        err.print(
            f"note: context {active[0]} is not used by the dev stack (it runs on this machine);"
            " other commands still use it: kubegate --context none …, or a context for the "
            "stack (kubegate config set-context dev --address 127.0.0.1:7233 --use)",
            markup=False,
            highlight=False,
        )


worker_app = typer.Typer(help="Run worker processes.", no_args_is_help=True)
gateway_app = typer.Typer(help="Private cloud gateways.", no_args_is_help=True)
ippool_app = typer.Typer(
    help="IP pools linked to gateways: static addresses for nodes.", no_args_is_help=True
)
cluster_app = typer.Typer(
    help="Kubernetes clusters: deploy, watch, change and delete.", no_args_is_help=True
)
config_app = typer.Typer(
    help="Contexts: named Temporal endpoints in ~/.config/kubegate/config.yaml.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")
app.add_typer(account_app, name="account")
app.add_typer(dev_app, name="dev")
app.add_typer(worker_app, name="worker")
app.add_typer(gateway_app, name="gateway")
app.add_typer(ippool_app, name="ippool")
app.add_typer(cluster_app, name="cluster")

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
    context: Annotated[
        str | None,
        typer.Option(
            "--context",
            help="The context of the config file to use (default KUBEGATE_CONTEXT, else its "
            "current-context).",
        ),
    ] = None,
) -> None:
    """kubegate: Kubernetes clusters on vSphere through private cloud gateways."""
    if context is not None:
        os.environ[CONTEXT_ENV] = context  # (every Settings() of this command reads it)
        os.environ[SOURCE_ENV] = "--context"
    try:
        active_context()
    except ContextError as exc:
        _bad_input(str(exc))


@app.command("version")
def show_version() -> None:
    """Print kubegate's version and the gateway agent releases it works with."""
    _print_version(True)


#: stdout is a terminal: tables fit it; otherwise (a pipe, a file) nothing is wrapped or cut
TERMINAL = sys.stdout.isatty()


def _console(stderr: bool = False) -> Console:
    """A console that prints data verbatim: no emoji codes (a thumbprint's `:AB:` stays as it
    is), no highlighting; outside a terminal, no wrapping (a line as long as it is)."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(
        stderr=stderr,
        emoji=False,
        highlight=False,
        soft_wrap=not tty,
        width=None if tty else 100_000,
    )


out = _console()
err = _console(stderr=True)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class Output(StrEnum):
    """What `-o` asks for: a table (wide: with more columns), or the data as JSON or YAML."""

    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"

    @property
    def data(self) -> bool:
        """JSON or YAML: the data alone, nothing else on stdout."""
        return self in (Output.json, Output.yaml)


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table, wide, json or yaml.")]


def print_data(output: Output, data: Any) -> None:
    """The data as `-o` asks, verbatim on stdout: `data` is JSON text or JSON-able values."""
    value = json.loads(data) if isinstance(data, str | bytes) else data
    if output is Output.yaml:
        text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=1_000_000)
    else:
        text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()


class LogFormat(StrEnum):
    text = "text"
    json = "json"


MetricsAddressOption = Annotated[
    str | None,
    typer.Option(
        help="HOST:PORT to serve Prometheus metrics on (/metrics): the Temporal SDK's and "
        "kubegate's; default KUBEGATE_METRICS_ADDRESS, else none.",
    ),
]
LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(help="Log lines as text or JSON (one object a line); default KUBEGATE_LOG_FORMAT"),
]


def process_stopped(exc: KubegateError, log_format: str | None) -> NoReturn:
    """A worker or agent stopped on an error it logged: say it on the console too, unless
    the console takes JSON lines only; exit 2 if it was refused, else 1."""
    code = EXIT_BAD_INPUT if isinstance(exc, RequestRefused) else EXIT_FAILED
    if (log_format or Settings().log_format) != "json":
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code)


def process_options(metrics_address: str | None, log_format: LogFormat | None) -> dict[str, Any]:
    """A worker's or agent's --metrics-address and --log-format, checked (exit 2 if bad).
    A long-running process uses a context only when one is named (--context,
    KUBEGATE_CONTEXT), never merely because it is the operator's current one."""
    if not os.environ.get(CONTEXT_ENV):
        os.environ[CONTEXT_ENV] = NO_CONTEXT
    if metrics_address is not None:
        host, sep, port = metrics_address.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or " " in host:
            _bad_input(f"--metrics-address: {metrics_address!r} must be HOST:PORT")
    return {
        "metrics_address": metrics_address,
        "log_format": log_format.value if log_format is not None else None,
    }


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
    """Flush what was written (logs, spans) and end the process without interpreter teardown."""
    with contextlib.suppress(Exception):
        tracing.flush()
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


def load_spec(path: Path, model: type[M], *, from_get: bool = False) -> M:
    """Read a YAML spec; bad input exits 2 naming the field and the rule. `from_get`: a
    document `get -o json|yaml` printed (its `spec` and `status`) gives its `spec`."""
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
    if from_get and isinstance(data.get("spec"), dict) and "status" in data:
        data = data["spec"]
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
            active = active_context()
            where = f" (context {active[0]})" if active else ""
            _failed(
                f"cannot reach Temporal at {Settings().temporal_address}{where}: start it "
                "(kubegate dev up), or set KUBEGATE_TEMPORAL_ADDRESS or a context "
                "(kubegate config use-context)"
            )
        raise


def workflow_link(workflow_id: str) -> str:
    """The Web UI page of a workflow's latest run."""
    settings = Settings()
    quoted = urllib.parse.quote(workflow_id, safe="")
    return f"{settings.ui_address}/namespaces/{settings.temporal_namespace}/workflows/{quoted}"


GatewayOption = Annotated[
    str | None,
    typer.Option(
        "--gateway",
        "-g",
        help="Gateway. Lists: every gateway without it; one object: the gateway holding it, "
        "else the default gateway (the context's, else KUBEGATE_GATEWAY).",
    ),
]


WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="Follow until it is done.")]


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
    """Text cut to `width` in a terminal; whole outside one (a pipe can be copied from)."""
    if not TERMINAL or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def age(span: timedelta) -> str:
    """An age as kubectl prints it: 45s, 12m, 5h, 3d."""
    seconds = max(int(span.total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _call(fn: Any) -> Any:
    """Connect, run fn(client), map refusals to exit 2 and failures to exit 1."""

    async def run() -> Any:
        client = await KubegateClient.connect()
        return await fn(client)

    return _run(run())


def read_code_file(path: Path) -> str:
    """A pairing code from a file (first line); exit 2 naming the file when unreadable."""
    return first_line(path, "--pairing-code-file").strip()


def first_line(path: Path, option: str) -> str:
    """A secret's file: its first line; exit 2 naming the option and file when unreadable
    or empty (the content is never quoted)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        _bad_input(f"{option}: {path}: cannot read it ({type(exc).__name__})")
    if not lines or not lines[0].strip():
        _bad_input(f"{option}: {path}: empty")
    return lines[0]


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


def show_health(health: ClusterHealth) -> None:
    """A reconcile's findings (a cluster's or a gateway's nodes), as a table."""
    if health.error:
        out.print(f"reconcile: {health.error}", highlight=False, markup=False)
    if not health.findings:
        return
    table = Table(title="Findings")
    for column in ("kind", "node", "VM", "detail"):
        table.add_column(column)
    for f in health.findings:
        table.add_row(f.kind, f.node, f.vm.partition(":")[2], f.detail)
    out.print(table)


YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def confirm(question: str, yes: bool) -> None:
    """Ask before something destructive, on a terminal; without one `--yes` is needed (exit 2,
    nothing started). Declined: exit 0, nothing started."""
    if yes:
        return
    if not sys.stdin.isatty():
        _bad_input(
            f"--yes: this asks for confirmation on a terminal ({question}); pass --yes to go "
            "on without asking (nothing was started)"
        )
    if not typer.confirm(question, err=True):
        err.print("not confirmed: nothing was started")
        raise typer.Exit(0)
