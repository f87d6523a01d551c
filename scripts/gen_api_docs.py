"""Render the generated part of docs/api.md from the OpenAPI document the gateway serves.

    python scripts/gen_api_docs.py          # rewrite the region between the markers
    python scripts/gen_api_docs.py --check  # exit 1 when the checked-in region is out of date

The endpoint table and every field table come from `relay.openapi.document()`, which is built
from the code's own wire types: when a type changes, run this and commit docs/api.md with it
(tests/system/test_docs.py fails until then).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "api.md"
START = "<!-- generated:start (scripts/gen_api_docs.py; do not edit by hand) -->"
END = "<!-- generated:end -->"
METHODS = ("get", "post", "put", "patch", "delete")


def _name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A schema as a short Markdown phrase (no `|`: it sits in a table cell)."""
    if "$ref" in schema:
        name = _name(schema["$ref"])
        return f"[`{name}`](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type(schema['items'])}" if "items" in schema else "array"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {_type(schema['additionalProperties'])}"
    return str(kind) if kind else "any JSON value"


def _notes(schema: dict[str, Any]) -> str:
    """Constraints and default of a property, wherever in its `anyOf` they are."""
    parts = []
    for part in [schema, *schema.get("anyOf", [])]:
        if "minLength" in part or "maxLength" in part:
            parts.append(f"{part.get('minLength', 0)} to {part['maxLength']} characters"
                         if "maxLength" in part else f"at least {part['minLength']} characters")
        if "exclusiveMinimum" in part:
            parts.append(f"> {part['exclusiveMinimum']}")
        if "minimum" in part:
            parts.append(f"≥ {part['minimum']}")
        if "pattern" in part:
            parts.append(f"matches `{part['pattern']}`")
    if "default" in schema:
        parts.append(f"default `{json.dumps(schema['default'])}`")
    return "; ".join(parts)


def _table(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"#### `{name}`", ""]
    if schema.get("description"):
        lines += [schema["description"], ""]
    required = set(schema.get("required", ()))
    lines += ["| field | type | required | notes |", "|---|---|---|---|"]
    for field, prop in schema.get("properties", {}).items():
        notes = _notes(prop).replace("|", r"\|")  # GFM: a pipe in a cell, even in code
        lines.append(f"| `{field}` | {_type(prop)} | {'yes' if field in required else 'no'} "
                     f"| {notes} |")
    return [*lines, ""]


def _credentials(operation: dict[str, Any]) -> str:
    security = operation.get("security")
    if security == []:
        return "none"
    names = {name for requirement in security or () for name in requirement}
    return "key or JWT, or `access_token`" if "accessToken" in names else "key or JWT"


def _endpoints(document: dict[str, Any]) -> list[str]:
    lines = ["| endpoint | what | credentials | success | refusals |", "|---|---|---|---|---|"]
    for path, item in document["paths"].items():
        for method in (m for m in METHODS if m in item):
            operation = item[method]
            statuses = sorted(operation["responses"], key=int)
            ok = ", ".join(s for s in statuses if int(s) < 400)
            refused = ", ".join(s for s in statuses if int(s) >= 400)
            lines.append(f"| `{method.upper()} {path}` | {operation['summary']} "
                         f"| {_credentials(operation)} | {ok} | {refused} |")
    return [*lines, ""]


def _is_message(schema: dict[str, Any]) -> bool:
    """Events, bus entries and stream notices: objects tagged by a one-value `type`."""
    tag = schema.get("properties", {}).get("type", {})
    return len(tag.get("enum", ())) == 1


def render(document: dict[str, Any]) -> str:
    schemas = document["components"]["schemas"]
    bodies, replies, messages = [], [], []
    for name, schema in schemas.items():
        if "properties" not in schema:
            continue  # a union (Event): its members are listed on their own
        if _is_message(schema):
            messages.append(name)
        elif schema.get("additionalProperties") is False:
            bodies.append(name)
        else:
            replies.append(name)
    lines = ["### Endpoints", "", *_endpoints(document)]
    for title, names in (("Request bodies", bodies), ("Responses and their parts", replies),
                         ("Messages: events, bus entries, stream notices", messages)):
        lines += [f"### {title}", ""]
        for name in names:
            lines += _table(name, schemas[name])
    return "\n".join(lines).rstrip("\n") + "\n"


def splice(text: str, generated: str) -> str:
    """`text` with the region between START and END replaced by `generated`."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{API_MD}: the markers {START!r} and {END!r} are missing")
    return f"{head}{START}\n\n{generated}\n{END}{tail}"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    from relay.openapi import document

    current = API_MD.read_text()
    wanted = splice(current, render(document()))
    if "--check" in argv:
        if current != wanted:
            print(f"{API_MD} is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        API_MD.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
