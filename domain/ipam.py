"""IP pools: the spec users write and the allocation state the pool workflow keeps.

Allocation cost does not depend on the pool's size or on how many addresses are in use:
addresses are offsets from the pool's first address; never-used offsets are handed out by
advancing a cursor, released ones come back from a min-heap. Deterministic: safe in workflows.
"""

from __future__ import annotations

import base64
import heapq
import ipaddress
import json
import re
import zlib
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from domain.names import DnsLabel, is_host

#: Largest pool: a /16 of IPv4 (or the same number of IPv6 addresses).
MAX_POOL_ADDRESSES = 65_536

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SLOT = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_OWNER = re.compile(r"^[a-z0-9]([-a-z0-9./]{0,251}[a-z0-9])?$")


class IpPoolSpec(BaseModel):
    """An IP pool as the user writes it (pool.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: DnsLabel = Field(description="Pool name, a DNS label; unique per gateway.")
    gateway: DnsLabel = Field(description="The gateway the pool is linked to.")
    kind: Literal["range", "subnet"] = Field(
        description="'range': first..last addresses; 'subnet': every host address of a CIDR."
    )
    first: str | None = Field(default=None, description="First address (kind range).")
    last: str | None = Field(default=None, description="Last address (kind range).")
    subnet: str | None = Field(default=None, description="CIDR, e.g. 10.10.0.0/24 (kind subnet).")
    prefix: int | None = Field(
        default=None, ge=1, le=128, description="Prefix length of the node network."
    )
    network_gateway: str = Field(description="Default gateway of the node network.")
    nameservers: list[str] = Field(default_factory=list, max_length=8, description="DNS servers.")
    search_domains: list[str] = Field(
        default_factory=list, max_length=16, description="DNS search domains."
    )
    restrict_to_single_cluster: bool = Field(
        default=False, description="Reserve the pool for the first cluster that allocates."
    )

    @field_validator("first", "last", "network_gateway")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else usable_address(value)

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "%" in value:
            raise ValueError("must not carry a zone id (%…)")
        try:
            network = ipaddress.ip_network(value.strip(), strict=True)
        except ValueError as exc:
            raise ValueError(f"must be a CIDR with no host bits set ({exc})") from None
        usable_address(str(network.network_address), what="the subnet")
        return str(network)

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        return [usable_address(v, what=f"entry {i}") for i, v in enumerate(value)]

    @field_validator("search_domains")
    @classmethod
    def _search_domains(cls, value: list[str]) -> list[str]:
        for i, domain in enumerate(value):
            if not is_host(domain.strip()):
                raise ValueError(f"entry {i}: {domain!r} is not a domain name")
        return [d.strip() for d in value]

    @model_validator(mode="after")
    def _rules(self) -> IpPoolSpec:
        if self.kind == "range":
            if self.first is None or self.last is None:
                raise ValueError("kind range needs first and last")
            if self.subnet is not None:
                raise ValueError("subnet is for kind subnet; a range has first and last")
            if self.prefix is None:
                raise ValueError("prefix: required for kind range (e.g. 24)")
        else:
            if self.subnet is None:
                raise ValueError("kind subnet needs subnet (a CIDR)")
            if self.first is not None or self.last is not None:
                raise ValueError("first and last are for kind range; a subnet has subnet")
            subnet_prefix = ipaddress.ip_network(self.subnet).prefixlen
            if self.prefix is not None and self.prefix != subnet_prefix:
                raise ValueError(f"prefix {self.prefix} differs from the subnet's /{subnet_prefix}")
        gateway = ipaddress.ip_address(self.network_gateway)
        network = self.network
        if gateway.version != network.version:
            raise ValueError("network_gateway: must be of the same address family as the pool")
        if gateway not in network:
            raise ValueError(f"network_gateway {gateway} is outside the node network {network}")
        if self.kind == "range":
            first = ipaddress.ip_address(self.first)  # type: ignore[arg-type]
            last = ipaddress.ip_address(self.last)  # type: ignore[arg-type]
            if first.version != last.version:
                raise ValueError("first and last must be of the same address family")
            if int(first) > int(last):
                raise ValueError(f"first {first} is after last {last}")
            if first not in network or last not in network:
                raise ValueError(f"first..last must lie inside the node network {network}")
        size = int(self.upper) - int(self.lower) + 1
        if size > MAX_POOL_ADDRESSES:
            raise ValueError(
                f"the pool spans {size} addresses; at most {MAX_POOL_ADDRESSES} (a /16) allowed"
            )
        if allocatable_count(self) == 0:
            raise ValueError("the pool has no allocatable address")
        return self

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The node network: the subnet, or first/prefix for a range."""
        if self.subnet is not None:
            return ipaddress.ip_network(self.subnet)
        return ipaddress.ip_network(f"{self.first}/{self.prefix}", strict=False)

    @property
    def prefix_length(self) -> int:
        return self.network.prefixlen

    @property
    def lower(self) -> IPAddress:
        if self.first is not None:
            return ipaddress.ip_address(self.first)
        return self.network.network_address

    @property
    def upper(self) -> IPAddress:
        if self.last is not None:
            return ipaddress.ip_address(self.last)
        return self.network.broadcast_address

    def reserved(self) -> set[int]:
        """Addresses inside first..last that are never handed out, as integers: the network's
        own address, its broadcast address, its gateway and the pool's name servers."""
        network = self.network
        out = {int(ipaddress.ip_address(self.network_gateway)), int(network.network_address)}
        out |= {int(ipaddress.ip_address(a)) for a in self.nameservers}
        if network.version == 4 and network.prefixlen < 31:
            out.add(int(network.broadcast_address))
        return {a for a in out if int(self.lower) <= a <= int(self.upper)}

    def overlaps(self, other: IpPoolSpec) -> bool:
        if self.lower.version != other.lower.version:
            return False
        return int(self.lower) <= int(other.upper) and int(other.lower) <= int(self.upper)

    def describe_range(self) -> str:
        return self.subnet if self.kind == "subnet" else f"{self.first}-{self.last}"  # type: ignore[return-value]


