"""Attacks by someone who can reach Temporal (real simulator, real Temporal): each fails.

The attacker reads every history and query, starts workflows, sends signals and updates,
and polls task queues. The agent of gateway `test` and the control worker are the real ones.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import socket
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
import yaml
from temporalio import activity
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.converter import PayloadCodec
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.bootstrap import generate_secrets
from activities.secrets import secrets_binding
from domain import names
from domain.account import VCenterCredentials, VCenterEndpoint
from domain.bootstrap import RenderResult, ca_cert_hash, decode
from domain.gateway import ClusterChanged
from domain.ipam import IpPoolSpec, ReleaseRequest
from domain.lifecycle import ClusterInput, ClusterStatus
from domain.preflight import PreflightReport, PreflightRequest
from domain.sealing import AgentKey, seal
from domain.trust import AccountAnswer, AgentAuthorization, ReleaseIntent
from domain.vm import VmInfo
from plumbing.codec import data_converter
from starters.client import KubegateClient, KubegateError
from tests.conftest import GATEWAY
from tests.integration.test_cluster import deploy, domain, owned_vms, small_spec, until
from tests.support import Vcsim, ensure_account, record_history, run_cli


class Garbling(PayloadCodec):
    """An attacker's codec: every other payload it sends is JSON that does not parse."""

    def __init__(self) -> None:
        self.sent = 0

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for payload in payloads:
            self.sent += 1
            if self.sent % 2:
                payload = Payload(metadata={"encoding": b"json/plain"}, data=b"{")
            out.append(payload)
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return list(payloads)


