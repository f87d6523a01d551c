"""Principal names: one rule wherever a principal is named (`RELAY_API_KEYS`, `relay keys
create`, a JWT's `sub`).

A name is text a human can read and copy: no whitespace or control characters, which hide in
logs, and neither `:` nor `,`, which separate principals from keys and pairs from each other in
`RELAY_API_KEYS` (so every principal could be configured there too).
"""

from __future__ import annotations

import re

MAX_LENGTH = 128
RULE = (f"1 to {MAX_LENGTH} characters, none of them whitespace, a control character, "
        "`:` or `,`")
_NAME = re.compile(rf"[^\s:,\x00-\x1f\x7f-\x9f]{{1,{MAX_LENGTH}}}")


def is_principal(name: str) -> bool:
    """Whether `name` may name a principal (see RULE)."""
    return _NAME.fullmatch(name) is not None
