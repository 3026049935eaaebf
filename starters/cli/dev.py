"""`kubegate dev …`: the local stack (up, down, status) and gateway agents beside it.

Registers on the `dev` app of starters/cli/common.py. Exit codes as there.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from plumbing.settings import Settings, settings_with
from starters.cli.common import (
    LogFormatOption,
    Output,
    OutputOption,
    PairingCodeFileOption,
    _failed,
    dev_app,
    out,
    print_data,
    read_code_file,
)


@dev_app.command("up")
def dev_up(log_format: LogFormatOption = None) -> None:
    """Start the local stack (idempotent). Its control worker and agents serve Prometheus
    metrics from KUBEGATE_DEV_METRICS_PORT (9464) on: see `dev status`."""
    from starters.dev import DevStack, DevStackError

    stack = DevStack(settings_with(log_format=log_format.value if log_format else None))
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
    for name in ("control-worker", "gateway-agent"):
        address = stack.metrics_address(name)
        if address:
            out.print(f"metrics       http://{address}/metrics  ({name})", highlight=False)
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
    if output.data:
        print_data(output, json.dumps(rows))
        return
    table = Table()
    for column in ("component", "state", "pid", "address", "metrics", "log"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    out.print(table)


@dev_app.command("agent")
def dev_agent(
    name: Annotated[str, typer.Argument(help="Gateway name (not the stack's own).")],
    installer_vm: Annotated[
        str | None,
        typer.Option(help="Inventory path of the installer VM: its pairing code (first start)."),
    ] = None,
    vcenter: Annotated[
        Path | None,
        typer.Option(help="A file whose vcenter block reaches the installer VM (install.yaml)."),
    ] = None,
    pairing_code_file: PairingCodeFileOption = None,
) -> None:
    """Start a gateway's agent in the background, recorded so `dev down` stops it.

    First start: its key is made and its policy written for the simulator (unless
    policy.yaml exists), then it pairs with the code read from the installer VM (or from
    --pairing-code-file). Later starts need only its key. It prints its key fingerprint:
    approve it (kubegate gateway approve NAME FINGERPRINT) unless the gateway was created
    with it. Output goes to <home>/agents/NAME/agent.out; waits until it polls.
    """
    from starters.dev import DevStack, DevStackError

    code_file = pairing_code_file or Settings().pairing_code_file
    code = read_code_file(code_file) if code_file is not None and installer_vm is None else None
    stack = DevStack()
    try:
        state = asyncio.run(
            stack.agent(name, installer_vm=installer_vm, vcenter=vcenter, pairing_code=code)
        )
        approved = asyncio.run(stack.agent_approved(name))
    except DevStackError as exc:
        _failed(str(exc))
    component = stack.agent_component(name)
    out.print(f"{component.name:15} {state}  (log {component.log})", highlight=False)
    address = stack.metrics_address(component.name)
    if address:
        out.print(f"{'':15} metrics http://{address}/metrics", highlight=False)
    fingerprint = stack.agent_key(name).fingerprint
    if approved:
        out.print(f"{'':15} key fingerprint {fingerprint} (approved)", highlight=False)
    else:
        out.print(
            f"{'':15} key fingerprint {fingerprint}: not approved yet; compare it with the "
            f"gateway's (kubegate gateway get {name}), then: kubegate gateway approve {name} "
            f"{fingerprint}",
            highlight=False,
        )