class Listener:
    """A TCP listener on loopback that counts who connects (the attacker's 'vCenter')."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close()


def spec_for(name: str, pool: str = "trust-pool") -> Any:
    """One control-plane node and one worker on DC0_C0 (every host there keeps time)."""
    spec = small_spec(name, pool)
    data = spec.model_dump(mode="json")
    data["workers"][0]["placement"] = [domain("DC0_C0", pool)]
    return type(spec).model_validate(data)


@pytest.fixture
async def trust_pool(kubegate: KubegateClient) -> str:
    pools = {p.spec.name for p in await kubegate.list_pools(GATEWAY)}
    if "trust-pool" not in pools:
        await kubegate.create_pool(
            IpPoolSpec.model_validate(
                {
                    "name": "trust-pool",
                    "gateway": GATEWAY,
                    "kind": "range",
                    "first": "10.143.0.10",
                    "last": "10.143.0.60",
                    "prefix": 24,
                    "network_gateway": "10.143.0.1",
                }
            )
        )
    return "trust-pool"


async def live_credentials(kubegate: KubegateClient, account: str) -> VCenterCredentials:
    state = await kubegate.gateway_state(GATEWAY)
    found = state.account(account)
    assert found is not None
    return found.credentials


async def test_a_stolen_seal_sent_to_another_endpoint_reaches_nothing(
    kubegate: KubegateClient, vcsim: Vcsim, temporal: WorkflowEnvironment
) -> None:
    account = await ensure_account(kubegate, vcsim, GATEWAY)
    stolen = await live_credentials(kubegate, account)  # from the gateway's state query
    listener = Listener()
    try:
        forged = stolen.model_copy(
            update={"endpoint": VCenterEndpoint(server=f"127.0.0.1:{listener.port}", insecure=True)}
        )
        for credentials in (forged, stolen):  # the attacker's endpoint, then the real one
            request = PreflightRequest(account=account, gateway=GATEWAY, credentials=credentials)
            try:
                report = await temporal.client.execute_workflow(
                    "PreflightWorkflow",
                    request,
                    id=f"preflight/{uuid.uuid4()}",
                    task_queue=names.CONTROL_TASK_QUEUE,
                    result_type=PreflightReport,
                    execution_timeout=timedelta(seconds=60),
                )
            except WorkflowFailureError as exc:  # not a lifecycle of the gateway: refused
                assert "not a lifecycle of gateway" in str(exc.cause.cause), exc.cause
                continue
            # the attacker's endpoint: the agent's policy refused it before any connection
            assert not report.passed and report.results[0].check == "agent.policy"
        await asyncio.sleep(0.5)
        assert listener.connections == 0
    finally:
        listener.close()


async def test_a_seal_copied_into_another_account_is_refused(
    kubegate: KubegateClient, vcsim: Vcsim
) -> None:
    from domain.gateway import AccountRequest
    from workflows.gateway import GatewayWorkflow

    account = await ensure_account(kubegate, vcsim, GATEWAY)
    stolen = await live_credentials(kubegate, account)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await kubegate.gateway_handle(GATEWAY).execute_update(
            GatewayWorkflow.add_account, AccountRequest(name="copycat", credentials=stolen)
        )
    assert "sealed for another use" in str(refused.value.cause)
    assert "account: sealed for" in str(refused.value.cause)


async def test_a_directly_started_cluster_gets_nothing_done(
    kubegate: KubegateClient, vcsim: Vcsim, temporal: WorkflowEnvironment, trust_pool: str
) -> None:
    """A ClusterWorkflow started with a copied input, bypassing the gateway: no VM is made."""
    account = await ensure_account(kubegate, vcsim, GATEWAY)
    state = await kubegate.gateway_state(GATEWAY)
    stolen = state.account(account)
    assert stolen is not None
    from domain.lifecycle import ClusterAccount

    spec = spec_for("rogue").model_copy(update={"cloud_account": account})
    await temporal.client.start_workflow(
        "ClusterWorkflow",
        ClusterInput(
            spec=spec,
            account=ClusterAccount(
                name=account,
                gateway=GATEWAY,
                credentials=stolen.credentials,
                template="templates/ubuntu-2204-kube-v1.30",
            ),
        ),
        id=names.cluster_workflow_id("rogue"),
        task_queue=names.CONTROL_TASK_QUEUE,
    )
    result = await until(kubegate, "rogue", ClusterStatus.FAILED)
    assert "NotAuthorized" in (result.error or "") or "not a lifecycle" in (result.error or "")
    assert owned_vms(vcsim, "cluster/rogue") == []


async def test_forged_deleted_signal_and_release_change_nothing(
    kubegate: KubegateClient, vcsim: Vcsim, trust_pool: str
) -> None:
    await deploy(kubegate, vcsim, spec_for("victim"))
    running = await until(kubegate, "victim", ClusterStatus.RUNNING)
    account = running.account

    # "victim was deleted", says anyone: the gateway checks Temporal's record and keeps it
    await kubegate.gateway_handle(GATEWAY).signal(
        "cluster_changed", ClusterChanged(name="victim", account=account, status="Deleted")
    )
    await asyncio.sleep(1.5)
    state = await kubegate.gateway_state(GATEWAY)
    assert "victim" in state.live_clusters(account=account)
    with pytest.raises(KubegateError, match="used by"):
        await kubegate.delete_account(account, GATEWAY)

    # "release victim's addresses", says anyone: refused, the VIP stays the victim's
    handle = kubegate.client.get_workflow_handle(names.ippool_workflow_id(GATEWAY, "trust-pool"))
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(
            "release", ReleaseRequest(owner="cluster/victim"), result_type=None
        )
    assert "release refused" in str(refused.value.cause)
    held = await kubegate.pool_allocations(GATEWAY, "trust-pool")
    assert running.vip in {a.address for a in held}

    await kubegate.delete_cluster("victim")
    await until(kubegate, "victim", ClusterStatus.DELETED)
    # the real end is believed: the gateway drops it, the pool holds nothing for it
    for _ in range(100):
        state = await kubegate.gateway_state(GATEWAY)
        if "victim" not in state.live_clusters():
            break
        await asyncio.sleep(0.2)
    assert "victim" not in state.live_clusters()
    assert [
        a for a in await kubegate.pool_allocations(GATEWAY, "trust-pool") if "victim" in a.owner
    ] == []
    await record_history(
        kubegate.client, names.ippool_workflow_id(GATEWAY, "trust-pool"), "ippool_release_refused"
    )


async def test_a_rogue_worker_on_the_gateway_queue_cannot_forge_results(
    kubegate: KubegateClient, vcsim: Vcsim, temporal: WorkflowEnvironment, trust_pool: str
) -> None:
    """A worker beside the real agent answers VM tasks with made-up VMs and bootstrap tasks
    with its own cluster CA (sealed to the agent's public key, bound to the cluster: anyone
    can make such a seal). Its answers are refused, the real agent's are taken: no forged VM
    is recorded and no node carries the attacker's CA."""
    answered: list[str] = []

    state = await kubegate.gateway_state(GATEWAY)
    assert state.agent is not None
    theirs = generate_secrets()
    planted = seal(
        theirs.model_dump_json(),
        base64.b64decode(state.agent.public_key),
        secrets_binding(GATEWAY, "cluster/guarded"),
    )

    enough = asyncio.Event()  # set at the rogue's third answer

    @activity.defn(name="vm_create")
    async def vm_create(request: dict[str, object]) -> VmInfo:
        if enough.is_set():  # stepping aside while it shuts down: a failed attempt
            raise ApplicationError("rogue stepping aside")
        answered.append("vm_create")
        if len(answered) >= 3:
            enough.set()
        return VmInfo(name=str(request.get("name")), ref="VirtualMachine:vm-forged")

    @activity.defn(name="bootstrap_render")
    async def bootstrap_render(request: dict[str, object]) -> RenderResult:
        if enough.is_set():  # stepping aside while it shuts down: a failed attempt
            raise ApplicationError("rogue stepping aside")
        answered.append("bootstrap_render")
        if len(answered) >= 3:
            enough.set()
        return RenderResult(nodes=[], secrets=planted)

    attacker = await Client.connect(
        temporal.client.service_client.config.target_host, data_converter=data_converter()
    )
    rogue = Worker(
        attacker,
        task_queue=names.gateway_task_queue(GATEWAY),
        activities=[vm_create, bootstrap_render],
        # twice the agent's pollers: it takes most of the agent's tasks while it runs
        max_concurrent_activity_task_polls=10,
    )
    async with rogue:
        # six workers cloned at once: more tasks at a time than the agent has pollers, so the
        # rogue's pollers are handed some of them
        guarded = spec_for("guarded").model_dump(mode="json")
        guarded["workers"][0]["size"] = 6
        await deploy(kubegate, vcsim, type(spec_for("guarded")).model_validate(guarded))
        # the rogue answers beside the agent until some of its answers were refused; it could
        # win every retry of one call by chance (a denial of service docs/security.md admits):
        # it stops after three, so the test cannot fail by luck
        for _ in range(300):  # until its third answer, or the cluster no longer needs it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), 0.2)
            if enough.is_set():
                break
            status = (await kubegate.cluster_state("guarded")).status
            if status is not ClusterStatus.PROVISIONING:
                break
    state_c = await until(kubegate, "guarded", ClusterStatus.RUNNING)
    if not answered:  # (should not happen: the agent took every one of seven clones)
        pytest.skip("the agent took every task this time: no forged answer to refuse")
    assert all(n.vm != "VirtualMachine:vm-forged" for n in state_c.nodes)
    vms = owned_vms(vcsim, "cluster/guarded")
    assert {vm["name"] for vm in vms} == {n.name for n in state_c.nodes}
    their_ca, their_hash = theirs.ca_cert_pem.splitlines()[1], ca_cert_hash(theirs.ca_cert_pem)
    for vm in vms:
        userdata = decode(vm["extra"]["guestinfo.userdata"])
        # control-plane nodes carry the cluster's CA, joiners it in their discovery file
        # (before 0.3: its hash): never the attacker's
        shown = userdata + "".join(discovery_cas(userdata))
        assert "BEGIN CERTIFICATE" in shown or "sha256:" in shown, vm["name"]
        assert their_ca not in shown and their_hash not in shown, vm["name"]
    await kubegate.delete_cluster("guarded")
    await until(kubegate, "guarded", ClusterStatus.DELETED)


