"""The payload codec (AES-256-GCM, key ids, rotation), its keys, readable summaries and the
codec server's HTTP protocol."""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio.api.common.v1 import Payload, Payloads

from plumbing.codec import (
    ENCODING,
    KEY_ID,
    READABLE,
    CodecKey,
    CodecKeyError,
    EncryptionCodec,
    PayloadDecryptError,
    Readable,
    ReadableText,
    create_key_file,
    data_converter,
    load_keys,
    parse_key_file,
    parse_key_list,
)
from plumbing.settings import Settings
from starters.codec_server import CodecServer

OLD = CodecKey("old", os.urandom(32))
NEW = CodecKey("new", os.urandom(32))
SECRET = b'{"password": "hunter2-not-in-clear"}'


def clear(data: bytes = SECRET) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=data)


async def test_round_trip_names_the_key_and_hides_the_data() -> None:
    codec = EncryptionCodec([NEW])
    [sealed] = await codec.encode([clear()])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID] == b"new"
    assert b"hunter2" not in sealed.SerializeToString()
    [opened] = await codec.decode([sealed])
    assert opened == clear()


async def test_rotation_newest_encrypts_old_still_decrypts() -> None:
    [by_old] = await EncryptionCodec([OLD]).encode([clear()])
    rotated = EncryptionCodec([OLD, NEW])
    [by_new] = await rotated.encode([clear()])
    assert by_new.metadata[KEY_ID] == b"new"
    assert await rotated.decode([by_old, by_new]) == [clear(), clear()]


async def test_unknown_or_wrong_key_or_tampering_is_a_clear_error() -> None:
    [sealed] = await EncryptionCodec([OLD]).encode([clear()])
    with pytest.raises(PayloadDecryptError, match="key 'old', which is not configured"):
        await EncryptionCodec([NEW]).decode([sealed])
    impostor = CodecKey("old", os.urandom(32))
    with pytest.raises(PayloadDecryptError, match="key 'old' cannot be decrypted"):
        await EncryptionCodec([impostor]).decode([sealed])
    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(PayloadDecryptError, match="altered"):
        await EncryptionCodec([OLD]).decode([tampered])
    relabelled = Payload()
    relabelled.CopyFrom(sealed)
    relabelled.metadata[KEY_ID] = b"new"  # the key id is bound to the ciphertext
    with pytest.raises(PayloadDecryptError):
        await EncryptionCodec([OLD, CodecKey("new", OLD.key)]).decode([relabelled])


async def test_clear_and_readable_payloads_are_left_alone() -> None:
    codec = EncryptionCodec([NEW])
    readable = Payload(metadata={"encoding": b"json/plain", READABLE: b"true"}, data=b'"hi"')
    assert await codec.encode([readable]) == [readable]
    assert await codec.decode([clear()]) == [clear()]  # written before a key was set
    assert await EncryptionCodec([]).encode([clear()]) == [clear()]  # no key: as before


async def test_converter_marks_summaries_and_wrapped_values_readable() -> None:
    converter = data_converter([NEW])
    summary, wrapped, secret = await converter.encode(
        [ReadableText("Deploy cluster demo"), Readable({"a": 1}), "hunter2"]
    )
    assert summary.metadata[READABLE] == b"true"
    assert summary.data == b'"Deploy cluster demo"'
    assert wrapped.data == b'{"a":1}'
    assert secret.metadata["encoding"] == ENCODING
    assert await converter.decode([summary, wrapped, secret], [str, dict, str]) == [
        "Deploy cluster demo",
        {"a": 1},
        "hunter2",
    ]


def key_line(key: CodecKey) -> str:
    return f"{key.key_id} {base64.b64encode(key.key).decode()}"


def test_key_file_and_list_formats_and_their_errors(tmp_path: Path) -> None:
    text = f"# comment\n{key_line(OLD)}\n\n{key_line(NEW)}  # newest\n"
    assert parse_key_file(text, "f") == [OLD, NEW]
    inline = f"old:{base64.b64encode(OLD.key).decode()},new:{base64.b64encode(NEW.key).decode()}"
    assert parse_key_list(inline) == [OLD, NEW]
    with pytest.raises(CodecKeyError, match=r"f:1: key 'k' must be 32 bytes \(AES-256\), is 3"):
        parse_key_file("k AAAA", "f")
    with pytest.raises(CodecKeyError, match="f:1: key 'k' is not valid base64"):
        parse_key_file("k not-base64!", "f")
    with pytest.raises(CodecKeyError, match="f:1: key id 'a/b' must be"):
        parse_key_file(f"a/b {base64.b64encode(OLD.key).decode()}", "f")
    with pytest.raises(CodecKeyError, match="f:2: want 'KEY_ID BASE64KEY'"):
        parse_key_file(f"{key_line(OLD)}\nlonely", "f")
    with pytest.raises(CodecKeyError, match=r"key id\(s\) old given twice"):
        parse_key_file(f"{key_line(OLD)}\n{key_line(OLD)}", "f")
    with pytest.raises(CodecKeyError, match="not both"):
        load_keys(Settings(home=tmp_path, codec_keys=inline, codec_key_file=tmp_path / "k"))
    assert "hunter" not in repr(OLD) and base64.b64encode(OLD.key).decode() not in repr(OLD)


