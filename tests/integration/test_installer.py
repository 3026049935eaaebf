"""The installer OVA imported into the simulator, checked behind kubegate's back with pyvmomi."""

from __future__ import annotations

import hashlib
import io
import shutil
import ssl
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from activities.vsphere import ovf
from activities.vsphere.ovf import OvaError, import_ova, power_off, read_ova
from activities.vsphere.session import VSphereSession, open_session, request_meter
from domain.account import Placement, VCenterEndpoint
from domain.gateway import InstallerProperties, new_pairing_code
from starters.installer import INSTALLER_VERSION, builder, install, read_installer
from tests.support import ADMIN, PLACEMENT, Vcsim

pytestmark = pytest.mark.integration


def endpoint(sim: Vcsim) -> VCenterEndpoint:
    return VCenterEndpoint(server=sim.address, thumbprint=sim.thumbprint)


def properties(name: str) -> InstallerProperties:
    return InstallerProperties(
        installer_name=name,
        console_endpoint="https://kubegate.example.com:8443",
        pairing_code=new_pairing_code(),
        ssh_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKubegateTestKeyOnly test@kubegate",
        pod_cidr="10.244.0.0/16",
        service_cidr="10.96.0.0/12",
        node_network="192.168.10.0/24",
        http_proxy="http://proxy.example.com:3128",
        https_proxy="http://proxy.example.com:3128",
        no_proxy="localhost,127.0.0.1,.example.com",
    )


