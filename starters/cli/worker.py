"""`kubegate worker …`: run worker processes, and move new runs between releases.

Registers on the `worker` app of starters/cli/common.py.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from domain.version import VERSION
from plumbing.connect import connect
from plumbing.errors import KubegateError
from plumbing.settings import Settings
from plumbing.versioning import BUILD_ID, DeploymentVersion, promote, versions
from starters.cli.common import (
    LogFormatOption,
    MetricsAddressOption,
    Output,
    OutputOption,
    _bad_input,
    _run,
    out,
    print_data,
    process_options,
    process_stopped,
    worker_app,
)

DeploymentOption = Annotated[
    str | None,
    typer.Option(help="Worker deployment; default KUBEGATE_WORKER_DEPLOYMENT."),
]


@worker_app.command("control")
def worker_control(
    metrics_address: MetricsAddressOption = None, log_format: LogFormatOption = None
) -> None:
    """Run the control worker (all workflows); a version of KUBEGATE_WORKER_DEPLOYMENT
    when it is set."""
    from workers import control

    options = process_options(metrics_address, log_format)
    try:
        control.main(**options)
    except KubegateError as exc:
        process_stopped(exc, options["log_format"])


def _deployment(name: str | None) -> str:
    deployment = name or Settings().worker_deployment
    if deployment is None:
        _bad_input(
            "--deployment: no worker deployment given and KUBEGATE_WORKER_DEPLOYMENT is unset "
            "(worker versioning is off)"
        )
    return deployment


@worker_app.command("versions")
def worker_versions(
    deployment: DeploymentOption = None, output: OutputOption = Output.table
) -> None:
    """The control worker's versions: which is current (takes new runs), which drain."""
    name = _deployment(deployment)

    async def run() -> list[DeploymentVersion]:
        return await versions(await connect(), name)

    found: list[DeploymentVersion] = _run(run())
    rows = [
        {"build_id": v.build_id, "status": v.status, "drainage": v.drainage, "current": v.current}
        for v in found
    ]
    if output.data:
        print_data(output, json.dumps(rows))
        return
    table = Table()
    for column in ("build id", "status", "drainage"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["build_id"]), str(row["status"]), str(row["drainage"]))
    out.print(table)


@worker_app.command("promote")
def worker_promote(
    build_id: Annotated[
        str | None,
        typer.Argument(
            help="Version to make current; default KUBEGATE_WORKER_BUILD_ID or this release."
        ),
    ] = None,
    deployment: DeploymentOption = None,
) -> None:
    """Send new runs to a control worker version (start its workers first); running
    workflows move to it at their next task."""
    name = _deployment(deployment)
    target = build_id or Settings().worker_build_id or VERSION
    if not BUILD_ID.fullmatch(target):
        _bad_input(f"BUILD_ID: {target!r} must be letters, digits and . + _ - (at most 63)")

    async def run() -> None:
        await promote(await connect(), name, target)

    _run(run())
    out.print(f"worker deployment {name}: {target} is current", highlight=False, markup=False)
