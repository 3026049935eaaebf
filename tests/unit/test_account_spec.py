"""Cloud account and placement specs: every rule names its field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from domain.account import CloudAccountSpec, Placement, VCenterEndpoint, normalize_thumbprint

GOOD: dict[str, Any] = {
    "name": "dev",
    "gateway": "local",
    "vcenter": {
        "server": "vc.example.com",
        "username": "kubegate@vsphere.local",
        "password_env": "VC_PASSWORD",
    },
    "placement": {
        "datacenter": "DC0",
        "compute_cluster": "C0",
        "datastore": "ds",
        "network": "VM Network",
    },
}


def errors_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        CloudAccountSpec.model_validate(data)
    return {".".join(map(str, e["loc"])): e["msg"] for e in info.value.errors()}


def with_vcenter(**changes: Any) -> dict[str, Any]:
    return {**GOOD, "vcenter": {**GOOD["vcenter"], **changes}}


def test_good_spec_parses_with_defaults() -> None:
    spec = CloudAccountSpec.model_validate(GOOD)
    assert spec.vcenter.port == 443
    assert spec.placement is not None
    assert spec.placement.resource_pool == "Resources"
    assert spec.placement.inventory_paths()["folder"] == "/DC0/vm"


@pytest.mark.parametrize(
    ("server", "host", "port"),
    [
        ("https://vc.example.com/", "vc.example.com", 443),
        ("https://vc.example.com/sdk", "vc.example.com", 443),
        ("vc.example.com:8443", "vc.example.com", 8443),
        (" 10.0.0.5 ", "10.0.0.5", 443),
        ("fd00::10", "fd00::10", 443),
        ("[fd00::10]:8443", "fd00::10", 8443),
        ("https://[fd00::10]/", "fd00::10", 443),
    ],
)
def test_server_is_normalised(server: str, host: str, port: int) -> None:
    endpoint = VCenterEndpoint(server=server)
    assert (endpoint.server, endpoint.port) == (host, port)


def test_name_must_be_a_dns_label() -> None:
    assert "name" in errors_of({**GOOD, "name": "Not_A_Label"})


def test_unknown_field_is_refused_with_its_path() -> None:
    assert "vcenter.passwd" in errors_of(with_vcenter(passwd="x"))


def test_thumbprint_must_be_sha256_or_sha1() -> None:
    found = errors_of(with_vcenter(thumbprint="not-hex"))
    assert "SHA-256" in found["vcenter.thumbprint"]


def test_thumbprint_and_insecure_exclude_each_other() -> None:
    found = errors_of(with_vcenter(thumbprint="ab" * 32, insecure=True))
    assert "exclude each other" in found["vcenter"]


def test_only_one_password_source() -> None:
    found = errors_of(with_vcenter(password="x"))
    assert "password_env" in found["vcenter"]


def test_thumbprint_normalised_to_colon_hex() -> None:
    assert normalize_thumbprint("ab" * 32) == ":".join(["AB"] * 32)
    assert normalize_thumbprint(":".join(["ab"] * 20)) == ":".join(["AB"] * 20)


def test_nested_pool_and_template_paths() -> None:
    placement = Placement(
        datacenter="DC0",
        compute_cluster="C0",
        resource_pool="team/a",
        datastore="ds",
        network="net",
        folder="/k8s/",
        template="t/ubuntu",
    )
    paths = placement.inventory_paths()
    assert paths["resource_pool"] == "/DC0/host/C0/Resources/team/a"
    assert paths["folder"] == "/DC0/vm/k8s"
    assert paths["template"] == "/DC0/vm/t/ubuntu"


def test_empty_datastore_is_refused() -> None:
    data = {**GOOD, "placement": {**GOOD["placement"], "datastore": " / "}}
    assert "placement.datastore" in errors_of(data)
