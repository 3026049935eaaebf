"""Every kept history of every release replays against today's workflow code.

Histories live in `histories/<version>/`, one folder per release, and are never re-recorded:
a change that breaks one uses `workflow.patched()` or a new workflow type (docs/development.md).
A released folder carries SHA256SUMS, so a history changed after its release fails here.

Record this release's histories with: KUBEGATE_RECORD_HISTORIES=1 make test
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from domain.version import VERSION
from plumbing.codec import data_converter
from tests.support import HISTORIES
from workers.control import WORKFLOWS, workflow_runner

FILES = sorted(HISTORIES.glob("*/*.json"))
RELEASES = sorted(p for p in HISTORIES.iterdir() if p.is_dir())


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3])


def test_histories_are_stored() -> None:
    names = {f.stem for f in HISTORIES.glob("0.1.0/*.json")}
    assert {
        "preflight_passed",
        "preflight_wrong_password",
        "preflight_missing_template",
        "ippool_live",
        "ippool_deleted",
        "cluster_deployed_deleted",
        "cluster_aborted",
        "cluster_dhcp_day2",
        "gateway_story",
        "gateway_reset",
        "cluster_queued_by_gateway",
        # the trust model's release: signed results, verified deletes, confirmed releases
        "gateway_rekeyed",
        "gateway_raced",
        "cluster_rekeyed",
        "cluster_rotated",
        "ippool_release_refused",
    } <= names


def test_every_release_folder_is_a_release_up_to_this_one() -> None:
    assert RELEASES, "no kept histories"
    for folder in RELEASES:
        assert _release(folder.name) <= _release(VERSION), folder.name
        kinds = {f.stem.split("_")[0] for f in folder.glob("*.json")}
        assert {"cluster", "gateway", "ippool", "preflight"} <= kinds, folder.name


def test_this_release_keeps_its_new_shapes() -> None:
    """0.2.0: settle points (continue-as-new at every operation's end, one file per run) and
    lifecycles begun by 0.1.0 and finished by 0.2.0."""
    names = {f.stem.rsplit("-", 1)[0] for f in HISTORIES.glob("0.2.0/*.json")}
    assert {
        "cluster_deployed_deleted",
        "cluster_change_refused_delete_failed",
        "cluster_dhcp_day2",
        "cluster_settled",
        "cluster_upgraded",
        "gateway_story",
        "gateway_story_clusterstate_nodes",
        "gateway_reset",
        "gateway_upgraded",
        "ippool_live",
        "preflight_passed",
    } <= names
    assert len(list(HISTORIES.glob("0.2.0/cluster_settled-*.json"))) == 3  # deploy, scale, delete
    # every patch this release introduced is taken by at least one kept history
    taken = set().union(*(patches(f) for f in HISTORIES.glob("0.2.0/*.json")))
    assert {
        "not-queued-unless-queued",
        "continue-at-settle-points-1",
        "changes-are-operations",
        "render-bootstrap-at-creation",
    } <= taken, taken


def patches(history: Path) -> set[str]:
    """The patch ids a history's markers record."""
    found: set[str] = set()
    for event in json.loads(history.read_text())["events"]:
        marker = event.get("markerRecordedEventAttributes")
        if not marker or marker.get("markerName") != "core_patch":
            continue
        for payload in marker["details"]["patch-data"]["payloads"]:
            found.add(json.loads(base64.b64decode(payload["data"]))["id"])
    return found


@pytest.mark.parametrize("folder", RELEASES, ids=[p.name for p in RELEASES])
def test_released_histories_are_unchanged(folder: Path) -> None:
    """Each earlier release's folder matches the sums taken at its release."""
    sums = folder / "SHA256SUMS"
    if folder.name == VERSION and not sums.exists():
        pytest.skip(f"{VERSION} is this release: its histories may still be recorded")
    assert sums.exists(), f"{folder.name}: a released folder needs its SHA256SUMS"
    listed = {}
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    present = {f.name for f in folder.iterdir() if f.name != "SHA256SUMS"}
    assert present == set(listed), "files added to or removed from a released folder"
    for name, digest in listed.items():
        actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert actual == digest, f"{folder.name}/{name} changed after its release"


@pytest.mark.parametrize("path", FILES, ids=[f"{f.parent.name}/{f.stem}" for f in FILES])
async def test_history_replays(path: Path) -> None:
    # the workflow's own id (agents' signatures cover it); older files did not keep it
    id_file = path.with_suffix(".workflow-id")
    workflow_id = id_file.read_text().strip() if id_file.exists() else path.stem
    history = WorkflowHistory.from_json(workflow_id, path.read_text())
    replayer = Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    )
    await replayer.replay_workflow(history)


