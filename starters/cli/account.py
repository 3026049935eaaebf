"""`kubegate account …`: check, keep, rotate, list and delete cloud accounts.

Registers on the `account` app of starters/cli/common.py. Exit codes as there.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from domain import names
from domain.account import CloudAccountSpec
from domain.preflight import PreflightReport
from starters.cli.common import (
    EXIT_FAILED,
    GatewayOption,
    Output,
    OutputOption,
    _bad_input,
    _call,
    _run,
    account_app,
    err,
    first_line,
    load_spec,
    out,
    print_data,
    print_report,
    read_password,
)
from starters.client import KubegateClient


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

    if not output.data:
        err.print(f"preflight {workflow_id} on gateway {spec.gateway} …", highlight=False)
    report: PreflightReport = _run(run())
    if output.data:
        data = report.model_dump(mode="json")
        data["passed"] = report.passed
        data["workflow_id"] = workflow_id
        print_data(output, json.dumps(data))
    else:
        print_report(report, workflow_id)
    raise typer.Exit(0 if report.passed else EXIT_FAILED)


@account_app.command("create")
def account_create(
    file: Annotated[Path, typer.Option("--file", "-f", help="Cloud account YAML.")],
    output: OutputOption = Output.table,
) -> None:
    """Check a cloud account on its gateway (preflight) and keep it there."""
    spec = load_spec(file, CloudAccountSpec)
    password = read_password(spec.vcenter, file.parent)
    summary = _call(lambda c: c.create_account(spec, password))
    if output.data:
        print_data(output, summary.model_dump_json())
        return
    out.print(
        f"cloud account {summary.name} on gateway {summary.gateway}: {summary.username} @ "
        f"{summary.server} (checked)",
        highlight=False,
    )


@account_app.command("rotate")
def account_rotate(
    name: Annotated[str, typer.Argument(help="Cloud account name.")],
    password_file: Annotated[
        Path | None, typer.Option(help="File holding the new password (first line).")
    ] = None,
    password_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the new password.")
    ] = None,
    gateway: GatewayOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Give an account a new password: sealed to the agent, checked by preflight, then kept;
    its clusters use it from their next work on. The old one stays if the check fails."""
    if not names.is_dns_label(name):
        _bad_input(f"NAME: {name!r} must be a DNS label")
    if password_file is not None and password_env is not None:
        _bad_input("give --password-file or --password-env, not both")
    if password_file is not None:
        password = first_line(password_file, "--password-file")
    elif password_env is not None:
        password = os.environ.get(password_env, "")
        if not password:
            _bad_input(f"--password-env: {password_env} is not set")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"new password of cloud account {name}: ")
    else:
        _bad_input("give the new password with --password-file or --password-env")
    if not password:
        _bad_input("password: empty")
    summary = _call(lambda c: c.rotate_account(name, password, gateway))
    if output.data:
        print_data(output, summary.model_dump_json())
        return
    out.print(f"cloud account {summary.name}: new password checked and kept", highlight=False)


@account_app.command("list")
def account_list(
    gateway: Annotated[
        str | None, typer.Option("--gateway", "-g", help="Only this gateway.")
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Cloud accounts of every gateway (or one), and the clusters using them."""
    accounts = _call(lambda c: c.list_accounts(gateway))
    if output.data:
        print_data(output, json.dumps([a.model_dump(mode="json") for a in accounts]))
        return
    table = Table()
    for column in ("account", "gateway", "vCenter", "user", "default", "clusters"):
        table.add_column(column)
    for a in accounts:
        table.add_row(
            a.name,
            a.gateway,
            a.server,
            a.username,
            "yes" if a.default else "",
            ", ".join(a.clusters),
        )
    out.print(table)


@account_app.command("delete")
def account_delete(
    name: Annotated[str, typer.Argument(help="Cloud account name.")],
    gateway: Annotated[str | None, typer.Option("--gateway", "-g")] = None,
) -> None:
    """Delete a cloud account (refused while clusters use it)."""
    _call(lambda c: c.delete_account(name, gateway))
    out.print(f"cloud account {name} deleted", highlight=False)
