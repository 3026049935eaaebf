"""vSphere tags (vAPI REST) and custom attributes (SOAP) on what kubegate makes.

`vm_tag` makes the categories and tags it is asked for once (ids kept per vCenter by the
worker: later calls make none) and attaches each tag to all its objects in one call
(`attach-tag-to-multiple-objects`); custom attributes cost one `SetField` per VM and field.
A missing privilege is reported in the result (the step records it): tagging is best effort.
`vm_untag` deletes tags by id (gone = done). `tagged_objects` serves the delete sweep,
`owner_tags` and `owner_tag_problem` the orphan audit (activities/vsphere/audit.py).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from pyVmomi import vim, vmodl
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.secrets import open_password
from activities.vsphere.calls import call_vcenter, shielded
from activities.vsphere.faults import classify
from activities.vsphere.inventory import from_ref, ref, retrieve
from activities.vsphere.rest import RestError, RestPool, RestSession
from activities.vsphere.session import SessionPool, VSphereSession, request_meter
from domain import errors
from domain.account import VCenterCredentials
from domain.audit import OwnerTag
from domain.sealing import AgentKey
from domain.tags import (
    CATEGORIES,
    CATEGORY,
    TagRequest,
    TagResult,
    TagSpec,
    UntagRequest,
    UntagResult,
    owner_tag,
    tag_owner,
)

T = TypeVar("T")

CATEGORY_PATH = "/com/vmware/cis/tagging/category"
TAG_PATH = "/com/vmware/cis/tagging/tag"
ASSOCIATION_PATH = "/com/vmware/cis/tagging/tag-association"
DESCRIPTION = "Managed by kubegate"

_pools: weakref.WeakKeyDictionary[SessionPool, RestPool] = weakref.WeakKeyDictionary()


def rest_pool(sessions: SessionPool) -> RestPool:
    """The vAPI sessions that go with a worker's SOAP sessions (logged out with them)."""
    pool = _pools.get(sessions)
    if pool is None:
        pool = _pools[sessions] = RestPool(timeout=sessions.timeout)
        sessions.on_close.append(pool.close_all)
    return pool


def call_rest(
    key: AgentKey,
    sessions: SessionPool,
    credentials: VCenterCredentials,
    context: str,
    call: Callable[[RestSession, dict[str, str]], T],
) -> T:
    """Open the sealed password, run call with a vAPI session and the vCenter's known ids,
    classify what goes wrong."""
    password = open_password(key, credentials)
    pool = rest_pool(sessions)
    known = pool.known(credentials.endpoint)
    try:
        with shielded():
            return pool.run(
                credentials.endpoint,
                credentials.username,
                password,
                lambda session: call(session, known),
            )
    except (ApplicationError, CancelledError):
        raise
    except Exception as exc:
        raise classify(exc, context) from None


# --- tagging over a session -------------------------------------------------------------------


def find_category(session: RestSession, known: dict[str, str], name: str) -> str | None:
    """The category's id: known, else looked for among vCenter's (each category not known
    yet read once); None when there is none of that name."""
    if name in known:
        return known[name]
    for category_id in session.request("GET", CATEGORY_PATH) or []:
        if category_id in known.values():
            continue
        info = session.request("GET", f"{CATEGORY_PATH}/id:{category_id}") or {}
        known[str(info.get("name"))] = str(category_id)
        if info.get("name") == name:
            break
    return known.get(name)


def ensure_category(session: RestSession, known: dict[str, str], name: str) -> str:
    """The category's id: known, else made (or, made meanwhile, found)."""
    if name in known:
        return known[name]
    cardinality, types = CATEGORIES[name]
    spec = {"name": name, "description": DESCRIPTION, "cardinality": cardinality}
    spec["associable_types"] = types  # type: ignore[assignment]
    try:
        known[name] = str(session.request("POST", CATEGORY_PATH, {"create_spec": spec}))
    except RestError as exc:
        if not exc.already_exists:
            raise
        if find_category(session, known, name) is None:
            raise RestError(404, "not_found", f"category {name} exists but was not found") from None
    return known[name]