def usable_address(value: str, what: str = "") -> str:
    """The address in normal form if a node could use it; ValueError naming the rule otherwise.

    Refused: zone ids, IPv4-mapped IPv6, multicast, loopback, link-local, unspecified and the
    limited broadcast address (255.255.255.255).
    """
    prefix = f"{what}: " if what else ""
    value = value.strip()
    if "%" in value:
        raise ValueError(f"{prefix}{value!r}: must not carry a zone id (%…)")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{prefix}{value!r} is not an IP address") from None
    kind = (
        "an IPv4-mapped IPv6 address (write the IPv4 address)"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
        else "a multicast address"
        if address.is_multicast
        else "a loopback address"
        if address.is_loopback
        else "a link-local address"
        if address.is_link_local
        else "the unspecified address"
        if address.is_unspecified
        else "the broadcast address"
        if address == ipaddress.IPv4Address("255.255.255.255")
        else None
    )
    if kind is not None:
        raise ValueError(f"{prefix}{address} is {kind}; nodes cannot use it")
    return str(address)


def allocatable_count(spec: IpPoolSpec) -> int:
    return int(spec.upper) - int(spec.lower) + 1 - len(spec.reserved())


class Allocation(BaseModel):
    owner: str
    slot: str
    address: str
    allocated_at: datetime


class OutOfAddresses(Exception):
    def __init__(self, pool: str, free: int, requested: int) -> None:
        super().__init__(
            f"pool {pool} has {free} free address(es), {requested} requested; nothing was "
            "allocated — add addresses to the pool or use another pool"
        )
        self.free, self.requested = free, requested


