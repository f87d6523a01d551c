"""The documentation stays true to the code and inside the repository.

- docs/api.md's generated region is what scripts/gen_api_docs.py renders from the OpenAPI
  document today (run the script after changing a wire type);
- no link in docs/ or the README leaves the repository, and every relative link reaches an
  existing file (and heading, when it names one).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from relay.openapi import document
from tests.conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).*?\1", re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs",
                                                  ROOT / "scripts" / "gen_api_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """Markdown without code blocks and code spans, where nothing is a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def _anchors(path: Path) -> set[str]:
    """The ids a code host gives the file's headings: lowercased, punctuation but `-` and `_`
    dropped, spaces as `-`, repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _problem(path: Path, link: str) -> str | None:
    """What is wrong with a link in `path`, or None."""
    if _EXTERNAL.match(link):
        return None
    target_text, _, anchor = link.partition("#")
    target = (path.parent / target_text).resolve() if target_text else path
    if not target.is_relative_to(ROOT):
        return f"{path.name}: {link} leaves the repository"
    if not target.exists():
        return f"{path.name}: {link} names no file"
    if anchor and target.suffix == ".md" and anchor not in _anchors(target):
        return f"{path.name}: {link} names no heading of {target.name}"
    return None


def _broken_links(path: Path) -> list[str]:
    text = path.read_text()
    problems = []
    if "../shared" in text or "shared/API.md" in text:
        problems.append(f"{path.name} refers to ../shared, outside the repository")
    return problems + [problem for link in _links(text)
                       if (problem := _problem(path, link)) is not None]


def test_the_generated_reference_matches_the_code() -> None:
    generator = _generator()
    checked_in = (ROOT / "docs" / "api.md").read_text()
    rendered = generator.splice(checked_in, generator.render(document()))
    assert checked_in == rendered, "docs/api.md is out of date: run python scripts/gen_api_docs.py"


def test_the_generated_reference_covers_every_endpoint_and_body() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    for path, item in document()["paths"].items():
        for method in item:
            assert f"`{method.upper()} {path}`" in text
    for name in ("ExecuteRequest", "ExecuteResponse", "ExecutionState", "ModuleInfo",
                 "ExecutionQueued", "ExecutionComplete", "ExecutionError", "WasmExecCompleted",
                 "EventsLost", "Problem", "Health"):
        assert f"#### `{name}`" in text


def test_the_api_reference_has_no_ambiguous_headings() -> None:
    # The generated tables link to `#<type name>`: a hand-written heading with the same id
    # would take those links.
    text = _FENCE.sub("", (ROOT / "docs" / "api.md").read_text())
    slugs = [re.sub(r"[^\w\- ]", "", h.replace("`", "").strip().lower()).replace(" ", "-")
             for h in _HEADING.findall(text)]
    assert len(slugs) == len(set(slugs)), sorted(s for s in slugs if slugs.count(s) > 1)


@pytest.mark.parametrize("path", DOCS, ids=[path.name for path in DOCS])
def test_docs_link_only_inside_the_repository(path: Path) -> None:
    assert _broken_links(path) == []


def test_the_readme_links_only_inside_the_repository() -> None:
    assert _broken_links(README) == []


def test_the_link_checker_catches_what_it_must() -> None:
    links = _links("[a](api.md#conventions) `[b](nowhere.md)` [e](https://example.com)\n"
                   "```\n[d](missing.md)\n```\n[c]: ../../etc/passwd\n")
    assert links == ["api.md#conventions", "https://example.com", "../../etc/passwd"]
    here = ROOT / "docs" / "README.md"
    assert _problem(here, "api.md#conventions") is None
    assert _problem(here, "#relay-documentation") is None
    assert _problem(here, "https://example.com/../shared") is None
    assert "leaves the repository" in str(_problem(here, "../../shared/API.md"))
    assert "names no file" in str(_problem(here, "nowhere.md"))
    assert "names no heading" in str(_problem(here, "api.md#nowhere"))
