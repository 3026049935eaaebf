"""`kubegate dev up | agent | status | down` and the demo's account check, as `make demo` runs
them: the stack pairs and configures its system gateway `local`, and stops the agents the demo
started."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from temporalio.client import Client

from activities.guard import load_policy
from domain import names
from domain.gateway import GatewayState, GatewayStatus
from plumbing.settings import Settings
from starters.client import KubegateClient
from starters.dev import DevStack, DevStackError
from tests.support import Vcsim, ensure_vcsim_built

pytestmark = pytest.mark.integration

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: what `dev up` runs with but never passes on
INHERITED_SECRETS = {
    "KUBEGATE_VCSIM_PASSWORD": "inherited-vcsim-password-3e1",
    "KUBEGATE_CODEC_KEY_PASSWORD": "inherited-key-password-9b2",
    "DB_PASSWORD": "inherited-db-password-5c7",
}
#: what a process of the stack may inherit besides KUBEGATE_* settings
ALLOWED = {"PATH", "HOME", "LANG", "TZ"}


def assert_private(home: Path) -> None:
    """Directories 0700, files 0600 (0700 if executable), the SQLite database among them."""
    assert (home / "temporal.db").exists()
    for root, _, files in os.walk(home):
        assert stat.S_IMODE(Path(root).stat().st_mode) == 0o700, root
        for name in files:
            path = Path(root, name)
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode in (0o600, 0o700), f"{path} {mode:o}"


def assert_no_secret(pid: int, secrets: list[str]) -> None:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    for secret in secrets:
        assert secret not in cmdline, (pid, cmdline)
        assert secret not in environ, pid
    keys = {entry.partition("=")[0] for entry in environ.split("\0") if entry}
    foreign = {k for k in keys if k not in ALLOWED and not k.startswith(("LC_", "KUBEGATE_"))}
    assert not foreign, (pid, foreign)
    assert not {k for k in keys if "PASSWORD" in k or "SECRET" in k}, (pid, keys)


async def encrypted_gateway_input(client: KubegateClient) -> bool:
    """The gateway workflow's input, read without the codec: encrypted with the stack's key."""
    raw = await Client.connect(client.client.service_client.config.target_host)
    history = await raw.get_workflow_handle(names.gateway_workflow_id("local")).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    return all(p.metadata["encoding"] == b"binary/encrypted" for p in started.input.payloads)


def assert_policy_allows_simulator(home: Path, gateway: str, stack: DevStack) -> None:
    """The agent's policy.yaml (0600, beside its key) allows exactly the simulator, pinned."""
    path = home / "agents" / gateway / "policy.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    policy = load_policy(path)
    endpoint = stack.gateway_file().vcenter.endpoint()
    assert policy.gateway == gateway and policy.endpoint_problem(endpoint) is None
    assert [(vc.trust, vc.thumbprint) for vc in policy.vcenters] == [
        ("thumbprint", endpoint.thumbprint)
    ]


