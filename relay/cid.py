"""Content ids: computing a module's CID and normalising what clients send.

Modules are stored under CIDv1, codec raw, sha2-256, base32. Any CID a client sends (v0 or v1, any
multibase, any codec) is reduced to its multihash and re-expressed that way, so a CIDv0 and a
CIDv1 naming the same bytes find the same module.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from typing import NamedTuple

from multiformats import CID

GLYPH_SCHEME = "glyph://"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""What a glyph name, and a tag, must match (whole)."""
NAME_RULE = "[a-z0-9][a-z0-9._-]{0,63}"


class InvalidCid(ValueError):
    """The text is neither a CID nor a `glyph://NAME@TAG` name."""


class GlyphName(NamedTuple):
    name: str
    tag: str


# CIDv1 (0x01), codec raw (0x55), multihash sha2-256 (0x12) of 32 bytes (0x20).
_CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])


def compute(data: bytes) -> str:
    """The canonical CID of some bytes (a binary module, a state's manifest): CIDv1, raw,
    sha2-256, base32. Built directly (the multiformats objects cost about 250 µs a call; a
    session call computes one), pinned to the library's result by tests/relay/test_cid.py."""
    digest = hashlib.sha256(data).digest()
    return "b" + base64.b32encode(_CID_PREFIX + digest).decode().lower().rstrip("=")


@lru_cache(maxsize=4096)
def normalize(text: str) -> str:
    """The canonical CIDv1 (raw, base32) for any CID with the same multihash.

    Raises InvalidCid when `text` does not parse as a CID.
    """
    try:
        cid = CID.decode(text)
    except Exception as exc:  # multiformats raises several unrelated types
        raise InvalidCid(f"not a CID: {exc}") from None
    return str(CID("base32", 1, "raw", cid.digest))


def is_name(text: str) -> bool:
    """Whether `text` is a valid glyph name or tag: the one check of both."""
    return NAME_PATTERN.fullmatch(text) is not None


def parse_reference(text: str) -> str | GlyphName:
    """A module reference from a request: a canonical CID, or a glyph name to resolve.

    Raises InvalidCid for anything else.
    """
    if text.startswith(GLYPH_SCHEME):
        name, at, tag = text[len(GLYPH_SCHEME) :].partition("@")
        tag = tag if at else "latest"
        if not is_name(name) or not is_name(tag):
            raise InvalidCid(f"a glyph name is glyph://NAME@TAG, each {NAME_RULE}")
        return GlyphName(name, tag)
    try:
        return normalize(text)
    except InvalidCid:
        if is_name(text):  # "calculator": a name written without its scheme
            raise InvalidCid(f"{text!r} is not a CID; to run the module named {text}, send "
                             f"glyph://{text} (its latest tag) or glyph://{text}@TAG") from None
        raise
