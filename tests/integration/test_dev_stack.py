"""`kubegate dev up | agent | status | down` and the demo's account check, as `make demo` runs
them: the stack pairs and configures its system gateway `local`, and stops the agents the demo
started."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from domain.gateway import GatewayState, GatewayStatus
from starters.client import KubegateClient
from starters.dev import DevStack, DevStackError
from starters.settings import Settings
from tests.support import ensure_vcsim_built

pytestmark = pytest.mark.integration

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dev_stack_up_validate_status_down(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KUBEGATE_HOME": str(tmp_path / "home"),
        "KUBEGATE_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "KUBEGATE_UI_PORT": str(free_port()),
        "KUBEGATE_VCSIM_ADDRESS": f"127.0.0.1:{free_port()}",
        "KUBEGATE_VCSIM_BINARY": str(ensure_vcsim_built()),
        "COLUMNS": "200",
    }

    def kubegate(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        # `kubegate -m MODULE …` runs another entry point (starters.dev_cli) the same way
        argv = list(args) if args[0] == "-m" else ["-m", "starters.cli", *args]
        return subprocess.run(
            [sys.executable, *argv],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=180,
        )

    home = tmp_path / "home"
    settings = Settings(
        home=home,
        temporal_address=env["KUBEGATE_TEMPORAL_ADDRESS"],
        vcsim_address=env["KUBEGATE_VCSIM_ADDRESS"],
    )

    def run(call: Callable[[KubegateClient], Awaitable[T]]) -> T:
        async def connected() -> T:
            return await call(await KubegateClient.connect(settings))

        return asyncio.run(connected())

    def gateway_state(name: str) -> GatewayState:
        return run(lambda client: client.gateway_state(name))

    try:
        up = kubegate("dev", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Web UI" in up.stdout and "make down" in up.stdout
        assert (
            "gateway local   Running (system gateway; default cloud account local-default)"
            in up.stdout
        ), up.stdout

        again = kubegate("dev", "up")  # idempotent: nothing started twice, nothing paired again
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("running") == 4, again.stdout
        assert "gateway local   Running" in again.stdout

        gateway = gateway_state("local")
        assert (gateway.status, gateway.system) == (GatewayStatus.RUNNING, True)
        assert [a.name for a in gateway.accounts] == ["local-default"]

        # a gateway of the demo's kind: its agent pairs with the code from the environment,
        # runs in the background, is listed and stopped by `dev down`; none for `local`
        _, code = run(lambda client: client.create_gateway("side"))
        side = kubegate("-m", "starters.dev_cli", "agent", "side", KUBEGATE_PAIRING_CODE=code)
        assert side.returncode == 0, side.stdout + side.stderr
        assert "agent-side      started" in side.stdout
        assert gateway_state("side").status is GatewayStatus.REGISTERED
        stack = DevStack(settings)
        assert asyncio.run(stack.agent("side")) == "running"  # paired and running: left alone
        with pytest.raises(DevStackError, match="dev up` runs its agent"):
            asyncio.run(stack.agent("local"))

        status = json.loads(kubegate("dev", "status", "-o", "json").stdout)
        assert {row["component"]: row["state"] for row in status} == {
            "temporal": "running",
            "vcsim": "running",
            "control-worker": "running",
            "gateway-agent": "running",
            "agent-side": "running",
        }
        logs = home / "logs"
        assert (logs / "gateway-agent.log").exists()
        agent_log = home / "agents" / "local" / "agent.log"
        assert "paired" in agent_log.read_text()

        account = home / "accounts" / "dev.yaml"
        check = kubegate("account", "validate", "-f", str(account))
        assert check.returncode == 0, check.stdout + check.stderr
        assert "passed" in check.stdout

        # the agent's key gone: the gateway cannot pair again; `dev up` says how to recover
        keys = home / "agents" / "local"
        keys.rename(home / "agents" / "local.moved")
        try:
            lost = kubegate("dev", "up")
        finally:
            (home / "agents" / "local.moved").rename(keys)
        assert lost.returncode == 1
        message = " ".join(lost.stderr.split())
        assert "agent.key is missing" in message, message
        assert "kubegate gateway delete local --wait, then kubegate dev up" in message, message

        password = (home / "vcsim-password").read_text().strip()
        for log in [*logs.iterdir(), agent_log, home / "agents" / "side" / "agent.out"]:
            assert password not in log.read_text(errors="replace"), log
    finally:
        down = kubegate("dev", "down")
    assert down.returncode == 0
    assert down.stdout.splitlines()[0].startswith("agent-side"), down.stdout  # agents first
    pids = [int(row["pid"]) for row in status if row["pid"]]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert {row["state"] for row in DevStack(settings).status()} == {"stopped"}
