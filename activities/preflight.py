"""Preflight checks of a cloud account and placement; run on the gateway agent.

Each activity reports what it found as CheckResults instead of raising: a failed check is
an answer, not an error. Only a secret the agent cannot open, or a bug, raises.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, TypeVar

from pyVmomi import vim, vmodl
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.secrets import open_password
from activities.vsphere.calls import shielded
from activities.vsphere.faults import classify
from activities.vsphere.inventory import (
    find_by_path,
    from_ref,
    inventory_paths,
    ref,
    retrieve_mixed,
    retrieve_spec,
)
from activities.vsphere.session import SessionPool, VSphereSession, request_meter
from domain import errors
from domain.account import VCenterCredentials
from domain.preflight import (
    CheckBatch,
    CheckResult,
    CheckStatus,
    InventoryBatch,
    ObjectChecksRequest,
    PreflightReport,
    PreflightRequest,
    skipped,
    version_supported,
)
from domain.privileges import DISPLAY_NAME, ROLE_OF_OBJECT, all_privilege_ids, privilege_ids
from domain.sealing import AgentKey

PASS, WARN, FAIL = CheckStatus.PASS, CheckStatus.WARN, CheckStatus.FAIL
B = TypeVar("B", bound=CheckBatch)

#: What each placement role must be in vSphere, and how to say it.
_EXPECTED_TYPES: dict[str, tuple[tuple[str, ...], str]] = {
    "datacenter": (("Datacenter",), "datacenter"),
    "compute_cluster": (("ClusterComputeResource",), "compute cluster"),
    "resource_pool": (("ResourcePool",), "resource pool"),
    "datastore": (("Datastore",), "datastore"),
    "network": (
        ("Network", "DistributedVirtualPortgroup", "OpaqueNetwork"),
        "network or port group",
    ),
    "folder": (("Folder",), "VM folder"),
    "template": (("VirtualMachine",), "VM template"),
}


#: how long a user's privileges found complete are believed (HasPrivilegeOnEntities is the
#: costliest answer of a deploy to read: every privilege of both roles on every object)
PRIVILEGES_TTL = 60.0


class PreflightActivities:
    """The preflight activities of one gateway agent (its key opens sealed passwords)."""

    def __init__(self, key: AgentKey, sessions: SessionPool) -> None:
        self.key = key
        self.sessions = sessions
        #: (vCenter, port, user, objects) -> (read at, granted): complete answers only, so a
        #: missing privilege is asked again at every check (and a fix is seen at once)
        self._privileges: dict[tuple[str, int, str, tuple[str, ...]], tuple[float, Granted]] = {}
        self._privileges_locks: dict[tuple[str, int, str, tuple[str, ...]], threading.Lock] = {}
        self._privileges_guard = threading.Lock()

    def password(self, credentials: VCenterCredentials) -> str:
        return open_password(self.key, credentials)

    def _run(self, credentials: VCenterCredentials, call: Any) -> Any:
        with shielded():  # a cancellation never cuts a SOAP exchange on a pooled session
            return self.sessions.run(
                credentials.endpoint, credentials.username, self.password(credentials), call
            )

    @activity.defn(name="preflight_connection")
    def connection(self, request: PreflightRequest) -> CheckBatch:
        """vCenter reachable, certificate trusted, login works, version supported."""
        creds = request.credentials
        endpoint = creds.endpoint
        batch = CheckBatch()
        results = batch.results
        try:
            with socket.create_connection((endpoint.server, endpoint.port), timeout=10):
                pass
        except OSError as exc:
            results.append(
                CheckResult(
                    check="vcenter.reachable",
                    title="vCenter reachable",
                    status=FAIL,
                    object=endpoint.address,
                    detail=classify(exc, f"connect to {endpoint.address}").message,
                    remedy="check the address and port, DNS, and that the gateway's network "
                    "may reach vCenter",
                )
            )
            results += _skip_rest(["vcenter.tls", "vcenter.login", "vcenter.version"])
            return batch
        results.append(
            CheckResult(
                check="vcenter.reachable",
                title="vCenter reachable",
                status=PASS,
                object=endpoint.address,
                detail="TCP connection accepted",
            )
        )
        logins = self.sessions.logins
        with request_meter() as meter:
            try:
                password = self.password(creds)
                if request.fresh_login:
                    # a real login: a cached session would survive a changed password
                    session = self.sessions.renew(creds.endpoint, creds.username, password)
                else:
                    # the cluster's preflight: reuse the session other activities are using
                    session = self.sessions.get(creds.endpoint, creds.username, password)
            except ApplicationError:
                raise
            except Exception as exc:
                results += _login_failure(exc, creds)
                batch.vcenter_requests = meter[0]
                return batch
        batch.vcenter_requests = meter[0]
        results.append(_tls_result(creds))
        results.append(
            CheckResult(
                check="vcenter.login",
                title="Login",
                status=PASS,
                object=f"user {creds.username}",
                detail=f"logged in to {endpoint.address}"
                if self.sessions.logins != logins
                else f"reused this gateway's session on {endpoint.address}",
            )
        )
        results.append(_version_result(session.content.about))
        return batch

    @activity.defn(name="preflight_inventory")
    def inventory(self, request: PreflightRequest) -> InventoryBatch:
        """Every placement object exists and is of the right kind; the template is a template.

        Each distinct inventory path of all placements is looked up once.
        """
        assert request.placement is not None
        primary = request.placement.inventory_paths()
        roles: dict[str, str] = {}  # path -> role, in check order
        for placement in request.placements():
            for role, path in placement.inventory_paths().items():
                roles.setdefault(path, role)
        batch = InventoryBatch()

        def check(session: VSphereSession) -> None:
            # each datacenter found, then its folders, clusters, pools, datastores and
            # networks in one traversal; any other path (VMs, hosts, what the traversal did
            # not find) is looked up by itself
            known: dict[str, Any] = {}
            for path, role in roles.items():
                if role == "datacenter":
                    known[path] = found = find_by_path(session, path)
                    if isinstance(found, vim.Datacenter):
                        known.update(inventory_paths(session, found, path.strip("/")))
            objects: dict[str, Any] = {}
            for path, role in roles.items():
                obj = known[path] if path in known else find_by_path(session, path)
                kinds, word = _EXPECTED_TYPES[role]
                if obj is None:
                    batch.results.append(_missing(role, word, path))
                elif obj._wsdlName not in kinds:
                    batch.results.append(
                        CheckResult(
                            check=f"exists.{role}",
                            title=f"{_capital(word)} exists",
                            status=FAIL,
                            object=path,
                            detail=f"{path} is a {obj._wsdlName}, not a {word}",
                            remedy=f"name a {word} in placement.{role}",
                        )
                    )
                else:
                    objects[path] = obj
            extra: dict[str, tuple[Any, list[str]]] = {}
            for path, obj in objects.items():
                if roles[path] in _EXTRA_PROPERTIES:
                    extra.setdefault(ref(obj), (obj, _EXTRA_PROPERTIES[roles[path]]))
            props = retrieve_mixed(session, list(extra.values())) if extra else {}
            for path, obj in objects.items():
                role = roles[path]
                batch.results.append(_exists_result(role, path, props.get(ref(obj), {})))
                if batch.results[-1].status is PASS:
                    batch.refs[path] = ref(obj)
            batch.found = {r: batch.refs[p] for r, p in primary.items() if p in batch.refs}

        return self._guarded(request.credentials, check, batch)

    @activity.defn(name="preflight_privileges")
    def privileges(self, request: ObjectChecksRequest) -> CheckBatch:
        """The user holds the root-level role on root and datacenter, the cluster role below;
        one request for every distinct object of every placement."""
        batch = CheckBatch()
        user = request.credentials.username

        def check(session: VSphereSession) -> None:
            entities: dict[str, tuple[str, Any]] = {"/": ("root", session.content.rootFolder)}
            for path, (role, value) in request.objects().items():
                if role in ROLE_OF_OBJECT:
                    entities[path] = (role, from_ref(session, value))
            distinct = {ref(e): e for _, e in entities.values()}
            endpoint = request.credentials.endpoint
            key = (endpoint.server.lower(), endpoint.port, user.lower(), tuple(sorted(distinct)))
            with self._privileges_guard:
                lock = self._privileges_locks.setdefault(key, threading.Lock())
            with lock:  # (concurrent deploys through one account ask once)
                cached = self._privileges.get(key)
                fresh = cached is not None and time.monotonic() - cached[0] < PRIVILEGES_TTL
                granted = cached[1] if cached is not None and fresh else None
                if granted is None:
                    granted = _granted(session, list(distinct.values()))
                complete = True
                for path, (role, entity) in entities.items():
                    role_name = ROLE_OF_OBJECT[role]
                    have = granted.get(ref(entity), set())
                    missing = [p for p in privilege_ids(role_name) if p not in have]
                    complete = complete and not missing
                    batch.results.append(_privilege_result(role, path, role_name, user, missing))
                if complete and not fresh:
                    self._privileges[key] = (time.monotonic(), granted)

        return self._guarded(request.credentials, check, batch)

    @activity.defn(name="preflight_hosts")
    def hosts(self, request: ObjectChecksRequest) -> CheckBatch:
        """NTP configured on every host of each compute cluster; each placement's datastore
        mounted on all hosts of its cluster. One property read for all of it."""
        batch = CheckBatch()
        objects = request.objects()
        pairs: list[tuple[str, str | None]] = []  # (cluster path, datastore path or None)
        shown: dict[str, str] = {}  # cluster path -> its name as the placement gives it
        for placement in [request.placement, *request.more_placements]:
            paths = placement.inventory_paths()
            if paths["compute_cluster"] not in objects:
                continue
            datastore = paths["datastore"] if paths["datastore"] in objects else None
            shown.setdefault(paths["compute_cluster"], placement.compute_cluster)
            if (paths["compute_cluster"], datastore) not in pairs:
                pairs.append((paths["compute_cluster"], datastore))
        # with several clusters, say which one a host or a datastore result is about
        qualify = len(shown) > 1

        def check(session: VSphereSession) -> None:
            cluster_objs = {c: from_ref(session, objects[c][1]) for c in shown}
            ds_objs = {d: from_ref(session, objects[d][1]) for _, d in pairs if d is not None}
            spec = _hosts_spec(list(cluster_objs.values()), list(ds_objs.values()))
            props = retrieve_spec(session, spec)
            hosts_of: dict[str, list[Any]] = {}
            for path, cluster in cluster_objs.items():
                hosts = list(props.get(ref(cluster), {}).get("host") or [])
                hosts_of[path] = hosts
                names = _host_names(hosts, props)
                where = f" (compute cluster {shown[path]})" if qualify else ""
                if not hosts:
                    batch.results.append(
                        CheckResult(
                            check="hosts.present",
                            title="Hosts in the compute cluster",
                            status=FAIL,
                            object=shown[path],
                            detail="the compute cluster has no hosts",
                            remedy="add hosts to the cluster",
                        )
                    )
                for host in hosts:
                    result = _ntp_result(names[ref(host)], props.get(ref(host), {}))
                    result.object += where
                    batch.results.append(result)
            for cluster_path, ds_path in pairs:
                if ds_path is None:
                    continue
                hosts = hosts_of[cluster_path]
                ds = props.get(ref(ds_objs[ds_path]), {})
                result = _shared_storage_result(ds, hosts, _host_names(hosts, props))
                if qualify:
                    result.object += f" for compute cluster {shown[cluster_path]}"
                batch.results.append(result)

        return self._guarded(request.credentials, check, batch)

    @activity.defn(name="preflight_all")
    def all_checks(self, request: PreflightRequest) -> PreflightReport:
        """Every check of PreflightWorkflow in one activity, in the same order and with the same
        skips: for callers on a critical path (the cluster workflow), one round trip."""
        connection = self.connection(request)
        results = list(connection.results)
        requests = connection.vcenter_requests
        refs: dict[str, str] = {}
        placement = request.placement
        connected = not any(r.status is FAIL for r in results)
        if placement is not None and not connected:
            results.append(
                skipped("placement", "Placement checks", "not checked: cannot log in to vCenter")
            )
        elif placement is not None:
            inventory = self.inventory(request)
            results += inventory.results
            requests += inventory.vcenter_requests
            refs = inventory.refs
            objects = ObjectChecksRequest(
                credentials=request.credentials,
                placement=placement,
                found=inventory.found,
                more_placements=request.more_placements,
                refs=refs,
            )
            privileges = self.privileges(objects)
            results += privileges.results
            requests += privileges.vcenter_requests
            clusters = "compute_cluster" in inventory.found or any(
                more.inventory_paths()["compute_cluster"] in refs
                for more in request.more_placements
            )
            if clusters:
                hosts = self.hosts(objects)
                results += hosts.results
                requests += hosts.vcenter_requests
            else:
                results.append(
                    skipped("hosts", "NTP and shared storage", "not checked: no compute cluster")
                )
        return PreflightReport(
            account=request.account,
            gateway=request.gateway,
            server=request.credentials.endpoint.address,
            username=request.credentials.username,
            results=results,
            vcenter_requests=requests,
            refs=refs,
        )

    def _guarded(self, creds: VCenterCredentials, check: Any, batch: B) -> B:
        """Run a check, counting its vCenter requests; a vCenter failure becomes one failed
        result instead of an error."""
        with request_meter() as meter:
            try:
                self._run(creds, check)
            except ApplicationError:
                raise
            except Exception as exc:
                batch.results.append(self._failure(creds, exc))
        batch.vcenter_requests = meter[0]
        return batch

    @staticmethod
    def _failure(creds: VCenterCredentials, exc: Exception) -> CheckResult:
        error = classify(exc, activity.info().activity_type)
        return CheckResult(
            check=f"{activity.info().activity_type}.error",
            title="vCenter request",
            status=FAIL,
            object=creds.endpoint.address,
            detail=error.message,
            remedy="see docs/vsphere-errors.md for this error type: " + (error.type or ""),
        )


#: Properties the inventory check reads of some roles (one request for all of them).
_EXTRA_PROPERTIES: dict[str, list[str]] = {
    "folder": ["childType"],
    "template": ["config.template"],
}

_HOST_PROPERTIES = ["name", "config.dateTimeInfo.ntpConfig.server", "runtime.connectionState"]


def _hosts_spec(
    clusters: list[Any], datastores: list[Any]
) -> vmodl.query.PropertyCollector.FilterSpec:
    """One property read: each cluster's hosts and their NTP settings and connection state
    (through a traversal), each datastore's name and host mounts."""
    to_hosts = vmodl.query.PropertyCollector.TraversalSpec(
        name="cluster-hosts", type=vim.ClusterComputeResource, path="host", skip=False
    )
    spec = vmodl.query.PropertyCollector
    objects = [spec.ObjectSpec(obj=c, skip=False, selectSet=[to_hosts]) for c in clusters]
    objects += [spec.ObjectSpec(obj=d, skip=False) for d in datastores]
    return spec.FilterSpec(
        objectSet=objects,
        propSet=[
            spec.PropertySpec(type=vim.ClusterComputeResource, pathSet=["host"]),
            spec.PropertySpec(type=vim.HostSystem, pathSet=_HOST_PROPERTIES),
            spec.PropertySpec(type=vim.Datastore, pathSet=["host", "name"]),
        ],
    )


