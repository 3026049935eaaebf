"""Every stored history replays against today's workflow code (determinism guard).

Record new histories with: KUBEGATE_RECORD_HISTORIES=1 make test PYTEST_ARGS=tests/integration
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from starters.codec import data_converter
from tests.support import HISTORIES
from workers.control import WORKFLOWS, workflow_runner

FILES = sorted(HISTORIES.glob("*.json"))


def test_histories_are_stored() -> None:
    names = {f.stem for f in FILES}
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


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
async def test_history_replays(path: Path) -> None:
    # the workflow's own id (agents' signatures cover it); older files did not keep it
    id_file = path.with_suffix(".workflow-id")
    workflow_id = id_file.read_text().strip() if id_file.exists() else path.stem
    history = WorkflowHistory.from_json(workflow_id, path.read_text())
    replayer = Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(), workflow_runner=workflow_runner()
    )
    await replayer.replay_workflow(history)
