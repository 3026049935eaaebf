"""Run a worker until SIGTERM/SIGINT, then shut it down gracefully."""

from __future__ import annotations

import asyncio
import signal

from temporalio.worker import Worker


async def run_until_signalled(worker: Worker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        await stop.wait()
