"""The vSphere access layer against the simulator: sessions, task waits, faults."""

from __future__ import annotations

import functools
import ssl
import uuid
from typing import Any

import pytest
from pyVmomi import Security, vim

from activities.vsphere.faults import classify
from activities.vsphere.inventory import find_by_path, ref, retrieve
from activities.vsphere.session import (
    PinnedHTTPSConnection,
    SessionPool,
    VSphereSession,
    open_session,
    request_meter,
    ssl_context,
)
from activities.vsphere.tasks import wait_for_task
from domain import errors
from domain.account import VCenterEndpoint
from tests.support import ADMIN, TEMPLATE, Vcsim

pytestmark = pytest.mark.integration


def endpoint(sim: Vcsim) -> VCenterEndpoint:
    return VCenterEndpoint(server=sim.address, thumbprint=sim.thumbprint)


def test_sessions_are_reused_and_renewed_after_expiry(vcsim: Vcsim) -> None:
    pool = SessionPool(check_after=0.0)
    try:
        first = pool.get(endpoint(vcsim), ADMIN, vcsim.password)
        again = pool.get(endpoint(vcsim), ADMIN, vcsim.password)
        assert again is first and pool.logins == 1

        # vCenter ends the session behind our back (idle timeout, admin action)
        admin = vcsim.connect()
        admin.content.sessionManager.TerminateSession([first.key])
        vcsim.disconnect(admin)

        renewed = pool.get(endpoint(vcsim), ADMIN, vcsim.password)
        assert renewed is not first and pool.logins == 2
        assert renewed.content.sessionManager.currentSession.userName.lower().startswith(
            "administrator"
        )
    finally:
        pool.close_all()


def test_not_authenticated_during_a_call_logs_in_again(vcsim: Vcsim) -> None:
    pool = SessionPool(check_after=3600.0)  # never checks proactively
    try:
        first = pool.get(endpoint(vcsim), ADMIN, vcsim.password)
        admin = vcsim.connect()
        admin.content.sessionManager.TerminateSession([first.key])
        vcsim.disconnect(admin)

        def find_cluster(session: VSphereSession) -> str:
            # vCenter answers a request on the ended session with a NotAuthenticated fault
            cluster = find_by_path(session, "/DC0/host/DC0_C0")
            return ref(cluster)

        assert pool.run(endpoint(vcsim), ADMIN, vcsim.password, find_cluster).startswith(
            "ClusterComputeResource:"
        )
        assert pool.logins == 2
    finally:
        pool.close_all()


def test_close_all_logs_out(vcsim: Vcsim) -> None:
    pool = SessionPool()
    session = pool.get(endpoint(vcsim), ADMIN, vcsim.password)
    pool.close_all()
    admin = vcsim.connect()
    try:
        keys = {s.key for s in admin.content.sessionManager.sessionList or []}
    finally:
        vcsim.disconnect(admin)
    assert session.key not in keys


def test_requests_are_counted(vcsim: Vcsim) -> None:
    with request_meter() as meter:
        session = open_session(endpoint(vcsim), ADMIN, vcsim.password)
    try:
        assert meter[0] == 3  # version discovery, RetrieveServiceContent, Login
        with request_meter() as meter:
            hosts = find_by_path(session, "/DC0/host/DC0_C0")
            assert hosts is not None
            retrieve(session, [hosts], ["name", "host"])
        assert meter[0] == 2
    finally:
        session.logout()


def test_wrong_password_is_classified_as_invalid_credentials(vcsim: Vcsim) -> None:
    with pytest.raises(vim.fault.InvalidLogin) as info:
        open_session(endpoint(vcsim), ADMIN, "not-the-password")
    error = classify(info.value, "log in")
    assert error.type == errors.INVALID_CREDENTIALS and error.non_retryable
    assert "not-the-password" not in error.message


def clone(session: VSphereSession, name: str) -> Any:
    template = find_by_path(session, f"/DC0/vm/{TEMPLATE}")
    folder = find_by_path(session, "/DC0/vm")
    pool = find_by_path(session, "/DC0/host/DC0_C0/Resources")
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool), powerOn=False, template=False)
    return template.CloneVM_Task(folder=folder, name=name, spec=spec)


def test_wait_for_task_heartbeats_with_the_task_reference(workdir: Any) -> None:
    sim = Vcsim(workdir, args=["-task-delay", "CloneVM_Task=1500"]).start()
    session = open_session(endpoint(sim), ADMIN, sim.password)
    try:
        beats: list[tuple[str, int]] = []
        task = clone(session, f"vm-{uuid.uuid4().hex[:6]}")
        vm = wait_for_task(session, task, lambda r, p: beats.append((r, p)), max_wait_seconds=1)

        assert ref(vm).startswith("VirtualMachine:")
        assert len(beats) >= 2, beats  # the clone took 1.5 s, each wait at most 1 s
        assert {r for r, _ in beats} == {f"Task:{task._moId}"}
        props = retrieve(session, [vm], ["config.template", "name"])
        assert props[ref(vm)]["config.template"] is False
    finally:
        session.logout()
        sim.stop()


