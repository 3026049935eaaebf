"""`kubegate worker …`: run worker processes.

Registers on the `worker` app of starters/cli/common.py.
"""

from __future__ import annotations

from starters.cli.common import worker_app


@worker_app.command("control")
def worker_control() -> None:
    """Run the control worker (all workflows)."""
    from workers import control

    control.main()
