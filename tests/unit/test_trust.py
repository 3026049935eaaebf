"""Seals bound to their use, the agent's policy, signed results, pairing proofs (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from domain.account import SealedSecret, VCenterEndpoint, password_binding
from domain.gateway import PairingState, pairing_proof, pairing_verifier
from domain.sealing import AgentKey, SealError, normalize_fingerprint, seal, verify_signature
from domain.trust import (
    AccountCheck,
    AgentAuthorization,
    AgentPolicy,
    SignedResult,
    canonical_json,
    compact_request,
    policy_for,
    result_statement,
    verified_body,
)

TP = "AB:" * 31 + "CD"
VC = VCenterEndpoint(server="vc.example.com", thumbprint=TP)


def sealed_for(
    key: AgentKey, endpoint: VCenterEndpoint = VC, account: str = "prod"
) -> SealedSecret:
    return seal("pw-1", key.public_bytes, password_binding("lab", account, endpoint, "admin"))


def test_a_seal_opens_only_for_its_exact_use() -> None:
    key = AgentKey.generate()
    sealed = sealed_for(key)
    assert key.open(sealed, password_binding("lab", "prod", VC, "admin")) == "pw-1"
    elsewhere = VCenterEndpoint(server="attacker.example.com", insecure=True)
    with pytest.raises(SealError) as caught:
        key.open(sealed, password_binding("lab", "prod", elsewhere, "admin"))
    message = str(caught.value)
    assert "server: sealed for 'vc.example.com', used for 'attacker.example.com'" in message
    assert "trust: sealed for 'thumbprint:" in message and "'insecure'" in message
    assert "pw-1" not in message
    for other in (
        password_binding("lab2", "prod", VC, "admin"),
        password_binding("lab", "dev", VC, "admin"),
        password_binding("lab", "prod", VC, "root"),
        password_binding("lab", "prod", VCenterEndpoint(server="vc.example.com:8443"), "admin"),
    ):
        with pytest.raises(SealError, match="sealed for another use"):
            key.open(sealed, other)


def test_a_binding_changed_in_transit_breaks_the_seal() -> None:
    key = AgentKey.generate()
    sealed = sealed_for(key)
    assert sealed.binding is not None
    moved = sealed.model_copy(update={"binding": sealed.binding.model_copy(update={"server": "x"})})
    with pytest.raises(SealError, match="damaged or was sealed for another use"):
        key.open(moved, moved.binding)  # type: ignore[arg-type]


def test_a_seal_without_binding_is_refused() -> None:
    key = AgentKey.generate()
    old = sealed_for(key).model_copy(update={"binding": None})
    with pytest.raises(SealError, match="without a binding"):
        key.open(old, password_binding("lab", "prod", VC, "admin"))


def test_signatures_verify_only_for_the_call_request_run_and_result_they_cover() -> None:
    key = AgentKey.generate()
    body = canonical_json({"vm": "vm-42", "power": "on"}).decode()
    statement = result_statement(
        "cluster/a", "run-1", "id-1", "vm_create", canonical_json([{"n": 1}]), body
    )
    signed = SignedResult(body=body, key_id=key.key_id, signature=key.sign(statement))
    assert verified_body(signed, key.signing_key_b64, statement) == body
    assert verified_body(signed, AgentKey.generate().signing_key_b64, statement) is None
    assert verified_body(signed, None, statement) is None
    for other in (
        result_statement(
            "cluster/b", "run-1", "id-1", "vm_create", canonical_json([{"n": 1}]), body
        ),
        result_statement(
            "cluster/a", "run-2", "id-1", "vm_create", canonical_json([{"n": 1}]), body
        ),
        result_statement(
            "cluster/a", "run-1", "id-1", "vm_destroy", canonical_json([{"n": 1}]), body
        ),
        result_statement(
            "cluster/a", "run-1", "id-1", "vm_create", canonical_json([{"n": 2}]), body
        ),
        result_statement(
            "cluster/a", "run-1", "id-1", "vm_create", canonical_json([{"n": 1}]), "{}"
        ),
        # the same request and result, answering another call (a replayed answer)
        result_statement(
            "cluster/a", "run-1", "id-2", "vm_create", canonical_json([{"n": 1}]), body
        ),
    ):
        assert verified_body(signed, key.signing_key_b64, other) is None
    assert not verify_signature(key.signing_key_b64, b"x", "not base64!")


class PowerOnBefore(BaseModel):
    """A request as the release before knows it."""

    vm: str
    wait: bool = True


class PowerOnNow(PowerOnBefore):
    """The same request after this release added a field."""

    timeout_seconds: int = 600


def _signed_by_agent(key: AgentKey, request: BaseModel, body: str, compact: bool) -> SignedResult:
    """What the agent's guard returns for `request` as it decoded it."""
    call = ("cluster/a", "run-1", "id-1", "vm_power_on")
    full = result_statement(*call, canonical_json([request]), body)
    signed = SignedResult(body=body, key_id=key.key_id, signature=key.sign(full))
    if compact:
        statement = result_statement(*call, compact_request([request]), body, compact=True)
        signed.compact_signature = key.sign(statement)
    return signed


