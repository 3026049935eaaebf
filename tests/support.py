"""Test support: start real vcsim processes and talk to them with pyvmomi (no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from domain.privileges import ROOT_LEVEL_ROLE
from starters.dev import SIM_PLACEMENT, SIM_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
VCSIM = Path(os.environ.get("KUBEGATE_VCSIM_BINARY", ROOT / ".kubegate" / "bin" / "vcsim"))
ADMIN = "administrator@vsphere.local"

TEMPLATE = SIM_TEMPLATE
PLACEMENT = SIM_PLACEMENT


def _vcsim_sources() -> list[Path]:
    """What the simulator binary is built from (as the Makefile's rule lists it)."""
    here = ROOT / "tools" / "vcsim"
    return [*here.glob("*.go"), *here.glob("overlay/*"), here / "build.sh"]


def ensure_vcsim_built() -> Path:
    """Build the simulator if it is missing or older than its sources (build.sh swaps the
    binary in with a rename, so a simulator that is running keeps its own)."""
    if not VCSIM.exists() or VCSIM.stat().st_mtime < max(
        p.stat().st_mtime for p in _vcsim_sources()
    ):
        subprocess.run(["bash", str(ROOT / "tools" / "vcsim" / "build.sh"), str(VCSIM)], check=True)
    return VCSIM


#: every simulator this test process started, and the test agents' policy files: each
#: agent's policy allows exactly the simulators started so far (as an operator would list them)
STARTED: list[Vcsim] = []
POLICIES: list[tuple[Path, str, bool]] = []


def sims_policy(gateway: str, operators: bool = False) -> Any:
    """A policy allowing every simulator started so far, each pinned by its thumbprint (and
    with `operators`, the tests' operators' kubeconfigs)."""
    from domain.trust import AgentPolicy, PolicyVCenter

    # (a port a stopped simulator had may be another's now: the newest one on it counts)
    newest = {sim.info["port"]: sim for sim in STARTED}
    return AgentPolicy(
        gateway=gateway,
        vcenters=[
            PolicyVCenter(server="127.0.0.1", port=port, thumbprint=sim.thumbprint)
            for port, sim in newest.items()
        ],
        operators=list(OPERATORS) if operators else [],
    )


#: signing keys of the operators the test agents' policies list (the tests' own home's)
OPERATORS: list[str] = []


def agent_policy(path: Path, gateway: str, operators: bool = False) -> Path:
    """A test agent's policy file, kept listing the simulators as they start."""
    POLICIES.append((path, gateway, operators))
    write_policy(path, sims_policy(gateway, operators))
    return path


def write_policy(path: Path, policy: Any) -> None:
    from activities.guard import write_policy as write

    write(path, policy)


@dataclass
class Vcsim:
    """A running simulator started with its own flags."""

    workdir: Path
    args: list[str] = field(default_factory=list)
    password: str = "admin-password-for-tests"
    process: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def start(self) -> Vcsim:
        ready = self.workdir / f"vcsim-{id(self)}.json"
        ready.unlink(missing_ok=True)
        # the password from a 0600 file: never on a command line
        password_file = self.workdir / f"vcsim-{id(self)}.password"
        password_file.unlink(missing_ok=True)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.password + "\n")
        argv = [
            str(ensure_vcsim_built()),
            "-listen",
            "127.0.0.1:0",
            "-username",
            ADMIN,
            "-password-file",
            str(password_file),
            "-ready-file",
            str(ready),
            "-watch-pid",
            str(os.getpid()),
            *self.args,
        ]
        log = open(self.workdir / f"vcsim-{id(self)}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vcsim did not start: {argv}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())
        STARTED.append(self)
        for path, gateway, operators in POLICIES:
            write_policy(path, sims_policy(gateway, operators))
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        if self in STARTED:  # its port may be the next simulator's: no longer trusted
            STARTED.remove(self)
            for path, gateway, operators in POLICIES:
                write_policy(path, sims_policy(gateway, operators))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.info['port']}"

    @property
    def thumbprint(self) -> str:
        return str(self.info["thumbprint_sha256"])

    def connect(self, user: str = ADMIN, password: str | None = None) -> Any:
        """An independent pyvmomi connection, for checking vCenter behind kubegate's back."""
        context = ssl._create_unverified_context()  # noqa: S323 - test simulator
        return SmartConnect(
            host="127.0.0.1",
            port=int(self.info["port"]),
            user=user,
            pwd=password or self.password,
            sslContext=context,
        )

    @staticmethod
    def disconnect(si: Any) -> None:
        Disconnect(si)


