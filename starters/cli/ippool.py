"""`kubegate ippool …`: IP pools linked to gateways.

Registers on the `ippool` app of starters/cli/common.py. Exit codes as there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from domain.ipam import Allocation, IpPoolSpec, PoolStatus
from plumbing.settings import Settings
from starters.cli.common import (
    GatewayOption,
    Output,
    OutputOption,
    _run,
    ippool_app,
    load_spec,
    out,
    print_data,
)
from starters.client import KubegateClient, RequestRefused


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
    if output.data:
        print_data(output, json.dumps(_pool_row(status)))
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
    if output.data:
        print_data(output, json.dumps(rows))
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

    async def run() -> tuple[PoolStatus, list[Allocation]]:
        client = await KubegateClient.connect()
        gw = await client.pool_gateway(name, gateway, Settings().gateway)
        status = await client.pool_status(gw, name)
        return status, await client.pool_allocations(gw, name, owner)

    status, allocations = _run(run())
    if output.data:
        data = {
            **_pool_row(status),
            "spec": status.spec.model_dump(mode="json"),
            "allocations": [a.model_dump(mode="json") for a in allocations],
        }
        print_data(output, json.dumps(data))
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

    async def run() -> str:
        client = await KubegateClient.connect()
        gw = await client.pool_gateway(name, gateway, Settings().gateway)
        await client.delete_pool(gw, name)
        return gw

    gw = _run(run())
    out.print(f"deleted IP pool {name} of gateway {gw}", highlight=False)
