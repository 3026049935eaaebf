"""Importing an OVA into vSphere (the gateway installer), with plain pyVmomi calls.

No Temporal here: a starter or an activity calls these functions with an open session.

    read_ova       the archive's descriptor, properties and networks; every file checked against
                   the manifest before anything is sent to vCenter
    import_ova     OvfManager.CreateImportSpec -> ResourcePool.ImportVApp -> HttpNfcLease: upload
                   every file, report progress, complete (abort and clean up on any failure),
                   then power on. Idempotent: a VM of that name in the folder is not imported
                   again, only powered on
    find_vm, read_properties, power_off

Errors are OvaError with a message for the user; the values of properties are never logged or
put in a message (the pairing code is one of them), only their keys.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from pyVmomi import Security, vim, vmodl

from activities.vsphere.inventory import find_by_path, from_ref, ref, retrieve, retrieve_mixed
from activities.vsphere.session import PinnedHTTPSConnection, VSphereSession, ssl_context
from activities.vsphere.tasks import wait_for_task
from domain.account import Placement, VCenterEndpoint

log = logging.getLogger(__name__)

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
_NS = {"ovf": OVF}
#: vApp properties kubegate reads back (the installer's ProductSection class).
PROPERTY_PREFIX = "kubegate."
_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")
_CHUNK = 1 << 20
#: How often upload progress is reported to vCenter (the lease expires without it).
_PROGRESS_EVERY = 2.0
ON = vim.VirtualMachine.PowerState.poweredOn
OFF = vim.VirtualMachine.PowerState.poweredOff


class OvaError(Exception):
    """The OVA or its import was refused; the message says why, for the user."""


@dataclass
class OvaPackage:
    """An OVA whose files all matched its manifest."""

    path: Path
    descriptor: str
    #: tar member by file name
    members: dict[str, tarfile.TarInfo]
    #: fully qualified property key (class.key[.instance]) -> default value
    properties: dict[str, str]
    #: network names the descriptor's NICs connect to
    networks: list[str]


@dataclass
class ImportedVm:
    """The VM an import made (or found, created=False)."""

    vm: Any
    ref: str
    path: str
    power_state: str
    created: bool
    warnings: list[str] = field(default_factory=list)


def _q(tag: str) -> str:
    return f"{{{OVF}}}{tag}"


def _member_name(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def read_ova(path: Path) -> OvaPackage:
    """Open an OVA and check it: the .ovf first, a manifest, every file present with its digest."""
    try:
        archive = tarfile.open(path, "r:")  # noqa: SIM115 - closed below
    except (OSError, tarfile.TarError) as exc:
        raise OvaError(f"{path.name}: not an OVA (an uncompressed tar archive): {exc}") from None
    with archive:
        members = [m for m in archive.getmembers() if m.isfile()]
        by_name = {_member_name(m.name): m for m in members}
        if not members or not _member_name(members[0].name).endswith(".ovf"):
            raise OvaError(f"{path.name}: the first file of an OVA must be its .ovf descriptor")
        ovf_name = _member_name(members[0].name)
        descriptor = _read(archive, members[0]).decode("utf-8", errors="replace")
        manifests = [n for n in by_name if n.endswith(".mf")]
        if len(manifests) != 1:
            raise OvaError(f"{path.name}: expected one manifest (.mf), found {len(manifests)}")
        digests = _parse_manifest(path.name, _read(archive, by_name[manifests[0]]))
        envelope = _parse_descriptor(path.name, descriptor)
        referenced = {
            str(f.get(_q("href"))): f.get(_q("size"))
            for f in envelope.findall("ovf:References/ovf:File", _NS)
        }
        for name in [ovf_name, *referenced]:
            if name not in by_name:
                raise OvaError(f"{path.name}: {name} is referenced but not in the archive")
            if name not in digests:
                raise OvaError(f"{path.name}: {name} is not listed in the manifest")
            size = referenced.get(name)
            if size is not None and str(by_name[name].size) != size:
                raise OvaError(
                    f"{path.name}: {name} has {by_name[name].size} bytes, the descriptor "
                    f"says {size}"
                )
        for name, (algorithm, expected) in digests.items():
            if name not in by_name:
                raise OvaError(f"{path.name}: the manifest lists {name}, which is missing")
            if _digest(archive, by_name[name], algorithm) != expected.lower():
                raise OvaError(
                    f"{path.name}: {name} does not match its {algorithm} digest in the "
                    "manifest (the file is corrupt or was changed); download the OVA again"
                )
    return OvaPackage(
        path=path,
        descriptor=descriptor,
        members=by_name,
        properties=_properties(envelope),
        networks=[
            str(n.get(_q("name")))
            for n in envelope.findall(".//ovf:NetworkSection/ovf:Network", _NS)
        ],
    )


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise OvaError(f"{member.name} cannot be read from the archive")
    with handle:
        return handle.read()


def _digest(archive: tarfile.TarFile, member: tarfile.TarInfo, algorithm: str) -> str:
    digest = hashlib.new(algorithm.lower())
    handle = archive.extractfile(member)
    if handle is None:
        raise OvaError(f"{member.name} cannot be read from the archive")
    with handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_manifest(ova: str, data: bytes) -> dict[str, tuple[str, str]]:
    digests: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line.strip())
        if match is None:
            raise OvaError(f"{ova}: manifest line {number} is not 'SHA256(file)= digest'")
        algorithm, name, value = match.groups()
        digests[name] = (algorithm, value)
    return digests


def _parse_descriptor(ova: str, text: str) -> ET.Element:
    if "<!DOCTYPE" in text or "<!ENTITY" in text:  # no DTDs: nothing to expand
        raise OvaError(f"{ova}: the OVF descriptor must not contain a DOCTYPE")
    try:
        envelope = ET.fromstring(text)  # noqa: S314 - DTDs refused above
    except ET.ParseError as exc:
        raise OvaError(f"{ova}: the OVF descriptor is not valid XML: {exc}") from None
    if envelope.tag != _q("Envelope") or envelope.find("ovf:VirtualSystem", _NS) is None:
        raise OvaError(f"{ova}: not an OVF 1.x envelope with one VirtualSystem")
    return envelope


def _properties(envelope: ET.Element) -> dict[str, str]:
    found: dict[str, str] = {}
    for section in envelope.iter(_q("ProductSection")):
        parts = [section.get(_q("class")) or "", "", section.get(_q("instance")) or ""]
        for prop in section.findall("ovf:Property", _NS):
            parts[1] = str(prop.get(_q("key")))
            found[".".join(p for p in parts if p)] = prop.get(_q("value")) or ""
    return found


# --- lookups -----------------------------------------------------------------------------------


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2f")


def vm_path(datacenter: str, folder: str, name: str) -> str:
    """The inventory path of a VM in a folder (relative to the datacenter's VM folder)."""
    base = f"/{datacenter.strip('/')}/vm/{folder.strip('/')}".rstrip("/")
    return f"{base}/{_escape(name)}"


def find_vm(session: VSphereSession, datacenter: str, folder: str, name: str) -> Any | None:
    """One request: the VM `name` in `folder` of `datacenter`, or None."""
    return find_vm_by_path(session, vm_path(datacenter, folder, name))


def find_vm_by_path(session: VSphereSession, path: str) -> Any | None:
    """One request: the VM at a full inventory path, or None (also when it is no VM)."""
    found = find_by_path(session, path)
    return found if isinstance(found, vim.VirtualMachine) else None


_ROLES: dict[str, tuple[type, str]] = {
    "datacenter": (vim.Datacenter, "datacenter"),
    "folder": (vim.Folder, "VM folder"),
    "resource_pool": (vim.ResourcePool, "resource pool"),
    "datastore": (vim.Datastore, "datastore"),
    "network": (vim.Network, "network or port group"),
}


def _resolve(session: VSphereSession, placement: Placement) -> dict[str, Any]:
    paths = placement.inventory_paths()
    objects: dict[str, Any] = {}
    for role, (kind, word) in _ROLES.items():
        obj = find_by_path(session, paths[role])
        if not isinstance(obj, kind):
            raise OvaError(f"{word} {paths[role]} not found (check the placement)")
        objects[role] = obj
    # vCenter refuses a datastore that no host of the pool's cluster mounts (vcsim 0.24 crashes
    # on it): say so in the placement's words. Two requests.
    pool, datastore = objects["resource_pool"], objects["datastore"]
    props = retrieve_mixed(session, [(pool, ["owner"]), (datastore, ["host"])])
    owner = props.get(ref(pool), {}).get("owner")
    hosts = {ref(h) for h in (owner.host if owner is not None else [])}
    mounted = {ref(m.key) for m in props.get(ref(datastore), {}).get("host") or []}
    if not hosts & mounted:
        raise OvaError(
            f"datastore {paths['datastore']} is not mounted on any host of "
            f"{paths['compute_cluster']} (check the placement)"
        )
    return objects


def vapp_properties(vapp_config: Any, extra_config: Any) -> dict[str, str]:
    """The kubegate.* properties of a VM from its config.vAppConfig, as vCenter keeps an
    imported OVF's ProductSection; a VM without vAppConfig (vcsim 0.24, which turns the import's
    propertyMapping into extraConfig keys) is read from its extraConfig instead."""
    found: dict[str, str] = {}
    if vapp_config is not None and vapp_config.property:
        for prop in vapp_config.property:
            key = ".".join(p for p in (prop.classId, prop.id, prop.instanceId) if p)
            value = prop.value if prop.value is not None else prop.defaultValue
            found[key] = "" if value is None else str(value)
    else:
        found = {o.key: "" if o.value is None else str(o.value) for o in extra_config or []}
    return {k: v for k, v in found.items() if k.startswith(PROPERTY_PREFIX)}


def read_properties(session: VSphereSession, vm: Any) -> dict[str, str]:
    """One request: the VM's kubegate.* vApp properties, key -> value."""
    if isinstance(vm, str):
        vm = from_ref(session, vm)
    props = retrieve(session, [vm], ["config.vAppConfig", "config.extraConfig"]).get(ref(vm), {})
    return vapp_properties(props.get("config.vAppConfig"), props.get("config.extraConfig"))


def _ignore(_task: str, _progress: int) -> None:
    return None


def _power_state(vm: Any) -> str:
    return str(vm.runtime.powerState)


def _set_power(session: VSphereSession, vm: Any, wanted: str) -> str:
    if isinstance(vm, str):
        vm = from_ref(session, vm)
    if _power_state(vm) != wanted:
        task = vm.PowerOnVM_Task() if wanted == ON else vm.PowerOffVM_Task()
        wait_for_task(session, task, _ignore)
    return str(wanted)


def ensure_powered_on(session: VSphereSession, vm: Any) -> str:
    """Power the VM (object or 'VirtualMachine:id') on unless it is on (then no task)."""
    return _set_power(session, vm, ON)


def power_off(session: VSphereSession, vm: Any) -> str:
    """Power the VM (object or 'VirtualMachine:id') off, hard, unless it is off (then no
    task); returns 'poweredOff'."""
    return _set_power(session, vm, OFF)


# --- import ------------------------------------------------------------------------------------


def import_ova(
    session: VSphereSession,
    ova: Path | OvaPackage,
    *,
    name: str,
    placement: Placement,
    properties: dict[str, str],
    power_on: bool = True,
    progress: Callable[[int], None] | None = None,
    lease_timeout: float = 300.0,
) -> ImportedVm:
    """Import the OVA as VM `name` into the placement's folder, pool, datastore and network,
    with the given vApp properties; power it on. See the module's docstring. `ova` may be a
    package read_ova already checked (then it is not hashed again)."""
    package = ova if isinstance(ova, OvaPackage) else read_ova(ova)
    ova = package.path
    unknown = sorted(set(properties) - set(package.properties))
    if unknown:
        raise OvaError(f"{ova.name} has no properties {', '.join(unknown)}")
    where = _resolve(session, placement)
    path = vm_path(placement.datacenter, placement.folder, name)
    existing = find_by_path(session, path)
    if existing is not None:
        return _existing(session, existing, path, properties, power_on)

    spec = _import_spec(session, package, name, where, properties)
    log.info("importing %s as %s", ova.name, path)
    try:
        lease = where["resource_pool"].ImportVApp(spec.importSpec, folder=where["folder"])
    except vim.fault.DuplicateName:
        raise OvaError(f"a VM named {name} appeared in the folder meanwhile; run again") from None
    except vmodl.MethodFault as exc:
        raise OvaError(f"vCenter refused to import {ova.name}: {_fault_text(exc)}") from None
    entity = None
    try:
        info = _lease_ready(lease, lease_timeout)
        entity = info.entity
        _upload_all(session, package, spec.fileItem or [], info, lease, progress)
        lease.HttpNfcLeaseProgress(100)
        lease.HttpNfcLeaseComplete()
    except BaseException as exc:
        _abandon(session, lease, entity, exc)
        raise
    if progress is not None:
        progress(100)
    vm = entity
    state = ensure_powered_on(session, vm) if power_on else _power_state(vm)
    log.info("imported %s as %s (%s)", ova.name, path, state)
    return ImportedVm(
        vm=vm,
        ref=ref(vm),
        path=path,
        power_state=state,
        created=True,
        warnings=[_fault_text(w) for w in spec.warning or []],
    )


def _existing(
    session: VSphereSession, existing: Any, path: str, properties: dict[str, str], wanted_on: bool
) -> ImportedVm:
    if not isinstance(existing, vim.VirtualMachine):
        raise OvaError(f"{path} exists and is not a VM ({type(existing).__name__})")
    current = read_properties(session, existing)
    differ = sorted(k for k, v in properties.items() if current.get(k, "") != v)
    if differ:
        raise OvaError(
            f"{path} already exists with other values for {', '.join(differ)}: delete the VM "
            "(or choose another VM name) to import the installer again"
        )
    state = ensure_powered_on(session, existing) if wanted_on else _power_state(existing)
    return ImportedVm(vm=existing, ref=ref(existing), path=path, power_state=state, created=False)


def _import_spec(
    session: VSphereSession,
    package: OvaPackage,
    name: str,
    where: dict[str, Any],
    properties: dict[str, str],
) -> Any:
    params = vim.OvfManager.CreateImportSpecParams(
        entityName=name,
        diskProvisioning="thin",
        propertyMapping=[vim.KeyValue(key=k, value=v) for k, v in properties.items()],
        networkMapping=[
            vim.OvfManager.NetworkMapping(name=n, network=where["network"])
            for n in package.networks
        ],
    )
    try:
        result = session.content.ovfManager.CreateImportSpec(
            package.descriptor, where["resource_pool"], where["datastore"], params
        )
    except vmodl.MethodFault as exc:
        raise OvaError(f"vCenter refused {package.path.name}: {_fault_text(exc)}") from None
    problems = [_fault_text(e) for e in result.error or []]
    if problems or result.importSpec is None:
        raise OvaError(
            f"vCenter cannot import {package.path.name}: "
            + ("; ".join(problems) or "no import spec returned")
        )
    for warning in result.warning or []:
        log.warning("import of %s: %s", package.path.name, _fault_text(warning))
    return result


def _fault_text(fault: Any) -> str:
    text = getattr(fault, "localizedMessage", None) or getattr(fault, "msg", None)
    inner = getattr(fault, "fault", None)
    if not text and inner is not None:
        text = getattr(inner, "msg", None)
        fault = inner
    return f"{type(fault).__name__.rsplit('.', 1)[-1]}: {text}" if text else type(fault).__name__


def _lease_ready(lease: Any, timeout: float) -> Any:
    """Wait (a read every 0.05-1 s) until the lease is ready; return its info."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        state = lease.state
        if state == vim.HttpNfcLease.State.ready:
            return lease.info
        if state == vim.HttpNfcLease.State.error:
            raise OvaError(f"vCenter could not prepare the import: {_fault_text(lease.error)}")
        if state == vim.HttpNfcLease.State.done:
            raise OvaError("the import lease ended before the upload")
        if time.monotonic() > deadline:
            raise OvaError(f"the import lease was not ready after {timeout:.0f}s")
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


class _Progress:
    """Bytes sent of the total; reported to the lease and the caller every few seconds."""

    def __init__(self, lease: Any, total: int, callback: Callable[[int], None] | None) -> None:
        self.lease, self.total, self.callback = lease, max(total, 1), callback
        self.sent = 0
        self.reported = time.monotonic()

    def __call__(self, n: int) -> None:
        self.sent += n
        if time.monotonic() - self.reported >= _PROGRESS_EVERY:
            self.report()

    def report(self) -> None:
        percent = min(99, self.sent * 100 // self.total)
        self.lease.HttpNfcLeaseProgress(percent)
        if self.callback is not None:
            self.callback(percent)
        self.reported = time.monotonic()


def _upload_all(
    session: VSphereSession,
    package: OvaPackage,
    items: list[Any],
    info: Any,
    lease: Any,
    callback: Callable[[int], None] | None,
) -> None:
    urls = {d.importKey: d for d in info.deviceUrl or []}
    progress = _Progress(lease, sum(int(i.size or 0) for i in items), callback)
    with tarfile.open(package.path, "r:") as archive:
        for item in items:
            device = urls.get(item.deviceId)
            member = package.members.get(item.path)
            if device is None or member is None:
                raise OvaError(f"vCenter gave no upload URL for {item.path} ({item.deviceId})")
            source = archive.extractfile(member)
            if source is None:
                raise OvaError(f"{item.path} cannot be read from the archive")
            with source:
                upload(
                    session,
                    device.url,
                    device.sslThumbprint,
                    source,
                    member.size,
                    progress,
                    create=bool(item.create),
                )
            progress.report()


def upload(
    session: VSphereSession,
    url: str,
    thumbprint: str | None,
    source: IO[bytes],
    size: int,
    sent: Callable[[int], None],
    *,
    create: bool = False,
    timeout: float = 60.0,
) -> None:
    """Send one file of an import to its lease URL.

    A URL whose host is '*' is the vCenter this session talks to, trusted as its endpoint says
    (pinned thumbprint, CA, or insecure); another host (an ESXi host) is pinned to the lease's
    sslThumbprint when vCenter gives one, else trusted as the endpoint says. Disks are POSTed
    as a stream-optimized VMDK, other files PUT (as govc and ovftool do).
    """
    parts = urlsplit(url)
    endpoint = session.endpoint
    if parts.hostname in (None, "*"):
        trust = endpoint
    else:
        pin = thumbprint or None
        trust = VCenterEndpoint(
            server=parts.hostname,
            port=parts.port or 443,
            thumbprint=pin,
            insecure=endpoint.insecure and pin is None,
        )
    context = ssl_context(trust)
    conn: http.client.HTTPSConnection
    if trust.thumbprint:
        conn = PinnedHTTPSConnection(
            trust.server, trust.port, context=context, timeout=timeout, pin=trust.thumbprint
        )
    else:
        conn = http.client.HTTPSConnection(
            trust.server, trust.port, context=context, timeout=timeout
        )
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    name = target.rsplit("/", 1)[-1]
    try:
        conn.putrequest("PUT" if create else "POST", target, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(size))
        conn.putheader(
            "Content-Type",
            "application/octet-stream" if create else "application/x-vnd.vmware-streamVmdk",
        )
        if create:
            conn.putheader("Overwrite", "t")
        if session.stub.cookie:
            conn.putheader("Cookie", session.stub.cookie)
        conn.endheaders()
        while chunk := source.read(_CHUNK):
            conn.send(chunk)
            sent(len(chunk))
        response = conn.getresponse()
        response.read()
        if response.status not in (200, 201, 204):
            raise OvaError(
                f"uploading {name} to {trust.address} failed: HTTP {response.status} "
                f"{response.reason}"
            )
    except (OSError, http.client.HTTPException, Security.ThumbprintMismatchException) as exc:
        raise OvaError(f"uploading {name} to {trust.address} failed: {exc}") from exc
    finally:
        conn.close()


def _abandon(session: VSphereSession, lease: Any, entity: Any, exc: BaseException) -> None:
    """Abort the lease (vCenter then deletes the VM it made) and make sure the half-imported VM
    is gone, so that a retry imports again instead of finding a VM without its disk."""
    log.warning("import aborted: %s", type(exc).__name__)
    with suppress(Exception):
        lease.HttpNfcLeaseAbort(vmodl.fault.SystemError(reason=f"import failed: {exc}"))
    if entity is None:
        return
    try:
        if _power_state(entity) != OFF:
            wait_for_task(session, entity.PowerOffVM_Task(), _ignore)
        wait_for_task(session, entity.Destroy_Task(), _ignore)
    except vmodl.fault.ManagedObjectNotFound:
        pass  # vCenter removed it on abort
    except Exception as cleanup:  # the import's own error is the one to raise
        log.warning("could not remove the half-imported VM %s: %s", ref(entity), cleanup)
