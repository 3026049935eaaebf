"""Payloads encrypted at rest: the data converter of every kubegate client and worker.

Keys come from KUBEGATE_CODEC_KEY_FILE (one `KEY_ID BASE64KEY` a line, `#` comments) or
KUBEGATE_CODEC_KEYS (`KEY_ID:BASE64KEY,...`); without either, from <home>/codec.key if it
exists (`kubegate dev up` creates it). Each key is 32 random bytes (AES-256-GCM). The last key
encrypts, every key decrypts: to rotate, append a new key and restart clients and workers.
Without any key nothing is encrypted (as before).

An encrypted payload is `binary/encrypted` with its key id in the metadata; its data is a
nonce and the sealed original payload. Payloads the codec did not encrypt pass through
`decode` untouched, so histories written before a key was set stay readable.

Summaries and details (of workflows, child workflows and activities) and the answer of the
workflow metadata query (current details, shown by the Web UI) are marked readable and never
encrypted: the UI shows them without the codec server. They must hold no secret.
Search attributes never pass through a codec. Failure messages and stack traces stay in
clear too (the SDK's default); only failure details are encrypted.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import temporalio.client
import temporalio.worker
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter, PayloadCodec

from plumbing.settings import Settings

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
#: metadata of a payload that stays in clear (a summary, details): the codec leaves it alone
READABLE = "kubegate-readable"
METADATA_QUERY = "__temporal_workflow_metadata"

_KEY_ID_RULE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NONCE = 12


log = logging.getLogger("kubegate.codec")


class CodecKeyError(ValueError):
    """The codec keys are misconfigured; the message names the source and the rule."""


class PayloadDecryptError(ValueError):
    """An encrypted payload cannot be decrypted (unknown key, wrong key or altered)."""


@dataclass(frozen=True)
class CodecKey:
    key_id: str
    key: bytes = b""

    def __repr__(self) -> str:  # never print the key
        return f"CodecKey({self.key_id!r})"


def _key(key_id: str, encoded: str, where: str) -> CodecKey:
    if not _KEY_ID_RULE.fullmatch(key_id):
        raise CodecKeyError(f"{where}: key id {key_id!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise CodecKeyError(f"{where}: key {key_id!r} is not valid base64") from None
    if len(key) != 32:
        raise CodecKeyError(f"{where}: key {key_id!r} must be 32 bytes (AES-256), is {len(key)}")
    return CodecKey(key_id, key)


def _unique(keys: list[CodecKey], source: str) -> list[CodecKey]:
    seen = [k.key_id for k in keys]
    if duplicate := sorted({i for i in seen if seen.count(i) > 1}):
        raise CodecKeyError(f"{source}: key id(s) {', '.join(duplicate)} given twice")
    return keys


def parse_key_file(text: str, source: str) -> list[CodecKey]:
    """Keys of a key file: `KEY_ID BASE64KEY` a line, blank lines and `#` comments ignored."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CodecKeyError(f"{source}:{number}: want 'KEY_ID BASE64KEY'")
        keys.append(_key(parts[0], parts[1], f"{source}:{number}"))
    return _unique(keys, source)


def parse_key_list(text: str, source: str = "KUBEGATE_CODEC_KEYS") -> list[CodecKey]:
    """Keys given inline: `KEY_ID:BASE64KEY,...`."""
    keys = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        key_id, sep, encoded = item.partition(":")
        if not sep:
            raise CodecKeyError(f"{source}: want 'KEY_ID:BASE64KEY,...'")
        keys.append(_key(key_id.strip(), encoded.strip(), source))
    return _unique(keys, source)


def key_file(settings: Settings) -> Path | None:
    """The key file in use: KUBEGATE_CODEC_KEY_FILE, else <home>/codec.key if it exists."""
    if settings.codec_key_file is not None:
        return settings.codec_key_file
    default = settings.default_codec_key_file
    return default if default.exists() else None


def load_keys(settings: Settings) -> list[CodecKey]:
    """The configured keys, oldest first (the last encrypts); [] when none is configured."""
    if settings.codec_keys and settings.codec_key_file is not None:
        raise CodecKeyError("set KUBEGATE_CODEC_KEYS or KUBEGATE_CODEC_KEY_FILE, not both")
    if settings.codec_keys:
        keys = parse_key_list(settings.codec_keys)
        source = "KUBEGATE_CODEC_KEYS"
    else:
        path = key_file(settings)
        if path is None:
            return []
        try:
            text = path.read_text()
        except OSError as exc:
            raise CodecKeyError(f"KUBEGATE_CODEC_KEY_FILE {path}: {exc.strerror}") from None
        keys = parse_key_file(text, str(path))
        source = str(path)
    if not keys:
        raise CodecKeyError(f"{source}: holds no key")
    return keys


def new_key_line() -> str:
    """A fresh key as a key file line: an id from today's date, 32 random bytes."""
    key_id = f"{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
    return f"{key_id} {base64.b64encode(os.urandom(32)).decode()}\n"


