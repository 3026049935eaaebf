"""The local stack: Temporal dev server, vCenter simulator, control worker and the system
gateway `local` with its agent; and gateway agents started for the demo (`dev agent`).

`up` is idempotent (a component already running is left alone; the gateway is created,
paired and configured only when it is not Running yet). Before an agent starts, the stack makes
its key (`<home>/agents/<gateway>/agent.key`) and, unless the operator wrote one, its policy
(`policy.yaml` beside it) allowing the simulator; the system gateway is created with that key's
fingerprint (or its agent approved by it); a pairing code reaches the agent only in a 0600 file
in its directory, removed once it paired. `down` stops only the processes `up`
and `agent` started, found by the pid files under `<home>/pids/` (pid and kernel start time,
so a reused pid is never taken for ours). Logs go to `<home>/logs/`; a demo agent writes its
output to `<home>/agents/<gateway>/agent.out`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from domain import names
from domain.certs import self_signed
from domain.gateway import GatewayFile, GatewayState, GatewayStatus, default_account_name
from domain.sealing import AgentKey
from plumbing.codec import CodecKeyError, create_key_file, load_keys
from plumbing.settings import Settings, tool_path, vcsim_binary

if TYPE_CHECKING:
    from starters.client import KubegateClient

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
    """A component of the local stack (or its gateway) could not be made ready; the message
    says why and where to look."""


#: pid files of gateway agents started by `dev agent` (the stack's own is "gateway-agent")
AGENT_PREFIX = "agent-"
#: how long `up` waits for the system gateway to be configured and Running
GATEWAY_TIMEOUT = 120.0


@dataclass
class Component:
    name: str
    argv: list[str]
    ready: Callable[[int], Awaitable[bool]]  # given the pid of the process started
    address: str
    log: Path | None = None  # default <home>/logs/<name>.log
    #: serves Prometheus metrics (a worker or agent): on a port `up` picks, see metrics_address
    metrics: bool = False


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _free_port(port: int) -> int | None:
    """`port` if nothing listens on it on the loopback (0: a free port), else None."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return None
        return int(probe.getsockname()[1])


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
        self.codec_key_file = (
            self.settings.codec_key_file or self.settings.default_codec_key_file
        ).resolve()

    # -- public ---------------------------------------------------------------------------

    async def up(self, timeout: float = 90.0) -> list[tuple[str, str]]:
        """Start what is not running and make sure the system gateway is Running with its
        agent; return (component, 'started'|'running') pairs, then the gateway's line.

        Everything under the home is private (directories 0700, files 0600), and the stack's
        payload key file is created there if no key file exists."""
        with _private_umask():
            self._secure_home()
            self._codec_key()
            return await self._up(timeout)

    async def _up(self, timeout: float) -> list[tuple[str, str]]:
        for folder in (self.pids, self.logs):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        password = self._sim_password()
        self._sim_certificate()
        outcome: list[tuple[str, str]] = []
        try:
            for component in self.components(password):
                if component.name != "gateway-agent":  # it pairs first: see _system_gateway
                    outcome.append((component.name, await self._start(component, timeout)))
            self._write_dev_account()
            outcome += await self._system_gateway(password, timeout)
        except BaseException:
            # failed half-way: stop what this call started (what ran before stays), newest
            # first, so a second `dev up` starts from where the first began
            for name, how in reversed(outcome):
                if how == "started":
                    self._stop(name)
            raise
        return outcome

    def _stop(self, name: str) -> bool:
        """Stop one recorded process; True when it was running."""
        pidfile = self.pids / f"{name}.pid"
        if not pidfile.exists():
            return False
        pid = self._pid(name)
        if pid is not None:
            _terminate(pid)
        pidfile.unlink(missing_ok=True)
        return pid is not None

    async def agent(
        self,
        gateway: str,
        *,
        installer_vm: str | None = None,
        vcenter: Path | None = None,
        pairing_code: str | None = None,
        timeout: float = 90.0,
    ) -> str:
        """Start an agent for a gateway made outside the stack (the demo's `lab`), recorded
        like the stack's components so `down` stops it. A paired agent starts from its key
        alone; an unpaired one needs the installer VM (and a file reaching its vCenter) or the
        pairing code (handed to it in a 0600 file in its directory, removed once it paired).
        Its key is created first (see `agent_key`) and its policy allows the simulator unless
        the operator wrote one. The gateway's operator approves it (`kubegate gateway approve`)
        unless the gateway was created with its fingerprint. Returns 'started', or 'running'
        if a paired agent runs already."""
        if not names.is_dns_label(gateway):
            raise DevStackError(f"NAME: {gateway!r} must be a DNS label")
        if gateway == self.settings.gateway:
            raise DevStackError(
                f"gateway {gateway} is the stack's own: `kubegate dev up` runs its agent"
            )
        if installer_vm is not None and vcenter is None:
            raise DevStackError("--installer-vm needs --vcenter (a file reaching its vCenter)")
        self._secure_home()
        client = await self._client()
        state = await self._gateway(client, gateway)
        if state is None:
            raise DevStackError(
                f"gateway {gateway} does not exist: kubegate gateway create {gateway} first"
            )
        name = AGENT_PREFIX + gateway
        pid = self._pid(name)
        if state.agent is not None:
            self._check_key(
                state,
                f"kubegate gateway delete {gateway} --wait, then create, install and pair it "
                "again (make demo does all three for lab)",
            )
            key = self._agent_files(gateway)
            if pid is not None and not _registers_again(state, key):
                return "running"
            if pid is not None:  # paired before signed results: it registers its keys again
                _terminate(pid)
            # paired: its key is all it needs (the installer VM may be gone, e.g. with a
            # simulator started afresh)
            installer_vm, vcenter, pairing_code = None, None, None
        else:
            if pid is not None:  # it paired with an earlier gateway of that name: pair again
                _terminate(pid)
            if installer_vm is None and pairing_code is None:
                raise DevStackError(
                    f"gateway {gateway} is {state.status.value} and not paired: give "
                    "--installer-vm with --vcenter, or --pairing-code-file (or "
                    "KUBEGATE_PAIRING_CODE_FILE)"
                )
            self._agent_files(gateway)
        component = self.agent_component(gateway, installer_vm, vcenter)
        pairs = state.agent is None
        return await self._start_agent(component, gateway, pairing_code, timeout, pairs=pairs)

    async def agent_approved(self, gateway: str) -> bool:
        """Whether the gateway approved this machine's agent (its key, its signing key)."""
        client = await self._client()
        state = await self._gateway(client, gateway)
        paired = state.agent if state is not None else None
        if paired is None or not paired.approved:
            return False
        key = self.agent_key(gateway)
        return (paired.public_key, paired.signing_key) == (
            key.public_key_b64,
            key.signing_key_b64,
        )

    def agent_key(self, gateway: str) -> AgentKey:
        """The agent's key (created if missing: the stack runs on the agent's machine)."""
        from workers.gateway_agent import load_key

        with _private_umask():
            return load_key(self.settings, gateway)

    def agent_policy(self, gateway: str, *, on_simulator: bool = True) -> str:
        """The agent's policy.yaml: written to allow the simulator (its address, its pinned
        thumbprint) unless the file exists — the operator's then, kept as it is (but with
        `on_simulator`, for a gateway that works on the simulator, refused if it does not let
        the agent reach it). Returns 'written' or 'kept'."""
        from activities.guard import PolicyError, load_policy, write_policy
        from domain.trust import policy_for
        from workers.gateway_agent import policy_path

        path = policy_path(self.settings, gateway).resolve()
        endpoint = self.gateway_file().vcenter.endpoint()
        if path.exists():
            try:
                policy = load_policy(path)
            except PolicyError as exc:
                raise DevStackError(
                    f"{exc}; fix it, or remove it and the stack writes one for the simulator"
                ) from None
            problem = (
                f"it is for gateway {policy.gateway}"
                if policy.gateway != gateway
                else policy.endpoint_problem(endpoint)
                if on_simulator
                else None
            )
            if problem:
                raise DevStackError(
                    f"{path}: the agent's policy (kept: it exists) does not let it work on the "
                    f"simulator: {problem}. Add the simulator ({endpoint.address}, trust: "
                    f"thumbprint, thumbprint: {endpoint.thumbprint}), or remove the file and "
                    "the stack writes one"
                )
            return "kept"
        if endpoint.thumbprint is None:
            raise DevStackError(
                "the simulator's thumbprint is unknown (no vcsim.json): start the stack first "
                "(kubegate dev up)"
            )
        # the stack's own operator (this home's key) may have kubeconfigs minted
        operator = AgentKey.load_or_create(self.settings.home / "operator.key")
        policy = policy_for(gateway, endpoint)
        policy.operators = [operator.signing_key_b64]
        with _private_umask():
            write_policy(path, policy)
        return "written"

    def _agent_files(self, gateway: str) -> AgentKey:
        """What a demo agent needs before it starts: its key, then its policy (one the
        operator wrote is kept, whichever vCenters it allows)."""
        key = self.agent_key(gateway)
        self.agent_policy(gateway, on_simulator=False)
        return key

    async def _start_agent(
        self,
        component: Component,
        gateway: str,
        code: str | None,
        timeout: float,
        *,
        pairs: bool = False,
    ) -> str:
        """Start an agent; a pairing code reaches it in a 0600 file in its directory only
        (KUBEGATE_PAIRING_CODE_FILE), removed once it is up (paired) or failed.

        `pairs`: it pairs now with a gateway of that name (a new one, e.g. deleted and created
        again): the gateway workflow it pinned on an earlier pairing (`gateway.pin` beside its
        key, see activities/guard.py) is forgotten, as the operator would remove it."""
        if pairs:
            (self.settings.agent_dir(gateway).resolve() / "gateway.pin").unlink(missing_ok=True)
        if code is None:
            return await self._start(component, timeout)
        path = self.settings.agent_dir(gateway).resolve() / "pairing-code"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(path, code + "\n")
        try:
            return await self._start(component, timeout, {"KUBEGATE_PAIRING_CODE_FILE": str(path)})
        finally:
            path.unlink(missing_ok=True)

    def down(self) -> list[tuple[str, str]]:
        """Stop the processes `up` and `agent` started: the demo's agents, then the stack
        newest first."""
        outcome = []
        for name in [*reversed(self._agent_names()), *reversed(self._names())]:
            if (self.pids / f"{name}.pid").exists():
                outcome.append((name, "stopped" if self._stop(name) else "not running"))
        return outcome

    def status(self) -> list[dict[str, str]]:
        rows = []
        components = self.components("-")
        components += [
            self.agent_component(n.removeprefix(AGENT_PREFIX)) for n in self._agent_names()
        ]
        for component in components:
            pid = self._pid(component.name)
            alive = pid is not None
            rows.append(
                {
                    "component": component.name,
                    "state": "running" if alive else "stopped",
                    "pid": str(pid) if alive else "",
                    "address": component.address,
                    "metrics": (self.metrics_address(component.name) or "") if alive else "",
                    "log": str(self._log(component)),
                }
            )
        return rows

    def components(self, sim_password: str) -> list[Component]:
        s = self.settings
        temporal_host, temporal_port = _split(s.temporal_address)
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
        if s.ui_codec_endpoint:  # the UI decodes payloads with `kubegate codec-server`
            temporal += ["--ui-codec-endpoint", s.ui_codec_endpoint]
        for key in names.SEARCH_ATTRIBUTES:
            temporal += ["--search-attribute", f"{key.name}=Keyword"]
        try:
            options = shlex.split(s.vcsim_options)  # (quoted values may hold spaces)
        except ValueError as exc:
            raise DevStackError(
                f"KUBEGATE_VCSIM_OPTIONS: {exc} (quote values with spaces)"
            ) from None
        vcsim = [
            str(vcsim_binary(s).resolve()),
            "-listen",
            s.vcsim_address,
            "-username",
            SIM_USER,
            "-password-file",  # never the password itself on a command line
            str(self.password_file),
            "-ready-file",
            str(self.vcsim_ready_file),
            "-tls-cert",
            str(self.cert_file),
            "-tls-key",
            str(self.key_file),
            *options,
        ]
        agent_queue = names.gateway_task_queue(s.gateway)
        return [
            Component("temporal", temporal, self._temporal_ready, s.temporal_address),
            Component("vcsim", vcsim, self._vcsim_ready, s.vcsim_address),
            Component(
                "control-worker",
                [*_cli(), "worker", "control"],
                lambda pid: self._polling(names.CONTROL_TASK_QUEUE, True, pid),
                names.CONTROL_TASK_QUEUE,
                metrics=True,
            ),
            Component(
                "gateway-agent",
                [*_cli(), "gateway", "agent", s.gateway],
                lambda pid: self._polling(agent_queue, False, pid),
                agent_queue,
                metrics=True,
            ),
        ]

    def agent_component(
        self, gateway: str, installer_vm: str | None = None, vcenter: Path | None = None
    ) -> Component:
        """A gateway agent started by `agent`: its output in <home>/agents/<gateway>/agent.out."""
        argv = [*_cli(), "gateway", "agent", gateway]
        if installer_vm is not None and vcenter is not None:
            argv += ["--installer-vm", installer_vm, "--vcenter", str(vcenter.resolve())]
        queue = names.gateway_task_queue(gateway)
        return Component(
            AGENT_PREFIX + gateway,
            argv,
            lambda pid: self._polling(queue, False, pid),
            queue,
            log=self.settings.agent_dir(gateway).resolve() / "agent.out",
            metrics=True,
        )

    def thumbprint(self) -> str | None:
        try:
            return str(json.loads(self.vcsim_ready_file.read_text())["thumbprint_sha256"])
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            return None

    def sim_vcenter(self) -> dict[str, str | None]:
        """The vcenter block of a file reaching the simulator: its password file, its
        certificate pinned."""
        return {
            "server": self.settings.vcsim_address,
            "username": SIM_USER,
            "password_file": str(self.password_file),
            "thumbprint": self.thumbprint(),
        }

    def gateway_file(self) -> GatewayFile:
        """The system gateway's configuration: the simulator, its placement, DHCP."""
        return GatewayFile.model_validate(
            {"vcenter": self.sim_vcenter(), "placement": SIM_PLACEMENT, "ip_allocation": "dhcp"}
        )

    # -- the system gateway -----------------------------------------------------------------

    async def _system_gateway(self, sim_password: str, timeout: float) -> list[tuple[str, str]]:
        """Gateway `local`: created as a system gateway with its agent's fingerprint (the key
        is made here first, with the agent's policy for the simulator) and paired by the
        stack's agent the first time (the code in a 0600 file of the agent's only; its key
        persists), its agent approved by `dev up` if the gateway waits for that, configured on
        the simulator, Running; its agent running."""
        from plumbing.errors import KubegateError

        name = self.settings.gateway
        agent = self.components(sim_password)[-1]
        client = await self._client()
        try:
            state = await self._gateway(client, name)
            if state is not None and state.agent is not None:
                self._check_key(  # before any key is made: a missing one is refused
                    state, f"kubegate gateway delete {name} --wait, then kubegate dev up"
                )
            key = self.agent_key(name)
            policy = self.agent_policy(name)
            code: str | None = None
            if state is None:
                state, code = await client.create_gateway(
                    name, system=True, fingerprint=key.fingerprint
                )
            elif state.agent is None:  # never paired: its code was shown once; reset for another
                code = await self._new_code(client, state)
            restart = code is not None or _registers_again(state, key)
            if restart and (pid := self._pid(agent.name)) is not None:
                # it paired with an earlier gateway of that name, or before signed results
                _terminate(pid)
            started = await self._start_agent(agent, name, code, timeout, pairs=code is not None)
            await self._approve(client, name, key)
            state = await self._configured(client, name, sim_password)
        except KubegateError as exc:
            raise DevStackError(f"gateway {name}: {exc}") from None
        kind = "system gateway; " if state.system else ""
        return [
            (agent.name, started),
            (f"agent {name}", f"fingerprint {key.fingerprint}, approved"),
            ("agent policy", f"{policy}: <home>/agents/{name}/policy.yaml"),
            (
                f"gateway {name}",
                f"{state.status.value} ({kind}default cloud account {default_account_name(name)})",
            ),
        ]

    async def _approve(self, client: KubegateClient, name: str, key: AgentKey) -> None:
        """Approve the stack's own agent when the gateway waits for that (it was paired after
        a reset, or registered again with its signing key): the fingerprint is its key's."""
        state = await client.gateway_state(name)
        paired = state.agent
        if paired is None or paired.approved:
            return
        if (paired.public_key, paired.signing_key) != (key.public_key_b64, key.signing_key_b64):
            raise DevStackError(
                f"gateway {name} waits for approval of agent {paired.fingerprint}, not of this "
                f"stack's agent ({key.fingerprint}): kubegate gateway reset {name}, then "
                "kubegate dev up"
            )
        await client.approve_agent(name, key.fingerprint)

    async def _new_code(self, client: KubegateClient, state: GatewayState) -> str:
        before = (state.pairing.salt, state.pairing.verifier)
        _, code = await client.reset_gateway(state.name)
        if code is None:
            raise DevStackError(f"gateway {state.name}: reset gave no pairing code")
        await self._wait(
            client,
            state.name,
            lambda s: (s.pairing.salt, s.pairing.verifier) != before,
            "reset",
        )
        return code

    async def _configured(
        self, client: KubegateClient, name: str, sim_password: str
    ) -> GatewayState:
        state = await client.gateway_state(name)
        if state.status is GatewayStatus.FAILED and not (state.nodes and state.nodes.provisioned):
            await client.reset_gateway(name)  # its configuration failed: start over
            state = await self._wait(
                client, name, lambda s: s.status is not GatewayStatus.FAILED, "reset"
            )
        if state.status in (GatewayStatus.PENDING, GatewayStatus.REGISTERED):
            await client.configure_gateway(name, self.gateway_file(), sim_password)
        state = await self._wait(
            client,
            name,
            lambda s: s.status in (GatewayStatus.RUNNING, GatewayStatus.FAILED),
            "Running",
        )
        if state.status is GatewayStatus.FAILED:
            raise DevStackError(
                f"gateway {name} failed: {state.error}; see kubegate gateway describe {name}"
            )
        self._check_simulator(state)
        return state

    def _check_simulator(self, state: GatewayState) -> None:
        """Refuse a gateway configured for another simulator (address or certificate)."""
        if state.config is None:
            return
        endpoint = state.config.credentials.endpoint
        wanted = self.gateway_file().vcenter
        if (endpoint.address, endpoint.thumbprint) == (wanted.address, wanted.thumbprint):
            return
        live = sorted(state.live_clusters())
        raise DevStackError(
            f"gateway {state.name} is configured for {endpoint.address} (thumbprint "
            f"{endpoint.thumbprint}), but the simulator is {wanted.address} (thumbprint "
            f"{wanted.thumbprint}). A running gateway keeps its vCenter. Recover: "
            + (f"delete its clusters ({', '.join(live)}), then " if live else "")
            + f"kubegate gateway delete {state.name} --wait, then kubegate dev up"
        )

    async def _wait(
        self,
        client: KubegateClient,
        name: str,
        done: Callable[[GatewayState], bool],
        what: str,
    ) -> GatewayState:
        from plumbing.errors import KubegateError

        try:
            return await client.wait_gateway(name, done, timeout=GATEWAY_TIMEOUT, interval=0.2)
        except KubegateError as exc:
            raise DevStackError(
                f"{exc} (waiting for {what}); see kubegate gateway describe {name}"
            ) from None

    async def _gateway(self, client: KubegateClient, name: str) -> GatewayState | None:
        """The gateway's state; None if it does not exist, is deleted or its workflow ended."""
        from temporalio.client import WorkflowExecutionStatus
        from temporalio.service import RPCError, RPCStatusCode

        try:
            described = await client.gateway_handle(name).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        if described.status is not WorkflowExecutionStatus.RUNNING:
            return None
        state = await client.gateway_state(name)
        if state.status is GatewayStatus.DELETING:
            state = await self._wait(
                client, name, lambda s: s.status is GatewayStatus.DELETED, "its deletion"
            )
        return None if state.status is GatewayStatus.DELETED else state

    def _check_key(self, state: GatewayState, recovery: str) -> None:
        """Refuse a gateway paired with another key than the agent's own on this machine."""
        assert state.agent is not None
        path = self.settings.agent_key_path(state.name)
        mine = AgentKey.load_or_create(path) if path.exists() else None
        if mine is not None and mine.public_key_b64 == state.agent.public_key:
            return
        found = f"its key {path} is another ({mine.key_id})" if mine else f"{path} is missing"
        live = sorted(state.live_clusters())
        raise DevStackError(
            f"gateway {state.name} is {state.status.value} and paired with agent key "
            f"{state.agent.key_id}, but {found} (was {path.parent} removed?). A gateway pairs "
            "once, so this agent cannot serve it. Recover: "
            + (f"delete its clusters ({', '.join(live)}), then " if live else "")
            + recovery
        )

    # -- processes ------------------------------------------------------------------------

    def _names(self) -> list[str]:
        return [c.name for c in self.components("-")]

    def _agent_names(self) -> list[str]:
        """Agents `agent` recorded (pid files agent-<gateway>.pid)."""
        return sorted(p.stem for p in self.pids.glob(f"{AGENT_PREFIX}*.pid"))

    def metrics_address(self, name: str) -> str | None:
        """Where a running worker or agent of the stack serves its metrics (HOST:PORT)."""
        if not self._alive(name):
            return None
        try:
            return (self.pids / f"{name}.metrics").read_text().strip() or None
        except FileNotFoundError:
            return None

    def _pick_metrics_address(self, name: str) -> str:
        """The control worker on the first port (KUBEGATE_DEV_METRICS_PORT), the system
        gateway's agent on the next, demo agents on the next free ones; 0: any free port."""
        base = self.settings.dev_metrics_port
        if base == 0:
            return f"127.0.0.1:{_free_port(0)}"
        first = {"control-worker": base, "gateway-agent": base + 1}.get(name, base + 2)
        taken = {
            self.metrics_address(other)
            for other in [*self._names(), *self._agent_names()]
            if other != name
        }
        for port in range(first, min(first + 100, 65536)):
            if f"127.0.0.1:{port}" not in taken and _free_port(port) == port:
                return f"127.0.0.1:{port}"
        return f"127.0.0.1:{_free_port(0)}"

    def _log(self, component: Component) -> Path:
        return component.log or self.logs / f"{component.name}.log"

    async def _start(
        self, component: Component, timeout: float, env: dict[str, str] | None = None
    ) -> str:
        if self._alive(component.name):
            return "running"
        if component.name == "vcsim":
            self.vcsim_ready_file.unlink(missing_ok=True)
        process = self._spawn(component, env)
        await self._wait_ready(component, process, timeout)
        return "started"

    def _spawn(
        self, component: Component, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        if not Path(component.argv[0]).exists():
            raise DevStackError(
                f"{component.name}: {component.argv[0]} is missing (run `make setup`)"
            )
        # a pairing code reaches only the agent it is given to, never one inherited
        environ = {k: v for k, v in child_environment().items() if k not in _PAIRING}
        environ["KUBEGATE_HOME"] = str(self.home)
        if self.codec_key_file.exists():
            environ["KUBEGATE_CODEC_KEY_FILE"] = str(self.codec_key_file)
        environ["KUBEGATE_LOG_FORMAT"] = self.settings.log_format
        environ.update(env or {})
        argv = list(component.argv)
        if component.metrics:
            address = self._pick_metrics_address(component.name)
            argv += ["--metrics-address", address]
            self.pids.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_private(self.pids / f"{component.name}.metrics", address + "\n")
        path = self._log(component)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environ,
            start_new_session=True,
            umask=0o077,  # what it writes (the SQLite database, logs, keys) is private
        )
        log.close()
        # pid and kernel start time: together they name this process even after pid reuse
        self.pids.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(
            self.pids / f"{component.name}.pid", f"{process.pid} {_start_time(process.pid)}\n"
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
                    f"{component.name} exited during start; see {self._log(component)}"
                    + _last_error(self._log(component))
                )
            if await component.ready(process.pid):
                return
            await asyncio.sleep(0.3)
        raise DevStackError(
            f"{component.name} not ready after {timeout:.0f}s; see {self._log(component)}"
        )

    # -- readiness ------------------------------------------------------------------------

    async def _client(self) -> KubegateClient:
        from starters.client import KubegateClient

        return await KubegateClient.connect(self.settings)

    async def _temporal_ready(self, pid: int) -> bool:
        if not _port_open(self.settings.temporal_address):
            return False
        from plumbing.connect import connect

        try:
            await connect(self.settings)
        except RuntimeError:
            return False
        return True

    async def _vcsim_ready(self, pid: int) -> bool:
        return self.vcsim_ready_file.exists()

    async def _polling(self, queue: str, workflow: bool, pid: int) -> bool:
        """True once the process `pid` polls the queue (a poller's identity is pid@host), so a
        poller that stopped a minute ago, still listed by the server, does not count."""
        from temporalio.api.enums.v1 import TaskQueueType
        from temporalio.api.taskqueue.v1 import TaskQueue
        from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
        from temporalio.service import RPCError

        from plumbing.connect import connect

        client = await connect(self.settings)
        kind = (
            TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
            if workflow
            else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
        )
        try:
            response = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=client.namespace,
                    task_queue=TaskQueue(name=queue),
                    task_queue_type=kind,
                )
            )
        except RPCError:
            return False  # a busy server may drop the call: ask again
        return any(p.identity.startswith(f"{pid}@") for p in response.pollers)

    # -- files ----------------------------------------------------------------------------

    def _secure_home(self) -> None:
        """Make the home and everything in it private: directories 0700, files 0600 (0700
        if executable); symbolic links are left alone."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (self.pids, self.logs):
            folder.mkdir(mode=0o700, exist_ok=True)
        for root, _, files in os.walk(self.home):
            _chmod(Path(root), 0o700)
            for name in files:
                path = Path(root, name)
                with contextlib.suppress(OSError):
                    if not path.is_symlink():
                        _chmod(path, 0o700 if path.stat().st_mode & 0o100 else 0o600)

    def _codec_key(self) -> None:
        """The stack's payload key file (created under the home if missing); its processes
        get its path, never the keys."""
        if self.settings.codec_keys:
            raise DevStackError(
                "KUBEGATE_CODEC_KEYS is set, but the dev stack gives its processes keys only as "
                "a file: put them in a file ('KEY_ID BASE64KEY' a line, the newest last) and set "
                "KUBEGATE_CODEC_KEY_FILE instead"
            )
        if self.settings.codec_key_file is None:
            create_key_file(self.codec_key_file)
        try:
            load_keys(self.settings)
        except CodecKeyError as exc:
            raise DevStackError(f"payload encryption keys: {exc}") from None

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
            "vcenter": self.sim_vcenter(),
            "placement": SIM_PLACEMENT,
        }
        self.account_file.parent.mkdir(parents=True, exist_ok=True)
        self.account_file.write_text(yaml.safe_dump(account, sort_keys=False))


def _cli() -> list[str]:
    return [sys.executable, "-m", "starters.cli"]


def _registers_again(state: GatewayState, key: AgentKey) -> bool:
    """True when the gateway knows this agent without its signing key (paired before signed
    results): the agent registers it on its next start, and the gateway waits for approval."""
    return state.agent is not None and state.agent.signing_key != key.signing_key_b64


#: what a process of the stack inherits, besides the KUBEGATE_* settings
_INHERITED = ("PATH", "HOME", "LANG", "TZ")
#: how an agent is given its pairing code: only by `_start_agent`, never inherited
_PAIRING = ("KUBEGATE_PAIRING_CODE", "KUBEGATE_PAIRING_CODE_FILE")
#: settings that are secrets: never in a child's environment
_SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|_KEYS$|PAIRING_CODE$")


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed environment of a process the stack starts: PATH, HOME, LANG, LC_*,
    TZ and the KUBEGATE_* settings, minus any secret (passwords, API keys, inline codec keys,
    pairing codes); nothing else is inherited."""
    environ = os.environ if environ is None else environ
    settings = {f"KUBEGATE_{name.upper()}" for name in Settings.model_fields}
    return {
        k: v
        for k, v in environ.items()
        if k in _INHERITED or k.startswith("LC_") or (k in settings and not _SECRET.search(k))
    }


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Files and directories made meanwhile are private to the user (umask 077)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _chmod(path: Path, mode: int) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o7777 != mode:
            path.chmod(mode)


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600, also when it exists already)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def _last_error(log: Path) -> str:
    """The log's last line that says error, to show beside where to look."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-40:]
    except OSError:
        return ""
    for line in reversed(lines):
        if "error" in line.lower():
            return f"\n  {line.strip()[:300]}"
    return ""


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
