"""The gateway logs bundle: members, contents, and that no secret gets in."""

from __future__ import annotations

import json
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from domain.events import EventRecord, EventsResult, TaskRecord
from domain.lifecycle import Step, StepState
from plumbing.settings import Settings
from starters.logs import (
    REDACTED,
    BundleSummary,
    agent_log_files,
    redact,
    redact_text,
    write_bundle,
)

SECRET = "hunter2-Sup3r-s3cret"
CIPHERTEXT = "c2VhbGVkLWNpcGhlcnRleHQ="
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def state() -> dict[str, object]:
    return {
        "name": "gw1",
        "status": "Failed",
        "credentials": {
            "username": "kubegate@vsphere.local",
            "password": {
                "key_id": "k1",
                "ephemeral_public_key": "ZXBr",
                "nonce": "bm9uY2U=",
                "ciphertext": CIPHERTEXT,
            },
        },
        "installer": [{"pairing_code": "ABCD-EFGH"}, {"note": f"login with password={SECRET}"}],
        "secrets": {"ciphertext": CIPHERTEXT},
    }


def steps() -> list[Step]:
    return [
        Step(
            name="deploy-appliance",
            title="Deploy the appliance",
            state=StepState.DONE,
            started=T0,
            ended=T0 + timedelta(seconds=42.5),
            attempts=1,
            objects=["VirtualMachine:vm-42", "Folder:group-v7"],
        ),
        Step(
            name="register",
            title="Wait for the agent",
            state=StepState.FAILED,
            started=T0 + timedelta(minutes=1),
            ended=T0 + timedelta(minutes=31),
            attempts=3,
            error=f"agent said: bad login (password={SECRET})\nsecond line",
        ),
        Step(name="health", title="Health", state=StepState.RUNNING, started=T0),
    ]


def events() -> EventsResult:
    return EventsResult(
        events=[
            EventRecord(
                key=7,
                time=T0 + timedelta(seconds=5),
                type="VmPoweredOnEvent",
                message="gw1-appliance on esx1 in DC0 is powered on",
                object="VirtualMachine:vm-42",
                object_name="gw1-appliance",
                user="kubegate@vsphere.local",
            )
        ],
        tasks=[
            TaskRecord(
                key="Task:task-9",
                time=T0,
                completed=T0 + timedelta(seconds=3),
                name="VirtualMachine.clone",
                state="error",
                object="VirtualMachine:vm-1",
                object_name="template",
                error=f"InvalidLogin: token={SECRET}",
            )
        ],
        missing=["VirtualMachine:vm-41"],
        vcenter_requests=6,
    )


def logs(tmp_path: Path) -> list[Path]:
    directory = tmp_path / "agents" / "gw1"
    directory.mkdir(parents=True)
    (directory / "agent.log").write_text(
        f"2025-03-01 12:00:00 INFO login user=kubegate password={SECRET}\n"
        "2025-03-01 12:00:01 INFO polling kubegate-gateway-gw1\n"
    )
    (directory / "agent.log.1").write_bytes(
        f'{{"event": "connect", "password": "{SECRET}", "url": "https://u:{SECRET}@vc"}}\n'.encode()
        + b"raw \xff byte\n"
    )
    (directory / "agent.log.2").write_text("old\n")
    (directory / "agent.log.tmp").write_text("not a log\n")
    return [directory / "agent.log", directory / "agent.log.1", directory / "agent.log.2"]