def _accepted(key: AgentKey, signed: SignedResult, sent: BaseModel) -> bool:
    """Whether the workflow that sent `sent` takes the result (as workflows/nodes.py does)."""
    call = ("cluster/a", "run-1", "id-1", "vm_power_on")
    statement = result_statement(*call, canonical_json([sent]), signed.body)
    compact = result_statement(*call, compact_request([sent]), signed.body, compact=True)
    return verified_body(signed, key.signing_key_b64, statement, compact) is not None


def test_an_agent_of_the_release_before_is_not_refused_for_a_field_it_does_not_know() -> None:
    key = AgentKey.generate()
    body = canonical_json({"power": "on"}).decode()
    # the workflow sends a new field at its default; the older agent decodes without it
    sent = PowerOnNow(vm="vm-42")
    decoded = PowerOnBefore.model_validate(sent.model_dump(mode="json"), strict=False)
    assert _accepted(key, _signed_by_agent(key, decoded, body, compact=True), sent)
    # the full statement alone could not tell: it covers every field
    assert not _accepted(key, _signed_by_agent(key, decoded, body, compact=False), sent)
    # a new field the older agent cannot honour (set, not default) is never taken
    honoured = PowerOnNow(vm="vm-42", timeout_seconds=30)
    decoded = PowerOnBefore.model_validate(honoured.model_dump(mode="json"))
    assert not _accepted(key, _signed_by_agent(key, decoded, body, compact=True), honoured)
    # an agent from before compact signatures (0.1.0) is taken on its full statement
    assert _accepted(key, _signed_by_agent(key, sent, body, compact=False), sent)
    # and the compact signature binds the request like the full one
    other = PowerOnNow(vm="vm-43")
    assert not _accepted(key, _signed_by_agent(key, sent, body, compact=True), other)


def test_the_fingerprint_covers_both_keys_and_is_stable() -> None:
    key = AgentKey.generate()
    assert len(key.fingerprint) == 39 and key.fingerprint.count(":") == 7
    assert normalize_fingerprint(key.fingerprint.replace(":", "").upper()) == key.fingerprint
    assert AgentKey.generate().fingerprint != key.fingerprint


def test_the_policy_allows_only_its_vcenters_with_their_trust() -> None:
    policy = policy_for("lab", VC)
    assert policy.endpoint_problem(VC) is None
    assert "not a vCenter" in (policy.endpoint_problem(VCenterEndpoint(server="evil")) or "")
    other_tp = VCenterEndpoint(server="vc.example.com", thumbprint="EF:" * 31 + "01")
    assert "trusts it as thumbprint" in (policy.endpoint_problem(other_tp) or "")
    insecure = VCenterEndpoint(server="vc.example.com", insecure=True)
    assert "insecure" in (policy.endpoint_problem(insecure) or "")
    assert "not a vCenter" in (
        policy.endpoint_problem(VCenterEndpoint(server="vc.example.com:444", thumbprint=TP)) or ""
    )
    scoped = policy.model_copy(update={"datacenters": ["DC0"], "folders": ["kubegate"]})
    assert scoped.datacenter_problem("DC0") is None and scoped.datacenter_problem("DC1")
    assert scoped.folder_problem("kubegate/demo") is None
    assert scoped.folder_problem("kubegate-other") and scoped.folder_problem("")