def ensure_tag(session: RestSession, known: dict[str, str], category: str, name: str) -> str:
    """The tag's id (category by name): known, else made (or found)."""
    key = f"{category}/{name}"
    if key in known:
        return known[key]
    category_id = ensure_category(session, known, category)
    spec = {"name": name, "description": DESCRIPTION, "category_id": category_id}
    try:
        known[key] = str(session.request("POST", TAG_PATH, {"create_spec": spec}))
    except RestError as exc:
        if not exc.already_exists:
            raise
        ids = session.request(
            "POST", f"{TAG_PATH}/id:{category_id}", action="list-tags-for-category"
        )
        for tag_id in ids or []:
            if tag_id in known.values():
                continue
            info = session.request("GET", f"{TAG_PATH}/id:{tag_id}") or {}
            known[f"{category}/{info.get('name')}"] = str(tag_id)
            if info.get("name") == name:
                break
        if key not in known:
            raise RestError(404, "not_found", f"tag {key} exists but was not found") from None
    return known[key]


def _object_id(value: str) -> dict[str, str]:
    kind, _, moid = value.partition(":")
    return {"type": kind, "id": moid}


def attach(session: RestSession, tag_id: str, objects: list[str]) -> None:
    """Attach one tag to many objects in one call (attached already: fine)."""
    answer = session.request(
        "POST",
        f"{ASSOCIATION_PATH}/id:{tag_id}",
        {"object_ids": [_object_id(o) for o in objects]},
        action="attach-tag-to-multiple-objects",
    )
    # vCenter answers a batch result; the simulator answers nothing
    if isinstance(answer, dict) and answer.get("success") is False:
        texts = [
            str(m.get("default_message") or m.get("id") or "")
            for e in answer.get("error_messages") or []
            if isinstance(e, dict)
            for m in [e]
        ]
        text = "; ".join(t for t in texts if t)[:300] or "no details"
        status = 403 if "privilege" in text.lower() or "permission" in text.lower() else 400
        raise RestError(status, "batch_failed", text)


def attach_spec(session: RestSession, known: dict[str, str], spec: TagSpec) -> str:
    """Make the spec's tag if missing and attach it to its objects; a tag deleted behind our
    back (its known id unknown to vCenter) is made again once."""
    tag_id = ensure_tag(session, known, spec.category, spec.name)
    if not spec.objects:
        return tag_id
    try:
        attach(session, tag_id, spec.objects)
    except RestError as exc:
        if exc.status != 404:
            raise
        _forget(known, tag_id)
        tag_id = ensure_tag(session, known, spec.category, spec.name)
        attach(session, tag_id, spec.objects)
    return tag_id


def _forget(known: dict[str, str], tag_id: str) -> None:
    for name in [n for n, i in known.items() if i == tag_id]:
        known.pop(name, None)


def delete_tag(session: RestSession, known: dict[str, str], tag_id: str) -> bool:
    """Delete a tag; False when it was gone already."""
    _forget(known, tag_id)
    try:
        session.request("DELETE", f"{TAG_PATH}/id:{tag_id}")
    except RestError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _refs(found: Any) -> list[str]:
    return [f"{o['type']}:{o['id']}" for o in found or [] if isinstance(o, dict)]


def attached_objects(session: RestSession, tag_id: str) -> list[str]:
    """'Type:id' of every object carrying the tag (none when the tag is gone)."""
    try:
        found = session.request(
            "POST", f"{ASSOCIATION_PATH}/id:{tag_id}", {}, action="list-attached-objects"
        )
    except RestError as exc:
        if exc.status == 404:
            return []
        raise
    return _refs(found)


def objects_on_tags(session: RestSession, tag_ids: list[str]) -> dict[str, list[str]]:
    """tag id -> 'Type:id' of the objects carrying it: one batch call
    (`list-attached-objects-on-tags`); where vCenter does not have it, one call per tag."""
    if not tag_ids:
        return {}
    try:
        found = session.request(
            "POST",
            ASSOCIATION_PATH,
            {"tag_ids": tag_ids},
            action="list-attached-objects-on-tags",
        )
    except RestError as exc:
        if exc.status in (401, 403):
            raise
        return {tag_id: attached_objects(session, tag_id) for tag_id in tag_ids}
    out: dict[str, list[str]] = {tag_id: [] for tag_id in tag_ids}
    for entry in found or []:
        if isinstance(entry, dict) and entry.get("tag_id") in out:
            out[str(entry["tag_id"])] = _refs(entry.get("object_ids"))
    return out