def grant_roles(sim: Vcsim, user: str, cluster_privileges: list[str]) -> None:
    """Give user the root-level role on root and DC0, and a cluster role on the placement."""
    si = sim.connect()
    try:
        content = si.RetrieveContent()
        auth = content.authorizationManager
        suffix = user.split("@")[0]
        root_role = auth.AddAuthorizationRole(
            f"kubegate-root-{suffix}", [p for p, _ in ROOT_LEVEL_ROLE]
        )
        cluster_role = auth.AddAuthorizationRole(f"kubegate-cluster-{suffix}", cluster_privileges)
        find = content.searchIndex.FindByInventoryPath

        def grant(path: str, role: int, propagate: bool) -> None:
            entity = content.rootFolder if path == "/" else find(path)
            assert entity is not None, path
            auth.SetEntityPermissions(
                entity,
                [
                    vim.AuthorizationManager.Permission(
                        principal=user, group=False, roleId=role, propagate=propagate
                    )
                ],
            )

        grant("/", root_role, False)
        grant("/DC0", root_role, False)
        for path in (
            "/DC0/host/DC0_C0",
            "/DC0/host/DC0_C0/Resources",
            "/DC0/datastore/LocalDS_0",
            "/DC0/network/VM Network",
            "/DC0/vm",
            f"/DC0/vm/{TEMPLATE}",
        ):
            grant(path, cluster_role, True)
    finally:
        sim.disconnect(si)


def history_text(history: Any) -> str:
    """A workflow history as text with every payload decoded, for searching it for secrets."""
    import base64

    raw = history.to_json()
    decoded: list[str] = [raw]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "data" in node and "metadata" in node and isinstance(node["data"], str):
                decoded.append(base64.b64decode(node["data"]).decode("utf-8", errors="replace"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(raw))
    return "\n".join(decoded)


#: the simulator inventory the lifecycle tests use: 2 compute clusters of 3 hosts, all with NTP
NTP = "0.pool.ntp.org,1.pool.ntp.org"
INVENTORY = ["-clusters", "2", "-hosts", "3", "-ntp", NTP]


HISTORIES = ROOT / "tests" / "replay" / "histories"


async def all_runs(client: Any, workflow_id: str) -> list[Any]:
    """The history of every run of a workflow, oldest first: the chain of runs followed
    from the first through each continue-as-new (visibility may not list a run started a
    moment ago, and lists earlier lifecycles under the id too)."""
    handle = client.get_workflow_handle(workflow_id)
    described = await handle.describe()
    run_id: str | None = described.raw_description.workflow_execution_info.first_run_id
    histories = []
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        histories.append(history)
        last = history.events[-1]
        continued = last.HasField("workflow_execution_continued_as_new_event_attributes")
        attributes = last.workflow_execution_continued_as_new_event_attributes
        run_id = attributes.new_execution_run_id if continued else None
    return histories


async def record_history(client: Any, workflow_id: str, name: str) -> None:
    """With KUBEGATE_RECORD_HISTORIES=1, store a workflow's histories for the replay tests, in
    the folder of this release (`histories/<version>/`): every run under the id, oldest first
    (`NAME-1.json`, `NAME-2.json`, ... when it continued as new; `NAME.json` for one run).
    Earlier releases' folders are never written: they replay as they were recorded, forever."""
    if os.environ.get("KUBEGATE_RECORD_HISTORIES") != "1":
        return
    from domain.version import VERSION

    folder = HISTORIES / VERSION
    histories = await all_runs(client, workflow_id)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob(f"{name}.*"), *folder.glob(f"{name}-[0-9]*.*")]:
        stale.unlink()  # a re-recording replaces every file of this name
    for number, history in enumerate(histories, start=1):
        stem = name if len(histories) == 1 else f"{name}-{number}"
        (folder / f"{stem}.json").write_text(history.to_json())
        # replays must see the real id: agents sign results over it, workflows verify them
        (folder / f"{stem}.workflow-id").write_text(workflow_id + "\n")


