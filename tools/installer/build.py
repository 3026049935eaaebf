"""Build the kubegate gateway installer OVA (standard library only).

    python tools/installer/build.py --version 1.0.0 --out DIR
    # -> DIR/kubegate-installer-1.0.0.ova

The OVA is a ustar archive: the OVF descriptor first (kubegate-installer.ovf beside this file,
filled in), then the manifest (SHA256 lines), then the disk, as the OVF specification orders
them. The disk is a blank streamOptimized VMDK written here (VMware "Virtual Disk Format 5.0",
stream-optimized compressed sparse extent): a sparse header (version 3, compressed grains and
markers, grain directory at the end), the embedded descriptor, a grain-directory marker and a
directory whose entries are all zero (no grain table, no grain: every sector reads as zero), a
footer marker with a copy of the header that holds the directory's offset, and an end-of-stream
marker. The build is reproducible: the same version gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import struct
import sys
import tarfile
import zlib
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).with_name("kubegate-installer.ovf")
#: Capacity of the installer's blank disk.
DISK_GIB = 8

SECTOR = 512
MAGIC = 0x564D444B  # "KDMV" on disk
VERSION_STREAM_OPTIMIZED = 3
FLAG_VALID_NEWLINE_TEST = 1 << 0
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_DEFLATE = 1
GRAIN_SECTORS = 128  # 64 KiB grains
GTES_PER_GT = 512
GD_AT_END = 0xFFFFFFFFFFFFFFFF
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
#: Sectors reserved for the embedded descriptor, and where the first marker starts (one grain,
#: as VMware's tools lay it out; a stream reader skips to `overHead`).
DESCRIPTOR_SECTORS = 20
OVERHEAD_SECTORS = GRAIN_SECTORS
#: <IIIQQQQIQQQB4sH: magic .. compressAlgorithm, 79 bytes, padded to one sector.
_HEADER = struct.Struct("<IIIQQQQIQQQB4sH")


def names(version: str) -> dict[str, str]:
    """File names of one version: the OVA and its members."""
    base = f"kubegate-installer-{version}"
    return {
        "ova": f"{base}.ova",
        "ovf": f"{base}.ovf",
        "mf": f"{base}.mf",
        "disk": f"{base}-disk1.vmdk",
    }


def _header(capacity_sectors: int, gd_offset: int) -> bytes:
    fields = _HEADER.pack(
        MAGIC,
        VERSION_STREAM_OPTIMIZED,
        FLAG_VALID_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity_sectors,
        GRAIN_SECTORS,
        1,  # descriptorOffset: right after the header
        DESCRIPTOR_SECTORS,
        GTES_PER_GT,
        0,  # rgdOffset: no redundant directory in a stream-optimized extent
        gd_offset,
        OVERHEAD_SECTORS,
        0,  # uncleanShutdown
        b"\n \r\n",  # singleEndLineChar, nonEndLineChar, doubleEndLineChar1/2
        COMPRESSION_DEFLATE,
    )
    return fields.ljust(SECTOR, b"\0")


def _marker(num_sectors: int, kind: int) -> bytes:
    """A metadata marker: numSectors of what follows, size 0, type; one sector."""
    return struct.pack("<QII", num_sectors, 0, kind).ljust(SECTOR, b"\0")


def _descriptor(capacity_sectors: int, file_name: str, cid: int) -> bytes:
    cylinders = min(capacity_sectors // (255 * 63), 65535)
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity_sectors} SPARSE "{file_name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.longContentID = "{cid:08x}{cid:08x}{cid:08x}{cid:08x}"\n'
        'ddb.virtualHWVersion = "13"\n'
    ).encode()
    if len(text) > DESCRIPTOR_SECTORS * SECTOR:
        raise ValueError("the VMDK descriptor does not fit its sectors")
    return text.ljust(DESCRIPTOR_SECTORS * SECTOR, b"\0")


def blank_stream_optimized_vmdk(capacity_bytes: int, file_name: str) -> bytes:
    """A streamOptimized VMDK of `capacity_bytes` (a multiple of 64 KiB) that reads as zeros."""
    grain_bytes = GRAIN_SECTORS * SECTOR
    if capacity_bytes <= 0 or capacity_bytes % grain_bytes:
        raise ValueError(f"capacity must be a positive multiple of {grain_bytes} bytes")
    capacity = capacity_bytes // SECTOR
    tables = -(-capacity // (GRAIN_SECTORS * GTES_PER_GT))
    gd_sectors = -(-tables * 4 // SECTOR)
    cid = zlib.crc32(f"{file_name}:{capacity}".encode()) or 1
    if cid == 0xFFFFFFFF:  # reserved for "no parent"
        cid = 1
    head = _header(capacity, GD_AT_END) + _descriptor(capacity, file_name, cid)
    out = bytearray(head.ljust(OVERHEAD_SECTORS * SECTOR, b"\0"))
    out += _marker(gd_sectors, MARKER_GD)
    gd_offset = len(out) // SECTOR
    out += bytes(gd_sectors * SECTOR)  # every entry 0: no grain table, the grains read as zero
    out += _marker(1, MARKER_FOOTER)
    out += _header(capacity, gd_offset)
    out += _marker(0, MARKER_EOS)
    return bytes(out)


def render_ovf(version: str, disk_file: str, disk_size: int, disk_gib: int = DISK_GIB) -> str:
    """The descriptor template filled in for one build."""
    return Template(TEMPLATE.read_text()).substitute(
        version=version, disk_file=disk_file, disk_size=disk_size, disk_gib=disk_gib
    )


def _member(archive: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def build_ova(out_dir: Path, version: str, *, disk_gib: int = DISK_GIB) -> Path:
    """Write `kubegate-installer-<version>.ova` into out_dir (atomically) and return its path."""
    files = names(version)
    disk = blank_stream_optimized_vmdk(disk_gib << 30, files["disk"])
    descriptor = render_ovf(version, files["disk"], len(disk), disk_gib).encode()
    manifest = "".join(
        f"SHA256({name})= {hashlib.sha256(data).hexdigest()}\n"
        for name, data in ((files["ovf"], descriptor), (files["disk"], disk))
    ).encode()
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / files["ova"]
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as archive:
            _member(archive, files["ovf"], descriptor, mtime)
            _member(archive, files["mf"], manifest, mtime)
            _member(archive, files["disk"], disk, mtime)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the kubegate installer OVA.")
    parser.add_argument("--version", required=True, help="installer version, e.g. 1.0.0")
    parser.add_argument("--out", type=Path, default=Path("."), help="output directory")
    parser.add_argument("--disk-gib", type=int, default=DISK_GIB, help="blank disk capacity")
    args = parser.parse_args(argv)
    print(build_ova(args.out, args.version, disk_gib=args.disk_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
