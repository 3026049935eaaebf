"""The agent's per-host / per-datastore slots (activities/vsphere/limits.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from activities.vsphere.limits import Slots, slots


async def test_slots_bound_the_holders_and_hand_over_in_order() -> None:
    slots = Slots(2)
    order: list[int] = []
    running = peak = 0

    async def job(i: int) -> None:
        nonlocal running, peak
        await slots.acquire()
        running += 1
        peak = max(peak, running)
        order.append(i)
        await asyncio.sleep(0.01)
        running -= 1
        slots.release()

    await asyncio.gather(*(job(i) for i in range(6)))
    assert peak == 2 and order == list(range(6)) and slots.in_use == 0


async def test_a_cancelled_waiter_never_keeps_a_slot() -> None:
    slots = Slots(1)
    await slots.acquire()
    queued = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    queued.cancel()  # still queued: it leaves the queue
    with pytest.raises(asyncio.CancelledError):
        await queued
    handed = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed over to `handed`...
    handed.cancel()  # ...which is cancelled before it runs: it passes the slot on
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert slots.in_use == 0
    await slots.acquire()
    slots.release()


def test_slots_hold_across_event_loops() -> None:
    """The audit's removals run on loops of their own: the limit is the process's."""
    slots = Slots(1)
    held = threading.Event()

    async def hold() -> None:
        await slots.acquire()
        held.set()
        await asyncio.sleep(0.3)
        slots.release()

    other = threading.Thread(target=asyncio.run, args=(hold(),))
    other.start()
    assert held.wait(5)
    started = time.monotonic()

    async def take() -> float:
        await slots.acquire()
        waited = time.monotonic() - started
        slots.release()
        return waited

    assert asyncio.run(take()) >= 0.2
    other.join()
    assert slots.in_use == 0


async def test_a_new_limit_resizes_the_same_slots() -> None:
    """A compute cluster's limit follows its hosts: the slots of (kind, vCenter, object) are
    the same whatever the limit asked, so old and new holders count together."""
    first = slots("cluster", "vc.example.com", "DC0_C9", 2)
    await first.acquire()
    await first.acquire()
    assert slots("cluster", "VC.example.com", "DC0_C9", 1) is first  # a host went away
    waiting = asyncio.ensure_future(first.acquire())
    first.release()  # 1 held again, and the limit is 1: not handed over
    await asyncio.sleep(0.01)
    assert not waiting.done() and first.in_use == 1
    assert slots("cluster", "vc.example.com", "DC0_C9", 3) is first  # hosts added
    await asyncio.wait_for(waiting, 1)
    assert first.in_use == 2
