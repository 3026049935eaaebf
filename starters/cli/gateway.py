"""`kubegate gateway …`: private cloud gateways, their installer and agent.

Registers on the `gateway` app of starters/cli/common.py. Exit codes as there.
"""

from __future__ import annotations

import json
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.markup import escape
from rich.table import Table

from domain import names
from domain.account import Placement, VCenterAccess, VCenterEndpoint
from domain.errors import field_errors
from domain.gateway import (
    GatewayFile,
    GatewayState,
    GatewayStatus,
    InstallerProperties,
)
from domain.lifecycle import Timing, operations
from domain.sealing import normalize_fingerprint
from plumbing.settings import Settings
from starters.cli.common import (
    EXIT_FAILED,
    LogFormatOption,
    MetricsAddressOption,
    Output,
    OutputOption,
    PairingCodeFileOption,
    WaitOption,
    YesOption,
    _bad_input,
    _call,
    _failed,
    _Progress,
    _run,
    _short,
    age,
    confirm,
    err,
    gateway_app,
    load_spec,
    out,
    print_data,
    process_options,
    process_stopped,
    read_code_file,
    read_password,
    show_health,
    workflow_link,
)
from starters.client import KubegateClient, KubegateError

GatewayArg = Annotated[str, typer.Argument(help="Gateway name.")]


def _check_name(name: str) -> None:
    if not names.is_dns_label(name) or len(name) > 40:
        _bad_input(f"NAME: {name!r} must be a DNS label of at most 40 characters")


def _gateway_json(state: GatewayState) -> str:
    data = state.model_dump(mode="json", exclude={"pairing": {"code_hash", "salt"}})
    for account in data.get("accounts", []):
        account["credentials"].pop("password", None)  # sealed, but of no use to anyone here
    if data.get("config"):
        data["config"]["credentials"].pop("password", None)
    data["steps"] = [s.model_dump(mode="json") for s in state.steps]
    data["available_version"] = state.available_version
    data["shown_status"] = state.shown_status
    return json.dumps(data)


