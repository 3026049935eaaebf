"""Malformed input through the real `kubegate` commands: exit 2, the field and rule named, no
traceback, and nothing started (Temporal is unreachable here: a command that got as far as
asking it would exit 1 instead)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from starters.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CODE = "ABCDEFGHJK"  # the shape of a pairing code (10 characters of its alphabet)
#: the file holding it, written in each test's directory (the tests run there)
CODE_FILE = "pairing-code"


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return data


# -- the commands that read a file, each with the example it reads --------------------------

COMMANDS: dict[str, tuple[str, list[str]]] = {
    "cluster deploy": ("cluster.yaml", ["cluster", "deploy", "-f"]),
    "cluster add-pool": ("pool-highmem.yaml", ["cluster", "add-pool", "demo", "-f"]),
    "ippool create": ("ippool.yaml", ["ippool", "create", "-f"]),
    "account create": ("account.yaml", ["account", "create", "-f"]),
    "account validate": ("account.yaml", ["account", "validate", "-f"]),
    "gateway configure": ("gateway.yaml", ["gateway", "configure", "lab", "-f"]),
    "gateway install": (
        "install.yaml",
        ["gateway", "install", "lab", "--pairing-code-file", CODE_FILE, "-f"],
    ),
    "gateway agent": (
        "install.yaml",
        ["gateway", "agent", "lab", "--installer-vm", "kubegate-installer-lab", "--vcenter"],
    ),
}

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)

#: (case, file content, what the message must say)
FILE_CASES: list[tuple[str, bytes, str]] = [
    ("binary junk", bytes(random.Random(7).randrange(256) for _ in range(4096)), "UTF-8"),
    ("NUL bytes", b"name: x\x00\x00\n", "NUL"),
    ("empty file", b"", "empty"),
    ("only a comment", b"# nothing\n", "empty"),
    ("a list", b"- name: x\n- name: y\n", "not a list"),
    ("a scalar", b"just words\n", "not a single value"),
    ("duplicate key", b"name: a\nname: b\n", "duplicate key 'name' at line 2"),
    ("billion laughs", BOMB.encode(), "aliases"),
    ("self-referencing alias", b"name: &a [*a]\n", "refers to the value that holds it"),
    ("deep nesting", b"name: " + b"[" * 200 + b"]" * 200 + b"\n", "nested too deeply"),
    ("unclosed bracket", b"name: [x\n", "not valid YAML at line"),
    ("python tag", b"name: !!python/object/apply:os.system [reboot]\n", "not valid YAML"),
    ("huge file", b"name: x\n" + b"#" * 1_100_000 + b"\n", "at most 1048576"),
]


@pytest.fixture(autouse=True)
def no_temporal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBEGATE_TEMPORAL_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("KUBEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KUBEGATE_VCENTER_PASSWORD", "pw")
    monkeypatch.setenv("KUBEGATE_VCSIM_PASSWORD", "pw")
    (tmp_path / CODE_FILE).write_text(CODE + "\n")
    monkeypatch.chdir(tmp_path)


def refused(args: list[str], expected: str) -> None:
    """Exit 2, `expected` in the message, no traceback."""
    result = CliRunner().invoke(app, args)
    output = result.output  # stdout and stderr
    flat = "".join(output.split())
    assert result.exit_code == 2, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output
    assert "".join(expected.split()) in flat, output


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("case", "content", "expected"), FILE_CASES, ids=[c[0] for c in FILE_CASES]
)
def test_a_broken_file_is_refused_the_same_way_by_every_command(
    tmp_path: Path, command: str, case: str, content: bytes, expected: str
) -> None:
    path = tmp_path / "input.yaml"
    path.write_bytes(content)
    refused([*COMMANDS[command][1], str(path)], expected)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_file_is_refused_by_every_command(tmp_path: Path, command: str) -> None:
    refused([*COMMANDS[command][1], str(tmp_path / "nope.yaml")], "no such file")


# -- field rules, one command each -------------------------------------------------------------

Change = Callable[[dict[str, Any]], None]


def pool(i: int, size: int) -> dict[str, Any]:
    return {
        "name": f"p{i}",
        "size": size,
        "placement": [{"compute_cluster": "C", "datastore": "D", "network": "N", "ip_pool": "x"}],
    }


def setter(path: str, value: Any) -> Change:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


FIELD_CASES: list[tuple[str, str, Change, str]] = [
    # cluster.yaml
    ("cluster deploy", "wrong type", setter("control_plane.size", "three"), "control_plane.size"),
    ("cluster deploy", "unknown field", setter("colour", "blue"), "colour: Extra inputs"),
    ("cluster deploy", "bad name", setter("name", "Demo_1"), "name: must be a DNS label"),
    ("cluster deploy", "pool too big", setter("workers.0.size", 10_000), "workers.0.size"),
    (
        "cluster deploy",
        "too many nodes",
        setter("workers", [pool(i, 200) for i in range(3)]),
        "603 nodes in all; a cluster has at most 500",
    ),
    (
        "cluster deploy",
        "20 pools x 500",
        setter("workers", [pool(i, 500) for i in range(20)]),
        "workers.0.size: Input should be less than or equal to 200",
    ),
    (
        "cluster deploy",
        "too many pools",
        setter("workers", [pool(i, 1) for i in range(21)]),
        "workers: List should have at most 20 items",
    ),
    (
        "cluster deploy",
        "huge spec",
        setter("overrides", {"kubernetes": {"blob": "x" * 200_000}}),
        "bytes as JSON; at most 131072",
    ),
    (
        "cluster deploy",
        "NTP injection",
        setter("placement.ntp_servers", ["$(reboot)"]),
        "placement.ntp_servers.0: '$(reboot)' is not a host name or IP address",
    ),
    (
        "cluster deploy",
        "NTP with a space",
        setter("placement.ntp_servers", ["ntp.example.com; reboot"]),
        "placement.ntp_servers.0",
    ),
    ("cluster deploy", "bad ssh key", setter("placement.ssh_keys", ["hello"]), "ssh_keys"),
    (
        "cluster deploy",
        "static without a pool",
        setter("control_plane.placement.0.ip_pool", None),
        "control_plane.placement.0.ip_pool: required with static IP allocation",
    ),
    (
        "cluster deploy",
        "missing profile file",
        setter("profile", {"file": "nope.yaml"}),
        "nope.yaml: no such file",
    ),
    ("cluster deploy", "bad tag", setter("tags", ["a b"]), "tags"),
    # pool-highmem.yaml
    (
        "cluster add-pool",
        "pool too big",
        setter("size", 10_000),
        "size: Input should be less than or equal to 200",
    ),
    ("cluster add-pool", "named cp", setter("name", "CP"), "name: must be a DNS label"),
    # ippool.yaml
    (
        "ippool create",
        "bad CIDR",
        lambda d: d.update(kind="subnet", first=None, last=None, subnet="10.0.0.0/33"),
        "subnet",
    ),
    (
        "ippool create",
        "host bits",
        lambda d: d.update(kind="subnet", first=None, last=None, subnet="10.10.0.1/24"),
        "no host bits",
    ),
    ("ippool create", "zone id", setter("first", "fe80::1%eth0"), "zone id"),
    ("ippool create", "IPv4-mapped", setter("network_gateway", "::ffff:10.10.0.1"), "IPv4-mapped"),
    (
        "ippool create",
        "multicast",
        lambda d: d.update(
            kind="subnet", first=None, last=None, subnet="224.0.0.0/24", network_gateway="224.0.0.1"
        ),
        "multicast",
    ),
    (
        "ippool create",
        "loopback",
        lambda d: d.update(first="127.0.0.10", last="127.0.0.20", network_gateway="127.0.0.1"),
        "loopback",
    ),
    (
        "ippool create",
        "link-local",
        lambda d: d.update(
            first="169.254.0.10", last="169.254.0.20", network_gateway="169.254.0.1"
        ),
        "link-local",
    ),
    (
        "ippool create",
        "unspecified",
        setter("nameservers", ["0.0.0.0"]),  # noqa: S104 - refused, not bound
        "nameservers: entry 0: 0.0.0.0 is the unspecified address",
    ),
    ("ippool create", "broadcast", setter("nameservers", ["255.255.255.255"]), "broadcast"),
    (
        "ippool create",
        "search domain injection",
        setter("search_domains", ["$(reboot)"]),
        "search_domains",
    ),
    ("ippool create", "bad name", setter("name", "Lab Pool"), "name: must be a DNS label"),
    ("ippool create", "size as text", setter("prefix", "twenty"), "prefix"),
    # account.yaml
    (
        "account create",
        "server injection",
        setter("vcenter.server", "$(reboot)"),
        "vcenter: server: '$(reboot)' is not a host name or IP address",
    ),
    (
        "account create",
        "port out of range",
        setter("vcenter.server", "vc.example.com:99999"),
        "between 1 and 65535",
    ),
    (
        "account validate",
        "bad thumbprint",
        setter("vcenter.thumbprint", "zz"),
        "vcenter.thumbprint",
    ),
    ("account validate", "unknown field", setter("vcenter.colour", "blue"), "vcenter.colour"),
    (
        "account validate",
        "missing password file",
        lambda d: d["vcenter"].update(password_env=None, password_file="nope.pw"),
        "vcenter.password_file: cannot read a password",
    ),
    # gateway.yaml
    ("gateway configure", "NTP injection", setter("ntp_servers", ["`reboot`"]), "ntp_servers.0"),
    (
        "gateway configure",
        "no template",
        setter("placement.template", None),
        "placement.template: required",
    ),
    (
        "gateway configure",
        "bad pool address",
        setter("create_ip_pool.first", "10.10.0.300"),
        "create_ip_pool.first",
    ),
    (
        "gateway configure",
        "pool names a gateway",
        setter("create_ip_pool.gateway", "other"),
        "create_ip_pool.gateway: not allowed",
    ),
    (
        "gateway configure",
        "pool with DHCP",
        lambda d: d.update(ip_allocation="dhcp", vip="10.10.0.50"),
        "create_ip_pool: only with static IP allocation",
    ),
    ("gateway configure", "bad ssh key", setter("ssh_keys", ["nope"]), "ssh_keys"),
    ("gateway configure", "size 2", setter("size", 2), "size"),
    # install.yaml
    (
        "gateway install",
        "endpoint injection",
        setter("properties.console_endpoint", "http://$(reboot):7233"),
        "properties.console_endpoint",
    ),
    (
        "gateway install",
        "no_proxy injection",
        lambda d: d["properties"].update(
            http_proxy="http://p:3128",
            https_proxy="http://p:3128",
            no_proxy="a.example.com,$(reboot)",
        ),
        "properties.no_proxy",
    ),
    (
        "gateway install",
        "unknown property",
        setter("properties.colour", "blue"),
        "properties.colour",
    ),
    (
        "gateway install",
        "overlapping networks",
        setter("properties.pod_cidr", "10.10.0.0/16"),
        "overlaps",
    ),
]


@pytest.mark.parametrize(
    ("command", "case", "change", "expected"),
    FIELD_CASES,
    ids=[f"{c[0]}: {c[1]}" for c in FIELD_CASES],
)
def test_a_bad_field_is_refused_naming_it(
    tmp_path: Path, command: str, case: str, change: Change, expected: str
) -> None:
    name, args = COMMANDS[command]
    data = copy.deepcopy(example(name))
    change(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    if name == "cluster.yaml" and "profile" not in case:
        (tmp_path / "profile.yaml").write_text((EXAMPLES / "profile.yaml").read_text())
    refused([*args, str(path)], expected)


@pytest.mark.parametrize("content", [b"\xff\xfe junk", b"name: a\nname: b\n"])
def test_a_broken_profile_file_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "cluster.yaml").write_text((EXAMPLES / "cluster.yaml").read_text())
    (tmp_path / "profile.yaml").write_bytes(content)
    refused(["cluster", "deploy", "-f", str(tmp_path / "cluster.yaml")], "profile.yaml:")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cluster", "scale", "demo", "general", "--size", "10000"], "--size: between 0 and 200"),
        (["cluster", "scale", "demo", "general", "--size", "-1"], "--size: between 0 and 200"),
        (["cluster", "deploy", "-f", "x.yaml", "--readiness", "soon"], "--readiness"),
        (["gateway", "resize", "lab", "--size", "2"], "--size: a gateway has 1 or 3 nodes"),
        (["gateway", "create", "Lab_1"], "NAME"),
        (["gateway", "agent", "Lab_1"], "NAME"),
        (["gateway", "install", "lab", "-f", "x.yaml", "--pairing-code-file", CODE_FILE], "x.yaml"),
        (["worker", "promote", "$(reboot)", "--deployment", "kubegate"], "BUILD_ID"),
        (["worker", "versions"], "KUBEGATE_WORKER_DEPLOYMENT"),
        (["audit", "--gateway", "Lab_1"], "--gateway"),
        (["audit", "--yes"], "--yes: only with --clean"),
        # not a terminal (CliRunner) and no --yes: nothing is started without a confirmation
        (["audit", "--clean"], "--clean: asks for confirmation"),
        (["audit", "-o", "xml"], "--output"),
        (["gateway", "reconcile", "Lab_1"], "NAME"),
        (["cluster", "wait", "demo", "--for", "sideways"], "--for: 'sideways' must be one of"),
        (["cluster", "wait", "demo", "--timeout", "0"], "--timeout"),
        (["gateway", "logs", "lab", "-o", "x.tgz"], "--output"),  # -o is a format everywhere
        # destructive: no terminal and no --yes, nothing is started
        (["cluster", "delete", "demo"], "--yes: this asks for confirmation"),
        (["cluster", "remove-pool", "demo", "w"], "--yes: this asks for confirmation"),
        (["gateway", "delete", "lab"], "--yes: this asks for confirmation"),
        (["cluster", "reconcile", "demo", "-o", "xml"], "--output"),
        (["cluster", "remediation", "pause", "demo", "-o", "text"], "--output"),
    ],
)
def test_bad_options_are_refused(args: list[str], expected: str) -> None:
    refused(args, expected)


def test_a_bad_pairing_code_is_refused_naming_the_option(tmp_path: Path) -> None:
    path = tmp_path / "install.yaml"
    path.write_text((EXAMPLES / "install.yaml").read_text())
    code = tmp_path / "short-code"
    code.write_text("short\n")
    args = ["gateway", "install", "lab", "-f", str(path), "--pairing-code-file"]
    refused([*args, str(code)], f"--pairing-code-file: {code}: must be the 10-character code")
    code.write_text("\n")
    refused([*args, str(code)], f"--pairing-code-file: {code}: empty")
    refused([*args, str(tmp_path / "nope")], "cannot read it")
    result = CliRunner().invoke(
        app, ["gateway", "install", "lab", "-f", str(path), "--pairing-code", CODE]
    )
    assert result.exit_code == 2 and CODE not in result.output  # no code on a command line


def test_a_binary_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vc.pw").write_bytes(b"\xff\xfe\x00junk")
    data = example("account.yaml")
    del data["vcenter"]["password_env"]
    data["vcenter"]["password_file"] = "vc.pw"
    path = tmp_path / "account.yaml"
    path.write_text(yaml.safe_dump(data))
    refused(["account", "validate", "-f", str(path)], "vcenter.password_file")