async def run_cli(settings: Any, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run the CLI without blocking the event loop that hosts the workers (stdout and
    stderr together, as a terminal shows them)."""
    code, output, _ = await run_cli_split(settings, *args, stdin=stdin, together=True)
    return code, output


async def run_cli_split(
    settings: Any, *args: str, stdin: bytes | None = None, together: bool = False
) -> tuple[int, str, str]:
    """The CLI with its stdout and stderr apart (`-o json` leaves stdout to the data)."""
    env = {
        **os.environ,
        "KUBEGATE_HOME": str(settings.home),
        "KUBEGATE_TEMPORAL_ADDRESS": settings.temporal_address,
        "COLUMNS": "250",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "starters.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if together else asyncio.subprocess.PIPE,
        env=env,
    )
    output, errors = await process.communicate(stdin)
    assert process.returncode is not None
    return process.returncode, output.decode(), (errors or b"").decode()


# -- gateways and cloud accounts for the tests ---------------------------------------------


def sim_file(sim: Vcsim, **extra: Any) -> Any:
    """A gateway.yaml for a system gateway on this simulator (DHCP, the shared placement)."""
    from domain.gateway import GatewayFile

    return GatewayFile.model_validate(
        {
            "vcenter": {"server": sim.address, "username": ADMIN, "thumbprint": sim.thumbprint},
            "placement": PLACEMENT,
            **extra,
        }
    )


async def system_gateway(
    kubegate: Any,
    name: str,
    sim: Vcsim,
    key: Any = None,
    *,
    fingerprint: str | None = None,
    timing: Any = None,
) -> str | None:
    """Create a system gateway, pair `key` with it (if given) and configure it on `sim`.

    Without a key, returns the pairing code for an agent process to pair with (approved as it
    pairs if `fingerprint` is its key's); then call `configure_system_gateway` once that agent
    runs.
    """
    from domain.gateway import GatewayStatus

    existing = {s.name: s for s in await kubegate.list_gateways()}
    if name in existing and existing[name].status is GatewayStatus.RUNNING:
        return None
    if key is not None:
        fingerprint = key.fingerprint
    _, code = await kubegate.create_gateway(
        name, system=True, fingerprint=fingerprint, timing=timing
    )
    if key is None:
        return str(code)
    await kubegate.register_agent(name, key, code)
    await configure_system_gateway(kubegate, name, sim)
    return None


async def configure_system_gateway(kubegate: Any, name: str, sim: Vcsim) -> None:
    from domain.gateway import GatewayStatus

    await kubegate.configure_gateway(name, sim_file(sim), sim.password)
    state = await kubegate.wait_gateway(
        name,
        lambda s: s.status in (GatewayStatus.RUNNING, GatewayStatus.FAILED),
        timeout=120,
        interval=0.1,
    )
    assert state.status is GatewayStatus.RUNNING, (state.status, state.error)


def sim_account_name(sim: Vcsim, gateway: str) -> str:
    """A cloud account name unique to this simulator process and gateway."""
    digits = "".join(ch for ch in sim.thumbprint.lower() if ch in "0123456789abcdef")
    return f"{gateway}-{sim.info['port']}-{digits[:8]}"


async def ensure_account(kubegate: Any, sim: Vcsim, gateway: str) -> str:
    """The simulator's cloud account on the gateway (created, i.e. checked, once)."""
    from domain.account import CloudAccountSpec

    name = sim_account_name(sim, gateway)
    if name not in {a.name for a in await kubegate.list_accounts(gateway)}:
        await kubegate.create_account(
            CloudAccountSpec.model_validate(
                {
                    "name": name,
                    "gateway": gateway,
                    "vcenter": {
                        "server": sim.address,
                        "username": ADMIN,
                        "thumbprint": sim.thumbprint,
                    },
                }
            ),
            sim.password,
        )
    return name


async def explained(kubegate: Any, wait: Any) -> Any:
    """Await a KubegateClient wait; if it runs out, fail with every running workflow's
    pending activities (where it stopped, and why)."""
    from starters.client import KubegateError

    try:
        return await wait
    except KubegateError as exc:
        raise AssertionError(f"{exc}\n{await pending_work(kubegate.client)}") from None


async def pending_work(client: Any) -> str:
    """What every running workflow waits on (its pending activities with their attempts,
    last failures and heartbeats): printed when a test's wait runs out, to show where."""
    lines: list[str] = []
    async for execution in client.list_workflows("ExecutionStatus = 'Running'"):
        described = await client.get_workflow_handle(execution.id).describe()
        raw = described.raw_description
        lines.append(f"{execution.id} ({execution.workflow_type})")
        for act in raw.pending_activities:
            failure = act.last_failure.message if act.HasField("last_failure") else ""
            payloads = act.heartbeat_details.payloads
            beat = payloads[0].data[:200] if payloads else b""
            lines.append(
                f"  {act.activity_type.name} id={act.activity_id} state={act.state} "
                f"attempt={act.attempt} worker={act.last_worker_identity} "
                f"failure={failure!r} heartbeat={beat!r}"
            )
        for child in raw.pending_children:
            lines.append(f"  child {child.workflow_id}")
    return "\n".join(lines)
