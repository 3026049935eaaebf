"""The gateway agent's guard: every task is checked before it runs, every result is signed.

Before an activity runs, the agent checks, in this order and from nothing a task says:
1. its **local policy** (`policy.yaml` beside its key, the datacenter operator's file): every
   vCenter the task names, with its trust mode, and every datacenter and folder;
2. its **gateway** (`gateway/<name>`'s `authorization` query and Temporal's own record of the
   workflows): the calling workflow is the gateway itself or one of its live lifecycles that
   the gateway started (its parent), the gateway workflow is the one this agent paired with
   (same first run), this agent's key is the approved one, and every credential in the task
   is the live credential of the account its seal names.
A refused task fails at once (non-retryable) with what did not match, and is logged here.
After it ran, the result is signed (Ed25519) over the request it answers; workflows verify.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from domain import errors, names
from domain.account import Placement, VCenterCredentials
from domain.audit import AuditItem, RemovalRequest
from domain.errors import field_errors
from domain.kubeconfig import MintKubeconfig, kubeconfig_statement
from domain.sealing import AgentKey, verify_signature
from domain.tags import CATEGORY, owner_tag, tag_owner
from domain.trust import (
    AgentAuthorization,
    AgentPolicy,
    SignedResult,
    canonical_json,
    compact_request,
    result_statement,
)
from domain.vm import FolderRequest, SweepRequest

log = logging.getLogger("kubegate.agent.guard")

#: how long a gateway's answer is reused (revocations take effect within this)
AUTHORIZATION_TTL = 1.0
#: how long one question to Temporal may take: a check never hangs (a slow answer is a
#: retryable GatewayUnavailable, never a task kept alive while it waits)
ASK_TIMEOUT = timedelta(seconds=10)


class PolicyError(Exception):
    """The policy file is missing or invalid (the message names the field and rule)."""


def load_policy(path: Path) -> AgentPolicy:
    """Read and validate an agent policy file."""
    if not path.exists():
        raise PolicyError(f"{path}: no agent policy (write one: see docs/security.md)")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: not YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: must be a mapping with gateway and vcenters")
    try:
        return AgentPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{path}: " + "; ".join(field_errors(exc))) from None


def write_policy(path: Path, policy: AgentPolicy) -> None:
    """Write the policy file (0600), as the operator would: fields left at their defaults
    are left out, so an agent of the release before (which refuses fields it does not know,
    such as `operators`) reads a policy that uses nothing new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(policy.model_dump(mode="json", exclude_defaults=True)))
    tmp.chmod(0o600)
    tmp.replace(path)


async def pin_gateway(client: Client, gateway: str, pin: Path) -> None:
    """Record the first run of the gateway workflow the agent just paired with (once): a
    workflow started again under the same id is not that gateway."""
    if pin.exists():
        return
    described = await client.get_workflow_handle(names.gateway_workflow_id(gateway)).describe()
    pin.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pin.write_text(described.raw_description.workflow_execution_info.first_run_id + "\n")
    pin.chmod(0o600)


class PolicyFile:
    """The policy file, read again whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._policy: AgentPolicy | None = None
        self._error: str | None = None

    def current(self) -> AgentPolicy:
        """The policy in force; PolicyError when there is none or it is invalid."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or (self._policy is None and self._error is None):
            self._stamp = stamp
            try:
                self._policy, self._error = load_policy(self.path), None
            except PolicyError as exc:
                self._policy, self._error = None, str(exc)
        if self._policy is None:
            raise PolicyError(self._error or f"{self.path}: no agent policy")
        return self._policy