def tag_info(session: RestSession, tag_id: str) -> dict[str, Any] | None:
    """A tag's name and category_id (None: no such tag)."""
    try:
        info = session.request("GET", f"{TAG_PATH}/id:{tag_id}")
    except RestError as exc:
        if exc.status == 404:
            return None
        raise
    return info if isinstance(info, dict) else None


def owner_tags(session: RestSession, known: dict[str, str]) -> list[OwnerTag]:
    """Every owner tag of category `kubegate` (`cluster:<name>`, `gateway-nodes:<name>`) and
    what carries it. Requests: the category's id (known: none), one listing of its tags, one
    read of each tag whose name is not known, one batch listing of the owner tags' objects.
    Shared tags (pool:, gateway:) are read but never returned."""
    category_id = find_category(session, known, CATEGORY)
    if category_id is None:
        return []
    ids = session.request("POST", f"{TAG_PATH}/id:{category_id}", action="list-tags-for-category")
    prefix = f"{CATEGORY}/"
    names = {i: n.removeprefix(prefix) for n, i in known.items() if n.startswith(prefix)}
    found: list[OwnerTag] = []
    for tag_id in sorted(str(i) for i in ids or []):
        name = names.get(tag_id)
        if name is None:
            info = tag_info(session, tag_id)
            if info is None or info.get("category_id") != category_id:
                continue  # deleted meanwhile
            name = str(info.get("name") or "")
            known[prefix + name] = tag_id
        owner = tag_owner(name)
        if owner is not None:
            found.append(OwnerTag(id=tag_id, name=name, owner=owner))
    objects = objects_on_tags(session, [t.id for t in found])
    for tag in found:
        tag.objects = sorted(objects.get(tag.id, []))
    return found


def owner_tag_problem(
    session: RestSession, known: dict[str, str], tag_id: str, name: str, owner: str
) -> str | None:
    """Why tag_id is not (or no longer) `name`, the owner tag of `owner` in category
    `kubegate`; None when it is. Read from vCenter (one or two requests), not from `known`."""
    info = tag_info(session, tag_id)
    if info is None:
        return "the tag is gone"
    now = str(info.get("name") or "")
    if now != name or tag_owner(now) != owner:
        return f"the tag is now named {now!r}, not {name!r}"
    category_id = str(info.get("category_id") or "")
    if known.get(CATEGORY) != category_id:
        category = session.request("GET", f"{CATEGORY_PATH}/id:{category_id}") or {}
        if category.get("name") != CATEGORY:
            return f"the tag is in category {category.get('name')!r}, not {CATEGORY!r}"
        known[CATEGORY] = category_id
    return None


# --- custom attributes ---------------------------------------------------------------------

#: (server, port) -> custom attribute name -> key
_field_keys: dict[tuple[str, int], dict[str, int]] = {}


def _field_key(session: VSphereSession, name: str) -> int:
    """The key of the VM custom attribute `name`, defined if missing (known keys: no request)."""
    known = _field_keys.setdefault((session.endpoint.server.lower(), session.endpoint.port), {})
    if name in known:
        return known[name]
    manager = session.content.customFieldsManager
    found = retrieve(session, [manager], ["field"]).get(ref(manager), {})
    for definition in found.get("field") or []:
        if definition.managedObjectType in (None, vim.VirtualMachine):
            known[definition.name] = definition.key
    if name not in known:
        try:
            known[name] = manager.AddCustomFieldDef(name=name, moType=vim.VirtualMachine).key
        except vim.fault.DuplicateName:  # defined meanwhile
            _field_keys.pop((session.endpoint.server.lower(), session.endpoint.port), None)
            return _field_key(session, name)
    return known[name]


def set_fields(session: VSphereSession, fields: dict[str, dict[str, str]]) -> int:
    """Set custom attributes on VMs (a VM gone is skipped); the number set."""
    manager = session.content.customFieldsManager
    done = 0
    for vm_ref, values in sorted(fields.items()):
        for name, value in sorted(values.items()):
            key = _field_key(session, name)
            try:
                manager.SetField(entity=from_ref(session, vm_ref), key=key, value=value)
            except vmodl.fault.ManagedObjectNotFound:
                break  # the VM is gone
            done += 1
    return done


