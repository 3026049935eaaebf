"""Sealed secrets (X25519 + HKDF-SHA256 + AES-256-GCM, an ECIES "sealed box") and the
agent's signatures (Ed25519).

The CLI seals a password to a gateway agent's public key, bound to one use (`SealBinding`:
gateway, account, vCenter server, port, user, trust); only that agent, holding the private
key, can open it, and only for that use. Workflow histories carry the sealed form only.
The agent signs the results workflows act on; `verify_signature` is deterministic and is
what workflows call. Sealing and signing are not for use inside workflows (randomness, keys).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from domain.account import PASSWORD_PURPOSE, SealBinding, SealedSecret, VCenterEndpoint


class AgentPolicyLike(Protocol):
    """What opening a password asks of the agent's policy."""

    def endpoint_problem(self, endpoint: VCenterEndpoint, /) -> str | None: ...


_INFO = b"kubegate sealed secret v1"
_SIGNING_INFO = b"kubegate agent signing key v1"


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


def _binding(use: SealBinding | str) -> SealBinding:
    return use if isinstance(use, SealBinding) else SealBinding(purpose=use)


def seal(secret: str, recipient_public_key: bytes, use: SealBinding | str) -> SealedSecret:
    """Encrypt secret to the holder of the private key, for exactly one use."""
    binding = _binding(use)
    recipient = X25519PublicKey.from_public_bytes(recipient_public_key)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = _derive(ephemeral.exchange(recipient), ephemeral_pub, recipient_public_key)
    nonce = os.urandom(12)
    kid = key_id(recipient_public_key)
    ciphertext = AESGCM(key).encrypt(nonce, secret.encode(), binding.associated_data(kid))
    return SealedSecret(
        key_id=kid,
        ephemeral_public_key=_b64(ephemeral_pub),
        nonce=_b64(nonce),
        ciphertext=_b64(ciphertext),
        binding=binding,
    )


def fingerprint(public_key: bytes, signing_key: bytes) -> str:
    """What an operator compares and approves: SHA-256 over both public keys, in groups."""
    digest = hashlib.sha256(b"kubegate-agent|" + public_key + signing_key).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, len(digest), 4))


def normalize_fingerprint(value: str) -> str:
    """Lower-case groups of four; accepts it typed with or without separators."""
    raw = "".join(ch for ch in value.lower() if ch in "0123456789abcdef")
    return ":".join(raw[i : i + 4] for i in range(0, len(raw), 4))


def verify_signature(signing_key_b64: str, data: bytes, signature_b64: str) -> bool:
    """True when signature is the agent's Ed25519 signature of data (deterministic)."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signing_key_b64))
        public.verify(base64.b64decode(signature_b64), data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class AgentKey:
    """A gateway agent's key pair. The private half never leaves the agent's disk."""

    def __init__(self, private_key: X25519PrivateKey, gateway: str = "") -> None:
        self._private = private_key
        #: the gateway this agent serves (its seals name it)
        self.gateway = gateway
        #: the agent's local policy, when it runs as an agent (see activities/guard.py)
        self.policy: Callable[[], AgentPolicyLike] | None = None
        #: keys this one replaced (gateway rekey): they only open what was sealed to them
        self.retired: dict[str, AgentKey] = {}
        self.public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = key_id(self.public_bytes)
        # the signing key is derived from the same secret: one file to keep, one to approve
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SIGNING_INFO).derive(
            private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
        self._signer = Ed25519PrivateKey.from_private_bytes(seed)
        self.signing_bytes = self._signer.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.fingerprint = fingerprint(self.public_bytes, self.signing_bytes)

    @classmethod
    def generate(cls) -> AgentKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> AgentKey:
        """Load the key at path, or create it there (mode 0600). Keys it replaced (files
        `<path>.retired-<key id>` beside it) still open what was sealed to them."""
        if path.exists():
            key = cls.load(path)
        else:
            key = cls.generate()
            key.save(path)
        for retired in sorted(path.parent.glob(path.name + ".retired-*")):
            old = cls.load(retired)
            key.retired[old.key_id] = old
        return key

    @classmethod
    def load(cls, path: Path) -> AgentKey:
        return cls(X25519PrivateKey.from_private_bytes(base64.b64decode(path.read_text())))

    def save(self, path: Path) -> None:
        """Write the private key to path (mode 0600, atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        raw = self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(_b64(raw))
        tmp.replace(path)

    @property
    def public_key_b64(self) -> str:
        return _b64(self.public_bytes)

    @property
    def signing_key_b64(self) -> str:
        return _b64(self.signing_bytes)

    def sign(self, data: bytes) -> str:
        """This agent's Ed25519 signature of data, base64."""
        return _b64(self._signer.sign(data))

    def open(self, sealed: SealedSecret, use: SealBinding | str, *, legacy: bool = False) -> str:
        """Decrypt a secret sealed to this key, only for the use it was sealed for.

        `legacy` also opens a seal made before bindings (bound to the purpose only): for
        cluster secrets, which only the agent itself ever sealed.
        """
        wanted = _binding(use)
        if sealed.key_id in self.retired:
            return self.retired[sealed.key_id].open(sealed, wanted, legacy=legacy)
        if sealed.key_id != self.key_id:
            raise SealError(
                f"secret was sealed to key {sealed.key_id}, this agent holds key {self.key_id}"
            )
        if sealed.binding is None and not legacy:
            raise SealError("sealed without a binding by an older kubegate: seal it again")
        mismatch = sealed.binding.differences(wanted) if sealed.binding is not None else []
        if mismatch:
            raise SealError("sealed for another use (" + "; ".join(mismatch) + ")")
        associated = (
            wanted.associated_data(self.key_id)
            if sealed.binding is not None
            else f"{wanted.purpose}|{self.key_id}".encode()
        )
        try:
            ephemeral_pub = base64.b64decode(sealed.ephemeral_public_key)
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(ephemeral_pub))
            key = _derive(shared, ephemeral_pub, self.public_bytes)
            plain = AESGCM(key).decrypt(
                base64.b64decode(sealed.nonce),
                base64.b64decode(sealed.ciphertext),
                associated,
            )
        except (InvalidTag, ValueError) as exc:
            raise SealError("sealed secret is damaged or was sealed for another use") from exc
        return plain.decode()


__all__ = [
    "PASSWORD_PURPOSE",
    "AgentKey",
    "SealError",
    "fingerprint",
    "key_id",
    "normalize_fingerprint",
    "seal",
    "verify_signature",
]