def _show(state: GatewayState, output: Output, describe: bool) -> None:
    if output.data:
        print_data(output, _gateway_json(state))
        return
    out.print(
        f"gateway [bold]{escape(state.name)}[/bold]: {state.shown_status}"
        + (" [yellow](overdue)[/yellow]" if state.overdue else "")
        + (f" — {escape(state.reason)}" if state.reason else ""),
        highlight=False,
    )
    if state.agent_connected is False:
        seen = f"{state.agent_seen_at:%Y-%m-%d %H:%M:%S} UTC" if state.agent_seen_at else "?"
        out.print(
            f"  the agent is not there (last seen {seen}): requests are taken and wait for it",
            highlight=False,
            markup=False,
        )
    if state.health.findings or state.health.error:
        show_health(state.health)
    version = f"version {state.version}"
    if state.target_version:
        version += f" → {state.target_version} (upgrading)"
    elif state.available_version:
        version += f" (available: {state.available_version}; kubegate gateway upgrade)"
    out.print(f"  {version}", highlight=False)
    if state.error:
        out.print(f"  [red]error:[/red] {state.error}", highlight=False)
    if state.overdue:
        out.print("  the installer has not registered; check:", highlight=False)
        for hint in state.hints:
            out.print(f"    - {hint}", highlight=False)
    if state.agent:
        where = state.agent.installer_vm or state.agent.host or "?"
        address = f" ({state.agent.installer_address})" if state.agent.installer_address else ""
        agent = state.agent
        out.print(
            f"  agent key {agent.key_id} — {where}{address}; fingerprint {agent.fingerprint or '?'}"
            f" ({'approved' if agent.approved else 'not approved'}); release "
            f"{agent.version or 'unknown'}",
            highlight=False,
        )
        if state.agent_problem:
            out.print(
                f"  [red]agent:[/red] {state.agent_problem} (no new work until then)",
                highlight=False,
            )
    if state.config:
        c = state.config
        out.print(
            f"  vCenter {c.credentials.endpoint.address} as {c.credentials.username}; "
            + (
                "system gateway (no nodes of its own)"
                if state.system
                else f"{c.size} node(s), {c.ip_allocation}"
                + (f" from pool {c.ip_pool}" if c.ip_pool else "")
            )
            + (f"; VIP {state.nodes.vip}" if state.nodes and state.nodes.vip else ""),
            highlight=False,
        )
    out.print(
        f"  {len(state.accounts)} cloud account(s), {len(state.clusters)} cluster(s)"
        + (f", queued: {', '.join(state.queue)}" if state.queue else ""),
        highlight=False,
    )
    if not describe:
        return
    steps = state.steps
    if steps:
        table = Table(title="steps")
        for column in ("step", "state", "seconds", "attempts", "detail / error", "objects"):
            table.add_column(column, overflow="fold")
        for operation, _, group in operations(steps):
            if operation:
                table.add_row(f"[bold]{escape(operation)}[/bold]")
            for s in group:
                table.add_row(
                    ("  " if operation else "") + s.title,
                    s.state.value,
                    f"{s.seconds:.1f}" if s.seconds is not None else "",
                    str(s.attempts),
                    s.error or s.detail,
                    _short(", ".join(s.objects), 60),
                )
        out.print(table)
    if state.nodes and state.nodes.nodes:
        table = Table(title="nodes")
        for column in ("node", "VM", "host", "address", "phase"):
            table.add_column(column)
        for n in state.nodes.nodes:
            table.add_row(n.name, n.vm or "", n.host, n.address or "", n.phase)
        out.print(table)
    if state.accounts:
        table = Table(title="cloud accounts")
        for column in ("account", "vCenter", "user", "default"):
            table.add_column(column)
        for a in state.accounts:
            table.add_row(
                a.name,
                a.credentials.endpoint.address,
                a.credentials.username,
                "yes" if a.default else "",
            )
        out.print(table)
    if state.clusters:
        table = Table(title="clusters")
        for column in ("cluster", "account", "status"):
            table.add_column(column)
        for record in state.clusters:
            table.add_row(
                record.name, record.account, record.status + (" (queued)" if record.queued else "")
            )
        out.print(table)
    out.print(f"workflow: {workflow_link(names.gateway_workflow_id(state.name))}", highlight=False)


def _follow(name: str, done: Any) -> GatewayState:
    async def run() -> GatewayState:
        client = await KubegateClient.connect()
        return await client.wait_gateway(name, done, on_change=_Progress(), interval=0.25)

    state: GatewayState = _run(run())
    return state


def _settled(state: GatewayState) -> bool:
    return state.status in (
        GatewayStatus.RUNNING,
        GatewayStatus.FAILED,
        GatewayStatus.DELETED,
        GatewayStatus.PENDING,
        GatewayStatus.REGISTERED,
    ) and not state.reason.startswith("checking")


def _finish(state: GatewayState, wait: bool, output: Output, want: GatewayStatus) -> None:
    if wait:
        state = _follow(state.name, _settled)
    _show(state, output, describe=wait)
    if wait and state.status is not want:
        raise typer.Exit(EXIT_FAILED)


# -- gateway ----------------------------------------------------------------------------------