def test_vcsim_reads_its_password_from_a_file(tmp_path: Path) -> None:
    sim = Vcsim(tmp_path, password="from-a-file-42").start()
    try:
        cmdline = Path(f"/proc/{sim.process.pid}/cmdline").read_bytes()  # type: ignore[union-attr]
        assert b"from-a-file-42" not in cmdline and b"-password-file" in cmdline
        Vcsim.disconnect(sim.connect())  # the password from the file logs in
    finally:
        sim.stop()
    both = subprocess.run(
        [str(ensure_vcsim_built()), "-password", "x", "-password-file", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert both.returncode == 1 and "not both" in both.stderr


def assert_serves_metrics(address: str | None, wanted: str) -> None:
    """The endpoint serves the SDK's metrics and, within seconds, `wanted`."""
    text, deadline = "", time.monotonic() + 20
    while wanted not in text and time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        time.sleep(0.5)
    assert wanted in text and "temporal_worker_task_slots_available{" in text, text[-2000:]


def test_dev_stack_up_validate_status_down(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KUBEGATE_HOME": str(tmp_path / "home"),
        "KUBEGATE_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "KUBEGATE_UI_PORT": str(free_port()),
        "KUBEGATE_VCSIM_ADDRESS": f"127.0.0.1:{free_port()}",
        "KUBEGATE_VCSIM_BINARY": str(ensure_vcsim_built()),
        "KUBEGATE_DEV_METRICS_PORT": str(free_port()),
        "KUBEGATE_METRICS_INTERVAL": "1",
        "COLUMNS": "200",
        # secrets `dev up` must not hand to the processes it starts
        **INHERITED_SECRETS,
    }

    def kubegate(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "starters.cli", *args],
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
        # the agent's key made first, the gateway created with its fingerprint (so approved as
        # it paired), its policy written for the simulator, the code's file gone
        stack = DevStack(settings)
        local_key = stack.agent_key("local")
        assert f"agent local     fingerprint {local_key.fingerprint}, approved" in up.stdout
        assert "agent policy    written: <home>/agents/local/policy.yaml" in up.stdout
        assert_policy_allows_simulator(home, "local", stack)
        assert not (home / "agents" / "local" / "pairing-code").exists()
        # the worker and the agent serve metrics, each on its own port, as `up` printed
        served = {n: stack.metrics_address(n) for n in ("control-worker", "gateway-agent")}
        first = int(env["KUBEGATE_DEV_METRICS_PORT"])
        assert served["control-worker"] == f"127.0.0.1:{first}", served
        for name, address in served.items():
            assert f"metrics       http://{address}/metrics  ({name})" in up.stdout, up.stdout
        assert_serves_metrics(served["control-worker"], "kubegate_lifecycles{")
        assert_serves_metrics(served["gateway-agent"], "kubegate_vcenter_requests_total{")

        again = kubegate("dev", "up")  # idempotent: nothing started twice, nothing paired again
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("running") == 4, again.stdout
        assert "gateway local   Running" in again.stdout
        assert "agent policy    kept: <home>/agents/local/policy.yaml" in again.stdout

        gateway = gateway_state("local")
        assert (gateway.status, gateway.system) == (GatewayStatus.RUNNING, True)
        assert [a.name for a in gateway.accounts] == ["local-default"]
        assert gateway.agent is not None and gateway.agent.approved
        assert gateway.agent.fingerprint == local_key.fingerprint

        # a gateway of the demo's kind: its agent pairs with the code from a file (copied to a
        # 0600 file of the agent's, removed once it paired), runs in the background, is listed
        # and stopped by `dev down`; none for `local`. Created without the fingerprint, it waits
        # for the operator to approve the one the agent printed.
        _, code = run(lambda client: client.create_gateway("side"))
        code_file = tmp_path / "side-pairing-code"
        code_file.write_text(code + "\n")
        code_file.chmod(0o600)
        side = kubegate("dev", "agent", "side", KUBEGATE_PAIRING_CODE_FILE=str(code_file))
        assert side.returncode == 0, side.stdout + side.stderr
        assert "agent-side      started" in side.stdout
        side_key = stack.agent_key("side")
        flat = " ".join(side.stdout.split())
        assert f"key fingerprint {side_key.fingerprint}: not approved yet" in flat, flat
        assert f"kubegate gateway approve side {side_key.fingerprint}" in flat, flat
        printed = (home / "agents" / "side" / "agent.out").read_text()
        assert f"key fingerprint {side_key.fingerprint}" in printed  # on the agent's console
        assert not (home / "agents" / "side" / "pairing-code").exists()
        assert_policy_allows_simulator(home, "side", stack)
        pending = gateway_state("side")
        assert pending.status is GatewayStatus.PENDING, pending.status
        assert pending.agent is not None and pending.agent.fingerprint == side_key.fingerprint
        run(lambda client: client.approve_agent("side", side_key.fingerprint))
        assert gateway_state("side").status is GatewayStatus.REGISTERED
        # approved, it works on the simulator (its policy) and pins its gateway's workflow
        side_account = tmp_path / "side-account.yaml"
        data = yaml.safe_load((home / "accounts" / "dev.yaml").read_text())
        side_account.write_text(yaml.safe_dump({**data, "gateway": "side"}))
        check = kubegate("account", "validate", "-f", str(side_account))
        assert check.returncode == 0 and "passed" in check.stdout, check.stdout + check.stderr
        assert (home / "agents" / "side" / "gateway.pin").exists()
        # deleted and created again (now with the fingerprint: approved as it pairs): the same
        # agent pairs with the new gateway, forgetting the old one's pin, and works again
        run(lambda client: client.delete_gateway("side"))
        run(
            lambda client: client.wait_gateway(
                "side", lambda s: s.status is GatewayStatus.DELETED, timeout=60
            )
        )
        _, code2 = run(
            lambda client: client.create_gateway("side", fingerprint=side_key.fingerprint)
        )
        code_file.write_text(code2 + "\n")
        again_side = kubegate("dev", "agent", "side", KUBEGATE_PAIRING_CODE_FILE=str(code_file))
        assert again_side.returncode == 0, again_side.stdout + again_side.stderr
        assert "agent-side      started" in again_side.stdout
        assert f"key fingerprint {side_key.fingerprint} (approved)" in again_side.stdout
        assert gateway_state("side").status is GatewayStatus.REGISTERED
        check = kubegate("account", "validate", "-f", str(side_account))
        assert check.returncode == 0 and "passed" in check.stdout, check.stdout + check.stderr
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
        metrics = {row["component"]: row["metrics"] for row in status}
        workers = ("control-worker", "gateway-agent", "agent-side")
        assert len({metrics[n] for n in workers}) == 3 and all(metrics[n] for n in workers)
        assert metrics["temporal"] == metrics["vcsim"] == ""
        logs = home / "logs"
        assert (logs / "gateway-agent.log").exists()
        agent_log = home / "agents" / "local" / "agent.log"
        assert "paired" in agent_log.read_text()

        # hygiene: a private home; no password on a command line or in an environment; the
        # simulator read its password from its file (the gateway reached it: Running above)
        assert_private(home)
        sim_password = (home / "vcsim-password").read_text().strip()
        for row in status:
            secrets = [sim_password, code, code2, *INHERITED_SECRETS.values()]
            assert_no_secret(int(row["pid"]), secrets)
        vcsim_pid = next(int(row["pid"]) for row in status if row["component"] == "vcsim")
        assert "-password-file" in Path(f"/proc/{vcsim_pid}/cmdline").read_bytes().decode()
        # the stack's payload key: every process uses it, histories hold only ciphertext
        assert (home / "codec.key").exists()
        assert run(encrypted_gateway_input)

        account = home / "accounts" / "dev.yaml"
        check = kubegate("account", "validate", "-f", str(account))
        assert check.returncode == 0, check.stdout + check.stderr
        assert "passed" in check.stdout

        # what the Web UI's API answers (every workflow's history) and every file under the
        # home hold neither the simulator's password nor a pairing code
        ui = f"http://127.0.0.1:{env['KUBEGATE_UI_PORT']}/api/v1/namespaces/default/workflows"
        listed = json.loads(urllib.request.urlopen(ui, timeout=30).read())
        ids = [w["execution"]["workflowId"] for w in listed.get("executions", [])]
        assert "gateway/local" in ids and "gateway/side" in ids, ids
        answers = [json.dumps(listed)]
        for workflow_id in ids:
            quoted = urllib.parse.quote(workflow_id, safe="")
            url = f"{ui}/{quoted}/history?maximumPageSize=1000"
            answers.append(urllib.request.urlopen(url, timeout=30).read().decode())  # noqa: S310
        for answer in answers:
            for secret in (sim_password, code, code2):
                assert secret not in answer
        for path in home.rglob("*"):
            if path.is_file() and path.name != "vcsim-password":
                data = path.read_bytes()
                for secret in (sim_password, code, code2):
                    assert secret.encode() not in data, path

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


def test_dev_up_failing_half_way_stops_what_it_started(tmp_path: Path) -> None:
    """The simulator cannot start (no binary there): `dev up` fails, and the Temporal server
    it had started is stopped again (its pid file gone, its port free)."""
    temporal_port = free_port()
    env = {
        **os.environ,
        "KUBEGATE_HOME": str(tmp_path / "home"),
        "KUBEGATE_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "KUBEGATE_UI_PORT": str(free_port()),
        "KUBEGATE_VCSIM_ADDRESS": f"127.0.0.1:{free_port()}",
        "KUBEGATE_VCSIM_BINARY": str(tmp_path / "no-such-vcsim"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "starters.cli", "dev", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert not (tmp_path / "home" / "pids" / "temporal.pid").exists()
    with socket.socket() as probe:  # nothing listens on Temporal's port any more
        assert probe.connect_ex(("127.0.0.1", temporal_port)) != 0