def _host_names(hosts: list[Any], props: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {ref(h): props.get(ref(h), {}).get("name", h._moId) for h in hosts}


#: object ref -> the privileges the user holds on it
Granted = dict[str, set[str]]


def _granted(session: VSphereSession, entities: list[Any]) -> Granted:
    """One request: which of our privileges the session's user holds on each entity."""
    answers = session.content.authorizationManager.HasPrivilegeOnEntities(
        entity=entities, sessionId=session.key, privId=all_privilege_ids()
    )
    return {
        ref(answer.entity): {p.privId for p in answer.privAvailability or [] if p.isGranted}
        for answer in answers or []
    }


def _capital(word: str) -> str:
    return word[:1].upper() + word[1:]


def _skip_rest(checks: list[str]) -> list[CheckResult]:
    titles = {
        "vcenter.tls": "Certificate trusted",
        "vcenter.login": "Login",
        "vcenter.version": "vCenter version",
    }
    return [skipped(c, titles[c], "not checked: an earlier check failed") for c in checks]


def _login_failure(exc: Exception, creds: VCenterCredentials) -> list[CheckResult]:
    error = classify(exc, f"log in to {creds.endpoint.address}")
    address = creds.endpoint.address
    if error.type == errors.TLS_VERIFICATION_FAILED:
        return [
            CheckResult(
                check="vcenter.tls",
                title="Certificate trusted",
                status=FAIL,
                object=address,
                detail=error.message,
                remedy="set vcenter.thumbprint to the SHA-256 thumbprint vCenter shows, or "
                "install the vCenter CA on the gateway",
            ),
            *_skip_rest(["vcenter.login", "vcenter.version"]),
        ]
    tls = _tls_result(creds)
    if error.type == errors.INVALID_CREDENTIALS:
        detail = f"vCenter refused the user name or password of {creds.username}"
        remedy = "check vcenter.username and the password; the account may also be locked"
    else:
        detail, remedy = error.message, "see docs/vsphere-errors.md"
    return [
        tls,
        CheckResult(
            check="vcenter.login",
            title="Login",
            status=FAIL,
            object=f"user {creds.username}",
            detail=detail,
            remedy=remedy,
        ),
        *_skip_rest(["vcenter.version"]),
    ]


def _tls_result(creds: VCenterCredentials) -> CheckResult:
    endpoint = creds.endpoint
    if endpoint.insecure:
        return CheckResult(
            check="vcenter.tls",
            title="Certificate trusted",
            status=WARN,
            object=endpoint.address,
            detail="certificate not verified (insecure: true)",
            remedy="pin vcenter.thumbprint or install the vCenter CA, then drop insecure",
        )
    how = "pinned thumbprint matches" if endpoint.thumbprint else "certificate chain verified"
    return CheckResult(
        check="vcenter.tls",
        title="Certificate trusted",
        status=PASS,
        object=endpoint.address,
        detail=how,
    )


def _version_result(about: Any) -> CheckResult:
    shown = about.fullName or f"vCenter {about.version} build {about.build}"
    if about.apiType != "VirtualCenter":
        return CheckResult(
            check="vcenter.version",
            title="vCenter version",
            status=FAIL,
            object=shown,
            detail=f"this endpoint is a {about.apiType}, not a vCenter Server",
            remedy="point the account at the vCenter Server that manages the hosts",
        )
    if version_supported(about.version or "", about.build or ""):
        return CheckResult(
            check="vcenter.version",
            title="vCenter version",
            status=PASS,
            object=shown,
            detail="6.7 Update 3 or later",
        )
    return CheckResult(
        check="vcenter.version",
        title="vCenter version",
        status=FAIL,
        object=shown,
        detail=f"vCenter {about.version} build {about.build} is older than 6.7 Update 3",
        remedy="upgrade vCenter to 6.7 Update 3 or later",
    )


def _missing(role: str, word: str, path: str) -> CheckResult:
    return CheckResult(
        check=f"exists.{role}",
        title=f"{_capital(word)} exists",
        status=FAIL,
        object=path,
        detail=f"no {word} at {path}",
        remedy=f"create it, or correct placement.{role}",
    )


def _exists_result(role: str, path: str, props: dict[str, Any]) -> CheckResult:
    word = _EXPECTED_TYPES[role][1]
    title = f"{_capital(word)} exists"
    if role == "folder" and "VirtualMachine" not in list(props.get("childType") or []):
        return CheckResult(
            check="exists.folder",
            title=title,
            status=FAIL,
            object=path,
            detail=f"{path} is not a VM folder",
            remedy="name a folder under the datacenter's VM folder in placement.folder",
        )
    if role == "template" and not props.get("config.template"):
        return CheckResult(
            check="exists.template",
            title=title,
            status=FAIL,
            object=path,
            detail=f"{path} is a virtual machine, not a template",
            remedy="mark it as a template (Template > Convert to Template)",
        )
    return CheckResult(check=f"exists.{role}", title=title, status=PASS, object=path)


def _privilege_result(
    role: str, path: str, role_name: str, user: str, missing: list[str]
) -> CheckResult:
    kind = "vCenter root" if role == "root" else _EXPECTED_TYPES[role][1]
    title = f"Privileges on {kind}"
    if not missing:
        return CheckResult(
            check=f"privileges.{role}",
            title=title,
            status=PASS,
            object=path,
            detail=f"all {len(privilege_ids(role_name))} privileges of the {role_name} role",
        )
    listed = ", ".join(f"{p} ({DISPLAY_NAME[p]})" for p in missing)
    return CheckResult(
        check=f"privileges.{role}",
        title=title,
        status=FAIL,
        object=path,
        detail=f"{user} lacks {len(missing)} privilege(s) on {kind} {path}: {listed}",
        remedy=f"add them to the {role_name} role assigned to {user} on {path}"
        + (" (with propagation)" if role_name == "cluster" else ""),
    )


def _ntp_result(name: str, props: dict[str, Any]) -> CheckResult:
    servers = [s for s in props.get("config.dateTimeInfo.ntpConfig.server") or [] if s]
    state = props.get("runtime.connectionState")
    if state is not None and state != vim.HostSystem.ConnectionState.connected:
        return CheckResult(
            check="hosts.ntp",
            title="NTP on host",
            status=WARN,
            object=f"host {name}",
            detail=f"host is {state}; its NTP settings cannot be trusted",
            remedy="reconnect the host",
        )
    if not servers:
        return CheckResult(
            check="hosts.ntp",
            title="NTP on host",
            status=FAIL,
            object=f"host {name}",
            detail="no NTP server configured",
            remedy="configure NTP on the host (Configure > System > Time Configuration) "
            "and start the NTP service",
        )
    return CheckResult(
        check="hosts.ntp",
        title="NTP on host",
        status=PASS,
        object=f"host {name}",
        detail="NTP servers: " + ", ".join(servers),
    )


def _shared_storage_result(
    ds: dict[str, Any], hosts: list[Any], names: dict[str, str]
) -> CheckResult:
    ds_name = ds.get("name", "datastore")
    mounted = set()
    for mount in ds.get("host") or []:
        info = mount.mountInfo
        if info is None or (info.accessible is not False and info.mounted is not False):
            mounted.add(ref(mount.key))
    absent = sorted(names[ref(h)] for h in hosts if ref(h) not in mounted)
    if absent:
        return CheckResult(
            check="storage.shared",
            title="Datastore shared by all hosts",
            status=FAIL,
            object=f"datastore {ds_name}",
            detail=f"not mounted or not accessible on: {', '.join(absent)}",
            remedy="mount the datastore on every host of the compute cluster "
            "(shared storage such as vSAN, NFS or VMFS on a SAN)",
        )
    return CheckResult(
        check="storage.shared",
        title="Datastore shared by all hosts",
        status=PASS,
        object=f"datastore {ds_name}",
        detail=f"mounted on all {len(hosts)} hosts",
    )