def test_a_policy_names_the_field_it_refuses() -> None:
    with pytest.raises(ValidationError, match="thumbprint: required"):
        AgentPolicy.model_validate({"gateway": "lab", "vcenters": [{"server": "vc"}]})
    with pytest.raises(ValidationError, match="allow_insecure is false"):
        AgentPolicy.model_validate(
            {"gateway": "lab", "vcenters": [{"server": "vc", "trust": "insecure"}]}
        )
    with pytest.raises(ValidationError, match="Extra inputs"):
        AgentPolicy.model_validate({"gateway": "lab", "allow_everything": True})


def test_credentials_are_live_only_as_the_gateway_holds_them() -> None:
    auth = AgentAuthorization(
        gateway="lab",
        status="Running",
        accounts={"prod": "d1"},
        checking=[AccountCheck(workflow_id="preflight/x", account="new", digest="d2")],
    )
    assert auth.credentials_problem("cluster/a", "prod", "d1") is None
    assert "rotated" in (auth.credentials_problem("cluster/a", "prod", "old") or "")
    assert "not a live account" in (auth.credentials_problem("cluster/a", "gone", "d1") or "")
    assert auth.credentials_problem("preflight/x", "new", "d2") is None
    assert auth.credentials_problem("preflight/y", "new", "d2") is not None


def test_pairing_keeps_no_code_counts_wrong_ones_and_locks_out() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    state = PairingState(
        salt="s1",
        verifier=pairing_verifier(pairing_proof("ABCDEFGHJK", "s1")),
        expires_at=now + timedelta(hours=24),
    )
    assert "ABCDEFGHJK" not in state.model_dump_json()
    proof = pairing_proof("abcde-fghjk", "s1")
    assert state.proof_matches(proof) and not state.proof_matches(state.verifier)
    for _ in range(5):
        state.count_failure(now)
    assert "locked until" in (state.usable(now) or "")
    assert state.usable(now + timedelta(minutes=1, seconds=1)) is None
    for _ in range(5):
        state.count_failure(now)
    assert state.locked_until == now + timedelta(minutes=2)


def old_seal(secret: str, key: AgentKey, purpose: str) -> SealedSecret:
    """A seal as the previous release made it: purpose and key id as associated data."""
    import base64
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from domain.sealing import _derive

    ephemeral = X25519PrivateKey.generate()
    pub = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    aes = _derive(ephemeral.exchange(X25519PublicKeyOf(key)), pub, key.public_bytes)
    nonce = os.urandom(12)
    sealed = AESGCM(aes).encrypt(nonce, secret.encode(), f"{purpose}|{key.key_id}".encode())
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return SealedSecret(
        key_id=key.key_id, ephemeral_public_key=b64(pub), nonce=b64(nonce), ciphertext=b64(sealed)
    )


def X25519PublicKeyOf(key: AgentKey) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(key.public_bytes)


def test_cluster_secrets_sealed_before_bindings_still_open_as_legacy() -> None:
    from domain.account import SealBinding

    key = AgentKey.generate()
    old = old_seal('{"a": 1}', key, "kubegate/cluster-secrets")
    use = SealBinding(purpose="kubegate/cluster-secrets", gateway="lab", cluster="cluster/a")
    with pytest.raises(SealError, match="without a binding"):
        key.open(old, use)  # a password would be refused
    assert key.open(old, use, legacy=True) == '{"a": 1}'
    with pytest.raises(SealError):
        key.open(old, use.model_copy(update={"purpose": "vcenter-password"}), legacy=True)
