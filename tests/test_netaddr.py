"""pypop.netaddr: the one reading of a client address for every policy."""

from __future__ import annotations

import ipaddress

import pytest

from pypop.auth.penalty import client_key
from pypop.netaddr import client_address, in_networks

NETS = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")]


@pytest.mark.parametrize(
    ("host", "inside"),
    [
        ("192.0.2.7", True),
        ("::ffff:192.0.2.7", True),  # IPv4-mapped counts as the IPv4 address
        ("2001:db8::1%eth0", True),  # the scope is dropped
        ("198.51.100.1", False),
        ("::ffff:198.51.100.1", False),
        ("mail.example.org", False),  # a name is never inside a network
        ("", False),
    ],
)
def test_in_networks(host: str, inside: bool) -> None:
    assert in_networks(host, NETS) is inside


def test_client_address_and_key_agree() -> None:
    assert client_address("::ffff:10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert client_address("fe80::1%lo") == ipaddress.ip_address("fe80::1")
    assert client_address("not an address") is None
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_key("unix") == "unix"