@pytest.fixture(scope="module")
def ova(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = builder().build_ova(tmp_path_factory.mktemp("installer"), INSTALLER_VERSION)
    return path


@pytest.fixture(scope="module")
def si(vcsim: Vcsim) -> Iterator[Any]:
    """An independent connection, for looking behind kubegate's back."""
    connection = vcsim.connect()
    yield connection
    vcsim.disconnect(connection)


@pytest.fixture(scope="module")
def placement(si: Any) -> Placement:
    """Not the defaults: a folder of its own, a child pool, the second datastore, a DVPG."""
    folder = f"installers-{uuid.uuid4().hex[:6]}"
    si.content.searchIndex.FindByInventoryPath("/DC0/vm").CreateFolder(folder)
    return Placement(
        **{
            **PLACEMENT,
            "template": None,
            "folder": folder,
            "resource_pool": "DC0_C0_RP1",
            "datastore": "LocalDS_1",
            "network": "DC0_DVPG0",
        }
    )


def vms_named(si: Any, name: str) -> list[Any]:
    view = si.content.viewManager.CreateContainerView(
        si.content.rootFolder, [vim.VirtualMachine], True
    )
    try:
        return [vm for vm in view.view if vm.name == name]
    finally:
        view.DestroyView()


def find(si: Any, path: str) -> Any:
    return si.content.searchIndex.FindByInventoryPath(path)


@pytest.fixture(scope="module")
def installed(vcsim: Vcsim, placement: Placement, ova: Path) -> tuple[Any, InstallerProperties]:
    given = properties(f"gw-{uuid.uuid4().hex[:6]}")
    result = install(endpoint(vcsim), ADMIN, vcsim.password, placement, given, ova)
    return result, given


def test_install_imports_the_installer_where_the_placement_says(
    si: Any, installed: tuple[Any, InstallerProperties], placement: Placement
) -> None:
    result, given = installed
    name = f"kubegate-installer-{given.installer_name}"
    paths = placement.inventory_paths()
    assert result.created and result.power_state == "poweredOn"
    assert result.inventory_path == f"{paths['folder']}/{name}"
    assert result.seconds < 10 and result.vcenter_requests > 0

    [vm] = vms_named(si, name)
    assert f"VirtualMachine:{vm._moId}" == result.vm
    assert vm.parent == find(si, paths["folder"])
    assert vm.resourcePool == find(si, paths["resource_pool"])
    assert [d.name for d in vm.datastore] == ["LocalDS_1"]
    assert [n.name for n in vm.network] == ["DC0_DVPG0"]
    assert vm.runtime.powerState == "poweredOn"
    hardware = vm.config.hardware
    assert (hardware.numCPU, hardware.memoryMB) == (2, 4096)
    disks: list[Any] = [d for d in hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    nics = [d for d in hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert [d.capacityInKB for d in disks] == [8 * 1024 * 1024]
    assert disks[0].backing.fileName.startswith("[LocalDS_1] ")
    assert len(nics) == 1 and isinstance(nics[0], vim.vm.device.VirtualVmxnet3)

    # vcsim 0.24 keeps no vAppConfig on an imported VM: it turns the import's propertyMapping
    # into extraConfig keys. On vCenter the same values are in config.vAppConfig.property.
    assert vm.config.vAppConfig is None
    kept = {o.key: o.value for o in vm.config.extraConfig if o.key.startswith("kubegate.")}
    assert kept == given.ovf_properties()


def test_read_installer_round_trips(
    vcsim: Vcsim, installed: tuple[Any, InstallerProperties], placement: Placement
) -> None:
    result, given = installed
    by_path = read_installer(endpoint(vcsim), ADMIN, vcsim.password, "DC0", result.inventory_path)
    relative = f"{placement.folder}/kubegate-installer-{given.installer_name}"
    by_name = read_installer(endpoint(vcsim), ADMIN, vcsim.password, "DC0", relative)
    assert by_path == by_name == given
    with pytest.raises(OvaError, match="no VM at /DC0/vm/nothing-here"):
        read_installer(endpoint(vcsim), ADMIN, vcsim.password, "DC0", "nothing-here")


def test_a_second_install_finds_the_vm_and_powers_it_on(
    vcsim: Vcsim,
    si: Any,
    installed: tuple[Any, InstallerProperties],
    placement: Placement,
    ova: Path,
) -> None:
    result, given = installed
    session = open_session(endpoint(vcsim), ADMIN, vcsim.password)
    try:
        assert power_off(session, result.vm) == "poweredOff"
        with request_meter() as meter:
            assert power_off(session, result.vm) == "poweredOff"
        assert meter[0] == 1  # one read of the power state, no task
    finally:
        session.logout()

    again = install(endpoint(vcsim), ADMIN, vcsim.password, placement, given, ova)
    assert (again.vm, again.created, again.power_state) == (result.vm, False, "poweredOn")
    assert len(vms_named(si, f"kubegate-installer-{given.installer_name}")) == 1
    assert find(si, result.inventory_path).runtime.powerState == "poweredOn"


def test_an_existing_vm_with_other_properties_is_not_taken_for_the_installer(
    vcsim: Vcsim, installed: tuple[Any, InstallerProperties], placement: Placement, ova: Path
) -> None:
    _, given = installed
    other = given.model_copy(update={"pairing_code": new_pairing_code()})
    with pytest.raises(OvaError, match=r"other values for kubegate\.pairing_code: delete") as info:
        install(endpoint(vcsim), ADMIN, vcsim.password, placement, other, ova)
    assert other.pairing_code not in str(info.value)
    assert given.pairing_code not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"network": "no-such-net"}, "network or port group /DC0/network/no-such-net not found"),
        ({"datastore": "no-such-ds"}, "datastore /DC0/datastore/no-such-ds not found"),
        ({"folder": "no/such/folder"}, "VM folder /DC0/vm/no/such/folder not found"),
        (
            {"compute_cluster": "DC0_C1", "resource_pool": "Resources", "datastore": "LocalOnly"},
            "datastore /DC0/datastore/LocalOnly is not mounted on any host of /DC0/host/DC0_C1",
        ),
    ],
)
def test_a_missing_placement_object_is_a_clear_error(
    vcsim: Vcsim,
    si: Any,
    placement: Placement,
    ova: Path,
    change: dict[str, str],
    message: str,
) -> None:
    given = properties(f"gw-{uuid.uuid4().hex[:6]}")
    wrong = placement.model_copy(update=change)
    with pytest.raises(OvaError, match=message):
        install(endpoint(vcsim), ADMIN, vcsim.password, wrong, given, ova)
    assert vms_named(si, f"kubegate-installer-{given.installer_name}") == []