# --- activities --------------------------------------------------------------------------


class TagActivities:
    """The tagging activities of one gateway agent."""

    def __init__(self, key: AgentKey, sessions: SessionPool) -> None:
        self.key = key
        self.sessions = sessions

    @activity.defn(name="vm_tag")
    def tag(self, request: TagRequest) -> TagResult:
        """Make and attach the tags, set the custom attributes; missing privileges reported."""
        result = TagResult()

        owner = activity.info().workflow_id or ""
        for spec in request.tags:  # an owner tag only the caller's own (sweeps trust it)
            named = tag_owner(spec.name) if spec.category == CATEGORY else None
            if named is not None and named != owner:
                raise ApplicationError(
                    f"tag {spec.name} is {named}'s, not {owner}'s",
                    type=errors.NOT_AUTHORIZED,
                    non_retryable=True,
                )

        def tag_all(session: RestSession, known: dict[str, str]) -> None:
            for spec in request.tags:
                tag_id = attach_spec(session, known, spec)
                result.ids[f"{spec.category}/{spec.name}"] = tag_id
                result.attached += len(spec.objects)

        with request_meter() as meter:
            if request.tags:
                try:
                    call_rest(self.key, self.sessions, request.credentials, "tag VMs", tag_all)
                except ApplicationError as exc:
                    if exc.type != errors.MISSING_PRIVILEGE:
                        raise
                    result.problems.append(f"tags: {exc.message}")
            if request.fields:
                try:
                    result.fields_set = call_vcenter(
                        self.key,
                        self.sessions,
                        request.credentials,
                        "set custom attributes",
                        lambda session: set_fields(session, request.fields),
                    )
                except ApplicationError as exc:
                    if exc.type != errors.MISSING_PRIVILEGE:
                        raise
                    result.problems.append(f"custom attributes: {exc.message}")
        result.vcenter_requests = meter[0]
        return result

    @activity.defn(name="vm_untag")
    def untag(self, request: UntagRequest) -> UntagResult:
        """Delete the tags (gone already: done)."""
        result = UntagResult()

        owner = activity.info().workflow_id or ""
        mine = owner_tag(owner)

        def delete(session: RestSession, known: dict[str, str]) -> None:
            for tag_id in request.tag_ids:
                # only the caller's own owner tag, read back from vCenter (never a customer's
                # tag, a shared one, or another lifecycle's)
                problem = owner_tag_problem(session, known, tag_id, mine, owner)
                if problem == "the tag is gone":
                    continue
                if problem:
                    raise ApplicationError(
                        f"tag {tag_id} is not {mine} of category {CATEGORY}: {problem}",
                        type=errors.NOT_AUTHORIZED,
                        non_retryable=True,
                    )
                if delete_tag(session, known, tag_id):
                    result.deleted.append(tag_id)

        with request_meter() as meter:
            call_rest(self.key, self.sessions, request.credentials, "delete tags", delete)
        result.vcenter_requests = meter[0]
        return result

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for the agent's worker."""
        return [self.tag, self.untag]


def tagged_objects(
    key: AgentKey, sessions: SessionPool, credentials: VCenterCredentials, tag_id: str
) -> list[str]:
    """The objects carrying a tag, for the delete sweep; [] when tags cannot be read for
    good (e.g. a missing privilege: the sweep goes by the extraConfig marks alone), and when
    the tag is not the caller's own owner tag of category kubegate (read back first)."""
    owner = activity.info().workflow_id or ""

    def objects(session: RestSession, known: dict[str, str]) -> list[str]:
        problem = owner_tag_problem(session, known, tag_id, owner_tag(owner), owner)
        if problem:
            with contextlib.suppress(Exception):
                activity.logger.warning("sweep without the tag %s: %s", tag_id, problem)
            return []
        return attached_objects(session, tag_id)

    try:
        return call_rest(key, sessions, credentials, "list tagged VMs", objects)
    except ApplicationError as exc:
        if exc.non_retryable:
            with contextlib.suppress(Exception):
                activity.logger.warning("sweep without tags: %s", exc.message)
            return []
        raise
