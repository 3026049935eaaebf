"""How late a WaitForUpdatesEx waiter sees a task end in the simulator, and its idle CPU.

    uv run python -m bench.vcsim_wait [--binary .kubegate/bin/vcsim] [--tasks 20] [--idle 10]

Starts the simulator with `-vms 1 -task-delay PowerOnVM_Task=D,PowerOffVM_Task=D` and, on one
model VM, alternately powers off and on. Each task is waited the way kubegate's task watcher
waits (one collector, a filter on the task's `info.state`, WaitForUpdatesEx with
maxWaitSeconds 5), starting at a random point of the
run; the lateness is the time from the task's earliest end (the call's return +
D) to the waiter's return with a final state, i.e. to when the next call could be sent. Then
the simulator's CPU over `--idle` seconds, first with no client, then with one client parked
in WaitForUpdatesEx on a filter that never changes.
"""

# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pyVmomi import vim, vmodl

import tests.support as support

PC = vmodl.query.PropertyCollector


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_task(pc: Any, task: Any) -> None:
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=task, skip=False)],
        propSet=[PC.PropertySpec(type=vim.Task, pathSet=["info.state"])],
    )
    filt = pc.CreateFilter(spec, partialUpdates=False)
    try:
        version = ""
        while True:
            update = pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=5))
            if update is None:
                continue
            version = update.version
            for fs in update.filterSet:
                for obj in fs.objectSet:
                    for change in obj.changeSet:
                        if change.name == "info.state" and change.val in ("success", "error"):
                            return
    finally:
        filt.Destroy()


def measure(binary: Path, tasks: int, delay_ms: int, idle: float) -> dict[str, Any]:
    support.VCSIM = binary
    work = Path(tempfile.mkdtemp(prefix="kubegate-vcsim-wait-"))
    delays = f"PowerOnVM_Task={delay_ms},PowerOffVM_Task={delay_ms}"
    sim = support.Vcsim(work, args=["-vms", "1", "-task-delay", delays]).start()
    pid = int(sim.info["pid"])
    try:
        time.sleep(1.0)  # start-up done
        before = _cpu_seconds(pid)
        time.sleep(idle)
        idle_alone = _cpu_seconds(pid) - before

        si = sim.connect()
        try:
            content = si.RetrieveContent()
            vm = content.searchIndex.FindByInventoryPath("/DC0/vm/DC0_C0_RP0_VM0")
            pc = content.propertyCollector.CreatePropertyCollector()
            late = []
            for i in range(tasks):
                call = vm.PowerOffVM_Task if i % 2 == 0 else vm.PowerOnVM_Task
                task = call()
                returned = time.perf_counter()
                # start waiting at a random point of the run, as a watcher that is already
                # looping would be (vcsim's ticker starts with the waiting call)
                time.sleep(random.uniform(0, delay_ms / 2000))
                _wait_task(pc, task)
                late.append(time.perf_counter() - returned - delay_ms / 1000)

            # one client parked in WaitForUpdatesEx on an object that does not change
            parked = pc.CreateFilter(
                PC.FilterSpec(
                    objectSet=[PC.ObjectSpec(obj=vm, skip=False)],
                    propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])],
                ),
                partialUpdates=False,
            )
            version = pc.WaitForUpdatesEx("", PC.WaitOptions(maxWaitSeconds=5)).version
            before = _cpu_seconds(pid)
            end = time.monotonic() + idle
            polls = 0
            while time.monotonic() < end:
                pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=5))
                polls += 1
            idle_waiting = _cpu_seconds(pid) - before
            parked.Destroy()
            pc.Destroy()
        finally:
            sim.disconnect(si)
    finally:
        sim.stop()
    return {
        "binary": str(binary),
        "task_delay_ms": delay_ms,
        "tasks": tasks,
        "late_ms": {
            "mean": round(statistics.mean(late) * 1000, 1),
            "median": round(statistics.median(late) * 1000, 1),
            "min": round(min(late) * 1000, 1),
            "max": round(max(late) * 1000, 1),
        },
        "idle_cpu_seconds": {
            "seconds": idle,
            "no_client": round(idle_alone, 3),
            "one_waiting_client": round(idle_waiting, 3),
            "waits": polls,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", type=Path, default=support.VCSIM)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--delay", type=int, default=200, help="task run time, ms")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds per idle measurement")
    args = parser.parse_args()
    print(json.dumps(measure(args.binary.resolve(), args.tasks, args.delay, args.idle), indent=2))


if __name__ == "__main__":
    main()
