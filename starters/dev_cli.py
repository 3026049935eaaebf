"""`kubegate dev agent`: start a gateway agent beside the local stack, as the demo does.

Registers on the `dev` app of starters/cli.py when imported there. Until then it runs as
`python -m starters.dev_cli agent NAME …` (the same command, the same options).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from starters.cli import _failed, dev_app, out


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
) -> None:
    """Start a gateway's agent in the background, recorded so `dev down` stops it.

    First start: it pairs with the code read from the installer VM (or from
    KUBEGATE_PAIRING_CODE). Later starts need only its key. Output goes to
    <home>/agents/NAME/agent.out; waits until it polls.
    """
    from starters.dev import DevStack, DevStackError

    stack = DevStack()
    try:
        state = asyncio.run(
            stack.agent(
                name,
                installer_vm=installer_vm,
                vcenter=vcenter,
                pairing_code=os.environ.get("KUBEGATE_PAIRING_CODE") or None,
            )
        )
    except DevStackError as exc:
        _failed(str(exc))
    component = stack.agent_component(name)
    out.print(f"{component.name:15} {state}  (log {component.log})", highlight=False)


if __name__ == "__main__":
    import sys

    from starters.cli import main

    sys.argv[1:1] = ["dev"]
    main()