@gateway_app.command("create")
def gateway_create(
    name: GatewayArg,
    system: Annotated[
        bool, typer.Option(help="A system gateway: its agent runs beside kubegate, no nodes.")
    ] = False,
    fingerprint: Annotated[
        str | None,
        typer.Option(
            help="The agent's key fingerprint, if known: the agent that pairs with it is "
            "approved at once (otherwise: kubegate gateway approve)."
        ),
    ] = None,
    agent_silence: Annotated[
        int,
        typer.Option(
            "--agent-silence",
            help="Seconds without a sign of its agent before the gateway shows Disconnected "
            "(3-3600).",
        ),
    ] = Timing().agent_silence_seconds,
    output: OutputOption = Output.table,
) -> None:
    """Create a gateway (Pending) and print its pairing code and installer OVA."""
    _check_name(name)
    if fingerprint is not None and len(normalize_fingerprint(fingerprint)) != 39:
        _bad_input("--fingerprint: 32 hex digits, as the agent prints it (e.g. 1a2b:3c4d:…)")
    if not 3 <= agent_silence <= 3600:
        _bad_input(f"--agent-silence: between 3 and 3600 seconds, not {agent_silence}")
    timing = Timing(agent_silence_seconds=agent_silence)
    state, code = _call(
        lambda c: c.create_gateway(name, system=system, fingerprint=fingerprint, timing=timing)
    )
    ova = _ova_path()
    if output.data:
        data = json.loads(_gateway_json(state))
        data["pairing_code"] = code
        data["installer_ova"] = str(ova)
        print_data(output, json.dumps(data))
        return
    out.print(f"gateway {name}: {state.status.value}", highlight=False)
    out.print(
        f"pairing code: [bold]{code[:5]}-{code[5:]}[/bold]  (single use, expires "
        f"{state.pairing.expires_at:%Y-%m-%d %H:%M} UTC; only its hash is kept)",
        highlight=False,
    )
    out.print(f"installer OVA: {ova}", highlight=False)
    out.print(
        f"next: write the code to a file only you can read, then kubegate gateway install "
        f"{name} --ova {ova} -f install.yaml --pairing-code-file FILE   (or import the OVA "
        "in vSphere with these properties); approve the agent's fingerprint when it pairs: "
        f"kubegate gateway approve {name} FINGERPRINT",
        highlight=False,
    )


@gateway_app.command("approve")
def gateway_approve(
    name: GatewayArg,
    fingerprint: Annotated[
        str, typer.Argument(help="The key fingerprint the agent printed when it started.")
    ],
    output: OutputOption = Output.table,
) -> None:
    """Approve the agent that paired with the gateway: only then is any secret sealed to it."""
    _check_name(name)
    if len(normalize_fingerprint(fingerprint)) != 39:
        _bad_input("FINGERPRINT: 32 hex digits, as the agent prints it (e.g. 1a2b:3c4d:…)")
    state = _call(lambda c: c.approve_agent(name, fingerprint))
    _finish(state, False, output, state.status)


def _ova_path() -> Path:
    from starters.installer import installer_ova

    return installer_ova(Settings())


class InstallFile(BaseModel):
    """install.yaml: where to import the installer and its properties (no pairing code)."""

    model_config = ConfigDict(extra="forbid")

    vcenter: VCenterAccess
    placement: Placement
    properties: dict[str, str | None] = Field(
        default_factory=dict,
        description="console_endpoint, ssh_public_key, pod_cidr, service_cidr, node_network, "
        "http_proxy, https_proxy, no_proxy",
    )


@gateway_app.command("install")
def gateway_install(
    name: GatewayArg,
    file: Annotated[Path, typer.Option("--file", "-f", help="install.yaml (vCenter, placement).")],
    pairing_code_file: Annotated[
        Path,
        typer.Option(
            help="File holding the code `gateway create` printed (its first line; readable by "
            "you only). Never the code itself on the command line."
        ),
    ],
    ova: Annotated[Path | None, typer.Option(help="Installer OVA (default: built one).")] = None,
    output: OutputOption = Output.table,
) -> None:
    """Import the installer OVA into vSphere (OVF import) with its properties, power it on."""
    _check_name(name)
    spec = load_spec(file, InstallFile)
    pairing_code = read_code_file(pairing_code_file)
    props_data = {k: v for k, v in spec.properties.items() if v not in (None, "")}
    props_data.setdefault("console_endpoint", f"http://{Settings().temporal_address}")
    try:
        properties = InstallerProperties.model_validate(
            {**props_data, "installer_name": name, "pairing_code": pairing_code}
        )
    except ValidationError as exc:
        lines = [
            f"--pairing-code-file: {pairing_code_file}: {line.partition(': ')[2]}"
            if line.startswith("pairing_code")
            else f"properties.{line}"
            for line in field_errors(exc)
        ]
        _bad_input("\n".join([f"{file}: invalid installer properties", *lines]))
    password = read_password(spec.vcenter, file.parent)
    endpoint = spec.vcenter.endpoint()
    from activities.vsphere.ovf import OvaError
    from starters.installer import install

    path = ova or _ova_path()
    try:
        result = install(
            endpoint, spec.vcenter.username, password, spec.placement, properties, path
        )
    except OvaError as exc:
        _failed(str(exc))
    except Exception as exc:  # every vCenter failure, classified for the user
        _failed(_vcenter_failure(exc, endpoint.address))
    if output.data:
        print_data(output, result.model_dump_json())
        return
    out.print(
        f"installer {result.inventory_path} ({result.vm}): {result.power_state}"
        + ("" if result.created else " (existed already)"),
        highlight=False,
    )


