"""`kubegate ippool` as a user runs it, against the real server and control worker."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from plumbing.settings import Settings
from starters.client import KubegateClient
from tests.support import run_cli

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ippool.yaml"


def pool_file(tmp_path: Path, **changes: Any) -> tuple[Path, str]:
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    data = {**yaml.safe_load(EXAMPLE.read_text()), "gateway": gateway, **changes}
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, gateway


async def test_create_list_get_delete(
    settings: Settings, kubegate: KubegateClient, tmp_path: Path
) -> None:
    path, gw = pool_file(tmp_path)
    code, output = await run_cli(settings, "ippool", "create", "-f", str(path))
    assert code == 2 and f"gateway {gw} does not exist" in output, output  # nothing started
    assert await kubegate.list_pools(gw) == []
    await kubegate.create_gateway(gw)
    code, output = await run_cli(settings, "ippool", "create", "-f", str(path))
    assert code == 0, output
    assert "100 allocatable addresses" in output

    await kubegate.allocate(gw, "lab-pool", "cluster/demo", ["vip", "cp-0"])

    code, output = await run_cli(settings, "ippool", "list", "-g", gw, "-o", "json")
    assert code == 0, output
    (row,) = json.loads(output)
    assert (row["name"], row["used"], row["free"]) == ("lab-pool", 2, 98)

    code, output = await run_cli(settings, "ippool", "get", "lab-pool", "-g", gw)
    assert code == 0, output
    assert "cluster/demo" in output and "10.10.0.100" in output and "2 used, 98 free" in output

    code, output = await run_cli(settings, "ippool", "get", "lab-pool", "-g", gw, "-o", "json")
    data = json.loads(output)
    assert {a["slot"] for a in data["allocations"]} == {"vip", "cp-0"}
    # without -g: the one gateway that has a pool of that name (as `list` shows them all)
    code, output = await run_cli(settings, "ippool", "get", "lab-pool", "-o", "json")
    assert code == 0 and json.loads(output)["gateway"] == gw, output

    code, output = await run_cli(settings, "ippool", "delete", "lab-pool", "-g", gw)
    assert code == 2
    assert "held by cluster/demo" in output

    await kubegate.release(gw, "lab-pool", "cluster/demo")
    code, output = await run_cli(settings, "ippool", "delete", "lab-pool", "-g", gw)
    assert code == 0, output
    code, output = await run_cli(settings, "ippool", "get", "lab-pool", "-g", gw)
    assert code == 2 and "does not exist" in output


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"first": "10.10.0.250", "last": "10.10.0.20"}, "is after last"),
        ({"network_gateway": "10.99.0.1"}, "network_gateway 10.99.0.1 is outside"),
        ({"kind": "cidr"}, "kind: Input should be 'range' or 'subnet'"),
        ({"nameservers": ["not-an-ip"]}, "nameservers"),
        ({"restrict_to_single_cluster": "sometimes"}, "restrict_to_single_cluster"),
    ],
)
async def test_bad_pool_files_exit_2_naming_the_field(
    settings: Settings, tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    path, _ = pool_file(tmp_path, **changes)
    code, output = await run_cli(settings, "ippool", "create", "-f", str(path))
    assert code == 2, output
    assert expected in output


async def test_overlap_is_refused_with_both_ranges(
    settings: Settings, kubegate: KubegateClient, tmp_path: Path
) -> None:
    path, gw = pool_file(tmp_path)
    await kubegate.create_gateway(gw)
    assert (await run_cli(settings, "ippool", "create", "-f", str(path)))[0] == 0
    other = tmp_path / "other.yaml"
    data = yaml.safe_load(path.read_text()) | {
        "name": "other",
        "first": "10.10.0.150",
        "last": "10.10.0.160",
    }
    other.write_text(yaml.safe_dump(data))
    code, output = await run_cli(settings, "ippool", "create", "-f", str(other))
    assert code == 2
    assert "overlaps pool lab-pool (10.10.0.100-10.10.0.199)" in output
