"""The gateway installer: build its OVA, import it into vSphere, read its properties back.

`install` logs in with the agent's own session code (`activities.vsphere.session.open_session`:
the same TLS verification or thumbprint pinning), imports the OVA with the installer's vApp
properties (`activities.vsphere.ovf.import_ova`), powers the VM on and logs out. It is
idempotent: a VM of that name already in the folder is only powered on (`created=False`).
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel, Field

from activities.vsphere.ovf import (
    PROPERTY_PREFIX,
    OvaError,
    find_vm_by_path,
    import_ova,
    power_off,
    read_ova,
    read_properties,
)
from activities.vsphere.session import open_session, request_meter
from activities.vsphere.tasks import wait_for_task
from domain.account import Placement, VCenterEndpoint
from domain.gateway import InstallerProperties
from plumbing.settings import Settings

INSTALLER_VERSION = "1.0.0"
#: The OVA builder: a stdlib-only script, also run by hand (python tools/installer/build.py).
BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "installer" / "build.py"


class InstallResult(BaseModel):
    """What `install` did."""

    vm: str = Field(description="The VM's reference, e.g. 'VirtualMachine:vm-42'.")
    inventory_path: str
    power_state: str
    created: bool = Field(description="False if the VM was already there (not imported again).")
    seconds: float = Field(description="Wall time of the whole install, login to logout.")
    vcenter_requests: int = Field(description="SOAP requests made (the uploads not counted).")
    warnings: list[str] = Field(default_factory=list, description="vCenter's import warnings.")


@functools.cache
def builder() -> ModuleType:
    """tools/installer/build.py as a module (it is a script beside the packages, not in one)."""
    spec = importlib.util.spec_from_file_location("kubegate_installer_build", BUILD_SCRIPT)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"the OVA builder {BUILD_SCRIPT} is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installer_ova(settings: Settings) -> Path:
    """The installer OVA of this version under `<home>/installer`, built if missing or older
    than its sources (tools/installer/build.py and the descriptor template)."""
    build = builder()
    out_dir = settings.home / "installer"
    ova: Path = out_dir / build.names(INSTALLER_VERSION)["ova"]
    sources: list[Path] = [BUILD_SCRIPT, build.TEMPLATE]
    if not ova.exists() or ova.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        build.build_ova(out_dir, INSTALLER_VERSION)
    return ova


def default_vm_name(properties: InstallerProperties) -> str:
    return f"kubegate-installer-{properties.installer_name}"


def install(
    endpoint: VCenterEndpoint,
    username: str,
    password: str,
    placement: Placement,
    properties: InstallerProperties,
    ova: Path,
    vm_name: str | None = None,
) -> InstallResult:
    """Import the installer OVA with these properties and power it on. Raises OvaError for a
    bad OVA, a placement object that does not exist, or an import vCenter refuses; login and
    connection failures raise as `open_session` does."""
    started = time.monotonic()
    package = read_ova(ova)  # a corrupt OVA is refused before logging in
    with request_meter() as meter:
        session = open_session(endpoint, username, password)
        try:
            imported = import_ova(
                session,
                package,
                name=vm_name or default_vm_name(properties),
                placement=placement,
                properties=properties.ovf_properties(),
                power_on=True,
            )
        finally:
            session.logout()
    return InstallResult(
        vm=imported.ref,
        inventory_path=imported.path,
        power_state=imported.power_state,
        created=imported.created,
        seconds=round(time.monotonic() - started, 3),
        vcenter_requests=meter[0],
        warnings=imported.warnings,
    )


def read_installer(
    endpoint: VCenterEndpoint,
    username: str,
    password: str,
    datacenter: str,
    vm_path_or_name: str,
) -> InstallerProperties:
    """The installer properties of a VM, validated. `vm_path_or_name` is a full inventory path
    ('/DC0/vm/folder/name') or a path relative to the datacenter's VM folder ('name',
    'folder/name')."""
    path = (
        vm_path_or_name
        if vm_path_or_name.startswith("/")
        else f"/{datacenter.strip('/')}/vm/{vm_path_or_name.strip('/')}"
    )
    session = open_session(endpoint, username, password)
    try:
        vm = find_vm_by_path(session, path)
        if vm is None:
            raise OvaError(f"no VM at {path}")
        values = read_properties(session, vm)
    finally:
        session.logout()
    fields = InstallerProperties.model_fields
    given = {
        key.removeprefix(PROPERTY_PREFIX): value or None
        for key, value in values.items()
        if key.removeprefix(PROPERTY_PREFIX) in fields
    }
    return InstallerProperties.model_validate(given)


def uninstall(
    endpoint: VCenterEndpoint, username: str, password: str, placement: Placement, gateway: str
) -> str | None:
    """Remove the gateway's installer VM (at its default name in the placement's folder), off
    first; its path, or None if there is none. A VM there that is not this gateway's
    installer (its kubegate.installer_name) is refused (OvaError) and left alone."""
    folder = "/".join(p for p in (placement.folder.strip("/"),) if p)
    name = f"kubegate-installer-{gateway}"
    path = f"/{placement.datacenter.strip('/')}/vm/" + (f"{folder}/{name}" if folder else name)
    session = open_session(endpoint, username, password)
    try:
        vm = find_vm_by_path(session, path)
        if vm is None:
            return None
        owner = read_properties(session, vm).get(f"{PROPERTY_PREFIX}installer_name")
        if owner != gateway:
            raise OvaError(f"{path} is not gateway {gateway}'s installer ({owner!r}): left alone")
        power_off(session, vm)
        wait_for_task(session, vm.Destroy_Task(), lambda _task, _progress: None)
    finally:
        session.logout()
    return path
