"""The local stack: Temporal dev server, vCenter simulator, control worker and one gateway agent.

`up` is idempotent (a component already running is left alone), `down` stops only the
processes `up` started, found by the pid files under `<home>/pids/` and checked against
their command line. Logs go to `<home>/logs/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from domain import names
from domain.certs import self_signed
from starters.settings import Settings, tool_path, vcsim_binary

SIM_USER = "administrator@vsphere.local"
SIM_TEMPLATE = "templates/ubuntu-2204-kube-v1.30"
#: A placement that exists in the simulator's default inventory.
SIM_PLACEMENT = {
    "datacenter": "DC0",
    "compute_cluster": "DC0_C0",
    "resource_pool": "Resources",
    "datastore": "LocalDS_0",
    "network": "VM Network",
    "folder": "",
    "template": SIM_TEMPLATE,
}


class DevStackError(Exception):
    """A component of the local stack did not start; the message says where to look."""


@dataclass
class Component:
    name: str
    argv: list[str]
    ready: Callable[[], Awaitable[bool]]
    address: str


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _port_open(address: str) -> bool:
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class DevStack:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.home = self.settings.home.resolve()
        self.pids = self.home / "pids"
        self.logs = self.home / "logs"
        self.vcsim_ready_file = self.home / "vcsim.json"
        self.password_file = self.home / "vcsim-password"
        self.cert_file = self.home / "vcsim-tls.pem"
        self.key_file = self.home / "vcsim-tls.key"
        self.account_file = self.home / "accounts" / "dev.yaml"

    # -- public ---------------------------------------------------------------------------

    async def up(self, timeout: float = 90.0) -> list[tuple[str, str]]:
        """Start what is not running; return (component, 'started'|'running') pairs."""
        for folder in (self.pids, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        password = self._sim_password()
        self._sim_certificate()
        outcome = []
        for component in self.components(password):
            if self._alive(component.name):
                outcome.append((component.name, "running"))
                continue
            if component.name == "vcsim":
                self.vcsim_ready_file.unlink(missing_ok=True)
            process = self._spawn(component)
            await self._wait_ready(component, process, timeout)
            outcome.append((component.name, "started"))
        self._write_dev_account()
        return outcome

    def down(self) -> list[tuple[str, str]]:
        """Stop the processes `up` started, newest first."""
        outcome = []
        for name in reversed(self._names()):
            pidfile = self.pids / f"{name}.pid"
            if not pidfile.exists():
                continue
            pid = self._pid(name)
            if pid is not None:
                _terminate(pid)
            outcome.append((name, "stopped" if pid is not None else "not running"))
            pidfile.unlink(missing_ok=True)
        return outcome

    def status(self) -> list[dict[str, str]]:
        rows = []
        for component in self.components("-"):
            pid = self._pid(component.name)
            alive = pid is not None
            rows.append(
                {
                    "component": component.name,
                    "state": "running" if alive else "stopped",
                    "pid": str(pid) if alive else "",
                    "address": component.address,
                    "log": str(self.logs / f"{component.name}.log"),
                }
            )
        return rows

    def components(self, sim_password: str) -> list[Component]:
        s = self.settings
        temporal_host, temporal_port = _split(s.temporal_address)
        cli = [sys.executable, "-m", "starters.cli"]
        temporal = [
            str(tool_path("temporal")),
            "server",
            "start-dev",
            "--ip",
            temporal_host,
            "--port",
            str(temporal_port),
            "--ui-port",
            str(s.ui_port),
            "--db-filename",
            str(self.home / "temporal.db"),
            "--namespace",
            s.temporal_namespace,
            "--log-level",
            "warn",
        ]
        for key in names.SEARCH_ATTRIBUTES:
            temporal += ["--search-attribute", f"{key.name}=Keyword"]
        vcsim = [
            str(vcsim_binary(s).resolve()),
            "-listen",
            s.vcsim_address,
            "-username",
            SIM_USER,
            "-password",
            sim_password,
            "-ready-file",
            str(self.vcsim_ready_file),
            "-tls-cert",
            str(self.cert_file),
            "-tls-key",
            str(self.key_file),
            *s.vcsim_options.split(),
        ]
        return [
            Component("temporal", temporal, self._temporal_ready, s.temporal_address),
            Component("vcsim", vcsim, self._vcsim_ready, s.vcsim_address),
            Component(
                "control-worker",
                [*cli, "worker", "control"],
                self._control_ready,
                names.CONTROL_TASK_QUEUE,
            ),
            Component(
                "gateway-agent",
                [*cli, "gateway", "agent", s.gateway],
                self._agent_ready,
                names.gateway_task_queue(s.gateway),
            ),
        ]

    def thumbprint(self) -> str | None:
        try:
            return str(json.loads(self.vcsim_ready_file.read_text())["thumbprint_sha256"])
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            return None

    # -- processes ------------------------------------------------------------------------

    def _names(self) -> list[str]:
        return [c.name for c in self.components("-")]

    def _spawn(self, component: Component) -> subprocess.Popen[bytes]:
        if not Path(component.argv[0]).exists():
            raise DevStackError(
                f"{component.name}: {component.argv[0]} is missing (run `make setup`)"
            )
        log = open(self.logs / f"{component.name}.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            component.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        # pid and kernel start time: together they name this process even after pid reuse
        (self.pids / f"{component.name}.pid").write_text(
            f"{process.pid} {_start_time(process.pid)}\n"
        )
        return process

    def _pid(self, name: str) -> int | None:
        """The pid `up` recorded for a component, if that process still runs."""
        try:
            pid, started = (self.pids / f"{name}.pid").read_text().split()[:2]
        except (FileNotFoundError, ValueError):
            return None
        if _zombie(int(pid)) or _start_time(int(pid)) != started:
            return None
        return int(pid)

    def _alive(self, name: str) -> bool:
        return self._pid(name) is not None

    async def _wait_ready(
        self, component: Component, process: subprocess.Popen[bytes], timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DevStackError(
                    f"{component.name} exited during start; see {self.logs / component.name}.log"
                )
            if await component.ready():
                return
            await asyncio.sleep(0.3)
        raise DevStackError(
            f"{component.name} not ready after {timeout:.0f}s; see {self.logs / component.name}.log"
        )

    # -- readiness ------------------------------------------------------------------------

    async def _temporal_ready(self) -> bool:
        if not _port_open(self.settings.temporal_address):
            return False
        from starters.client import connect

        try:
            await connect(self.settings)
        except RuntimeError:
            return False
        return True

    async def _vcsim_ready(self) -> bool:
        return self.vcsim_ready_file.exists()

    async def _control_ready(self) -> bool:
        return await self._polling(names.CONTROL_TASK_QUEUE, workflow=True)

    async def _agent_ready(self) -> bool:
        return await self._polling(names.gateway_task_queue(self.settings.gateway), workflow=False)

    async def _polling(self, queue: str, workflow: bool) -> bool:
        from temporalio.api.enums.v1 import TaskQueueType
        from temporalio.api.taskqueue.v1 import TaskQueue
        from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

        from starters.client import connect

        client = await connect(self.settings)
        kind = (
            TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
            if workflow
            else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
        )
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
            )
        )
        return len(response.pollers) > 0

    # -- files ----------------------------------------------------------------------------

    def _sim_password(self) -> str:
        """The simulator's password: random, made once, kept in a 0600 file."""
        if self.password_file.exists():
            return self.password_file.read_text().strip()
        password = secrets.token_urlsafe(18)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        return password

    def _sim_certificate(self) -> None:
        """A self-signed certificate made once and kept, so the simulator's thumbprint (pinned
        in the dev account and in every cluster's credentials) survives `dev down` / `dev up`,
        as a real vCenter's does."""
        if self.cert_file.exists() and self.key_file.exists():
            return
        cert_pem, key_pem = self_signed(
            "kubegate dev vcsim", datetime.timedelta(days=3650), hosts=["localhost", "127.0.0.1"]
        )
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key_pem)
        self.cert_file.write_text(cert_pem)

    def _write_dev_account(self) -> None:
        """A cloud account file for the simulator, with its certificate pinned."""
        account = {
            "name": "dev",
            "gateway": self.settings.gateway,
            "vcenter": {
                "server": self.settings.vcsim_address,
                "username": SIM_USER,
                "password_file": str(self.password_file),
                "thumbprint": self.thumbprint(),
            },
            "placement": SIM_PLACEMENT,
        }
        self.account_file.parent.mkdir(parents=True, exist_ok=True)
        self.account_file.write_text(yaml.safe_dump(account, sort_keys=False))


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # reap if it is our child (it is not, after `up` exits) and check again
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return ""
