"""The SSRF guard's address predicate and URL parsing, without sending anything anywhere:
every range that is not globally routable is refused in each of its spellings."""

from __future__ import annotations

import ipaddress

import pytest

from relay import ssrf

REFUSED = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254",  # link-local: the cloud metadata service
    "100.64.0.1", "100.127.255.255",  # CGNAT
    "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "192.0.0.8", "198.18.0.1", "192.0.2.1", "198.51.100.1", "203.0.113.1",
    "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:100.64.0.1",
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",
    "::7f00:1", "::a00:1",  # IPv4-compatible
    "2002:7f00:1::", "2002:a00:1::",  # 6to4 of loopback and private
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8",
           "64:ff9b::808:808", "2002:808:808::"]


@pytest.mark.parametrize("text", REFUSED)
def test_addresses_that_are_not_globally_routable_are_refused(text: str) -> None:
    assert ssrf.is_forbidden(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", ALLOWED)
def test_global_addresses_are_allowed(text: str) -> None:
    assert not ssrf.is_forbidden(ipaddress.ip_address(text))


@pytest.mark.parametrize(("host", "address"), [
    ("2130706433", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"), ("017700000001", "127.0.0.1"), ("::ffff:127.0.0.1", "::ffff:7f00:1"),
    ("example.com", None), ("1example.com", None),
])
def test_literal_hosts_are_read_as_resolvers_read_them(host: str, address: str | None) -> None:
    found = ssrf.literal_address(host)
    assert found == (None if address is None else ipaddress.ip_address(address))


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/hook", "https://[::1]/hook", "https://[::ffff:127.0.0.1]/hook",
    "https://0.0.0.0/hook", "https://localhost/hook", "https://2130706433/hook",
    "https://0177.0.0.1/hook", "https://10.1.2.3/hook", "https://[fe80::1%25eth0]/hook",
])
async def test_urls_of_local_hosts_are_refused(url: str) -> None:
    with pytest.raises(ssrf.Refused):
        await ssrf.check(url, allow_http=False, allow_private=False)


@pytest.mark.parametrize("url", ["http://8.8.8.8/hook", "ftp://8.8.8.8/", "https:///nohost",
                                 "https://user:pw@8.8.8.8/", "not a url"])
async def test_urls_that_cannot_be_targets_are_refused(url: str) -> None:
    with pytest.raises(ssrf.Refused):
        await ssrf.check(url, allow_http=False, allow_private=True)


async def test_allowing_private_addresses_still_resolves_and_connects_to_them() -> None:
    target = await ssrf.check("http://localhost:8080/x", allow_http=True, allow_private=True)
    assert target.host == "localhost" and target.port == 8080
    assert all(address.is_loopback for address in target.addresses)
