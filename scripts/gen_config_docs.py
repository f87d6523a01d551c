"""Render the configuration documentation from the settings' one declaration (relay.settings).

    python scripts/gen_config_docs.py          # rewrite README.md's table and docs/configuration.md
    python scripts/gen_config_docs.py --check  # exit 1 when either is out of date

README.md's Configuration section carries the table of every setting between the markers below;
docs/configuration.md is generated whole: a section per group, its note and its settings. When a
setting changes, run this and commit the documents with it (tests/relay/test_settings.py fails until
then).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.settings import (  # noqa: E402 - the repository's relay, wherever this is run from
    AUTH,
    EVENTS,
    EXECUTOR,
    GROUPS,
    LIMITS,
    LOGS,
    REDIS,
    SETTINGS,
    Setting,
)

README = ROOT / "README.md"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
START = "<!-- generated:start (scripts/gen_config_docs.py; do not edit by hand) -->"
END = "<!-- generated:end -->"

# Each group's title and what a user needs to know about its settings together.
GROUP_NOTES: dict[str, tuple[str, str]] = {
    REDIS: ("Redis", "Every gateway and executor of one deployment uses the same Redis and the "
            "same `RELAY_STREAM_PREFIX`. Without `REDIS_URL`, each `relay` command starts an "
            "embedded Redis of its own under `RELAY_DATA_DIR`: right for `relay dev` on one "
            "machine, not for several processes. It keeps an append-only file, synced every "
            "second, and rewrites it once the file has grown to five times its size after the "
            "last rewrite (Redis's default is twice): more disk, for a fraction of the CPU that "
            "rewrites cost under load (see "
            "[operations](operations.md#redis-commands-per-execute))."),
    LIMITS: ("Limits", "An execute request may ask for gas, memory and time up to the ceilings "
             "(`RELAY_MAX_*`) and gets the defaults (`RELAY_DEFAULT_MAX_*`) for what it does not "
             "ask; a default above its ceiling stops the start. `principals.toml` in the policy "
             "directory can give a principal caps and a rate limit of its own."),
    AUTH: ("Authentication and authorization", "A caller presents an API key (from "
           "`RELAY_API_KEYS`, or stored in Redis by `relay keys create`) or a bearer token: "
           "HS256 signed with `RELAY_JWT_SECRET`, RS256/ES256 verified by "
           "`RELAY_JWT_PUBLIC_KEY`, or an access token of `POST /auth/tokens`. What it may then "
           "do is decided by the Cedar policies in `RELAY_POLICY_DIR`, re-read when the files "
           "change."),
    EXECUTOR: ("Executors", "Read by `relay executor` (and by gateways for the executor count "
               "in health). An executor renews a lease on every entry it holds; a peer takes "
               "over an entry whose lease has not been renewed for `RELAY_LEASE`, and an entry "
               "delivered `RELAY_MAX_DELIVERIES` times is dead-lettered instead of run again. "
               "Executors take high-priority work before normal before low, except that work "
               "waiting longer than `RELAY_PRIORITY_STARVATION_MS` goes before all accepted "
               "after it."),
    EVENTS: ("Events and execution records", "Requests and events are Redis streams, trimmed "
             "to about their retention. An execution's record and result outlive its end by "
             "`RELAY_IDEMPOTENCY_TTL`: within it, the same idempotency key answers the same "
             "execution, and `GET /executions/{id}` finds it."),
    LOGS: ("HTTP and logs", "Logs go to stderr, one JSON object a line (plain text under "
           "`relay dev`); a record logged while a request is served carries its request id."),
}
if set(GROUP_NOTES) != set(GROUPS):  # a group added to relay.settings needs its note here
    raise SystemExit(f"groups without a note: {set(GROUPS) ^ set(GROUP_NOTES)}")


def shown_default(setting: Setting) -> str:
    """The default as the documentation shows it: as the variable's own text (in backticks)
    when it has one, so a reader can copy it; else the declared description."""
    if setting.variable.shown_default is not None:
        return setting.variable.shown_default
    default = setting.default
    text = ("true" if default else "false") if isinstance(default, bool) else str(default)
    return f"`{text}`"


def markdown_table(group: str | None = None) -> str:
    """The configuration table (every setting, or one group's) in Markdown."""
    rows = ["| variable | default | unit | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        if group is None or setting.variable.group == group:
            variable = setting.variable
            rows.append(f"| `{variable.name}` | {shown_default(setting)} "
                        f"| {variable.unit or '—'} | {variable.doc} |")
    return "\n".join(rows) + "\n"


def configuration_md() -> str:
    """docs/configuration.md, whole."""
    parts = [
        "# Configuration",
        _paragraph(
            "Relay reads its configuration from environment variables, once, at start. A value "
            "it cannot use stops the start with the variable's name; an empty variable counts "
            "as unset. Gateways and executors read the same variables, each those that concern "
            "it, so one set can serve both. Numbers are integers (`_` may group digits, as in "
            "`1_000_000`); durations are milliseconds, sizes bytes, gas is wasmtime fuel."),
        _paragraph(
            "This file is generated from `relay/settings.py` by `python "
            "scripts/gen_config_docs.py`; `tests/relay/test_settings.py` fails when the file "
            "and the code disagree."),
    ]
    for group in GROUPS:
        title, note = GROUP_NOTES[group]
        parts += [f"## {title}", _paragraph(note), markdown_table(group)]
    return "\n\n".join(part.rstrip("\n") for part in parts) + "\n"


def readme_with_table(text: str) -> str:
    """README.md's `text` with the region between START and END replaced by the table."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{README}: the markers {START!r} and {END!r} are missing")
    return f"{head}{START}\n\n{markdown_table()}\n{END}{tail}"


def _paragraph(text: str) -> str:
    # Breaking only at spaces keeps `code` and paths whole in the source.
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def main(argv: list[str]) -> int:
    wanted = {README: readme_with_table(README.read_text()), CONFIGURATION_MD: configuration_md()}
    stale = [path for path, text in wanted.items()
             if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path} is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
