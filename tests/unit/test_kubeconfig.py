"""Kubeconfig pieces: the admin group per Kubernetes release, the request's bounds, the
client certificate and the file (the minting itself is tested on the agent, end to end)."""

from __future__ import annotations

import base64
import dataclasses
from datetime import timedelta

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.bootstrap import BootstrapActivities
from activities.guard import kubeconfig_problem
from domain.bootstrap import SecretsRequest
from domain.certs import client_certificate, self_signed
from domain.kubeconfig import (
    MAX_TTL_SECONDS,
    KubeconfigRequest,
    MintKubeconfig,
    admin_groups,
    issued_statement,
    kubeconfig_binding,
    kubeconfig_file,
    kubeconfig_statement,
)
from domain.sealing import AgentKey, seal, verify_signature
from domain.trust import AgentPolicy


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
    ok = {
        "user": "alice@example.com",
        "ttl_seconds": 3600,
        "recipient_key": key,
        "operator_key": key,
        "signature": "",
    }
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


def test_the_agent_mints_only_for_the_clusters_own_workflow_and_within_bounds() -> None:
    key = AgentKey.generate()
    own = ActivityEnvironment()
    own.info = dataclasses.replace(own.info, workflow_id="cluster/demo")
    acts = BootstrapActivities(key)
    secrets = own.run(acts.secrets, SecretsRequest(cluster="demo"))
    requester = AgentKey.generate()
    mint = {
        "cluster": "demo",
        "server": "https://10.0.0.5:6443",
        "secrets": secrets,
        "user": "alice",
        "kubernetes_version": "1.30.4",
        "ttl_seconds": 3600,
        "recipient_key": requester.public_key_b64,
        "request_id": "a" * 32,
        "operator_key": requester.signing_key_b64,
        "signature": "",
    }
    result = own.run(acts.kubeconfig, MintKubeconfig(**mint))
    assert result.issue.groups == ["kubeadm:cluster-admins"]  # the agent's choice
    text = requester.open(result.sealed, kubeconfig_binding("demo", "a" * 32))
    assert yaml.safe_load(text)["users"][0]["name"] == "alice@demo"
    # the requester checks it is the agent's: a file sealed by anyone else does not verify
    signed = issued_statement("", "demo", requester.public_key_b64, result.issue, result.sealed)
    assert verify_signature(key.signing_key_b64, signed, result.signature)
    other_file = seal(
        "apiVersion: v1", requester.public_bytes, kubeconfig_binding("demo", "a" * 32)
    )
    swapped = issued_statement("", "demo", requester.public_key_b64, result.issue, other_file)
    assert not verify_signature(key.signing_key_b64, swapped, result.signature)
    widened = result.issue.model_copy(update={"groups": ["system:masters"]})
    swapped = issued_statement("", "demo", requester.public_key_b64, widened, result.sealed)
    assert not verify_signature(key.signing_key_b64, swapped, result.signature)
    # another workflow of the gateway (a rogue control worker's) gets nothing
    other = ActivityEnvironment()
    other.info = dataclasses.replace(other.info, workflow_id="cluster/other")
    with pytest.raises(ApplicationError, match="only for that cluster"):
        other.run(acts.kubeconfig, MintKubeconfig(**{**mint, "cluster": "demo"}))
    # the bounds hold on the agent too: nothing a workflow says widens them
    for change in (
        {"ttl_seconds": 10 * 365 * 86400},
        {"user": "system:node:x"},
        {"server": "http://10.0.0.5:6443"},
    ):
        with pytest.raises(ValidationError):
            MintKubeconfig(**{**mint, **change})


def test_the_agent_mints_only_for_an_operator_its_policy_lists_signing_this_request() -> None:
    operator, recipient = AgentKey.generate(), AgentKey.generate()
    statement = kubeconfig_statement("demo", "alice", 3600, recipient.public_key_b64, "b" * 32)
    mint = MintKubeconfig(
        cluster="demo",
        server="https://10.0.0.5:6443",
        secrets=seal("{}", recipient.public_bytes, "x"),
        user="alice",
        kubernetes_version="1.30.4",
        ttl_seconds=3600,
        recipient_key=recipient.public_key_b64,
        request_id="b" * 32,
        operator_key=operator.signing_key_b64,
        signature=operator.sign(statement),
    )
    allowed = AgentPolicy(gateway="lab", operators=[operator.signing_key_b64])
    assert kubeconfig_problem(allowed, mint) is None
    stranger = AgentPolicy(gateway="lab")
    assert "may not have kubeconfigs" in (kubeconfig_problem(stranger, mint) or "")
    for forged in (
        mint.model_copy(update={"ttl_seconds": 7200}),  # longer than signed
        mint.model_copy(update={"user": "mallory"}),
        mint.model_copy(update={"recipient_key": AgentKey.generate().public_key_b64}),
    ):
        assert "not signed" in (kubeconfig_problem(allowed, forged) or "")