def _from_installer(name: str, vm: str, vcenter: Path) -> tuple[str, str]:
    """The pairing code and the console endpoint from the installer VM's vApp properties."""
    spec = load_spec(vcenter, InstallFile)
    password = read_password(spec.vcenter, vcenter.parent)
    endpoint = spec.vcenter.endpoint()
    from activities.vsphere.ovf import OvaError
    from starters.installer import read_installer

    try:
        props = read_installer(
            endpoint, spec.vcenter.username, password, spec.placement.datacenter, vm
        )
    except OvaError as exc:
        _failed(str(exc))
    except ValidationError as exc:
        _failed(f"{vm}: its installer properties are not valid: {'; '.join(field_errors(exc))}")
    except Exception as exc:  # every vCenter failure, classified for the user
        _failed(_vcenter_failure(exc, endpoint.address))
    if props.installer_name != name:
        _bad_input(
            f"--installer-vm: {vm} was installed for gateway {props.installer_name!r}, not {name!r}"
        )
    _first_policy(name, endpoint)
    return props.pairing_code, props.console_endpoint


def _first_policy(name: str, endpoint: VCenterEndpoint) -> None:
    """At pairing, with no policy yet: one allowing exactly the vCenter the operator named
    (with its trust), written beside the agent's key; an existing policy is kept."""
    from activities.guard import write_policy
    from domain.trust import policy_for
    from workers.gateway_agent import policy_path

    path = policy_path(Settings(), name)
    if path.exists():
        return
    write_policy(path, policy_for(name, endpoint))
    err.print(
        f"agent policy written: {path} (the vCenter {endpoint.address} only; edit it to add "
        "more: kubegate gateway policy)",
        highlight=False,
    )


def _vcenter_failure(exc: BaseException, address: str) -> str:
    """What went wrong talking to vCenter, in the words the agent's activities use."""
    from activities.vsphere.faults import classify

    return classify(exc, f"vCenter {address}").message


@gateway_app.command("get")
def gateway_get(name: GatewayArg, output: OutputOption = Output.table) -> None:
    """A gateway's status, version, agent and counts."""
    _show(_call(lambda c: c.gateway_state(name)), output, describe=False)


@gateway_app.command("describe")
def gateway_describe(name: GatewayArg, output: OutputOption = Output.table) -> None:
    """Everything: steps with their errors, nodes, cloud accounts, clusters, queue."""
    _show(_call(lambda c: c.gateway_state(name)), output, describe=True)


@gateway_app.command("list")
def gateway_list(output: OutputOption = Output.table) -> None:
    """Every gateway that is not deleted."""
    states: list[GatewayState] = _call(lambda c: c.list_gateways())
    if output.data:
        print_data(output, json.dumps([json.loads(_gateway_json(s)) for s in states]))
        return
    wide = output is Output.wide
    table = Table()
    columns = ["gateway", "status", "version", "nodes", "accounts", "clusters", "queued"]
    if wide:
        columns += ["vCenter", "agent", "agent last seen"]
    for column in columns:
        table.add_column(column)
    for s in states:
        cells = [
            s.name,
            s.shown_status + (" (overdue)" if s.overdue else ""),
            s.version,
            "system" if s.system else str(len(s.nodes.nodes) if s.nodes else 0),
            str(len(s.accounts)),
            str(len(s.clusters)),
            str(len(s.queue)),
        ]
        if wide:
            agent = s.agent
            cells += [
                s.config.credentials.endpoint.server if s.config else "",
                f"{agent.host} {agent.version}".strip() if agent else "",
                age(datetime.now(UTC) - s.agent_seen_at) + " ago" if s.agent_seen_at else "",
            ]
        table.add_row(*cells)
    out.print(table)


