"""Run a worker until SIGTERM/SIGINT, then shut it down gracefully."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from temporalio.worker import Worker


async def run_until_signalled(
    worker: Worker | AbstractAsyncContextManager[Any],
    started: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run `worker` until SIGTERM/SIGINT; `started` runs once it polls."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        if started is not None:
            await started()
        await stop.wait()
