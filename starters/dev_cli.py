"""`kubegate dev agent`: start a gateway agent beside the local stack, as the demo does.

Registers on the `dev` app of starters/cli.py when imported there. Until then it runs as
`python -m starters.dev_cli agent NAME …` (the same command, the same options).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from starters.cli import PairingCodeFileOption, _failed, dev_app, out
from starters.settings import Settings


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
    from starters.gateway_cli import read_code_file

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


if __name__ == "__main__":
    import sys

    from starters.cli import main

    sys.argv[1:1] = ["dev"]
    main()