async def test_rekey_reseals_what_the_gateway_keeps_and_clusters_carry_on(
    kubegate: KubegateClient,
    vcsim: Vcsim,
    temporal: WorkflowEnvironment,
    sessions: Any,
    settings: Any,
    trust_pool: str,
) -> None:
    """A system gateway with its own agent: a cluster deployed, the agent re-keyed (on its
    machine) and restarted with the new key; the cluster is scaled and deleted through it."""
    from tests.integration.test_gateway import agent_of
    from tests.support import system_gateway
    from workers.gateway_agent import load_key, rekey

    name = "rk"
    old = load_key(settings, name)
    async with agent_of(temporal, sessions, name, old):
        await system_gateway(kubegate, name, vcsim, old)  # approved as it pairs, configured
        await kubegate.create_pool(
            IpPoolSpec.model_validate(
                {
                    "name": "rk-pool",
                    "gateway": name,
                    "kind": "range",
                    "first": "10.58.0.10",
                    "last": "10.58.0.30",
                    "prefix": 24,
                    "network_gateway": "10.58.0.1",
                }
            )
        )
        await deploy(kubegate, vcsim, spec_for("rekeyed", "rk-pool"), gateway=name)
        await until(kubegate, "rekeyed", ClusterStatus.RUNNING)
    before = await kubegate.gateway_state(name)

    new = await rekey(settings, name)
    after = await kubegate.gateway_state(name)
    assert after.agent is not None and after.agent.key_id == new.key_id != old.key_id
    assert after.agent.fingerprint == new.fingerprint and after.agent.approved
    for account in after.accounts:
        assert account.credentials.password.key_id == new.key_id
        with pytest.raises(Exception, match="sealed to key"):
            old.open(account.credentials.password, account.credentials.password.binding)  # type: ignore[arg-type]
    assert {a.name for a in after.accounts} == {a.name for a in before.accounts}
    # a forged rekey (not signed by the current key) is refused
    from domain.gateway import RekeyRequest
    from workflows.gateway import GatewayWorkflow

    forged = RekeyRequest(
        public_key=old.public_key_b64,
        key_id=old.key_id,
        signing_key=old.signing_key_b64,
        accounts={},
        signature=old.sign(b"anything"),
    )
    with pytest.raises(WorkflowUpdateFailedError):
        await kubegate.gateway_handle(name).execute_update(GatewayWorkflow.rekey, forged)

    restarted = load_key(settings, name)
    assert restarted.key_id == new.key_id and old.key_id in restarted.retired
    async with agent_of(temporal, sessions, name, restarted):
        # the gateway's own work (its configuration's credentials, sealed anew with the
        # default account's: one seal) goes on
        await kubegate.gateway_events(name)
        result = await kubegate.scale_pool("rekeyed", "w", 2)
        assert result.status == "Running", result
        await kubegate.delete_cluster("rekeyed")
        await until(kubegate, "rekeyed", ClusterStatus.DELETED)
        assert owned_vms(vcsim, "cluster/rekeyed") == []
    await record_history(temporal.client, names.gateway_workflow_id(name), "gateway_rekeyed")
    await record_history(temporal.client, "cluster/rekeyed", "cluster_rekeyed")