def refuse(kind: str, message: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


class Walked(tuple[Any, ...]):
    """Every model inside a task's arguments, walked once (`walk` of it yields them)."""


def walk(value: Any) -> Iterator[Any]:
    """Every pydantic model inside value (itself included), depth first."""
    if isinstance(value, Walked):
        yield from value
        return
    if isinstance(value, BaseModel):
        yield value
        for name in type(value).model_fields:
            yield from walk(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from walk(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from walk(item)


def policy_problems(policy: AgentPolicy, args: Any) -> list[str]:
    """What in a task's arguments the policy forbids."""
    problems: list[str] = []
    for model in walk(args):
        if isinstance(model, VCenterCredentials):
            problem = policy.endpoint_problem(model.endpoint)
            if problem:
                problems.append(problem)
        if isinstance(model, Placement):
            problems += filter(None, [policy.datacenter_problem(model.datacenter)])
            problems += filter(None, [policy.folder_problem(model.folder)])
        elif isinstance(model, FolderRequest):
            path = "/".join(p for p in (model.parent.strip("/"), model.name) if p)
            problems += filter(None, [policy.folder_problem(path)])
        datacenter = getattr(model, "datacenter", None)
        if isinstance(datacenter, str) and not isinstance(model, Placement):
            problems += filter(None, [policy.datacenter_problem(datacenter)])
        if isinstance(model, MintKubeconfig):
            problems += filter(None, [kubeconfig_problem(policy, model)])
    problems += policy_folder_problems(policy, args)
    return sorted(set(problems))


def removal_problems(auth: AgentAuthorization, args: Any) -> list[str]:
    """What an audit's removal may not touch, by the gateway's own word: anything of a
    lifecycle the gateway says is live (its installer only once the gateway runs), anything
    unmarked; a tag only when it is an owner tag of category kubegate (the agent reads it
    again from vCenter), a VM found by its tag only by an owner tag."""
    problems: list[str] = []
    gateway_id = names.gateway_workflow_id(auth.gateway)
    for model in walk(args):
        if not isinstance(model, RemovalRequest):
            continue
        for item in model.items:
            if item.kind == "allocation" or not item.owner:
                problems.append(f"{item.id}: not a marked vSphere object")
            elif (item.kind == "tag" or item.tag) and _owner_tag_problem(item):
                problems.append(f"{item.id}: {_owner_tag_problem(item)}")
            elif item.kind == "installer":
                if item.owner == gateway_id and auth.status not in ("Running", "Upgrading"):
                    problems.append(f"{item.id}: gateway {auth.gateway}'s installer, in use")
                elif item.owner != gateway_id and item.owner in auth.lifecycles:
                    problems.append(f"{item.id}: {item.owner} is live")
            elif item.owner in auth.lifecycles:
                problems.append(f"{item.id}: {item.owner} is a live lifecycle of the gateway")
    return problems


def _owner_tag_problem(item: AuditItem) -> str | None:
    """A tag item names an owner tag of category kubegate, its owner's; a VM found by its tag
    names an owner that has such a tag."""
    tag = owner_tag(item.owner)
    if tag_owner(tag) != item.owner:
        return f"{item.owner} has no owner tag"
    if item.kind == "tag" and (item.name != tag or item.path != f"{CATEGORY}/{tag}"):
        return f"{item.path or item.name} is not {tag} of category {CATEGORY}"
    return None


def policy_folder_problems(policy: AgentPolicy, args: Any) -> list[str]:
    """Folders an audit would remove outside the policy's folders."""
    problems: list[str] = []
    for model in walk(args):
        if isinstance(model, RemovalRequest):
            base = f"/{model.datacenter.strip('/')}/vm/"
            for item in model.items:
                if item.kind == "folder":
                    problems += filter(None, [policy.folder_problem(item.path.removeprefix(base))])
    return problems


def kubeconfig_problem(policy: AgentPolicy, request: MintKubeconfig) -> str | None:
    """Why the policy does not let this kubeconfig be minted: it must be asked for by one of
    the policy's operators, signed over exactly this request."""
    if request.operator_key not in policy.operators:
        return (
            f"operator key {request.operator_key} may not have kubeconfigs (add it to the "
            "policy's operators)"
        )
    statement = kubeconfig_statement(
        request.cluster,
        request.user,
        request.ttl_seconds,
        request.recipient_key,
        request.request_id,
    )
    if not verify_signature(request.operator_key, statement, request.signature):
        return "the kubeconfig request is not signed by the operator it names"
    return None


class AgentGuard:
    """Checks tasks against the policy and the gateway; signs results."""

    def __init__(
        self,
        client: Client,
        gateway: str,
        key: AgentKey,
        policy: PolicyFile,
        pin: Path | None = None,
    ) -> None:
        self.client = client
        self.gateway = gateway
        self.gateway_id = names.gateway_workflow_id(gateway)
        self.key = key
        self.policy = policy
        self._auth: AgentAuthorization | None = None
        self._auth_at = 0.0
        self._fetching: asyncio.Future[AgentAuthorization] | None = None
        self._parents: dict[tuple[str, str], str | None] = {}
        #: the first run of the gateway workflow this agent paired with, kept in `pin`: a
        #: gateway workflow terminated and started again under the same id is not believed
        self.pin = pin
        self.first_run: str | None = None
        if pin is not None and pin.exists():
            self.first_run = pin.read_text().strip() or None

    # -- the gateway's word, from Temporal ---------------------------------------------------

    async def authorization(self) -> AgentAuthorization:
        """The gateway's authorization, at most AUTHORIZATION_TTL old (one request at a time)."""
        now = time.monotonic()
        if self._auth is not None and now - self._auth_at < AUTHORIZATION_TTL:
            return self._auth
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch())
        fetching = self._fetching
        try:
            auth = await asyncio.shield(fetching)
        finally:
            if self._fetching is fetching and fetching.done():
                self._fetching = None
        return auth

    async def _fetch(self) -> AgentAuthorization:
        handle = self.client.get_workflow_handle(self.gateway_id)
        try:
            described = await handle.describe(rpc_timeout=ASK_TIMEOUT)
            auth: AgentAuthorization = await handle.query(
                "authorization", result_type=AgentAuthorization, rpc_timeout=ASK_TIMEOUT
            )
        except Exception as exc:  # the gateway cannot answer now: try the task again later
            raise ApplicationError(
                f"cannot ask gateway {self.gateway} what it authorizes: {exc}",
                type="GatewayUnavailable",
            ) from None
        first = described.raw_description.workflow_execution_info.first_run_id
        if self.first_run is None:
            self.first_run = first
            if self.pin is not None:
                self.pin.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.pin.write_text(first + "\n")
                self.pin.chmod(0o600)
        elif first != self.first_run:
            raise refuse(
                errors.NOT_AUTHORIZED,
                f"workflow {self.gateway_id} is not the gateway this agent paired with "
                f"(first run {first}, paired with {self.first_run}); if the gateway was "
                f"deleted and created again, pair anew and remove {self.pin}",
            )
        self._auth, self._auth_at = auth, time.monotonic()
        return auth

    async def _parent(self, workflow_id: str, run_id: str) -> str | None:
        """The parent workflow id Temporal recorded for this run (cached: it never changes)."""
        key = (workflow_id, run_id)
        if key not in self._parents:
            handle = self.client.get_workflow_handle(workflow_id, run_id=run_id)
            described = await handle.describe(rpc_timeout=ASK_TIMEOUT)
            self._parents[key] = described.parent_id
        return self._parents[key]

    # -- checks ----------------------------------------------------------------------------

    async def check(self, info: activity.Info, args: Any) -> None:
        """Refuse (non-retryable ApplicationError) a task the policy or the gateway forbids;
        every refusal is logged here."""
        try:
            await self._check(info, args)
        except ApplicationError as exc:
            if exc.non_retryable:
                log.warning(
                    "refused %s for %s: %s", info.activity_type, info.workflow_id, exc.message
                )
            raise

    async def _gone(self, owner: str) -> str | None:
        """Why `owner` is not gone by Temporal's own record, asked here (never the
        workflow's word): None when no workflow ever ran under its id, or its last run ended
        Deleted."""
        if not owner.startswith(names.LIFECYCLE_PREFIXES):
            return "is no kubegate lifecycle"
        try:
            described = await self.client.get_workflow_handle(owner).describe(
                rpc_timeout=ASK_TIMEOUT
            )
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise ApplicationError(  # (retryable: Temporal will answer again)
                f"cannot ask Temporal whether {owner} is gone: {exc.message}"
            ) from None
        status = described.status
        if status == WorkflowExecutionStatus.COMPLETED:
            try:
                result = await self.client.get_workflow_handle(owner, result_type=dict).result(
                    rpc_timeout=ASK_TIMEOUT
                )
            except Exception:  # not a lifecycle's state: not Deleted
                result = None
            if isinstance(result, dict) and result.get("status") == "Deleted":
                return None
        return f"is not gone (Temporal: {status.name if status else 'unknown'})"

    async def _owners_gone(self, args: Any) -> list[str]:
        """An audit's removal: every owner it names must be gone by Temporal's record (the
        gateway's own installer excepted: the gateway rules it, see removal_problems)."""
        owners = sorted(
            {
                item.owner
                for model in walk(args)
                if isinstance(model, RemovalRequest)
                for item in model.items
                if item.owner and not (item.kind == "installer" and item.owner == self.gateway_id)
            }
        )
        problems = []
        for owner in owners:
            why = await self._gone(owner)
            if why:
                problems.append(f"{owner} {why}")
        return problems

    async def _check(self, info: activity.Info, args: Any) -> None:
        try:
            policy = self.policy.current()
        except PolicyError as exc:
            raise refuse(errors.POLICY_REFUSED, f"{info.activity_type}: {exc}") from None
        if policy.gateway != self.gateway:
            raise refuse(
                errors.POLICY_REFUSED,
                f"the agent's policy is for gateway {policy.gateway}, not {self.gateway}",
            )
        models = Walked(walk(args))  # (every check below reads them: walk the task once)
        problems = policy_problems(policy, models)
        if problems:
            raise refuse(
                errors.POLICY_REFUSED,
                f"{info.activity_type}: refused by the agent's policy: " + "; ".join(problems),
            )
        workflow_id = info.workflow_id or ""
        try:
            await self._authorized(info, args, models, await self.authorization())
        except ApplicationError as exc:
            if exc.type not in (errors.NOT_AUTHORIZED, errors.STALE_CREDENTIALS):
                raise
            # a cached answer may predate what the gateway just started: ask again, once
            self._auth = None
            await self._authorized(info, args, models, await self.authorization())
        if workflow_id != self.gateway_id:
            parent = await self._parent(workflow_id, info.workflow_run_id or "")
            if parent != self.gateway_id:
                raise refuse(
                    errors.NOT_AUTHORIZED,
                    f"{info.activity_type}: workflow {workflow_id} was not started by gateway "
                    f"{self.gateway} (its parent: {parent or 'none'})",
                )
        alive = await self._owners_gone(models)
        if alive:  # (what the audit says is gone, the agent asks Temporal itself)
            raise refuse(
                errors.NOT_AUTHORIZED,
                f"{info.activity_type}: refused, its owner is not gone: " + "; ".join(alive),
            )
        for model in walk(models):  # a sweep only of the caller's own VMs
            if isinstance(model, SweepRequest) and model.cluster_id != workflow_id:
                raise refuse(
                    errors.NOT_AUTHORIZED,
                    f"{info.activity_type}: {workflow_id} may sweep only its own VMs, not "
                    f"{model.cluster_id}'s",
                )

    async def _authorized(
        self, info: activity.Info, args: Any, models: Walked, auth: AgentAuthorization
    ) -> None:
        """Refuse unless the gateway authorizes this workflow, this agent and these credentials."""
        workflow_id = info.workflow_id or ""
        if auth.agent_key_id != self.key.key_id or (
            auth.agent_signing_key != self.key.signing_key_b64
        ):
            raise ApplicationError(
                f"gateway {self.gateway} has not approved this agent (key {self.key.key_id})",
                type=errors.NOT_AUTHORIZED,
                non_retryable=True,
            )
        if workflow_id not in auth.lifecycles:
            raise ApplicationError(
                f"{info.activity_type}: workflow {workflow_id} is not a lifecycle of gateway "
                f"{self.gateway}",
                type=errors.NOT_AUTHORIZED,
                non_retryable=True,
            )
        for model in walk(models):
            if isinstance(model, VCenterCredentials):
                self._check_credentials(model, workflow_id, auth, args)
        problems = removal_problems(auth, models)
        if problems:
            raise ApplicationError(
                f"{info.activity_type}: " + "; ".join(problems),
                type=errors.NOT_AUTHORIZED,
                non_retryable=True,
            )

    def _check_credentials(
        self,
        credentials: VCenterCredentials,
        workflow_id: str,
        auth: AgentAuthorization,
        args: Any,
    ) -> None:
        binding = credentials.password.binding
        if binding is None:
            raise refuse(
                errors.SECRET_UNREADABLE,
                "the vCenter password was sealed by an older kubegate without a binding: "
                "rotate the account's password (kubegate account rotate)",
            )
        named = [getattr(a, "account", None) for a in args if isinstance(a, BaseModel)]
        for account in named:
            if isinstance(account, str) and account and account != binding.account:
                raise refuse(
                    errors.SECRET_UNREADABLE,
                    f"the password was sealed for cloud account {binding.account}, the task "
                    f"is for {account}",
                )
        problem = auth.credentials_problem(
            workflow_id, binding.account, credentials.password.digest
        )
        if problem:
            kind = errors.STALE_CREDENTIALS if "rotated" in problem else errors.NOT_AUTHORIZED
            raise ApplicationError(problem, type=kind, non_retryable=True)

    # -- signatures ------------------------------------------------------------------------

    def sign(self, info: activity.Info, args: Any, result: Any) -> SignedResult:
        """The result as JSON, signed over the request it answers."""
        body = canonical_json(result).decode()
        call = (info.workflow_id or "", info.workflow_run_id or "", info.activity_id)
        full = result_statement(*call, info.activity_type, canonical_json(list(args)), body)
        compact = result_statement(
            *call, info.activity_type, compact_request(args), body, compact=True
        )
        return SignedResult(
            body=body,
            key_id=self.key.key_id,
            signature=self.key.sign(full),
            compact_signature=self.key.sign(compact),
            attempt=info.attempt,
        )


class GuardInterceptor(Interceptor):
    """Puts the guard in front of every activity of the agent's worker."""

    def __init__(self, guard: AgentGuard) -> None:
        self.guard = guard

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Guarded(next, self.guard)


#: how often the agent tells Temporal a task is alive, whatever the activity does meanwhile:
#: a quarter of the task's heartbeat timeout, within these bounds (Temporal's client sends at
#: most one heartbeat per 0.8 x the timeout anyway; each local one costs the agent CPU)
KEEPALIVE_SECONDS = (1.0, 5.0)


def beat_period(info: activity.Info) -> float:
    """Seconds between the heartbeats of a task that has nothing new to say."""
    low, high = KEEPALIVE_SECONDS
    timeout = info.heartbeat_timeout
    if timeout is None:
        return low
    return min(high, max(low, timeout.total_seconds() / 4))


class _Guarded(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, guard: AgentGuard) -> None:
        super().__init__(next)
        self.guard = guard
        self.beats: _Beats | None = None

    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        self.beats = _Beats(outbound)
        super().init(self.beats)

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        if self.beats is not None:  # until this attempt says more, what the last one said
            self.beats.details = tuple(info.heartbeat_details)
        keepalive = asyncio.create_task(self._keepalive())
        try:
            await self.guard.check(info, input.args)
            result = await self.next.execute_activity(input)
        finally:
            keepalive.cancel()
        return self.guard.sign(info, input.args, result)

    async def _keepalive(self) -> None:
        """Heartbeat a task whose activity does not heartbeat itself, repeating the details
        its last attempt left (a vCenter task's ref): a short heartbeat timeout then finds a
        dead agent quickly and a retry still re-attaches. Once the activity heartbeats itself
        it is judged by its own heartbeats (a hung wait is not kept alive)."""
        period = beat_period(activity.info())
        while self.beats is not None and not self.beats.own:
            self.beats.again()
            await asyncio.sleep(period)


class _Beats(ActivityOutboundInterceptor):
    """Remembers the activity's last heartbeat details, to repeat them."""

    def __init__(self, next: ActivityOutboundInterceptor) -> None:
        super().__init__(next)
        self.details: tuple[Any, ...] = ()
        self.own = False  # the activity heartbeated itself

    def heartbeat(self, *details: Any) -> None:
        self.details, self.own = details, True
        super().heartbeat(*details)

    def again(self) -> None:
        super().heartbeat(*self.details)
