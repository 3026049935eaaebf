"""Kubeconfig pieces: the admin group per Kubernetes release, the request's bounds, the
client certificate and the file (the minting itself is tested on the agent, end to end)."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from domain.certs import client_certificate, self_signed
from domain.kubeconfig import (
    MAX_TTL_SECONDS,
    KubeconfigRequest,
    admin_groups,
    kubeconfig_file,
)
from domain.sealing import AgentKey


@pytest.mark.parametrize(
    ("version", "groups"),
    [
        ("1.30.4", ["kubeadm:cluster-admins"]),
        ("v1.29.0", ["kubeadm:cluster-admins"]),
        ("1.28.9", ["system:masters"]),
        ("", ["kubeadm:cluster-admins"]),
    ],
)
def test_the_admin_group_follows_kubeadm(version: str, groups: list[str]) -> None:
    assert admin_groups(version) == groups


def test_a_request_names_a_plain_user_and_a_bounded_lifetime() -> None:
    key = AgentKey.generate().public_key_b64
    ok = {"user": "alice@example.com", "ttl_seconds": 3600, "recipient_key": key}
    KubeconfigRequest(**ok, request_id="0" * 32)
    for bad in (
        {"user": "$(reboot)"},
        {"user": "a" * 65},
        {"ttl_seconds": 60},
        {"ttl_seconds": MAX_TTL_SECONDS + 1},
        {"recipient_key": "not a key"},
    ):
        with pytest.raises(ValidationError):
            KubeconfigRequest(**{**ok, **bad}, request_id="0" * 32)


def test_the_certificate_chains_to_the_ca_and_the_file_embeds_all() -> None:
    ca_pem, ca_key = self_signed("kubernetes", timedelta(days=1), ca=True)
    cert_pem, key_pem, cert = client_certificate(
        ca_pem, ca_key, "bob", ["kubeadm:cluster-admins"], timedelta(hours=1)
    )
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bob"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    document = yaml.safe_load(
        kubeconfig_file("c1", "https://10.0.0.5:6443", ca_pem, "bob", cert_pem, key_pem)
    )
    assert document["current-context"] == "bob@c1"
    user = document["users"][0]["user"]
    assert base64.b64decode(user["client-key-data"]).decode() == key_pem
    cluster = document["clusters"][0]["cluster"]
    assert cluster["server"] == "https://10.0.0.5:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]).decode() == ca_pem