async def test_rotation_is_checked_before_it_is_kept_and_clusters_pick_it_up(
    kubegate: KubegateClient, vcsim: Vcsim, trust_pool: str, settings: Any
) -> None:
    """A wrong new password is refused and the old one kept; a right one (sealed anew) is
    kept, and a running cluster's next change uses it (its copy is stale: refreshed)."""
    await deploy(kubegate, vcsim, spec_for("rotated"))
    running = await until(kubegate, "rotated", ClusterStatus.RUNNING)
    account = running.account
    before = await live_credentials(kubegate, account)

    with pytest.raises(KubegateError, match="failed their checks"):
        await kubegate.rotate_account(account, "not-the-password", GATEWAY)
    assert (await live_credentials(kubegate, account)).password == before.password

    summary = await kubegate.rotate_account(account, vcsim.password, GATEWAY)
    assert summary.name == account
    after = await live_credentials(kubegate, account)
    assert after.password.digest != before.password.digest
    # the old seal is no longer live: a lifecycle holding it is told to fetch the current one
    result = await kubegate.scale_pool("rotated", "w", 2)
    assert result.status == "Running", result
    state = await kubegate.cluster_state("rotated")
    assert len(state.nodes) == 3
    # what every query answers holds the password sealed only
    handle = kubegate.gateway_handle(GATEWAY)
    answers = [
        (await kubegate.gateway_state(GATEWAY)).model_dump_json(),
        (await handle.query("authorization", result_type=AgentAuthorization)).model_dump_json(),
        (
            await handle.query("cluster_account", account, result_type=AccountAnswer)
        ).model_dump_json(),
        state.model_dump_json(),
        (
            await kubegate.cluster_handle("rotated").query("releasing", result_type=ReleaseIntent)
        ).model_dump_json(),
    ]
    assert all(vcsim.password not in answer for answer in answers)
    code, out = await run_cli(settings, "account", "rotate", account, "--gateway", GATEWAY)
    assert code == 2 and "--password-file" in out, out  # no password given: nothing done
    await kubegate.delete_cluster("rotated")
    await until(kubegate, "rotated", ClusterStatus.DELETED)
    await record_history(kubegate.client, "cluster/rotated", "cluster_rotated")