def test_a_failed_task_raises_its_fault_for_classification(vcsim: Vcsim) -> None:
    session = open_session(endpoint(vcsim), ADMIN, vcsim.password)
    try:
        vm = wait_for_task(session, clone(session, f"vm-{uuid.uuid4().hex[:6]}"), lambda *_: None)
        with pytest.raises(vim.fault.InvalidPowerState) as info:
            wait_for_task(session, vm.PowerOffVM_Task(), lambda *_: None)  # already off
        error = classify(info.value, "power off")
        assert error.type == errors.INVALID_STATE and not error.non_retryable
        wait_for_task(session, vm.Destroy_Task(), lambda *_: None)
    finally:
        session.logout()


def test_trust_settings_separate_cached_sessions(vcsim: Vcsim) -> None:
    pool = SessionPool()
    try:
        insecure = VCenterEndpoint(server=vcsim.address, insecure=True)
        opened = pool.get(insecure, ADMIN, vcsim.password)
        assert pool.get(insecure, ADMIN, vcsim.password) is opened
        # the same server and user, but verification asked for: no reuse, and it fails
        with pytest.raises(ssl.SSLError):
            pool.get(VCenterEndpoint(server=vcsim.address), ADMIN, vcsim.password)
    finally:
        pool.close_all()


def test_pinned_thumbprint_is_checked_on_every_new_connection(vcsim: Vcsim) -> None:
    session = open_session(endpoint(vcsim), ADMIN, vcsim.password)
    try:
        assert session.content.rootFolder.name  # works through the pinned connection
        # as if the server's certificate changed (a man in the middle): new connections
        # must refuse it, not only the session's first one
        session.stub.DropConnections()
        session.stub.scheme = functools.partial(PinnedHTTPSConnection, pin="ab" * 32)
        with pytest.raises(Security.ThumbprintMismatchException):
            _ = session.content.rootFolder.name
    finally:
        session.stub.scheme = functools.partial(PinnedHTTPSConnection, pin=vcsim.thumbprint)
        session.logout()


def test_pin_is_checked_even_for_a_certificate_a_ca_would_accept(vcsim: Vcsim) -> None:
    # with a pin, CA verification is replaced by the pin, never skipped for it
    context = ssl_context(endpoint(vcsim))
    assert context.verify_mode == ssl.CERT_NONE
    wrong = VCenterEndpoint(server=vcsim.address, thumbprint="cd" * 32)
    with pytest.raises(Security.ThumbprintMismatchException):
        open_session(wrong, ADMIN, vcsim.password)


def test_renew_logs_in_now_and_replaces_the_cached_session(vcsim: Vcsim) -> None:
    pool = SessionPool()
    try:
        first = pool.get(endpoint(vcsim), ADMIN, vcsim.password)
        renewed = pool.renew(endpoint(vcsim), ADMIN, vcsim.password)
        assert renewed is not first and pool.logins == 2
        assert pool.get(endpoint(vcsim), ADMIN, vcsim.password) is renewed
        admin = vcsim.connect()
        try:
            keys = {s.key for s in admin.content.sessionManager.sessionList or []}
        finally:
            vcsim.disconnect(admin)
        assert first.key not in keys and renewed.key in keys  # the old one was logged out
        with pytest.raises(vim.fault.InvalidLogin):
            pool.renew(endpoint(vcsim), ADMIN, "a-rotated-password")
    finally:
        pool.close_all()


def test_forget_keeps_a_session_another_thread_already_renewed(vcsim: Vcsim) -> None:
    pool = SessionPool()
    try:
        stale = pool.get(endpoint(vcsim), ADMIN, vcsim.password)
        fresh = pool.renew(endpoint(vcsim), ADMIN, vcsim.password)
        pool.forget(endpoint(vcsim), ADMIN, vcsim.password, stale)
        assert pool.get(endpoint(vcsim), ADMIN, vcsim.password) is fresh
    finally:
        pool.close_all()


@pytest.mark.parametrize("left", ["stopped", "left recentTask"])
def test_a_wait_the_watcher_cannot_end_asks_vcenter_instead_of_hanging(left: str) -> None:
    """The watcher holds a task's running state but will say no more about it: it stopped
    (idle), or the task left vCenter's bounded list of recent tasks unfinished (vcsim never
    reports that leave: the state is set as a real vCenter leaves it). The wait returns None
    at once (the caller then reads the task itself) instead of waiting for a turn that never
    comes."""
    import time as _time

    from activities.vsphere.watch import TaskWatcher

    watcher = TaskWatcher(session=None)  # type: ignore[arg-type]  # never started
    if left == "stopped":
        watcher._states["task-1"] = {"info.state": "running"}
        watcher._stopped = True
    else:
        watcher._gone["task-1"] = {"info.state": "running"}
    started = _time.monotonic()
    assert (
        watcher.wait(
            "task-1",
            lambda _p: None,
            cancelled=lambda: False,
            beat_every=1,
            deadline=_time.monotonic() + 3,  # (a hang would end as TaskTimeout)
        )
        is None
    )
    assert _time.monotonic() - started < 1