def test_a_corrupt_ova_is_refused_before_anything_is_created(
    vcsim: Vcsim, si: Any, placement: Placement, ova: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / ova.name
    shutil.copyfile(ova, corrupt)
    with tarfile.open(ova) as archive:
        disk = archive.getmembers()[2]
    with corrupt.open("r+b") as handle:  # one byte of the disk's descriptor text
        handle.seek(disk.offset_data + 520)
        byte = handle.read(1)
        handle.seek(disk.offset_data + 520)
        handle.write(bytes([byte[0] ^ 0x20]))
    given = properties(f"gw-{uuid.uuid4().hex[:6]}")
    with pytest.raises(OvaError, match=r"disk1.vmdk does not match its SHA256 digest"):
        install(endpoint(vcsim), ADMIN, vcsim.password, placement, given, corrupt)
    assert vms_named(si, f"kubegate-installer-{given.installer_name}") == []


@pytest.fixture
def session(vcsim: Vcsim) -> Iterator[VSphereSession]:
    opened = open_session(endpoint(vcsim), ADMIN, vcsim.password)
    yield opened
    opened.logout()


def test_a_failed_upload_aborts_and_leaves_no_vm(
    session: VSphereSession,
    si: Any,
    placement: Placement,
    ova: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"kubegate-installer-{uuid.uuid4().hex[:6]}"
    values = properties("gw-upload").ovf_properties()

    def broken(*_: Any, **__: Any) -> None:
        raise OvaError("uploading disk-0.vmdk failed: connection reset")

    with monkeypatch.context() as patch:
        patch.setattr(ovf, "upload", broken)
        with pytest.raises(OvaError, match="connection reset"):
            import_ova(session, ova, name=name, placement=placement, properties=values)
    assert vms_named(si, name) == []

    # the retry imports again (nothing half-made is taken for a finished import)
    seen: list[int] = []
    imported = import_ova(
        session,
        ova,
        name=name,
        placement=placement,
        properties=values,
        power_on=False,
        progress=seen.append,
    )
    assert imported.created and imported.power_state == "poweredOff"
    assert seen[-1] == 100
    assert len(vms_named(si, name)) == 1


def test_unknown_properties_are_refused(
    session: VSphereSession, placement: Placement, ova: Path
) -> None:
    with pytest.raises(OvaError, match=r"has no properties kubegate\.colour"):
        import_ova(
            session,
            read_ova(ova),
            name="never-made",
            placement=placement,
            properties={"kubegate.colour": "blue"},
        )


def test_uploads_to_another_host_are_pinned_to_the_lease_thumbprint(
    session: VSphereSession, vcsim: Vcsim
) -> None:
    host, port = vcsim.address.rsplit(":", 1)
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, int(port))))
    sha1 = hashlib.sha1(der).hexdigest()  # noqa: S324 - what vCenter's leases give
    url = f"https://{vcsim.address}/nfc/no-such-lease/disk-0.vmdk"

    def upload(thumbprint: str) -> None:
        ovf.upload(session, url, thumbprint, io.BytesIO(), 0, lambda _: None)

    with pytest.raises(OvaError, match=r"failed: .*[Tt]humbprint"):
        upload("AB" * 20)
    with pytest.raises(OvaError, match="HTTP 404"):  # trusted, then refused by the host
        upload(sha1)


@pytest.mark.parametrize(
    ("trust", "expected"),
    [({"thumbprint": ":".join(["AB"] * 32)}, "thumbprint"), ({}, "TLS")],
    ids=["wrong thumbprint", "no pin, untrusted certificate"],
)
def test_install_against_an_untrusted_certificate_says_so_without_a_traceback(
    vcsim: Vcsim, tmp_path: Path, ova: Path, trust: dict[str, Any], expected: str
) -> None:
    """`gateway install` to a vCenter whose certificate is not the pinned one (or not
    verifiable): a clear message, exit 1, nothing imported."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "pw").write_text(vcsim.password + "\n")
    (tmp_path / "code").write_text(new_pairing_code() + "\n")
    spec = {
        "vcenter": {
            "server": vcsim.address,
            "username": ADMIN,
            "password_file": str(tmp_path / "pw"),
            **trust,
        },
        "placement": PLACEMENT,
        "properties": {"node_network": "10.90.0.0/24"},
    }
    (tmp_path / "install.yaml").write_text(json.dumps(spec))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "starters.cli",
            "gateway",
            "install",
            "untrusted",
            "-f",
            str(tmp_path / "install.yaml"),
            "--pairing-code-file",
            str(tmp_path / "code"),
            "--ova",
            str(ova),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBEGATE_HOME": str(tmp_path / "home"), "COLUMNS": "200"},
    )
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert expected in said and "Traceback" not in said, said
    assert vcsim.password not in said