async def test_only_a_rogue_worker_on_the_queue_cannot_make_a_cluster_run(
    kubegate: KubegateClient,
    vcsim: Vcsim,
    temporal: WorkflowEnvironment,
    sessions: Any,
    settings: Any,
) -> None:
    """The gateway's agent is away; a rogue worker answers every agent task with a made-up
    success. Each answer is refused as forged; the cluster fails with ForgedResult, no VM."""
    from tests.integration.test_gateway import agent_of
    from tests.support import system_gateway
    from workers.gateway_agent import load_key

    name = "rg"
    key = load_key(settings, name)
    async with agent_of(temporal, sessions, name, key):
        await system_gateway(kubegate, name, vcsim, key)
        await ensure_account(kubegate, vcsim, name)
    calls: list[str] = []

    @activity.defn(name="preflight_all")
    async def preflight_all(request: PreflightRequest) -> PreflightReport:
        calls.append("preflight_all")
        return PreflightReport(
            account=request.account,
            gateway=request.gateway,
            server=request.credentials.endpoint.address,
            username=request.credentials.username,
            results=[],
            vcenter_requests=0,
        )

    # every other answer is not even decodable (a payload of '{'): refused the same way,
    # without failing the workflow's task
    attacker = await Client.connect(
        temporal.client.service_client.config.target_host,
        data_converter=dataclasses.replace(data_converter(), payload_codec=Garbling()),
    )
    spec = small_spec("forged", "unused").model_dump(mode="json")
    for pool in [spec["control_plane"], *spec["workers"]]:
        for placement in pool["placement"]:
            placement["ip_pool"] = None
            placement["compute_cluster"] = "DC0_C0"
    spec["placement"]["ip_allocation"] = "dhcp"
    spec["control_plane"]["vip"] = None
    async with Worker(
        attacker, task_queue=names.gateway_task_queue(name), activities=[preflight_all]
    ):
        await deploy(kubegate, vcsim, type(small_spec("x", "p")).model_validate(spec), gateway=name)
        state = await kubegate.wait_cluster(
            "forged", lambda s: s.status in (ClusterStatus.RUNNING, ClusterStatus.FAILED)
        )
    assert state.status is ClusterStatus.FAILED
    assert "forged result" in (state.error or ""), state.error
    assert len(calls) >= 8
    assert owned_vms(vcsim, "cluster/forged") == []
    await kubegate.delete_cluster("forged")


