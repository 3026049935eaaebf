"""CPU profiles of a worker process, for benchmarks: `KUBEGATE_PROFILE=DIR`.

Off unless the variable is set. When set, every Python thread of the process is profiled by
CPU time (cProfile with `time.thread_time`: the event loop's, each executor and workflow
thread's) and, when the process exits, DIR/<name>-<pid>.prof holds their merged statistics
and DIR/<name>-<pid>.threads the CPU seconds of each live OS thread (from /proc: Temporal's
core threads are Rust, named `tokio-runtime-w`, and invisible to cProfile). Profiling slows
the process: measure CPU in runs without it. The worker calls `finish()` when it is done
(the CLI ends with os._exit).
"""

from __future__ import annotations

import atexit
import cProfile
import os
import pstats
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

_profiles: list[cProfile.Profile] = []
_guard = threading.Lock()
_to: list[Path] = []


def start(name: str) -> None:
    """Profile this process if KUBEGATE_PROFILE names a directory (call once, early)."""
    directory = os.environ.get("KUBEGATE_PROFILE")
    if not directory:
        return
    threading.setprofile(_in_new_thread)
    _enable()
    _to.append(Path(directory) / f"{name}-{os.getpid()}")
    atexit.register(finish)


def finish() -> None:
    """Write the profile (once) if this process is profiled."""
    if _to:
        _dump(_to.pop())


def _enable() -> None:
    profile = cProfile.Profile(time.thread_time)  # CPU, not waits (nor the GIL's)
    with _guard:
        _profiles.append(profile)
    profile.enable()


def _in_new_thread(frame: FrameType, event: str, arg: Any) -> None:
    sys.setprofile(None)
    _enable()


def _dump(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _guard:
        profiles = list(_profiles)
    pstats.Stats(*profiles).dump_stats(str(path) + ".prof")
    lines = []
    tick = os.sysconf("SC_CLK_TCK")
    for task in sorted(Path("/proc/self/task").iterdir()):
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick
        lines.append(f"{task.name}\t{comm}\t{seconds:.2f}")
    Path(str(path) + ".threads").write_text("\n".join(lines) + "\n")
