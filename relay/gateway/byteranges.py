"""Serving one stored representation by parts (RFC 9110): the one byte range a request asks
for, `If-Range`, and `If-None-Match` against its ETag.

What a server may ignore is ignored, and the whole representation is sent (200): a Range in
another unit, one that does not parse, or several ranges (a multipart answer is more than any
client of an output needs). A range that parses but holds no byte of it is 416.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from relay.errors import RangeNotSatisfiable

_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)


def not_modified(headers: Mapping[str, str], etag: str) -> bool:
    """Whether `If-None-Match` names `etag` (or is `*`): answer 304. Weak comparison, as
    RFC 9110 asks for this header."""
    header = headers.get("if-none-match")
    if header is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags


def requested_range(headers: Mapping[str, str], size: int, etag: str) -> tuple[int, int] | None:
    """The bytes [start, end) the request asks for out of `size`; None for all of them. Raises
    RangeNotSatisfiable."""
    header = headers.get("range")
    if header is None:
        return None
    if_range = headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        return None  # the client's part is of another representation (or a date): all of it
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None  # "bytes=-": no range at all
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"no byte of the {size} is in the range {header}", size)
        return max(size - suffix, 0), size
    start = int(first)
    if last and int(last) < start:
        return None  # last before first: invalid, so ignored
    if start >= size:
        raise RangeNotSatisfiable(f"no byte of the {size} is in the range {header}", size)
    return start, size if not last else min(int(last) + 1, size)
