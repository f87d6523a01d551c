"""Writes src/relay_client/_sync_client.py, the blocking client, from _async_client.py by
plain textual substitution (the technique of httpcore's unasync), so the two clients cannot
drift apart. Run it after editing _async_client.py; `--check` exits 1 when the file is stale
(tests/clients/test_python_sdk.py runs that)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "relay_client"
SOURCE = PACKAGE / "_async_client.py"
TARGET = PACKAGE / "_sync_client.py"

# In order: each pattern is replaced everywhere before the next one runs.
SUBSTITUTIONS = [
    (r'\A""".*?"""\n', ""),
    (r"^import asyncio\n", ""),
    (r"AsyncIterator, Callable, Sequence", "Callable, Iterator, Sequence"),
    (r"await asyncio\.sleep\(", "time.sleep("),
    (r"\basync def\b", "def"),
    (r"\basync for\b", "for"),
    (r"\basync with\b", "with"),
    (r"\bawait ", ""),
    (r"\bAsync([A-Z]\w*)", r"\1"),
    (r"\b_Async([A-Z]\w*)", r"_\1"),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"\baclose\b", "close"),
    (r"\baiter_lines\b", "iter_lines"),
    (r"\baread\b", "read"),
    (r"contextlib\.aclosing", "contextlib.closing"),
    (r"for asyncio\b", "that blocks"),
    (r"`async with (\w+)\(\) as", r"`with \1() as"),
]

HEADER = '''"""The blocking client, `Relay`: generated from _async_client.py by scripts/unasync.py.
Do not edit; edit that file and run the script."""
'''


def generate() -> str:
    text = SOURCE.read_text()
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE | re.DOTALL)
    return HEADER + text


def main() -> int:
    text = generate()
    if sys.argv[1:] == ["--check"]:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
