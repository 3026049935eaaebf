"""Payloads encrypted at rest on the real dev server: a workflow run through an encrypted
client leaves only ciphertext in its history (seen by a client without the codec), its
summaries and current details stay readable, and the codec server decodes it over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
import uuid
from datetime import timedelta

import pytest
from google.protobuf import json_format
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.history.v1 import History
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from plumbing.codec import ENCODING, KEY_ID, READABLE, CodecKey, ReadableMetadata, data_converter
from starters.codec_server import CodecServer

pytestmark = pytest.mark.integration

SECRET = "vc-password-7f3a-must-not-be-in-clear"


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn(sandboxed=False)  # a test module: not importable in the sandbox
class EchoWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        workflow.set_current_details("shouting the text (no secret here)")
        return await workflow.execute_activity(
            shout, text, start_to_close_timeout=timedelta(seconds=30), summary="Shout the text"
        )


def decode_over_http(url: str, payloads: list[Payload], origin: str) -> list[Payload]:
    """POST /decode as the Web UI does (its namespace and origin)."""
    request = urllib.request.Request(  # noqa: S310 - a local http URL
        url + "/default/decode",
        data=json_format.MessageToJson(Payloads(payloads=payloads)).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-Namespace": "default", "Origin": origin},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local
        assert response.headers["Access-Control-Allow-Origin"] == origin
        return list(json_format.Parse(response.read(), Payloads()).payloads)


def readable_text(payload: Payload) -> str:
    assert payload.metadata[READABLE] == b"true"
    assert payload.metadata["encoding"] == b"json/plain"
    return str(json.loads(payload.data))


async def test_history_is_encrypted_summaries_readable_codec_server_decodes(
    temporal: WorkflowEnvironment,
) -> None:
    key = CodecKey("test-key", os.urandom(32))
    target = temporal.client.service_client.config.target_host
    encrypted = await Client.connect(
        target, data_converter=data_converter([key]), interceptors=[ReadableMetadata()]
    )
    raw = await Client.connect(target)  # no codec: what anyone reading the namespace sees
    queue = f"codec-{uuid.uuid4()}"
    async with Worker(encrypted, task_queue=queue, workflows=[EchoWorkflow], activities=[shout]):
        handle = await encrypted.start_workflow(
            EchoWorkflow.run,
            SECRET,
            id=f"codec-{uuid.uuid4()}",
            task_queue=queue,
            static_summary="Echo for the codec test",
        )
        assert await handle.result() == SECRET.upper()
        # the metadata query (the UI's current details) answers in clear
        metadata = await raw.get_workflow_handle(handle.id).query(
            "__temporal_workflow_metadata", result_type=WorkflowMetadata
        )
        assert metadata.current_details == "shouting the text (no secret here)"

    history = await raw.get_workflow_handle(handle.id).fetch_history()
    stored = History(events=history.events).SerializeToString()
    assert SECRET.encode() not in stored and SECRET.upper().encode() not in stored
    events = {e.WhichOneof("attributes"): e for e in history.events}
    started = events["workflow_execution_started_event_attributes"]
    [argument] = started.workflow_execution_started_event_attributes.input.payloads
    assert argument.metadata["encoding"] == ENCODING
    assert argument.metadata[KEY_ID] == b"test-key"
    assert readable_text(started.user_metadata.summary) == "Echo for the codec test"
    scheduled = events["activity_task_scheduled_event_attributes"]
    assert readable_text(scheduled.user_metadata.summary) == "Shout the text"
    completed = events["workflow_execution_completed_event_attributes"]
    [result] = completed.workflow_execution_completed_event_attributes.result.payloads
    assert result.metadata["encoding"] == ENCODING

    # without the codec the result cannot be read
    with pytest.raises(Exception, match="binary/encrypted"):
        await raw.get_workflow_handle(handle.id).result()

    # the codec server, as the Web UI calls it, decodes the history's payloads
    ui = "http://127.0.0.1:8233"
    server = CodecServer(("127.0.0.1", 0), [key], "default", [ui])
    server.start()
    try:
        decoded = await asyncio.to_thread(decode_over_http, server.url, [argument, result], ui)
    finally:
        server.shutdown()
        server.server_close()
    assert [json.loads(p.data) for p in decoded] == [SECRET, SECRET.upper()]