def test_the_home_key_file_is_created_once_0600_and_used_by_default(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    assert load_keys(settings) == []  # nothing configured: no encryption
    path = settings.default_codec_key_file
    assert create_key_file(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = load_keys(settings)
    assert len(first) == 1
    assert create_key_file(path) is False  # never overwritten
    assert load_keys(settings) == first
    path.write_text("")
    with pytest.raises(CodecKeyError, match="holds no key"):
        load_keys(settings)


# -- the codec server -------------------------------------------------------------------------

UI = "http://127.0.0.1:8233"


@pytest.fixture
def server() -> Iterator[CodecServer]:
    server = CodecServer(("127.0.0.1", 0), [OLD, NEW], "default", [UI])
    server.start()
    yield server
    server.shutdown()
    server.server_close()


def post(
    server: CodecServer, path: str, payloads: list[Payload], **headers: str
) -> tuple[int, dict[str, str], bytes]:
    body = json_format.MessageToJson(Payloads(payloads=payloads)).encode()
    request = urllib.request.Request(  # noqa: S310 - a local http URL
        server.url + path,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def payloads_of(body: bytes) -> list[Payload]:
    return list(json_format.Parse(body, Payloads()).payloads)


async def test_codec_server_encodes_and_decodes_over_http(server: CodecServer) -> None:
    [sealed] = await EncryptionCodec([OLD]).encode([clear()])
    status, headers, body = post(server, "/default/decode", [sealed, clear(b'"x"')], Origin=UI)
    assert status == 200, body
    assert payloads_of(body) == [clear(), clear(b'"x"')]
    assert headers["Access-Control-Allow-Origin"] == UI
    # the wire form: base64 data and metadata, as the protocol wants
    assert json.loads(body)["payloads"][0]["data"] == base64.b64encode(SECRET).decode()

    status, _, body = post(server, "/encode", [clear()], **{"X-Namespace": "default"})
    assert status == 200
    [encoded] = payloads_of(body)
    assert encoded.metadata[KEY_ID] == b"new"
    assert await EncryptionCodec([NEW]).decode([encoded]) == [clear()]


def test_codec_server_refuses_other_namespaces_origins_and_bad_input(
    server: CodecServer,
) -> None:
    status, _, body = post(server, "/decode", [clear()], **{"X-Namespace": "other"})
    assert status == 403 and b"serves namespace 'default'" in body
    status, headers, _ = post(server, "/decode", [clear()], Origin="http://evil.example")
    assert status == 200 and "Access-Control-Allow-Origin" not in headers

    preflight = urllib.request.Request(  # noqa: S310 - a local http URL
        server.url + "/decode", method="OPTIONS", headers={"Origin": UI}
    )
    with urllib.request.urlopen(preflight, timeout=10) as response:  # noqa: S310 - local
        assert response.status == 204
        assert "X-Namespace" in response.headers["Access-Control-Allow-Headers"]
        assert response.headers["Access-Control-Allow-Origin"] == UI

    bad = urllib.request.Request(  # noqa: S310 - a local http URL
        server.url + "/decode",
        data=b"{nope",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=10)  # noqa: S310 - local
    assert refused.value.code == 400
    unknown = Payload(metadata={"encoding": ENCODING, KEY_ID: b"gone"}, data=b"x" * 40)
    status, _, body = post(server, "/decode", [unknown])
    assert status == 400 and b"not configured" in body


class _RequestBefore(BaseModel):
    """An agent request as the release before knows it (unknown fields refused)."""

    model_config = ConfigDict(extra="forbid")
    vm: str
    tags: list[str] = Field(default_factory=list)


class _RequestNow(_RequestBefore):
    """The same request after a release added a field."""

    zone: str | None = None


def test_fields_at_their_defaults_are_not_sent_so_a_reader_of_the_release_before_decodes() -> None:
    converter = data_converter().payload_converter
    (payload,) = converter.to_payloads([_RequestNow(vm="vm-1")])
    assert json.loads(payload.data) == {"vm": "vm-1"}
    (value,) = converter.from_payloads([payload], [_RequestBefore])
    assert value == _RequestBefore(vm="vm-1")
    (again,) = converter.from_payloads([payload], [_RequestNow])
    assert again == _RequestNow(vm="vm-1")  # the reader fills the defaults in
    # a field it does not know, set: the older reader refuses the request as a whole
    (payload,) = converter.to_payloads([_RequestNow(vm="vm-1", zone="a", tags=["x"])])
    with pytest.raises(ValidationError, match="zone"):
        converter.from_payloads([payload], [_RequestBefore])
