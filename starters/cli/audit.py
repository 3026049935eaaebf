"""`kubegate audit`: what kubegate left behind, per gateway; `--clean` removes what it listed.

Registers on the root app of starters/cli/common.py. Exit codes as there: 0 listed (or
cleaned, everything chosen removed); 1 an audit failed, or a clean left something; 2 bad
input or refused (nothing started).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from domain import names
from domain.audit import AuditState, AuditStatus, CleanResult
from domain.gateway import GatewayStatus
from starters.cli.common import (
    EXIT_FAILED,
    Output,
    OutputOption,
    _bad_input,
    _call,
    app,
    err,
    out,
    print_data,
    workflow_link,
)

AuditGatewayOption = Annotated[
    str | None,
    typer.Option("--gateway", "-g", help="Audit this gateway only (default: every Running one)."),
]


@app.command("audit")
def audit(
    gateway: AuditGatewayOption = None,
    output: OutputOption = Output.table,
    clean: Annotated[
        bool,
        typer.Option("--clean", help="Remove what the audit listed, after confirmation."),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="With --clean: do not ask for confirmation.")
    ] = False,
) -> None:
    """List what kubegate left behind: marked (or owner-tagged) VMs and folders of no live
    lifecycle, owner tags of no live lifecycle, VM files without a VM, addresses held by
    lifecycles that are gone, installer VMs left on."""
    if gateway is not None and not names.is_dns_label(gateway):
        _bad_input(f"--gateway: {gateway!r} must be a gateway name (a DNS label)")
    if yes and not clean:
        _bad_input("--yes: only with --clean")
    if clean and not yes and not sys.stdin.isatty():
        _bad_input(
            "--clean: asks for confirmation on a terminal; pass --yes to clean without asking "
            "(nothing was started)"
        )
    audits: list[AuditState] = _call(lambda c: _audits(c, gateway))
    failed = [a for a in audits if a.status is AuditStatus.FAILED]
    items = sum(len(a.items) for a in audits if a.status is AuditStatus.LISTED)
    if not clean or not items:
        _call(lambda c: _close(c, audits))
        _print(audits, output, {})
        if clean:
            err.print("nothing to clean")
        raise typer.Exit(EXIT_FAILED if failed else 0)
    if not output.data:
        _print(audits, output, {})
    elif not yes:  # (what is asked about, beside the JSON that follows the clean)
        _table(audits, {}, to=err)
    if not yes and not typer.confirm(f"Remove these {items} item(s)?", err=True):
        _call(lambda c: _close(c, audits))
        err.print("nothing removed")
        raise typer.Exit(0)
    results: dict[str, CleanResult] = _call(lambda c: _clean(c, audits))
    if output.data:
        _print(audits, output, results)
    else:
        for workflow_id, result in results.items():
            err.print(f"{workflow_id}: {len(result.removed)} removed", highlight=False)
            for item, why in sorted(result.kept.items()):
                err.print(f"  [yellow]left[/yellow] {escape(item)}: {escape(why)}")
    kept = any(r.kept for r in results.values())
    raise typer.Exit(EXIT_FAILED if failed or kept else 0)


async def _audits(client: Any, gateway: str | None) -> list[AuditState]:
    if gateway is not None:
        await client.gateway_state(gateway)  # (an unknown gateway: refused, exit 2)
        gateways = [gateway]
    else:
        gateways = [
            g.name
            for g in await client.list_gateways()
            if g.status in (GatewayStatus.RUNNING, GatewayStatus.UPGRADING)
        ]
    return [await client.audit(name) for name in gateways]


async def _close(client: Any, audits: list[AuditState]) -> None:
    for state in audits:
        await client.close_audit(state.workflow_id)


async def _clean(client: Any, audits: list[AuditState]) -> dict[str, CleanResult]:
    results = {}
    for state in audits:
        if state.status is not AuditStatus.LISTED:
            continue
        if state.items:
            results[state.workflow_id] = await client.clean_audit(
                state.workflow_id, [i.id for i in state.items]
            )
        else:
            await client.close_audit(state.workflow_id)
    return results


def _print(audits: list[AuditState], output: Output, results: dict[str, CleanResult]) -> None:
    if output.data:
        data = []
        for state in audits:
            entry: dict[str, Any] = {
                "gateway": state.gateway,
                "workflow_id": state.workflow_id,
                "status": state.status.value,
                "error": state.error,
                "warnings": state.warnings,
                "items": [i.model_dump(mode="json") for i in state.items],
            }
            if state.workflow_id in results:
                result = results[state.workflow_id]
                entry["removed"] = result.removed
                entry["kept"] = result.kept
            data.append(entry)
        print_data(output, json.dumps(data))
        return
    _table(audits, results, to=out)


def _table(audits: list[AuditState], results: dict[str, CleanResult], to: Any) -> None:
    if not audits:
        to.print("no Running gateway to audit")
        return
    for state in audits:
        to.print(
            f"[bold]gateway {escape(state.gateway)}[/bold]: {state.status.value}, "
            f"{len(state.items)} leftover(s) — {workflow_link(state.workflow_id)}",
            highlight=False,
        )
        if state.error:
            to.print(f"  [red]error:[/red] {escape(state.error)}")
        for warning in state.warnings:
            to.print(f"  [yellow]warning:[/yellow] {escape(warning)}")
        if not state.items:
            continue
        table = Table()
        for column in ("kind", "name", "owner", "where", "detail", "why"):
            table.add_column(column)
        for item in state.items:
            table.add_row(
                item.kind,
                escape(item.name),
                escape(item.owner),
                escape(item.path or item.id),
                escape(item.detail),
                escape(item.reason),
            )
        to.print(table)
