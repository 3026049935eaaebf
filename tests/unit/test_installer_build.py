"""The installer OVA as tools/installer/build.py writes it, and the OVA reader's refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from activities.vsphere.ovf import OvaError, read_ova, vapp_properties
from domain.gateway import InstallerProperties
from plumbing.settings import Settings
from starters.installer import INSTALLER_VERSION, builder, installer_ova

build = builder()
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
HEADER = struct.Struct("<IIIQQQQIQQQB4sH")


@pytest.fixture(scope="module")
def ova(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = build.build_ova(tmp_path_factory.mktemp("ova"), INSTALLER_VERSION)
    return path


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        found = {}
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            assert handle is not None
            found[member.name] = handle.read()
        return found


def test_members_come_in_the_order_the_ovf_specification_wants(ova: Path) -> None:
    assert ova.name == "kubegate-installer-1.0.0.ova"
    with tarfile.open(ova) as archive:
        assert archive.getnames() == [
            "kubegate-installer-1.0.0.ovf",
            "kubegate-installer-1.0.0.mf",
            "kubegate-installer-1.0.0-disk1.vmdk",
        ]
        assert all(m.isfile() and m.mode == 0o644 for m in archive.getmembers())


def test_the_manifest_holds_the_sha256_of_every_other_file(ova: Path) -> None:
    files = members(ova)
    manifest = files.pop("kubegate-installer-1.0.0.mf").decode()
    assert manifest.splitlines() == [
        f"SHA256({name})= {hashlib.sha256(data).hexdigest()}" for name, data in files.items()
    ]


def test_builds_are_reproducible(ova: Path, tmp_path: Path) -> None:
    assert build.build_ova(tmp_path, INSTALLER_VERSION).read_bytes() == ova.read_bytes()


def test_the_disk_is_a_blank_stream_optimized_vmdk(ova: Path) -> None:
    disk = members(ova)["kubegate-installer-1.0.0-disk1.vmdk"]
    capacity = 8 * 2**30 // 512
    (magic, version, flags, sectors, grain, desc_at, desc_len, gtes, rgd, gd, overhead, unclean,
     newlines, compression) = HEADER.unpack_from(disk)  # fmt: skip
    assert disk[:4] == b"KDMV" and magic == 0x564D444B
    assert version == 3 and flags == 0x30001  # valid newline test, compressed grains, markers
    assert (sectors, grain, gtes, compression) == (capacity, 128, 512, 1)
    assert (desc_at, desc_len, rgd, overhead, unclean) == (1, 20, 0, 128, 0)
    assert gd == 0xFFFFFFFFFFFFFFFF  # the grain directory is at the end (see the footer)
    assert newlines == b"\n \r\n"
    assert len(disk) % 512 == 0

    descriptor = disk[512 : 512 * 21].rstrip(b"\0").decode()
    assert 'createType="streamOptimized"' in descriptor
    assert f'RW {capacity} SPARSE "kubegate-installer-1.0.0-disk1.vmdk"' in descriptor

    # at overHead: the grain-directory marker, then the directory, all zero (no grain table)
    tables = capacity // (128 * 512)
    gd_sectors = -(-tables * 4 // 512)
    marker = 128 * 512
    assert struct.unpack_from("<QII", disk, marker) == (gd_sectors, 0, 2)
    directory = disk[marker + 512 : marker + 512 + gd_sectors * 512]
    assert directory == bytes(gd_sectors * 512)
    # then the footer marker, the footer (the header with the directory's offset), the EOS
    assert struct.unpack_from("<QII", disk, len(disk) - 1536) == (1, 0, 3)
    footer = HEADER.unpack_from(disk, len(disk) - 1024)
    assert footer[9] == 129 and footer[:9] == HEADER.unpack_from(disk)[:9]
    assert disk[-512:] == bytes(512)
    assert len(disk) == (129 + gd_sectors + 3) * 512


def test_capacity_must_be_whole_grains() -> None:
    with pytest.raises(ValueError, match="multiple of 65536"):
        build.blank_stream_optimized_vmdk(1000, "x.vmdk")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) not installed")
def test_qemu_img_reads_the_disk_as_an_empty_stream_optimized_vmdk(
    ova: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.vmdk"
    disk.write_bytes(members(ova)["kubegate-installer-1.0.0-disk1.vmdk"])
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk)], check=True, capture_output=True
        ).stdout
    )
    assert info["format"] == "vmdk" and info["virtual-size"] == 8 * 2**30
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    subprocess.run(["qemu-img", "check", str(disk)], check=True, capture_output=True)
    extents = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(disk)], check=True, capture_output=True
        ).stdout
    )
    assert [(e["data"], e["zero"]) for e in extents] == [(False, True)]


def envelope(ova: Path) -> ET.Element:
    return ET.fromstring(members(ova)["kubegate-installer-1.0.0.ovf"])  # noqa: S314 - ours


def test_the_descriptor_describes_a_small_vm_with_one_disk_and_one_nic(ova: Path) -> None:
    root = envelope(ova)
    disk_size = len(members(ova)["kubegate-installer-1.0.0-disk1.vmdk"])
    [file] = root.findall(f"{OVF}References/{OVF}File")
    assert file.get(f"{OVF}href") == "kubegate-installer-1.0.0-disk1.vmdk"
    assert file.get(f"{OVF}size") == str(disk_size)
    [disk] = root.findall(f"{OVF}DiskSection/{OVF}Disk")
    assert disk.get(f"{OVF}capacity") == "8"
    assert disk.get(f"{OVF}capacityAllocationUnits") == "byte * 2^30"
    assert disk.get(f"{OVF}format", "").endswith("#streamOptimized")
    assert [n.get(f"{OVF}name") for n in root.iter(f"{OVF}Network")] == ["VM Network"]

    hardware = root.find(f"{OVF}VirtualSystem/{OVF}VirtualHardwareSection")
    assert hardware is not None
    assert hardware.get(f"{OVF}transport") == "com.vmware.guestInfo"
    items: dict[str, list[ET.Element]] = {}
    for item in hardware.findall(f"{OVF}Item"):
        items.setdefault(item.findtext(f"{RASD}ResourceType", ""), []).append(item)
    assert [i.findtext(f"{RASD}VirtualQuantity") for i in items["3"]] == ["2"]
    assert [i.findtext(f"{RASD}VirtualQuantity") for i in items["4"]] == ["4096"]
    assert [i.findtext(f"{RASD}HostResource") for i in items["17"]] == ["ovf:/disk/vmdisk1"]
    assert [i.findtext(f"{RASD}Connection") for i in items["10"]] == ["VM Network"]


def test_the_product_section_holds_every_installer_property(ova: Path) -> None:
    [section] = envelope(ova).iter(f"{OVF}ProductSection")
    assert section.get(f"{OVF}class") == "kubegate"
    assert section.findtext(f"{OVF}Version") == INSTALLER_VERSION
    props = section.findall(f"{OVF}Property")
    sample = InstallerProperties(
        installer_name="gw", console_endpoint="https://k.example.com", pairing_code="ABCDEFGHJK"
    )
    assert [f"kubegate.{p.get(f'{OVF}key')}" for p in props] == list(sample.ovf_properties())
    for prop in props:
        assert prop.get(f"{OVF}userConfigurable") == "true"
        assert prop.get(f"{OVF}type") == "string"
        assert prop.get(f"{OVF}password") is None
        assert prop.findtext(f"{OVF}Label") and prop.findtext(f"{OVF}Description")


def test_the_reader_accepts_the_built_ova(ova: Path) -> None:
    package = read_ova(ova)
    assert package.networks == ["VM Network"]
    assert set(package.properties) == {f"kubegate.{f}" for f in InstallerProperties.model_fields}
    assert set(package.properties.values()) == {""}


def rewrite(
    ova: Path, target: Path, change: dict[str, bytes | None], order: list[str] | None = None
) -> Path:
    """A copy of the OVA with members replaced (bytes), dropped (None) or reordered."""
    files = members(ova)
    for name, data in change.items():
        if data is None:
            files.pop(name)
        else:
            files[name] = data
    with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name in order or list(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            archive.addfile(info, io.BytesIO(files[name]))
    return target


def test_the_reader_refuses_a_changed_disk(ova: Path, tmp_path: Path) -> None:
    disk = bytearray(members(ova)["kubegate-installer-1.0.0-disk1.vmdk"])
    disk[600] ^= 1
    bad = rewrite(ova, tmp_path / "bad.ova", {"kubegate-installer-1.0.0-disk1.vmdk": bytes(disk)})
    with pytest.raises(OvaError, match=r"disk1\.vmdk does not match its SHA256 digest"):
        read_ova(bad)


@pytest.mark.parametrize(
    ("change", "order", "message"),
    [
        ({"kubegate-installer-1.0.0.mf": None}, None, "expected one manifest"),
        ({"kubegate-installer-1.0.0.mf": b"hello\n"}, None, "manifest line 1 is not"),
        ({"kubegate-installer-1.0.0-disk1.vmdk": None}, None, "referenced but not in the archive"),
        (
            {},
            [
                "kubegate-installer-1.0.0.mf",
                "kubegate-installer-1.0.0.ovf",
                "kubegate-installer-1.0.0-disk1.vmdk",
            ],
            "first file of an OVA must be its .ovf",
        ),
        (
            {"kubegate-installer-1.0.0.ovf": b'<?xml version="1.0"?><!DOCTYPE x []><x/>'},
            None,
            "must not contain a DOCTYPE",
        ),
    ],
)
def test_the_reader_refuses_a_broken_ova(
    ova: Path,
    tmp_path: Path,
    change: dict[str, bytes | None],
    order: list[str] | None,
    message: str,
) -> None:
    with pytest.raises(OvaError, match=message):
        read_ova(rewrite(ova, tmp_path / "broken.ova", change, order))


def test_the_reader_refuses_what_is_not_a_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ova"
    junk.write_bytes(b"PK\x03\x04 not a tar at all")
    with pytest.raises(OvaError, match=r"junk\.ova: not an OVA"):
        read_ova(junk)


def test_installer_ova_builds_once_and_again_when_outdated(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    first = installer_ova(settings)
    assert first == tmp_path / "installer" / "kubegate-installer-1.0.0.ova"
    built = first.stat().st_mtime_ns
    assert installer_ova(settings).stat().st_mtime_ns == built  # not built again
    old = build.TEMPLATE.stat().st_mtime - 60
    os.utime(first, (old, old))
    installer_ova(settings)
    assert first.stat().st_mtime > old


def test_vapp_properties_come_from_vapp_config_as_vcenter_keeps_them() -> None:
    vapp: Any = vim.vApp.VmConfigInfo(
        property=[
            vim.vApp.PropertyInfo(key=0, classId="kubegate", id="installer_name", value="gw1"),
            vim.vApp.PropertyInfo(key=1, classId="kubegate", id="no_proxy", defaultValue=""),
            vim.vApp.PropertyInfo(key=2, classId="other", id="thing", value="x"),
        ]
    )
    extra = [vim.option.OptionValue(key="kubegate.installer_name", value="not-this-one")]
    assert vapp_properties(vapp, extra) == {
        "kubegate.installer_name": "gw1",
        "kubegate.no_proxy": "",
    }
    # without vAppConfig (the simulator), the import's keys in extraConfig
    assert vapp_properties(None, extra) == {"kubegate.installer_name": "not-this-one"}