def create_key_file(path: Path) -> bool:
    """Create a key file with one new key (mode 0600) unless it exists; True if created."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write("# kubegate payload keys: KEY_ID BASE64KEY; the last one encrypts\n")
        handle.write(new_key_line())
    return True


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM with several keys: the last encrypts, any decrypts (by the key id)."""

    def __init__(self, keys: Sequence[CodecKey], strict: bool = True) -> None:
        self.keys = {k.key_id: AESGCM(k.key) for k in keys}
        self.current = keys[-1].key_id if keys else None
        #: False on workers: a payload that cannot be decrypted is passed on as it is (the
        #: workflow then refuses it) instead of failing the workflow task again and again
        self.strict = strict

    def encode_payloads(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._encrypt(p) for p in payloads]

    def decode_payloads(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decrypt(p) for p in payloads]

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return self.encode_payloads(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return self.decode_payloads(payloads)

    def _encrypt(self, payload: Payload) -> Payload:
        if self.current is None or READABLE in payload.metadata:
            return payload
        if payload.metadata.get("encoding") == ENCODING:
            return payload  # encrypted already
        nonce = os.urandom(_NONCE)
        sealed = self.keys[self.current].encrypt(
            nonce, payload.SerializeToString(), self.current.encode()
        )
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: self.current.encode()},
            data=nonce + sealed,
        )

    def _decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # not ours to open: written in clear
        try:
            return self._open(payload)
        except PayloadDecryptError as exc:
            if self.strict:
                raise
            log.warning("left a payload encrypted: %s", exc)
            return payload

    def _open(self, payload: Payload) -> Payload:
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        aead = self.keys.get(key_id)
        if aead is None:
            known = ", ".join(self.keys) or "none"
            raise PayloadDecryptError(
                f"payload encrypted with key {key_id!r}, which is not configured (keys: "
                f"{known}); add it to KUBEGATE_CODEC_KEY_FILE"
            )
        try:
            plain = aead.decrypt(payload.data[:_NONCE], payload.data[_NONCE:], key_id.encode())
        except InvalidTag:
            raise PayloadDecryptError(
                f"payload encrypted with key {key_id!r} cannot be decrypted: the configured "
                "key of that id is another, or the payload was altered"
            ) from None
        decoded = Payload()
        try:
            decoded.ParseFromString(plain)
        except Exception:
            raise PayloadDecryptError(f"payload under key {key_id!r} holds no payload") from None
        return decoded


# -- readable summaries ----------------------------------------------------------------------


class ReadableText(str):
    """A summary or details text that stays in clear (never a secret)."""

    __kubegate_readable__ = True

    def plain(self) -> str:
        return str.__str__(self)


@dataclass(frozen=True)
class Readable:
    """A value converted as usual, then left in clear by the codec (never a secret)."""

    value: Any
    __kubegate_readable__ = True

    def plain(self) -> Any:
        return self.value


class KubegatePayloadConverter(PydanticPayloadConverter):
    """Pydantic JSON; values marked readable get the metadata the codec leaves alone.

    A model's fields at their defaults are left out of its payload: the reader fills them in
    again, and a reader of the release before never sees a field it does not know unless
    the field is set (then a request to an agent is refused as a whole, see
    domain/requests.py). Histories get shorter too."""

    def to_payloads(self, values: Sequence[Any]) -> list[Payload]:
        # duck-typed: the workflow sandbox may hold its own copy of the marker classes
        marked = [getattr(v, "__kubegate_readable__", False) is True for v in values]
        plain = [
            v.plain() if m else _without_defaults(v) for v, m in zip(values, marked, strict=True)
        ]
        payloads = super().to_payloads(plain)
        for payload, readable in zip(payloads, marked, strict=True):
            if readable:
                payload.metadata[READABLE] = b"true"
        return payloads


def _without_defaults(value: Any) -> Any:
    """A model as JSON data without its fields at their defaults; anything else as it is."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    return value


def _readable(text: str | None) -> str | None:
    return None if text is None else ReadableText(text)


class _ClientOutbound(temporalio.client.OutboundInterceptor):
    async def start_workflow(
        self, input: temporalio.client.StartWorkflowInput
    ) -> temporalio.client.WorkflowHandle[Any, Any]:
        input.static_summary = _readable(input.static_summary)
        input.static_details = _readable(input.static_details)
        return await super().start_workflow(input)


class _WorkflowOutbound(temporalio.worker.WorkflowOutboundInterceptor):
    def start_activity(
        self, input: temporalio.worker.StartActivityInput
    ) -> Any:  # an ActivityHandle
        input.summary = _readable(input.summary)
        return super().start_activity(input)

    def start_local_activity(self, input: temporalio.worker.StartLocalActivityInput) -> Any:
        input.summary = _readable(input.summary)
        return super().start_local_activity(input)

    async def start_child_workflow(self, input: temporalio.worker.StartChildWorkflowInput) -> Any:
        input.static_summary = _readable(input.static_summary)
        input.static_details = _readable(input.static_details)
        return await super().start_child_workflow(input)


class _WorkflowInbound(temporalio.worker.WorkflowInboundInterceptor):
    def init(self, outbound: temporalio.worker.WorkflowOutboundInterceptor) -> None:
        super().init(_WorkflowOutbound(outbound))

    async def handle_query(self, input: temporalio.worker.HandleQueryInput) -> Any:
        result = await super().handle_query(input)
        return Readable(result) if input.query == METADATA_QUERY else result


class ReadableMetadata(temporalio.client.Interceptor, temporalio.worker.Interceptor):
    """Marks summaries, details and the metadata query's answer readable (client and
    workers: a worker takes it from its client)."""

    def intercept_client(
        self, next: temporalio.client.OutboundInterceptor
    ) -> temporalio.client.OutboundInterceptor:
        return _ClientOutbound(next)

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[temporalio.worker.WorkflowInboundInterceptor]:
        return _WorkflowInbound


def data_converter(keys: Sequence[CodecKey] = (), strict: bool = True) -> DataConverter:
    """Pydantic JSON, encrypted with `keys` (none: in clear); `strict=False` for workers."""
    return DataConverter(
        payload_converter_class=KubegatePayloadConverter,
        payload_codec=EncryptionCodec(keys, strict=strict),
    )


def settings_data_converter(settings: Settings, strict: bool = True) -> DataConverter:
    """The data converter for the keys the settings configure."""
    return data_converter(load_keys(settings), strict=strict)
