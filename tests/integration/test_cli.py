"""The kubegate command as a user runs it: a subprocess against the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.testing import WorkflowEnvironment

from plumbing.settings import Settings
from tests.conftest import GATEWAY
from tests.support import ADMIN, PLACEMENT, TEMPLATE, Vcsim, run_cli

pytestmark = pytest.mark.integration


def account_file(tmp_path: Path, sim: Vcsim, pw: str, **vcenter: Any) -> Path:
    secret = tmp_path / "password"
    secret.write_text(pw + "\n")
    data = {
        "name": "cli",
        "gateway": GATEWAY,
        "vcenter": {
            "server": sim.address,
            "username": ADMIN,
            "password_file": str(secret),
            "thumbprint": sim.thumbprint,
            **vcenter,
        },
        "placement": dict(PLACEMENT),
    }
    path = tmp_path / "account.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_validate_prints_a_table_and_exits_0(
    vcsim: Vcsim, settings: Settings, sessions: Any, tmp_path: Path
) -> None:
    code, output = await run_cli(
        settings, "account", "validate", "-f", str(account_file(tmp_path, vcsim, vcsim.password))
    )

    assert code == 0, output
    assert "passed" in output and "vCenter requests" in output
    assert "NTP on host" in output and "DC0_C0_H2" in output
    assert vcsim.password not in output


async def test_validate_json_is_machine_readable(
    vcsim: Vcsim, settings: Settings, sessions: Any, tmp_path: Path
) -> None:
    code, output = await run_cli(
        settings,
        "account",
        "validate",
        "-o",
        "json",
        "-f",
        str(account_file(tmp_path, vcsim, vcsim.password)),
    )

    assert code == 0, output
    report = json.loads(output)
    assert report["passed"] is True
    assert report["workflow_id"].startswith("preflight/")
    assert {r["status"] for r in report["results"]} == {"pass"}


async def test_failed_check_exits_1_and_never_prints_the_password(
    vcsim: Vcsim, settings: Settings, sessions: Any, tmp_path: Path
) -> None:
    wrong = "Wr0ng-but-s3cret"
    code, output = await run_cli(
        settings, "account", "validate", "-f", str(account_file(tmp_path, vcsim, wrong))
    )

    assert code == 1, output
    assert "failed" in output and "refused the user name or password" in output
    assert wrong not in output


async def test_restricted_user_fails_naming_the_privilege_and_object(
    vcsim: Vcsim,
    settings: Settings,
    sessions: Any,
    tmp_path: Path,
    restricted_user: tuple[str, str],
) -> None:
    user, password = restricted_user
    path = account_file(tmp_path, vcsim, password, username=user)
    code, output = await run_cli(settings, "account", "validate", "-o", "json", "-f", str(path))

    assert code == 1
    report = json.loads(output)
    template = next(r for r in report["results"] if r["check"] == "privileges.template")
    assert template["status"] == "fail"
    assert "VirtualMachine.Provisioning.Clone" in template["detail"]
    assert f"/DC0/vm/{TEMPLATE}" in template["object"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"thumbprint": "zz"}, "vcenter.thumbprint"),
        ({"server": ""}, "vcenter.server"),
        ({"colour": "blue"}, "vcenter.colour"),
        ({"password": "x"}, "password_env"),
    ],
)
async def test_bad_input_exits_2_naming_the_field_and_starts_nothing(
    vcsim: Vcsim,
    settings: Settings,
    sessions: Any,
    tmp_path: Path,
    temporal: WorkflowEnvironment,
    change: dict[str, str],
    expected: str,
) -> None:
    before = (await temporal.client.count_workflows()).count
    path = account_file(tmp_path, vcsim, "pw", **change)
    code, output = await run_cli(settings, "account", "validate", "-f", str(path))

    assert code == 2, output
    assert expected in output
    assert (await temporal.client.count_workflows()).count == before


async def test_missing_file_and_bad_yaml_exit_2(settings: Settings, tmp_path: Path) -> None:
    code, output = await run_cli(settings, "account", "validate", "-f", str(tmp_path / "nope"))
    assert code == 2 and "no such file" in output
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    code, output = await run_cli(settings, "account", "validate", "-f", str(broken))
    assert code == 2 and "not valid YAML" in output


async def test_unset_password_env_exits_2(
    vcsim: Vcsim, settings: Settings, sessions: Any, tmp_path: Path
) -> None:
    path = account_file(tmp_path, vcsim, "pw")
    data = yaml.safe_load(path.read_text())
    del data["vcenter"]["password_file"]
    data["vcenter"]["password_env"] = "KUBEGATE_TEST_UNSET_VARIABLE"
    path.write_text(yaml.safe_dump(data))
    code, output = await run_cli(settings, "account", "validate", "-f", str(path))

    assert code == 2
    assert "vcenter.password_env" in output


async def test_the_python_client_example_runs(
    vcsim: Vcsim, settings: Settings, sessions: Any, tmp_path: Path
) -> None:
    path = account_file(tmp_path, vcsim, "unused")
    data = yaml.safe_load(path.read_text())
    del data["vcenter"]["password_file"]
    data["vcenter"]["password_env"] = "EXAMPLE_VCENTER_PASSWORD"
    path.write_text(yaml.safe_dump(data))
    env = {
        **os.environ,
        "KUBEGATE_HOME": str(settings.home),
        "KUBEGATE_TEMPORAL_ADDRESS": settings.temporal_address,
        "EXAMPLE_VCENTER_PASSWORD": vcsim.password,
    }
    example = Path(__file__).resolve().parents[2] / "examples" / "validate_account.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(example),
        str(path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await process.communicate())[0].decode()
    assert process.returncode == 0, output
    assert "passed=True" in output


@pytest.mark.parametrize(
    "line",
    ["password: S3cr3t: pa55", 'password: "S3cr3t-pa55', "password: [S3cr3t-pa55"],
)
async def test_a_yaml_error_never_prints_the_password(
    settings: Settings, tmp_path: Path, line: str
) -> None:
    path = tmp_path / "account.yaml"
    path.write_text(
        f"name: x\ngateway: {GATEWAY}\nvcenter:\n  server: vc\n  username: u\n  {line}\n"
    )
    code, output = await run_cli(settings, "account", "validate", "-f", str(path))
    assert code == 2, output
    assert "not valid YAML at line" in output
    assert "S3cr3t" not in output


async def test_a_directory_instead_of_a_file_exits_2(settings: Settings, tmp_path: Path) -> None:
    code, output = await run_cli(settings, "account", "validate", "-f", str(tmp_path))
    assert code == 2 and "cannot read it" in output