async def test_a_gateway_of_the_previous_release_waiting_after_a_reset_replays_its_timer() -> None:
    """Found by review: a 0.1.0 gateway reset back to Pending waits on its overdue timer; when
    that timer fires under 0.2.0, the replay must expect the same timer (an extra wake at a
    settle point once restarted the timer and shifted its id: a non-determinism error). The
    history is the kept 0.1.0 `gateway_raced`, cut while the reset's timer runs, with the
    timer firing appended (built in memory: the released folder stays as it was)."""
    path = HISTORIES / "0.1.0" / "gateway_raced.json"
    data = json.loads(path.read_text())
    timers = [e for e in data["events"] if e["eventType"] == "EVENT_TYPE_TIMER_STARTED"]
    assert len(timers) >= 2  # the first overdue timer, then the reset's
    reset_timer = timers[1]
    cut = int(reset_timer["eventId"])
    events = data["events"][:cut]
    at = reset_timer["eventTime"]

    def event(number: int, kind: str, field: str, attributes: dict[str, object]) -> dict:
        return {"eventId": str(number), "eventTime": at, "eventType": kind, field: attributes}

    scheduled = {"taskQueue": {"name": "kubegate-control"}, "startToCloseTimeout": "10s"}
    events += [
        event(
            cut + 1,
            "EVENT_TYPE_TIMER_FIRED",
            "timerFiredEventAttributes",
            {
                "timerId": reset_timer["timerStartedEventAttributes"]["timerId"],
                "startedEventId": str(cut),
            },
        ),
        event(
            cut + 2,
            "EVENT_TYPE_WORKFLOW_TASK_SCHEDULED",
            "workflowTaskScheduledEventAttributes",
            {**scheduled, "attempt": 1},
        ),
        event(
            cut + 3,
            "EVENT_TYPE_WORKFLOW_TASK_STARTED",
            "workflowTaskStartedEventAttributes",
            {"scheduledEventId": str(cut + 2), "identity": "replay", "requestId": "replay"},
        ),
        event(
            cut + 4,
            "EVENT_TYPE_WORKFLOW_TASK_COMPLETED",
            "workflowTaskCompletedEventAttributes",
            {"scheduledEventId": str(cut + 2), "startedEventId": str(cut + 3)},
        ),
        event(
            cut + 5,
            "EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED",
            "workflowExecutionTerminatedEventAttributes",
            {"reason": "the replay ends here"},
        ),
    ]
    workflow_id = path.with_suffix(".workflow-id").read_text().strip()
    history = WorkflowHistory.from_json(workflow_id, json.dumps({"events": events}))
    replayer = Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    )
    await replayer.replay_workflow(history)


def test_this_release_records_its_rollouts() -> None:
    """0.3.0 (not released yet: recorded again until it is): rolling upgrades, a rollout
    paused and aborted, the control plane resized, an applied spec rolled; the joiner's
    kubeadm upgrade patch taken."""
    folder = HISTORIES / "0.3.0"
    if not folder.exists():
        pytest.skip("0.3.0's histories are not recorded")
    names = {f.stem.rsplit("-", 1)[0] for f in folder.glob("*.json")}
    assert {
        "cluster_rolling_upgrade",
        "cluster_rollout_paused",
        "cluster_control_plane_scale",
        "cluster_applied_rollout",
    } <= names
    taken = set().union(*(patches(f) for f in folder.glob("*.json")))
    assert "first-newer-member-upgrades-kubeadm" in taken, taken
