"""`kubegate dev up | status | down` and the demo's account check, as `make demo` runs them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ensure_vcsim_built

pytestmark = pytest.mark.integration


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

    def kubegate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "starters.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    try:
        up = kubegate("dev", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Web UI" in up.stdout and "make down" in up.stdout

        again = kubegate("dev", "up")  # idempotent: nothing started twice
        assert again.returncode == 0
        assert again.stdout.count("running") == 4, again.stdout

        status = json.loads(kubegate("dev", "status", "-o", "json").stdout)
        assert {row["component"]: row["state"] for row in status} == {
            "temporal": "running",
            "vcsim": "running",
            "control-worker": "running",
            "gateway-agent": "running",
        }
        logs = tmp_path / "home" / "logs"
        assert (logs / "gateway-agent.log").exists()

        account = tmp_path / "home" / "accounts" / "dev.yaml"
        check = kubegate("account", "validate", "-f", str(account))
        assert check.returncode == 0, check.stdout + check.stderr
        assert "passed" in check.stdout

        password = (tmp_path / "home" / "vcsim-password").read_text().strip()
        for log in logs.iterdir():
            assert password not in log.read_text(errors="replace"), log
    finally:
        down = kubegate("dev", "down")
    assert down.returncode == 0
    pids = [int(row["pid"]) for row in status if row["pid"]]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    final = json.loads(kubegate("dev", "status", "-o", "json").stdout)
    assert {row["state"] for row in final} == {"stopped"}
