"""Gateway groundwork: pairing codes, installer property rules, resize rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from domain.gateway import (
    GATEWAY_SIZES,
    PAIRING_CODE_LENGTH,
    InstallerProperties,
    PairingState,
    can_resize,
    new_pairing_code,
    normalize_pairing_code,
    pairing_hash,
    pairing_matches,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def props(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "installer_name": "pcg-lab",
        "console_endpoint": "https://kubegate.example.com",
        "pairing_code": "ABCD-EFGH-23",
    }
    base.update(changes)
    return base


def errors_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        InstallerProperties.model_validate(data)
    return str(info.value)


def test_codes_are_random_readable_and_kept_only_as_a_salted_hash() -> None:
    codes = {new_pairing_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(len(c) == PAIRING_CODE_LENGTH and not set(c) & set("01OIL") for c in codes)
    code = new_pairing_code()
    digest = pairing_hash(code, "salt-1")
    assert code not in digest and digest != pairing_hash(code, "salt-2")
    spaced = f"{code[:4].lower()}-{code[4:]}"
    assert normalize_pairing_code(spaced) == code
    assert pairing_matches(spaced, "salt-1", digest)
    assert not pairing_matches(new_pairing_code(), "salt-1", digest)


def test_a_code_is_single_use_and_expires() -> None:
    code = new_pairing_code()
    state = PairingState(
        code_hash=pairing_hash(code, "s"), salt="s", expires_at=NOW + timedelta(hours=1)
    )
    assert state.check(code, NOW) is None
    wrong = ("Y" if code[0] == "X" else "X") + code[1:]  # (a random code may start with X)
    assert "wrong pairing code" in (state.check(wrong, NOW) or "")
    assert "expired" in (state.check(code, NOW + timedelta(hours=2)) or "")
    assert "already used" in (state.model_copy(update={"used": True}).check(code, NOW) or "")


def test_valid_installer_properties_and_their_ovf_keys() -> None:
    installer = InstallerProperties.model_validate(
        props(
            pod_cidr="192.168.0.0/16",
            service_cidr="10.96.0.0/12",
            node_network="10.10.0.0/24",
            http_proxy="http://proxy.lab:3128",
            https_proxy="http://proxy.lab:3128",
            no_proxy="vcenter.lab,10.10.0.0/24,.lab",
        )
    )
    assert installer.pairing_code == "ABCDEFGH23"
    ovf = installer.ovf_properties()
    assert ovf["kubegate.console_endpoint"] == "https://kubegate.example.com"
    assert ovf["kubegate.ssh_public_key"] == ""


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"console_endpoint": "https://kubegate.example.com/"}, "must not end with a slash"),
        ({"console_endpoint": "kubegate.example.com"}, "console_endpoint"),
        ({"pairing_code": "12"}, "pairing_code"),
        ({"installer_name": "PCG_1"}, "installer_name"),
        ({"http_proxy": "http://p:3128"}, "https_proxy, no_proxy: required with http_proxy"),
        (
            {"http_proxy": "http://p:3128", "https_proxy": "http://p:3128"},
            "no_proxy: required",
        ),
        ({"pod_cidr": "10.0.0.0/8", "service_cidr": "10.96.0.0/12"}, "service_cidr: 10.96.0.0/12"),
        ({"pod_cidr": "10.10.0.0/16", "node_network": "10.10.5.0/24"}, "node_network"),
        ({"pod_cidr": "10.10.0.1/16"}, "pod_cidr: '10.10.0.1/16' is not a network"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_installer_property_rules_name_the_field(changes: dict[str, Any], message: str) -> None:
    assert message in errors_of(props(**changes))


def test_sizes_and_resize_rules() -> None:
    assert (GATEWAY_SIZES[1].vcpus, GATEWAY_SIZES[3].memory_gb) == (2, 12)
    assert can_resize(1, 3) is None
    assert "lose quorum" in (can_resize(3, 1) or "")
    assert "already has" in (can_resize(3, 3) or "")