@gateway_app.command("configure")
def gateway_configure(
    name: GatewayArg,
    file: Annotated[Path, typer.Option("--file", "-f", help="gateway.yaml.")],
    wait: WaitOption = False,
    output: OutputOption = Output.table,
) -> None:
    """vCenter credentials (sealed to the agent) and placement -> preflight -> Provisioning."""
    spec = load_spec(file, GatewayFile)
    password = read_password(spec.vcenter, file.parent)
    state = _call(lambda c: c.configure_gateway(name, spec, password))
    _finish(state, wait, output, GatewayStatus.RUNNING)


@gateway_app.command("reset")
def gateway_reset(
    name: GatewayArg, wait: WaitOption = False, output: OutputOption = Output.table
) -> None:
    """Reset a stuck or failed gateway: remove what the attempt made, back to Pending."""
    state, code = _call(lambda c: c.reset_gateway(name))
    if output.data:  # JSON alone, the new pairing code in it
        if wait:
            state = _follow(state.name, _settled)
        data = json.loads(_gateway_json(state))
        data["pairing_code"] = code or None
        print_data(output, json.dumps(data))
        if wait and state.status is not GatewayStatus.PENDING:
            raise typer.Exit(EXIT_FAILED)
        return
    if code:
        out.print(f"new pairing code: [bold]{code[:5]}-{code[5:]}[/bold]", highlight=False)
    _finish(state, wait, output, GatewayStatus.PENDING)


