"""Content ids: the CID Relay gives a module, and what it makes of the references clients send.

The expected CIDs are built here from the specifications (multihash, CIDv0, CIDv1, multibase)
with hashlib and base64 alone, not with the library Relay uses, so a change of library or of
its defaults that alters the ids clients see fails these tests.
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from relay.cid import GlyphName, InvalidCid, compute, normalize, parse_reference

MODULE = b"\x00asm\x01\x00\x00\x00"  # the smallest valid module: its header alone
SHA2_256, RAW, DAG_PB = 0x12, 0x55, 0x70
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def multihash(data: bytes) -> bytes:
    return bytes([SHA2_256, 32]) + hashlib.sha256(data).digest()


def base58btc(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits = ""
    while number:
        number, digit = divmod(number, 58)
        digits = BASE58[digit] + digits
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + digits


def base32(data: bytes) -> str:
    return base64.b32encode(data).decode().lower().rstrip("=")


def cid_v0(data: bytes) -> str:
    """CIDv0: the bare sha2-256 multihash in base58btc (implicitly dag-pb)."""
    return base58btc(multihash(data))


def cid_v1(data: bytes, codec: int, multibase: str = "base32") -> str:
    binary = bytes([1, codec]) + multihash(data)
    if multibase == "base32":
        return "b" + base32(binary)
    if multibase == "base32upper":
        return "B" + base32(binary).upper()
    if multibase == "base58btc":
        return "z" + base58btc(binary)
    assert multibase == "base64"
    return "m" + base64.b64encode(binary).decode().rstrip("=")


CANONICAL = cid_v1(MODULE, RAW)


def test_a_module_is_named_by_cidv1_raw_sha2_256_in_base32() -> None:
    assert compute(MODULE) == CANONICAL
    assert CANONICAL.startswith("bafkrei")  # what every module id a user sees looks like
    assert compute(b"hello world") == (
        "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e")
    for data in (b"", b"x" * 65536, MODULE):  # built by hand: what the library makes of it
        assert normalize(compute(data)) == compute(data)


@pytest.mark.parametrize("reference", [
    pytest.param(cid_v0(MODULE), id="v0"),
    pytest.param(cid_v1(MODULE, DAG_PB), id="v1-dag-pb"),
    pytest.param(cid_v1(MODULE, RAW, "base32upper"), id="v1-base32-upper"),
    pytest.param(cid_v1(MODULE, RAW, "base58btc"), id="v1-base58btc"),
    pytest.param(cid_v1(MODULE, DAG_PB, "base64"), id="v1-dag-pb-base64"),
    pytest.param(CANONICAL, id="canonical"),
])
def test_every_cid_of_the_same_bytes_normalises_to_the_module_id(reference: str) -> None:
    assert normalize(reference) == CANONICAL
    assert parse_reference(reference) == CANONICAL


def test_cidv0_and_cidv1_of_the_same_bytes_are_equal_and_of_other_bytes_are_not() -> None:
    assert cid_v0(MODULE).startswith("Qm")
    assert normalize(cid_v0(MODULE)) == normalize(cid_v1(MODULE, DAG_PB))
    assert normalize(cid_v0(MODULE + b"\0")) != CANONICAL


@pytest.mark.parametrize(("reference", "expected"), [
    ("glyph://calculator@quantum", GlyphName("calculator", "quantum")),
    ("glyph://fib", GlyphName("fib", "latest")),
    ("glyph://my-module_2.0@v1.2-rc_3", GlyphName("my-module_2.0", "v1.2-rc_3")),
    ("glyph://0@0", GlyphName("0", "0")),
    ("glyph://" + "a" * 64 + "@" + "b" * 64, GlyphName("a" * 64, "b" * 64)),
])
def test_glyph_names_parse_to_name_and_tag(reference: str, expected: GlyphName) -> None:
    assert parse_reference(reference) == expected


@pytest.mark.parametrize("reference", [
    pytest.param("glyph://Calculator@v1", id="upper-case-name"),
    pytest.param("glyph://calc@V1", id="upper-case-tag"),
    pytest.param("glyph://", id="no-name"),
    pytest.param("glyph://calc@", id="empty-tag"),
    pytest.param("glyph://-calc@v1", id="starts-with-dash"),
    pytest.param("glyph://.calc", id="starts-with-dot"),
    pytest.param("glyph://calc@v1@v2", id="two-tags"),
    pytest.param("glyph://ca/lc@v1", id="slash"),
    pytest.param("glyph://" + "a" * 65, id="name-too-long"),
    pytest.param("glyph://calc@" + "b" * 65, id="tag-too-long"),
])
def test_a_malformed_glyph_name_is_refused(reference: str) -> None:
    with pytest.raises(InvalidCid, match="glyph://NAME@TAG"):
        parse_reference(reference)


@pytest.mark.parametrize("reference", [
    pytest.param("", id="empty"),
    pytest.param("not-a-cid", id="words"),
    pytest.param(CANONICAL[:-4], id="truncated"),
    pytest.param(CANONICAL + "aa", id="too-long"),
    pytest.param("Qm" + "0" * 44, id="v0-not-base58"),
    pytest.param("calculator@quantum", id="name-without-scheme"),
    pytest.param("https://example.org/module.wasm", id="url"),
])
def test_what_is_neither_a_cid_nor_a_glyph_name_raises_invalid_cid(reference: str) -> None:
    with pytest.raises(InvalidCid, match="not a CID"):
        parse_reference(reference)
    with pytest.raises(InvalidCid):
        normalize(reference)
    assert issubclass(InvalidCid, ValueError)  # callers that catch ValueError still do
