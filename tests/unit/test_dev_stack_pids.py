"""`dev down` stops only processes `dev up` started: a reused pid is left alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

from plumbing.settings import Settings
from starters.dev import DevStack, _start_time


def test_down_leaves_a_process_whose_start_time_differs(tmp_path: Path) -> None:
    stack = DevStack(Settings(home=tmp_path))
    stack.pids.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        # a stale pid file naming a pid that now belongs to another process
        (stack.pids / "vcsim.pid").write_text(f"{stranger.pid} 1\n")
        assert {r["component"]: r["state"] for r in stack.status()}["vcsim"] == "stopped"
        assert stack.down() == [("vcsim", "not running")]
        assert stranger.poll() is None
        assert not (stack.pids / "vcsim.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_down_stops_the_process_it_recorded(tmp_path: Path) -> None:
    stack = DevStack(Settings(home=tmp_path))
    stack.pids.mkdir(parents=True)
    ours = subprocess.Popen(["sleep", "30"], start_new_session=True)
    (stack.pids / "vcsim.pid").write_text(f"{ours.pid} {_start_time(ours.pid)}\n")
    assert {r["component"]: r["state"] for r in stack.status()}["vcsim"] == "running"
    assert stack.down() == [("vcsim", "stopped")]
    assert ours.wait(5) is not None


def test_down_stops_recorded_gateway_agents_first_and_status_lists_them(tmp_path: Path) -> None:
    stack = DevStack(Settings(home=tmp_path))
    stack.pids.mkdir(parents=True)
    agent = subprocess.Popen(["sleep", "30"], start_new_session=True)
    worker = subprocess.Popen(["sleep", "30"], start_new_session=True)
    (stack.pids / "agent-lab.pid").write_text(f"{agent.pid} {_start_time(agent.pid)}\n")
    (stack.pids / "control-worker.pid").write_text(f"{worker.pid} {_start_time(worker.pid)}\n")
    rows = {r["component"]: r for r in stack.status()}
    assert rows["agent-lab"]["state"] == "running"
    assert rows["agent-lab"]["address"] == "kubegate-gateway-lab"
    assert rows["agent-lab"]["log"].endswith("agents/lab/agent.out")
    assert stack.down() == [("agent-lab", "stopped"), ("control-worker", "stopped")]
    assert agent.wait(5) is not None and worker.wait(5) is not None