@gateway_app.command("resize")
def gateway_resize(
    name: GatewayArg,
    size: Annotated[int, typer.Option(help="New number of nodes (only 1 -> 3).")],
    wait: WaitOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Grow a 1-node gateway to 3 nodes (3 -> 1 is refused)."""
    if size not in (1, 3):
        _bad_input(f"--size: a gateway has 1 or 3 nodes, not {size}")
    state = _call(lambda c: c.resize_gateway(name, size))
    _finish(state, wait, output, GatewayStatus.RUNNING)


@gateway_app.command("reconcile")
def gateway_reconcile(
    name: GatewayArg,
    retry_given_up: Annotated[
        bool,
        typer.Option(
            "--retry-given-up",
            help="Repairs given up get their attempts again (a backoff in progress stays).",
        ),
    ] = False,
    output: OutputOption = Output.table,
) -> None:
    """Compare the gateway's own nodes' VMs with their record now and repair them (a VM
    removed or powered off outside kubegate, a node whose guest stopped reporting). Exit 1
    if a repair is given up or vCenter could not be read."""
    _check_name(name)
    health = _call(lambda c: c.reconcile_gateway(name, retry_given_up))
    if output.data:
        print_data(output, health.model_dump_json())
    else:
        out.print(
            f"gateway {name}: {len(health.findings)} finding(s); {health.repairs_made} "
            "repair(s) made so far",
            highlight=False,
            markup=False,
        )
        show_health(health)
    if health.degraded or health.error:
        raise typer.Exit(EXIT_FAILED)


@gateway_app.command("upgrade")
def gateway_upgrade(
    name: GatewayArg,
    version: Annotated[str | None, typer.Option(help="Release (default: newest).")] = None,
    wait: WaitOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Roll the gateway's nodes to a newer release, one at a time; clusters queue meanwhile."""
    state = _call(lambda c: c.upgrade_gateway(name, version))
    _finish(state, wait, output, GatewayStatus.RUNNING)


@gateway_app.command("delete")
def gateway_delete(
    name: GatewayArg,
    wait: WaitOption = False,
    vcenter: Annotated[
        Path | None,
        typer.Option(
            help="install.yaml (its vcenter and placement): also remove the installer VM when "
            "the gateway holds no vCenter credentials (never configured, or reset); works on a "
            "gateway deleted already."
        ),
    ] = None,
    yes: YesOption = False,
    output: OutputOption = Output.table,
) -> None:
    """Delete a gateway: refused while any of its clusters is not deleted. A configured gateway
    removes its installer VM itself; one that never got vCenter credentials needs --vcenter.
    Asks first on a terminal (--yes does not ask)."""
    _check_name(name)
    confirm(f"Delete gateway {name}, its nodes, addresses and installer VM?", yes)
    spec = load_spec(vcenter, InstallFile) if vcenter is not None else None
    password = read_password(spec.vcenter, vcenter.parent) if spec and vcenter else None
    state = _call(lambda c: c.gateway_state(name))
    if state.status is not GatewayStatus.DELETED:
        state = _call(lambda c: c.delete_gateway(name))
        if spec is not None or wait:
            state = _follow(name, _settled)
    if spec is not None and password is not None and state.status is not GatewayStatus.DELETED:
        _show(state, output, describe=True)
        _failed(f"gateway {name} is {state.status.value}, not deleted: its installer VM stays")
    if spec is not None and password is not None:
        from activities.vsphere.ovf import OvaError
        from starters.installer import uninstall

        endpoint = spec.vcenter.endpoint()
        try:
            removed = uninstall(endpoint, spec.vcenter.username, password, spec.placement, name)
        except OvaError as exc:
            _failed(str(exc))
        except Exception as exc:  # every vCenter failure, classified for the user
            _failed(_vcenter_failure(exc, endpoint.address))
        err.print(
            f"installer VM {removed} removed" if removed else "no installer VM to remove",
            highlight=False,
        )
    elif state.config is None:
        err.print(
            f"gateway {name} holds no vCenter credentials: its installer VM "
            f"(kubegate-installer-{name}), if one was installed, is not removed; remove it with "
            f"kubegate gateway delete {name} --vcenter install.yaml",
            highlight=False,
        )
    _finish(state, wait or spec is not None, output, GatewayStatus.DELETED)


@gateway_app.command("agent")
def gateway_agent(
    name: Annotated[str, typer.Argument(help="Gateway name.")],
    pairing_code_file: PairingCodeFileOption = None,
    installer_vm: Annotated[
        str | None,
        typer.Option(
            help="Inventory path of the installer VM: read the code and endpoint from "
            "its vApp properties (needs --vcenter)."
        ),
    ] = None,
    vcenter: Annotated[
        Path | None,
        typer.Option(help="Cloud account YAML whose vcenter block reaches the installer VM."),
    ] = None,
    metrics_address: MetricsAddressOption = None,
    log_format: LogFormatOption = None,
) -> None:
    """Run a gateway agent: pairs once, shows its key fingerprint for the operator to approve,
    then polls the gateway's task queue. Its policy (policy.yaml beside its key) decides what
    it may do: see docs/security.md."""
    if not names.is_dns_label(name):
        _bad_input(f"NAME: {name!r} must be a DNS label")
    options = process_options(metrics_address, log_format)
    code_file = pairing_code_file or Settings().pairing_code_file
    pairing_code = read_code_file(code_file) if code_file is not None else None
    temporal_address = None
    if installer_vm is not None and vcenter is not None:
        pairing_code, endpoint = _from_installer(name, installer_vm, vcenter)
        parts = urllib.parse.urlsplit(endpoint)
        default_port = 443 if parts.scheme == "https" else 7233
        temporal_address = f"{parts.hostname}:{parts.port or default_port}"
    elif installer_vm is not None and pairing_code is None:
        _bad_input("--installer-vm: give --vcenter to read its properties, or --pairing-code-file")
    from workers import gateway_agent as agent

    try:
        agent.main(
            name,
            temporal_address=temporal_address,
            pairing_code=pairing_code,
            installer_vm=installer_vm,
            **options,
        )
    except KubegateError as exc:
        process_stopped(exc, options["log_format"])


@gateway_app.command("rekey")
def gateway_rekey(name: GatewayArg) -> None:
    """Give the gateway's agent new keys; run it on the agent's machine, then restart the
    agent. What the gateway keeps is sealed again to the new key; clusters' secrets stay
    readable (the old key is kept, retired, beside the new one)."""
    _check_name(name)
    from workers import gateway_agent as agent

    key = _run(agent.rekey(Settings(), name))
    out.print(
        f"gateway {name}: agent re-keyed, new fingerprint {key.fingerprint}; restart the agent",
        highlight=False,
    )


@gateway_app.command("policy")
def gateway_policy(
    name: GatewayArg,
    check: Annotated[
        Path | None,
        typer.Option("--check", help="Validate this policy file instead of the agent's own."),
    ] = None,
) -> None:
    """Show (and validate) the agent's local policy: the vCenters it may reach, with their
    trust, and the datacenters and folders it may touch. Run it on the agent's machine."""
    _check_name(name)
    from activities.guard import PolicyError, load_policy
    from workers.gateway_agent import policy_path

    path = check or policy_path(Settings(), name)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        _bad_input(str(exc))
    if policy.gateway != name:
        _bad_input(f"gateway: the policy at {path} is for gateway {policy.gateway}, not {name}")
    out.print(f"policy {path}: valid", highlight=False)
    for vc in policy.vcenters:
        trust = f"thumbprint {vc.thumbprint}" if vc.thumbprint else vc.trust
        out.print(f"  vCenter {vc.server}:{vc.port}  trust {trust}", highlight=False)
    out.print(f"  insecure allowed: {'yes' if policy.allow_insecure else 'no'}", highlight=False)
    out.print(f"  datacenters: {', '.join(policy.datacenters) or 'any'}", highlight=False)
    out.print(f"  folders: {', '.join(policy.folders) or 'any'}", highlight=False)
    operators = ", ".join(policy.operators) or "none (no kubeconfigs are minted)"
    out.print(f"  operators (kubeconfigs): {operators}", highlight=False, markup=False)


@gateway_app.command("logs")
def gateway_logs(
    name: GatewayArg,
    output_file: Annotated[Path, typer.Option("--output-file", help="Bundle to write (.tgz).")],
    output: OutputOption = Output.table,
) -> None:
    """A support bundle: the agent's logs, the step history, recent vCenter events and tasks."""
    from starters.logs import agent_log_files, write_bundle

    settings = Settings()
    notes: list[str] = []

    async def collect(client: KubegateClient) -> tuple[GatewayState, Any]:
        state = await client.gateway_state(name)
        events = None
        if state.config is None:
            notes.append("vCenter events: the gateway is not configured (no vCenter to ask)")
        else:
            try:
                events = await client.gateway_events(name)
            except KubegateError as exc:
                notes.append(f"vCenter events: {exc}")
        return state, events

    state, events = _call(collect)
    logs = agent_log_files(settings, name)
    if not logs:
        notes.append(
            f"agent log not found at {settings.agent_log_path(name)} (run this where the agent "
            "runs, or copy its log)"
        )
    summary = write_bundle(
        output_file,
        gateway=name,
        state=json.loads(_gateway_json(state)),
        steps=state.steps,
        agent_logs=logs,
        events=events,
        notes=notes,
    )
    if output.data:
        document = {
            "path": str(summary.path),
            "size": summary.size,
            "members": list(summary.members),
            "notes": list(summary.notes),
        }
        print_data(output, json.dumps(document))
        return
    out.print(
        f"wrote {summary.path} ({summary.size} bytes): {', '.join(summary.members)}",
        highlight=False,
    )
    for note in summary.notes:
        err.print(f"  note: {note}", highlight=False)