class PoolClaimed(Exception):
    def __init__(self, pool: str, owner: str, claimant: str) -> None:
        super().__init__(
            f"pool {pool} is restricted to a single cluster and belongs to {owner}; "
            f"{claimant} cannot allocate from it"
        )
        self.owner = owner


def check_owner(owner: str) -> None:
    if not _OWNER.match(owner):
        raise ValueError(f"owner {owner!r}: lower-case letters, digits, '-', '.', '/' only")


def check_slot(slot: str) -> None:
    if not _SLOT.match(slot):
        raise ValueError(f"slot {slot!r}: a DNS label such as 'vip', 'cp-0' or 'worker-a-3'")


class PoolAllocator:
    """The allocation state of one pool; every method is deterministic."""

    def __init__(self, spec: IpPoolSpec) -> None:
        self.spec = spec
        self._base = int(spec.lower)
        self._size = int(spec.upper) - self._base + 1
        self._reserved = {a - self._base for a in spec.reserved()}
        self._cursor = 0  # offsets below the cursor have been handed out at least once
        self._released: list[int] = []  # heap of free offsets below the cursor
        self._by_owner: dict[str, dict[str, tuple[int, str]]] = {}  # owner -> slot -> (offset, at)
        self._in_use: set[int] = set()
        self.claimed_by: str | None = None

    # -- queries --------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._size - len(self._reserved)

    @property
    def used(self) -> int:
        return len(self._in_use)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def owners(self) -> list[str]:
        return sorted(self._by_owner)

    def allocations(self, owner: str | None = None) -> list[Allocation]:
        owners = [owner] if owner is not None else sorted(self._by_owner)
        return [
            Allocation(
                owner=o,
                slot=slot,
                address=self._address(off),
                allocated_at=datetime.fromisoformat(at),
            )
            for o in owners
            for slot, (off, at) in sorted(self._by_owner.get(o, {}).items())
        ]

    # -- changes --------------------------------------------------------------------------

    def allocate(self, owner: str, slots: list[str], now: datetime) -> dict[str, str]:
        """Addresses for every slot; slots the owner already holds keep their address.

        All or nothing: raises OutOfAddresses or PoolClaimed without changing anything.
        """
        self.check_allocate(owner, slots)
        held = self._by_owner.setdefault(owner, {})
        at = now.isoformat()
        for slot in dict.fromkeys(slots):
            if slot not in held:
                offset = self._take()
                held[slot] = (offset, at)
                self._in_use.add(offset)
        if self.spec.restrict_to_single_cluster and self.claimed_by is None:
            self.claimed_by = owner
        return {slot: self._address(held[slot][0]) for slot in slots}

    def check_allocate(self, owner: str, slots: list[str]) -> None:
        """Raise what allocate would raise, changing nothing (for update validators)."""
        check_owner(owner)
        if not slots:
            raise ValueError("slots: give at least one slot name")
        for slot in slots:
            check_slot(slot)
        if self.spec.restrict_to_single_cluster and self.claimed_by not in (None, owner):
            raise PoolClaimed(self.spec.name, str(self.claimed_by), owner)
        held = self._by_owner.get(owner, {})
        new = len({s for s in slots if s not in held})
        if new > self.free:
            raise OutOfAddresses(self.spec.name, self.free, new)

    def release(self, owner: str, slots: list[str] | None = None) -> list[str]:
        """Give back the owner's addresses (all, or the named slots); returns those released."""
        held = self._by_owner.get(owner, {})
        names = list(held) if slots is None else [s for s in dict.fromkeys(slots) if s in held]
        released = []
        for slot in names:
            offset, _ = held.pop(slot)
            self._in_use.discard(offset)
            heapq.heappush(self._released, offset)
            released.append(self._address(offset))
        if owner in self._by_owner and not held:
            del self._by_owner[owner]
            if self.claimed_by == owner:
                self.claimed_by = None
        return released

    def _take(self) -> int:
        if self._released:
            return heapq.heappop(self._released)
        while self._cursor in self._reserved:
            self._cursor += 1
        offset = self._cursor
        self._cursor += 1
        return offset

    def _address(self, offset: int) -> str:
        return str(ipaddress.ip_address(self._base + offset))

    # -- snapshot (continue-as-new) ----------------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        table = {
            o: {s: [off, at] for s, (off, at) in slots.items()}
            for o, slots in self._by_owner.items()
        }
        raw = json.dumps(
            {"cursor": self._cursor, "released": self._released, "owners": table},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        return PoolSnapshot(
            compressed=base64.b64encode(zlib.compress(raw, 6)).decode(),
            claimed_by=self.claimed_by,
            allocations=self.used,
        )

    @classmethod
    def restore(cls, spec: IpPoolSpec, snapshot: PoolSnapshot | None) -> PoolAllocator:
        allocator = cls(spec)
        if snapshot is None:
            return allocator
        data = json.loads(zlib.decompress(base64.b64decode(snapshot.compressed)))
        allocator._cursor = data["cursor"]
        allocator._released = list(data["released"])
        heapq.heapify(allocator._released)
        allocator._by_owner = {
            o: {s: (int(v[0]), str(v[1])) for s, v in slots.items()}
            for o, slots in data["owners"].items()
        }
        allocator._in_use = {
            off for slots in allocator._by_owner.values() for off, _ in slots.values()
        }
        allocator.claimed_by = snapshot.claimed_by
        return allocator


class PoolSnapshot(BaseModel):
    """Every allocation of a pool, compressed, carried across continue-as-new."""

    compressed: str
    claimed_by: str | None = None
    allocations: int = 0


# -- workflow and activity messages ------------------------------------------------------------


class IpPoolInput(BaseModel):
    spec: IpPoolSpec
    snapshot: PoolSnapshot | None = None
    created_at: datetime | None = None
    #: history length at which the pool continues as new (tests lower it)
    continue_as_new_after: int = 4_000


class AllocateRequest(BaseModel):
    owner: str = Field(description="Who holds the addresses, e.g. 'cluster/prod-1'.")
    slots: list[str] = Field(description="Named slots, e.g. ['vip', 'cp-0', 'worker-a-3'].")


class AllocateResult(BaseModel):
    pool: str
    addresses: dict[str, str] = Field(description="slot -> address")
    prefix: int
    network_gateway: str
    nameservers: list[str]
    search_domains: list[str]


class ReleaseRequest(BaseModel):
    owner: str
    slots: list[str] | None = Field(default=None, description="None releases every slot.")


class ReleaseResult(BaseModel):
    released: list[str]


class PoolStatus(BaseModel):
    spec: IpPoolSpec
    capacity: int
    used: int
    free: int
    owners: list[str]
    claimed_by: str | None
    created_at: datetime | None
    deleting: bool = False


class AllocationsQuery(BaseModel):
    owner: str | None = None
    offset: int = 0
    limit: int = 1_000


class AllocationsPage(BaseModel):
    allocations: list[Allocation]
    total: int


class PoolRef(BaseModel):
    gateway: str
    pool: str


class AllocateAddresses(PoolRef, AllocateRequest):
    """Input of the allocate_addresses activity."""


class ReleaseAddresses(PoolRef, ReleaseRequest):
    """Input of the release_addresses activity."""


class ListAddresses(PoolRef, AllocationsQuery):
    """Input of the list_addresses activity."""


class AllocateBatch(BaseModel):
    """Many callers' allocation requests, sent to the pool as one update."""

    requests: list[AllocateRequest]


class AllocateOutcome(BaseModel):
    """One request's answer in a batch: a result, or the error it would have raised."""

    result: AllocateResult | None = None
    error_type: str | None = None
    error: str | None = None


class AllocateBatchResult(BaseModel):
    outcomes: list[AllocateOutcome]


#: largest batch the pool accepts in one update
MAX_BATCH = 200