def read(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        files = {m.name: tar.extractfile(m) for m in tar.getmembers()}
        return {name: f.read() for name, f in files.items() if f is not None}


def full_bundle(tmp_path: Path, out: Path, notes: list[str]) -> BundleSummary:
    """A bundle of everything above."""
    return write_bundle(
        out,
        gateway="gw1",
        state=state(),
        steps=steps(),
        agent_logs=logs(tmp_path),
        events=events(),
        notes=notes,
    )


def test_bundle_members_and_contents(tmp_path: Path) -> None:
    out = tmp_path / "out" / "gw1-logs.tgz"
    summary = full_bundle(tmp_path, out, [])
    members = read(out)
    assert (
        list(members)
        == summary.members
        == [
            "README.txt",
            "state.json",
            "steps.txt",
            "events.json",
            "events.txt",
            "tasks.txt",
            "notes.txt",
            "agent/agent.log",
            "agent/agent.log.1",
            "agent/agent.log.2",
        ]
    )
    assert summary.path == out and summary.size == out.stat().st_size
    assert not list(out.parent.glob(".*partial"))
    readme = members["README.txt"].decode()
    assert "gateway gw1" in readme and "agent/agent.log.1" in readme and "made 20" in readme
    assert json.loads(members["state.json"])["credentials"]["username"] == "kubegate@vsphere.local"

    step_lines = members["steps.txt"].decode().splitlines()
    assert step_lines[0].split() == [
        "STEP",
        "STATE",
        "START",
        "END",
        "SECONDS",
        "ATTEMPTS",
        "ERROR",
        "OBJECTS",
    ]
    deploy = step_lines[1].split()
    assert deploy[:6] == [
        "deploy-appliance",
        "done",
        "2025-03-01T12:00:00+00:00",
        "2025-03-01T12:00:42+00:00",
        "42.5",
        "1",
    ]
    assert step_lines[1].endswith("VirtualMachine:vm-42, Folder:group-v7")
    assert "bad login" in step_lines[2] and " | second line" in step_lines[2]
    assert step_lines[3].split()[:4] == ["health", "running", "2025-03-01T12:00:00+00:00", "-"]

    assert json.loads(members["events.json"])["events"][0]["type"] == "VmPoweredOnEvent"
    assert "gw1-appliance (VirtualMachine:vm-42)" in members["events.txt"].decode()
    tasks = members["tasks.txt"].decode()
    assert "VirtualMachine.clone" in tasks and "error" in tasks and "InvalidLogin" in tasks
    assert "VirtualMachine:vm-41" in members["notes.txt"].decode()
    assert b"polling kubegate-gateway-gw1" in members["agent/agent.log"]
    assert b"raw \xff byte" in members["agent/agent.log.1"]  # bytes kept as they were


def test_no_secret_in_any_member(tmp_path: Path) -> None:
    out = tmp_path / "b.tgz"
    full_bundle(tmp_path, out, [f"vCenter events: login failed for password={SECRET}"])
    members = read(out)
    for name, data in members.items():
        for secret in (SECRET, CIPHERTEXT, "bm9uY2U=", "ZXBr", "ABCD-EFGH"):
            assert secret.encode() not in data, (name, secret)
    with tarfile.open(out, "r:gz") as tar:  # nor in a member name
        assert SECRET not in " ".join(tar.getnames())
    saved = json.loads(members["state.json"])
    assert saved["credentials"]["password"] == REDACTED and saved["secrets"] == REDACTED
    assert saved["installer"][0]["pairing_code"] == REDACTED
    assert f"password={REDACTED}" in saved["installer"][1]["note"]
    assert f"password={REDACTED}" in members["agent/agent.log"].decode()
    assert f'"password": "{REDACTED}"' in members["agent/agent.log.1"].decode("utf-8", "replace")


def test_what_could_not_be_collected_is_noted(tmp_path: Path) -> None:
    out = tmp_path / "b.tgz"
    gone = tmp_path / "agent.log"
    summary = write_bundle(
        out,
        gateway="gw1",
        state={},
        steps=[],
        agent_logs=[gone],
        events=None,
        notes=["agent log not found at /x/agent.log"],
    )
    members = read(out)
    assert "events.json" not in members and not any(m.startswith("agent/") for m in members)
    notes = members["notes.txt"].decode()
    assert "agent log not found at /x/agent.log" in notes
    assert f"agent log {gone}: cannot read" in notes
    assert "vCenter events: not collected" in notes and notes.splitlines() == summary.notes
    assert members["steps.txt"] == b"(no steps)\n"
    assert b"not collected" in members["events.txt"] and b"not collected" in members["tasks.txt"]

    nothing = write_bundle(
        tmp_path / "c.tgz",
        gateway="gw1",
        state={},
        steps=[],
        agent_logs=[],
        events=EventsResult(),
        notes=["vCenter events: timed out"],
    )
    assert nothing.notes == ["vCenter events: timed out", "agent log: no log files found"]
    assert read(tmp_path / "c.tgz")["events.txt"] == b"(no events)\n"


def test_agent_log_files_newest_first(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert agent_log_files(settings, "gw1") == []
    made = logs(tmp_path)
    (settings.agent_dir("gw1") / "agent.log.10").write_text("oldest\n")
    assert agent_log_files(settings, "gw1") == [
        *made,
        settings.agent_dir("gw1") / "agent.log.10",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("password=abc def", f"password={REDACTED} def"),
        ("db_password: 'a b' rest", f"db_password: '{REDACTED}' rest"),
        ('{"Password": "x\\"y", "user": "u"}', f'{{"Password": "{REDACTED}", "user": "u"}}'),
        ("token=abc&x=1", f"token={REDACTED}&x=1"),
        ("https://admin:pw@vc.example/sdk", f"https://admin:{REDACTED}@vc.example/sdk"),
        ("password_hash=ok passwordless=true", "password_hash=ok passwordless=true"),
        ("nothing secret here: key=value", "nothing secret here: key=value"),
    ],
)
def test_redact_text(line: str, expected: str) -> None:
    assert redact_text(line) == expected


def test_redact_json_keys_at_any_depth() -> None:
    value = {"a": [{"Nonce": 1, "b": {"secrets": [1, 2]}}], "password": None, "keep": 3}
    assert redact(value) == {
        "a": [{"Nonce": REDACTED, "b": {"secrets": REDACTED}}],
        "password": REDACTED,
        "keep": 3,
    }
