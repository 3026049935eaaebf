"""Sealed secrets: X25519 key agreement + HKDF-SHA256 + AES-256-GCM (an ECIES "sealed box").

The CLI seals a password to a gateway agent's public key; only that agent, holding the
private key, can open it. Workflow histories carry the sealed form only. Not for use
inside workflows (randomness).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from domain.account import SealedSecret

_INFO = b"kubegate sealed secret v1"


class SealError(Exception):
    """A sealed secret cannot be opened: wrong key, tampered, or wrong purpose."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def key_id(public_key: bytes) -> str:
    """Short fingerprint of a raw X25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO)
    return hkdf.derive(shared)


def seal(secret: str, recipient_public_key: bytes, purpose: str) -> SealedSecret:
    """Encrypt secret to the holder of the private key; purpose binds it to one use."""
    recipient = X25519PublicKey.from_public_bytes(recipient_public_key)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = _derive(ephemeral.exchange(recipient), ephemeral_pub, recipient_public_key)
    nonce = os.urandom(12)
    kid = key_id(recipient_public_key)
    ciphertext = AESGCM(key).encrypt(nonce, secret.encode(), f"{purpose}|{kid}".encode())
    return SealedSecret(
        key_id=kid,
        ephemeral_public_key=_b64(ephemeral_pub),
        nonce=_b64(nonce),
        ciphertext=_b64(ciphertext),
    )


class AgentKey:
    """A gateway agent's key pair. The private half never leaves the agent's disk."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private = private_key
        self.public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = key_id(self.public_bytes)

    @classmethod
    def generate(cls) -> AgentKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> AgentKey:
        """Load the key at path, or create it there (mode 0600)."""
        if path.exists():
            return cls(X25519PrivateKey.from_private_bytes(base64.b64decode(path.read_text())))
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = key._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(_b64(raw))
        tmp.replace(path)
        return key

    @property
    def public_key_b64(self) -> str:
        return _b64(self.public_bytes)

    def open(self, sealed: SealedSecret, purpose: str) -> str:
        """Decrypt a secret sealed to this key for this purpose."""
        if sealed.key_id != self.key_id:
            raise SealError(
                f"secret was sealed to key {sealed.key_id}, this agent holds key {self.key_id}"
            )
        try:
            ephemeral_pub = base64.b64decode(sealed.ephemeral_public_key)
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(ephemeral_pub))
            key = _derive(shared, ephemeral_pub, self.public_bytes)
            plain = AESGCM(key).decrypt(
                base64.b64decode(sealed.nonce),
                base64.b64decode(sealed.ciphertext),
                f"{purpose}|{self.key_id}".encode(),
            )
        except (InvalidTag, ValueError) as exc:
            raise SealError("sealed secret is damaged or was sealed for another purpose") from exc
        return plain.decode()


PASSWORD_PURPOSE = "vcenter-password"