async def test_an_agent_that_raced_the_real_one_gets_nothing_and_reset_drops_it(
    kubegate: KubegateClient, vcsim: Vcsim
) -> None:
    """Someone who read the code pairs first: nothing is sealed to their key, the operator
    cannot approve it by mistake for their own agent, and a reset gives a new code."""
    from domain.gateway import GatewayStatus
    from starters.client import RequestRefused
    from tests.support import sim_file

    _, code = await kubegate.create_gateway("raced")
    thief, mine = AgentKey.generate(), AgentKey.generate()
    state = await kubegate.register_agent("raced", thief, code)
    assert state.status is GatewayStatus.PENDING and thief.fingerprint in state.reason
    with pytest.raises(RequestRefused, match="not approved"):
        await kubegate.configure_gateway("raced", sim_file(vcsim), vcsim.password)
    with pytest.raises(RequestRefused, match="not the paired agent"):
        await kubegate.approve_agent("raced", mine.fingerprint)
    with pytest.raises(RequestRefused, match="paired with another agent"):
        await kubegate.register_agent("raced", mine, code)
    _, new_code = await kubegate.reset_gateway("raced")
    assert new_code is not None and new_code != code
    state = await kubegate.wait_gateway("raced", lambda s: s.agent is None, timeout=30)
    assert state.status is GatewayStatus.PENDING
    state = await kubegate.register_agent("raced", mine, new_code)
    state = await kubegate.approve_agent("raced", mine.fingerprint)
    assert state.status is GatewayStatus.REGISTERED
    assert state.agent is not None and state.agent.fingerprint == mine.fingerprint
    history = await kubegate.gateway_handle("raced").fetch_history()
    text = history.to_json()
    assert code not in text and new_code not in text  # proofs and a verifier only
    await kubegate.delete_gateway("raced")
    await kubegate.wait_gateway("raced", lambda s: s.status is GatewayStatus.DELETED)
    await record_history(kubegate.client, "gateway/raced", "gateway_raced")


async def test_an_agent_of_another_release_is_shown_and_takes_no_new_work(
    kubegate: KubegateClient,
) -> None:
    """The agent says its release when it starts; outside this release's window (N, N-1) the
    gateway shows why and refuses new work, until the agent runs a release it accepts."""
    from domain.gateway import GatewayStatus
    from domain.version import VERSION
    from starters.client import RequestRefused

    key = AgentKey.generate()
    _, code = await kubegate.create_gateway("skewed", fingerprint=key.fingerprint)
    state = await kubegate.register_agent("skewed", key, code, version="99.0.0")
    assert state.status is GatewayStatus.REGISTERED
    state = await kubegate.gateway_state("skewed")
    assert state.agent is not None and state.agent.version == "99.0.0"
    assert state.agent_problem is not None and "upgrade the agent" in state.agent_problem
    with pytest.raises(RequestRefused, match=r"its agent is 99\.0\.0"):
        await kubegate.resize_gateway("skewed", 3)
    # the agent restarts on this release: it says so, the problem is gone
    state = await kubegate.register_agent("skewed", key, None)
    state = await kubegate.gateway_state("skewed")
    assert state.agent is not None and state.agent.version == VERSION
    assert state.agent_problem is None
    await kubegate.delete_gateway("skewed")


def discovery_cas(userdata: str) -> list[str]:
    """The CA (PEM) in a joiner's discovery kubeconfig, if its cloud-init has one."""
    found = []
    for item in yaml.safe_load(userdata).get("write_files", []):
        if item["path"].endswith("kubegate-discovery.conf"):
            config = yaml.safe_load(item["content"])
            data = config["clusters"][0]["cluster"]["certificate-authority-data"]
            found.append(base64.b64decode(data).decode())
    return found
