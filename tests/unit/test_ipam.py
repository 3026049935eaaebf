"""IP pool spec rules and the allocator's invariants (property-based)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from domain.ipam import (
    IpPoolSpec,
    OutOfAddresses,
    PoolAllocator,
    PoolClaimed,
    allocatable_count,
)

NOW = datetime(2026, 11, 24, tzinfo=UTC)

RANGE: dict[str, Any] = {
    "name": "pool-a",
    "gateway": "local",
    "kind": "range",
    "first": "10.10.0.10",
    "last": "10.10.0.20",
    "prefix": 24,
    "network_gateway": "10.10.0.1",
    "nameservers": ["10.10.0.2"],
}
SUBNET: dict[str, Any] = {
    "name": "pool-b",
    "gateway": "local",
    "kind": "subnet",
    "subnet": "10.20.0.0/29",
    "network_gateway": "10.20.0.1",
}


def errors_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        IpPoolSpec.model_validate(data)
    return "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in info.value.errors())


# -- spec rules --------------------------------------------------------------------------------


def test_subnet_excludes_network_broadcast_and_gateway() -> None:
    spec = IpPoolSpec.model_validate(SUBNET)
    assert allocatable_count(spec) == 8 - 3
    pool = PoolAllocator(spec)
    got = pool.allocate("c1", [f"n{i}" for i in range(5)], NOW)
    assert sorted(got.values(), key=ipaddress.ip_address) == [
        "10.20.0.2",
        "10.20.0.3",
        "10.20.0.4",
        "10.20.0.5",
        "10.20.0.6",
    ]


def test_range_excludes_the_gateway_and_name_servers_inside_it() -> None:
    spec = IpPoolSpec.model_validate(
        {**RANGE, "first": "10.10.0.1", "last": "10.10.0.5", "nameservers": ["10.10.0.3"]}
    )
    assert allocatable_count(spec) == 3  # .1 is the gateway, .3 the name server
    pool = PoolAllocator(spec)
    got = pool.allocate("c1", ["vip", "a", "b"], NOW)
    assert set(got.values()) == {"10.10.0.2", "10.10.0.4", "10.10.0.5"}
    with pytest.raises(OutOfAddresses):
        pool.allocate("c1", ["c"], NOW)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"first": "fe80::1%eth0", "last": "fe80::9", "network_gateway": "fe80::1"}, "zone id"),
        ({"network_gateway": "::ffff:10.10.0.1"}, "IPv4-mapped"),
        ({"nameservers": ["224.0.0.251"]}, "multicast"),
        ({"nameservers": ["127.0.0.53"]}, "loopback"),
        ({"nameservers": ["::1"]}, "loopback"),
        (
            {"first": "169.254.0.10", "last": "169.254.0.20", "network_gateway": "169.254.0.1"},
            "link-local",
        ),
        ({"nameservers": ["::"]}, "unspecified"),
        ({"nameservers": ["255.255.255.255"]}, "broadcast"),
        (
            {
                "kind": "subnet",
                "first": None,
                "last": None,
                "prefix": None,
                "subnet": "ff02::/120",
                "network_gateway": "ff02::1",
            },
            "multicast",
        ),
        (
            {
                "kind": "subnet",
                "first": None,
                "last": None,
                "prefix": None,
                "subnet": "fe80::%eth0/120",
                "network_gateway": "fe80::1",
            },
            "zone id",
        ),
        ({"search_domains": ["lab.example.com; reboot"]}, "search_domains"),
    ],
)
def test_addresses_nodes_cannot_use_are_refused(change: dict[str, Any], message: str) -> None:
    assert message in errors_of({**RANGE, **change})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"first": "10.10.0.30"}, "is after last"),
        ({"last": "fd00::5"}, "same address family"),
        ({"network_gateway": "10.11.0.1"}, "outside the node network"),
        ({"first": "10.10.0.250", "last": "10.10.1.5"}, "inside the node network"),
        ({"prefix": None}, "prefix: required"),
        ({"first": None}, "needs first and last"),
        ({"subnet": "10.10.0.0/24"}, "subnet is for kind subnet"),
        ({"name": "Pool_A"}, "name: "),
        ({"first": "10.10.0.x"}, "first: "),
        ({"nameservers": ["dns.example.com"]}, "nameservers"),
        ({"colour": "red"}, "colour"),
        ({"prefix": 15, "first": "10.10.0.1", "last": "10.11.0.2"}, "at most 65536"),
    ],
)
def test_range_rules_name_the_field(change: dict[str, Any], message: str) -> None:
    assert message in errors_of({**RANGE, **change})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subnet": "10.20.0.1/29"}, "no host bits"),
        ({"prefix": 24}, "differs from the subnet"),
        ({"first": "10.20.0.2"}, "first and last are for kind range"),
        ({"subnet": "10.0.0.0/15", "network_gateway": "10.0.0.1"}, "at most 65536"),
        ({"subnet": "10.20.0.5/32", "network_gateway": "10.20.0.5"}, "no allocatable"),
    ],
)
def test_subnet_rules_name_the_field(change: dict[str, Any], message: str) -> None:
    assert message in errors_of({**SUBNET, **change})


def test_a_16_is_allowed_and_ipv6_works() -> None:
    big = IpPoolSpec.model_validate(
        {**SUBNET, "subnet": "10.0.0.0/16", "network_gateway": "10.0.0.1"}
    )
    assert allocatable_count(big) == 65_536 - 3
    v6 = IpPoolSpec.model_validate(
        {**SUBNET, "subnet": "fd00:1::/120", "network_gateway": "fd00:1::1"}
    )
    assert allocatable_count(v6) == 256 - 2  # network address and gateway
    assert PoolAllocator(v6).allocate("c", ["a"], NOW)["a"] == "fd00:1::2"


def test_overlap() -> None:
    a = IpPoolSpec.model_validate(RANGE)
    assert a.overlaps(
        IpPoolSpec.model_validate({**RANGE, "first": "10.10.0.20", "last": "10.10.0.30"})
    )
    assert not a.overlaps(
        IpPoolSpec.model_validate({**RANGE, "first": "10.10.0.21", "last": "10.10.0.30"})
    )


# -- allocator behaviour -----------------------------------------------------------------------


def test_same_owner_and_slot_get_the_same_address() -> None:
    pool = PoolAllocator(IpPoolSpec.model_validate(RANGE))
    first = pool.allocate("cluster/a", ["vip", "cp-0"], NOW)
    again = pool.allocate("cluster/a", ["cp-0", "vip", "cp-1"], NOW)
    assert again["vip"] == first["vip"] and again["cp-0"] == first["cp-0"]
    assert pool.used == 3


def test_out_of_addresses_allocates_nothing() -> None:
    pool = PoolAllocator(IpPoolSpec.model_validate(RANGE))  # 11 addresses
    pool.allocate("a", [f"n{i}" for i in range(9)], NOW)
    with pytest.raises(OutOfAddresses) as info:
        pool.allocate("b", ["x", "y", "z"], NOW)
    assert "2 free address(es), 3 requested" in str(info.value)
    assert pool.used == 9 and "b" not in pool.owners()


def test_restricted_pool_belongs_to_the_first_owner_until_it_releases_everything() -> None:
    pool = PoolAllocator(IpPoolSpec.model_validate({**RANGE, "restrict_to_single_cluster": True}))
    pool.allocate("cluster/first", ["vip"], NOW)
    with pytest.raises(PoolClaimed, match="belongs to cluster/first"):
        pool.allocate("cluster/second", ["vip"], NOW)
    pool.release("cluster/first")
    assert pool.allocate("cluster/second", ["vip"], NOW)


def test_snapshot_round_trip_keeps_everything() -> None:
    pool = PoolAllocator(
        IpPoolSpec.model_validate(
            {**SUBNET, "subnet": "10.0.0.0/16", "network_gateway": "10.0.0.1"}
        )
    )
    for i in range(200):
        pool.allocate(f"c{i % 7}", [f"s{i}"], NOW)
    pool.release("c3")
    restored = PoolAllocator.restore(pool.spec, pool.snapshot())
    assert restored.allocations() == pool.allocations()
    assert (restored.used, restored.free) == (pool.used, pool.free)
    # the next address is the same in both
    assert restored.allocate("n", ["x"], NOW) == pool.allocate("n", ["x"], NOW)


# -- properties --------------------------------------------------------------------------------

op = st.one_of(
    st.tuples(
        st.just("alloc"), st.integers(0, 4), st.lists(st.integers(0, 9), min_size=1, max_size=4)
    ),
    st.tuples(st.just("release"), st.integers(0, 4), st.none()),
    st.tuples(st.just("release-slot"), st.integers(0, 4), st.lists(st.integers(0, 9), max_size=2)),
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(0, 2**20),
    size=st.integers(1, 40),
    gw_offset=st.integers(-2, 45),
    ops=st.lists(op, max_size=60),
    snapshot_every=st.integers(1, 20),
)
def test_allocator_invariants(
    base: int, size: int, gw_offset: int, ops: list[Any], snapshot_every: int
) -> None:
    network = ipaddress.ip_network(
        f"{ipaddress.ip_address(0x0A000000 + (base << 6))}/26", strict=False
    )
    first = network.network_address + 0
    last = first + min(size, 63)
    gateway = first + max(0, min(gw_offset, 63))
    try:
        spec = IpPoolSpec.model_validate(
            {
                "name": "p",
                "gateway": "g",
                "kind": "range",
                "first": str(first),
                "last": str(last),
                "prefix": 26,
                "network_gateway": str(gateway),
            }
        )
    except ValidationError:
        return
    reserved = {str(ipaddress.ip_address(a)) for a in spec.reserved()}
    pool = PoolAllocator(spec)
    expected: dict[tuple[str, str], str] = {}
    for step, (kind, owner_n, slots_n) in enumerate(ops):
        owner = f"c{owner_n}"
        if kind == "alloc":
            slots = [f"s{n}" for n in slots_n]
            try:
                got = pool.allocate(owner, slots, NOW)
            except OutOfAddresses:
                new = {s for s in slots if (owner, s) not in expected}
                assert len(new) > pool.free
                continue
            for slot, address in got.items():
                assert expected.setdefault((owner, slot), address) == address  # stable
        elif kind == "release":
            pool.release(owner)
            expected = {k: v for k, v in expected.items() if k[0] != owner}
        else:
            slots = [f"s{n}" for n in slots_n]
            pool.release(owner, slots)
            expected = {k: v for k, v in expected.items() if not (k[0] == owner and k[1] in slots)}
        if step % snapshot_every == 0:
            pool = PoolAllocator.restore(spec, pool.snapshot())
        held = [a.address for a in pool.allocations()]
        assert len(held) == len(set(held)), "an address has two owners"
        assert {(a.owner, a.slot): a.address for a in pool.allocations()} == expected
        for address in held:
            ip = ipaddress.ip_address(address)
            assert first <= ip <= last, "outside the pool"
            assert address not in reserved, "gateway, network or broadcast handed out"
        assert pool.used + pool.free == allocatable_count(spec)


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 30))
def test_released_addresses_are_reusable(size: int) -> None:
    spec = IpPoolSpec.model_validate(
        {
            **RANGE,
            "first": "10.10.0.100",
            "last": str(ipaddress.ip_address("10.10.0.100") + size - 1),
        }
    )
    pool = PoolAllocator(spec)
    everything = pool.allocate("a", [f"s{i}" for i in range(size)], NOW)
    with pytest.raises(OutOfAddresses):
        pool.allocate("b", ["x"], NOW)
    pool.release("a")
    again = pool.allocate("b", [f"s{i}" for i in range(size)], NOW)
    assert set(again.values()) == set(everything.values())
