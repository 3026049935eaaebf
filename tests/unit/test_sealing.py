"""Sealed secrets open only with the right key and purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.sealing import AgentKey, SealError, seal


def test_round_trip_and_no_plaintext_in_sealed_form() -> None:
    key = AgentKey.generate()
    sealed = seal("s3cret-pässword", key.public_bytes, "vcenter-password")
    assert "s3cret" not in sealed.model_dump_json()
    assert key.open(sealed, "vcenter-password") == "s3cret-pässword"


def test_other_key_cannot_open() -> None:
    sealed = seal("pw", AgentKey.generate().public_bytes, "vcenter-password")
    with pytest.raises(SealError, match="sealed to key"):
        AgentKey.generate().open(sealed, "vcenter-password")


def test_other_purpose_cannot_open() -> None:
    key = AgentKey.generate()
    sealed = seal("pw", key.public_bytes, "vcenter-password")
    with pytest.raises(SealError):
        key.open(sealed, "something-else")


def test_tampered_ciphertext_is_refused() -> None:
    key = AgentKey.generate()
    sealed = seal("pw", key.public_bytes, "vcenter-password")
    broken = sealed.model_copy(update={"ciphertext": sealed.ciphertext[:-4] + "AAA="})
    with pytest.raises(SealError):
        key.open(broken, "vcenter-password")


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "agents" / "g" / "agent.key"
    first = AgentKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert AgentKey.load_or_create(path).key_id == first.key_id
