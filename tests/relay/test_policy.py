"""Policies: Cedar decisions as a user's policy files make them, caps, and hot reload.

Pure unit tests: every test writes its own policy directory; no Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.policy import ACTIONS, ModuleResource, Policies, PolicyError, PrincipalCaps
from tests.conftest import ROOT, wait_for

CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
BOBS = ModuleResource(CID, "calculator", "bob")
UNNAMED = ModuleResource(CID, "", "bob")
PERMIT_ALL = "permit(principal, action, resource);\n"
OWNER_EXECUTES = (
    'permit(principal, action == Action::"execute", resource) when { resource.owner == principal };'
)
ODD_NAMES = [
    'alice" || true',
    'alice\\" || principal == User::"root',
    "back\\slash",
    "colon::name",
    "new\nline",
    "nul\x00byte",
    "ünïcødé 😀",
    "",
]


def replace(path: Path, text: str) -> None:
    """Write as deploy tools do: a complete file renamed into place, never half a file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path


def policies_with(directory: Path, *cedar: str, principals: str | None = None) -> Policies:
    for number, text in enumerate(cedar):
        replace(directory / f"{number:02d}.cedar", text)
    if principals is not None:
        replace(directory / "principals.toml", principals)
    return Policies(directory)


# --- decisions ---


@pytest.mark.parametrize("principal", ["alice", "bob", *ODD_NAMES])
def test_shipped_default_lets_any_principal_execute_upload_subscribe_but_not_admin(
    principal: str,
) -> None:
    policies = Policies(ROOT / "relay" / "policies")
    assert policies.error is None
    for resource in (BOBS, UNNAMED, None):
        for action in ("execute", "upload", "subscribe"):
            assert policies.authorize(principal, action, resource), (action, resource)
        assert not policies.authorize(principal, "admin", resource)
    assert policies.caps(principal) == PrincipalCaps()


def test_shipped_principals_example_is_all_comments() -> None:
    assert (ROOT / "relay" / "policies" / "principals.toml").is_file()
    assert Policies(ROOT / "relay" / "policies").caps("alice") == PrincipalCaps()


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"principals.toml": "[principals.alice]\nrate_limit = 5\n"},
        {"empty.cedar": ""},
        {"comments.cedar": "// nothing granted yet\n"},
        {"only-forbid.cedar": 'forbid(principal == User::"mallory", action, resource);'},
    ],
    ids=["no files", "only principals.toml", "empty", "only comments", "only a forbid"],
)
def test_without_a_permit_everything_is_denied(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        replace(directory / name, text)
    policies = Policies(directory)
    for action in ACTIONS:
        for resource in (BOBS, None):
            assert not policies.authorize("alice", action, resource)


def test_forbid_beats_permit(directory: Path) -> None:
    policies = policies_with(
        directory,
        PERMIT_ALL,
        'forbid(principal == User::"mallory", action == Action::"execute", resource);',
    )
    assert not policies.authorize("mallory", "execute", BOBS)
    assert policies.authorize("mallory", "upload", BOBS)
    assert policies.authorize("alice", "execute", BOBS)


def test_policies_from_every_file_apply_together(directory: Path) -> None:
    replace(
        directory / "a-users.cedar", 'permit(principal, action == Action::"execute", resource);'
    )
    replace(directory / "b-admins.cedar", 'permit(principal == User::"root", action, resource);')
    replace(directory / "c-bans.cedar", 'forbid(principal == User::"mallory", action, resource);')
    policies = Policies(directory)
    assert policies.authorize("alice", "execute", BOBS)
    assert not policies.authorize("alice", "upload", BOBS)
    assert policies.authorize("root", "admin", None)
    assert not policies.authorize("mallory", "execute", BOBS)


def test_owner_policy_lets_only_the_owner_execute(directory: Path) -> None:
    policies = policies_with(
        directory,
        OWNER_EXECUTES,
    )
    assert policies.authorize("bob", "execute", BOBS)
    assert not policies.authorize("alice", "execute", BOBS)
    assert not policies.authorize("bob", "upload", BOBS)
    # The gateway has no owner: the policy cannot apply (its error is not a permit).
    assert not policies.authorize("bob", "execute", None)


def test_name_policy_matches_the_name_the_request_used(directory: Path) -> None:
    policies = policies_with(
        directory,
        'permit(principal, action == Action::"execute", resource) '
        'when { resource.name == "calculator" };',
    )
    assert policies.authorize("alice", "execute", BOBS)
    # The same module by CID (no name) or under another name is not covered.
    assert not policies.authorize("alice", "execute", UNNAMED)
    assert not policies.authorize("alice", "execute", ModuleResource(CID, "calc", "bob"))


def test_actions_not_about_a_module_are_about_the_gateway(directory: Path) -> None:
    policies = policies_with(
        directory,
        'permit(principal, action == Action::"admin", resource == Relay::"gateway") '
        'when { principal == User::"root" };',
    )
    assert policies.authorize("root", "admin", None)
    assert not policies.authorize("alice", "admin", None)
    assert not policies.authorize("root", "admin", BOBS)
    assert not policies.authorize("root", "execute", None)


def test_an_unknown_action_is_a_programming_error(directory: Path) -> None:
    policies = policies_with(directory, PERMIT_ALL)
    with pytest.raises(ValueError, match="exec"):
        policies.authorize("alice", "exec", BOBS)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_principal_names_cannot_escape_their_uid(directory: Path, name: str) -> None:
    policies = policies_with(
        directory,
        'permit(principal == User::"alice", action, resource);',
        OWNER_EXECUTES,
        'permit(principal, action == Action::"upload", resource) '
        'when { resource.name == "calculator" };',
    )
    assert not policies.authorize(name, "subscribe", None)
    assert not policies.authorize(name, "admin", BOBS)
    # Odd characters in the owner and the name are data too, matched exactly.
    assert policies.authorize(name, "execute", ModuleResource(CID, "", name))
    assert not policies.authorize(name, "execute", ModuleResource(CID, "", name + "x"))
    assert not policies.authorize(name, "upload", ModuleResource(CID, name, "bob"))


def test_a_policy_can_name_a_principal_with_quotes_backslashes_and_unicode(
    directory: Path,
) -> None:
    policies = policies_with(
        directory, r'permit(principal == User::"a\"b\\c ü", action == Action::"execute", resource);'
    )
    assert policies.authorize('a"b\\c ü', "execute", BOBS)
    assert not policies.authorize('a"b\\c u', "execute", BOBS)
    assert not policies.authorize("a", "execute", BOBS)


def test_a_name_that_is_not_valid_unicode_is_denied_not_an_exception(directory: Path) -> None:
    policies = policies_with(directory, PERMIT_ALL)
    assert not policies.authorize("lone\ud800surrogate", "execute", BOBS)
    assert not policies.authorize("alice", "execute", ModuleResource(CID, "\udfff", "bob"))


# --- an evaluation error never grants ---


def test_a_permit_that_fails_to_evaluate_grants_nothing(directory: Path) -> None:
    # `principal.level` does not exist: the condition errors rather than being true or false.
    policies = policies_with(
        directory, "permit(principal, action, resource) when { principal.level > 3 };"
    )
    assert not policies.authorize("alice", "execute", BOBS)


@pytest.mark.parametrize(
    "forbid",
    [
        "forbid(principal, action, resource) when { principal.suspended };",
        "forbid(principal, action, resource) unless { principal.verified };",
        'forbid(principal, action, resource) when { resource.owner == User::"mallory" };',
        "forbid(principal, action, resource) when { 9223372036854775807 + resource.name == 1 };",
    ],
    ids=["missing attribute", "unless", "gateway has no owner", "type error"],
)
def test_a_forbid_that_fails_to_evaluate_still_denies(directory: Path, forbid: str) -> None:
    policies = policies_with(directory, PERMIT_ALL, forbid)
    # Cedar alone would skip the failed forbid and let the permit through.
    assert not policies.authorize("alice", "execute", None)
    assert not policies.authorize("alice", "subscribe", None)


def test_a_failed_forbid_only_denies_where_it_applies(directory: Path) -> None:
    policies = policies_with(
        directory,
        PERMIT_ALL,
        'forbid(principal, action == Action::"upload", resource) '
        "when { resource.owner == principal };",
    )
    # On the gateway the forbid errors (no owner) but its scope excludes execute.
    assert policies.authorize("bob", "execute", None)
    assert not policies.authorize("bob", "upload", None)
    # On a module it evaluates normally.
    assert not policies.authorize("bob", "upload", BOBS)
    assert policies.authorize("alice", "upload", BOBS)


def test_a_failed_permit_does_not_cancel_another_permit(directory: Path) -> None:
    policies = policies_with(
        directory,
        PERMIT_ALL,
        "permit(principal, action, resource) when { resource.owner == principal };",
    )
    assert policies.authorize("alice", "subscribe", None)


# --- caps ---


def test_caps_come_from_principals_toml(directory: Path) -> None:
    policies = policies_with(
        directory,
        PERMIT_ALL,
        principals="""
[principals.alice]
rate_limit = 100
rate_window = 60_000
max_gas = 10_000_000_000
max_memory = 268435456
max_time = 30000
max_active = 4

[principals."ci@example.com"]
rate_limit = 1000

[principals.'quote " and \\ and ü']
max_time = 1000
""",
    )
    assert policies.caps("alice") == PrincipalCaps(
        rate_limit=100,
        rate_window=60_000,
        max_gas=10_000_000_000,
        max_memory=268_435_456,
        max_time=30_000,
        max_active=4,
    )
    assert policies.caps("ci@example.com") == PrincipalCaps(rate_limit=1000)
    assert policies.caps('quote " and \\ and ü') == PrincipalCaps(max_time=1000)
    assert policies.caps("bob") == PrincipalCaps()


def test_without_principals_toml_every_principal_has_default_caps(directory: Path) -> None:
    assert policies_with(directory, PERMIT_ALL).caps("alice") == PrincipalCaps()


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("[principals.alice]\nrate_limt = 5", "rate_limt"),
        ("[principals.alice]\nmax_gas = 0", "max_gas"),
        ("[principals.alice]\nmax_memory = -1", "max_memory"),
        ("[principals.alice]\nmax_time = 1.5", "max_time"),
        ("[principals.alice]\nmax_time = 1000.0", "max_time"),
        ('[principals.alice]\nrate_limit = "100"', "rate_limit"),
        ("[principals.alice]\nrate_limit = true", "rate_limit"),
        ("[principals.alice]\nrate_window = 1500", "multiple of 1000"),
        ("[principals.alice]\nrate_window = 0", "rate_window"),
        ('[principals."bob smith"]\nmax_gas = 0', '"bob smith"'),
        ("[principal.alice]\nrate_limit = 5", "unknown key 'principal'"),
        ("principals = 5", "`principals` must"),
        ("[principals]\nalice = 5", "alice"),
        ("[principals.alice\nrate_limit = 5", "line 1"),
    ],
)
def test_a_bad_principals_toml_fails_the_first_load(
    directory: Path, table: str, expected: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        policies_with(directory, PERMIT_ALL, principals=table)
    message = str(caught.value)
    assert str(directory / "principals.toml") in message
    assert expected in message


# --- loading and reloading ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("permit(principal, action, resource)", "line 1"),
        (
            PERMIT_ALL + "\n// the ban\nforbid(principal, action resource);\n" + PERMIT_ALL,
            "line 4",
        ),
        ("permit(principal == ?principal, action, resource);", "templates"),
        ("permit(principal, action, resource) when { resource.name like 1 };", "like"),
    ],
)
def test_a_cedar_file_that_does_not_parse_fails_the_first_load(
    directory: Path, text: str, expected: str
) -> None:
    replace(directory / "good.cedar", PERMIT_ALL)
    replace(directory / "bad.cedar", text)
    with pytest.raises(PolicyError) as caught:
        Policies(directory)
    assert str(directory / "bad.cedar") in str(caught.value)
    assert expected in str(caught.value)


def test_a_missing_directory_fails_the_first_load(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="missing"):
        Policies(tmp_path / "missing")


def test_a_file_that_is_not_utf8_fails_the_first_load(directory: Path) -> None:
    (directory / "latin1.cedar").write_bytes(b"// caf\xe9\n" + PERMIT_ALL.encode())
    with pytest.raises(PolicyError, match=r"latin1\.cedar"):
        Policies(directory)


def test_hidden_and_other_files_are_not_policies(directory: Path) -> None:
    replace(directory / "README.md", "permit(")
    replace(directory / "default.cedar.bak", "permit(")
    (directory / ".#default.cedar").symlink_to("nowhere")  # an editor's lock link
    policies = policies_with(directory, PERMIT_ALL)
    assert policies.error is None
    assert policies.authorize("alice", "execute", BOBS)


def test_nothing_changed_means_nothing_reloaded(directory: Path) -> None:
    policies = policies_with(directory, PERMIT_ALL, principals="[principals.a]\nmax_gas = 1\n")
    assert policies.reload_if_changed() is False
    assert policies.reload_if_changed() is False
    assert policies.error is None


def test_an_added_forbid_takes_effect_on_reload(directory: Path) -> None:
    policies = policies_with(directory, PERMIT_ALL)
    assert policies.authorize("mallory", "execute", BOBS)
    ban = directory / "ban.cedar"
    replace(ban, 'forbid(principal == User::"mallory", action, resource);')
    assert policies.reload_if_changed() is True
    assert not policies.authorize("mallory", "execute", BOBS)
    assert policies.authorize("alice", "execute", BOBS)
    ban.unlink()
    assert policies.reload_if_changed() is True
    assert policies.authorize("mallory", "execute", BOBS)


def test_changed_caps_take_effect_on_reload(directory: Path) -> None:
    policies = policies_with(directory, PERMIT_ALL, principals="[principals.alice]\nmax_gas = 5\n")
    replace(directory / "principals.toml", "[principals.alice]\nmax_gas = 7\nmax_time = 2000\n")
    assert policies.reload_if_changed() is True
    assert policies.caps("alice") == PrincipalCaps(max_gas=7, max_time=2000)
    (directory / "principals.toml").unlink()
    assert policies.reload_if_changed() is True
    assert policies.caps("alice") == PrincipalCaps()


def test_a_broken_cedar_file_keeps_the_last_good_set_until_fixed(directory: Path) -> None:
    policies = policies_with(
        directory, PERMIT_ALL, principals="[principals.alice]\nrate_limit = 5\n"
    )
    ban = directory / "ban.cedar"
    replace(ban, 'forbid(principal == User::"alice", action, resource)')  # no `;`
    replace(directory / "principals.toml", "[principals.alice]\nrate_limit = 6\n")

    assert policies.reload_if_changed() is False
    assert policies.error is not None
    assert str(ban) in policies.error
    # Nothing of the new set applies, the good files included: one set, all or nothing.
    assert policies.authorize("alice", "execute", BOBS)
    assert policies.caps("alice") == PrincipalCaps(rate_limit=5)
    # The broken files are not read again until they change; the error stays reported.
    assert policies.reload_if_changed() is False
    assert policies.error is not None

    replace(ban, 'forbid(principal == User::"alice", action, resource);')
    assert policies.reload_if_changed() is True
    assert policies.error is None
    assert not policies.authorize("alice", "execute", BOBS)
    assert policies.caps("alice") == PrincipalCaps(rate_limit=6)


def test_a_broken_principals_toml_keeps_the_last_good_set_until_fixed(directory: Path) -> None:
    caps = directory / "principals.toml"
    policies = policies_with(directory, PERMIT_ALL, principals="[principals.alice]\nmax_gas = 5\n")
    replace(caps, "[principals.alice]\nmax_gaz = 9\n")
    assert policies.reload_if_changed() is False
    assert policies.error is not None
    assert str(caps) in policies.error
    assert "max_gaz" in policies.error
    assert policies.caps("alice") == PrincipalCaps(max_gas=5)

    replace(caps, "[principals.alice]\nmax_gas = 9\n")
    assert policies.reload_if_changed() is True
    assert policies.error is None
    assert policies.caps("alice") == PrincipalCaps(max_gas=9)


def test_a_vanished_directory_keeps_the_last_good_set_until_back(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    policies = policies_with(directory, PERMIT_ALL)
    moved = directory.rename(tmp_path / "elsewhere")
    assert policies.reload_if_changed() is False
    assert policies.error is not None
    assert str(directory) in policies.error
    assert policies.authorize("alice", "execute", BOBS)

    moved.rename(directory)
    assert policies.reload_if_changed() is True
    assert policies.error is None


# --- watch ---


@contextlib.contextmanager
def watching(policies: Policies, interval_s: float) -> Iterator[asyncio.Task[None]]:
    task = asyncio.create_task(policies.watch(interval_s=interval_s))
    try:
        yield task
    finally:
        task.cancel()


async def test_watch_applies_changes_and_reports_broken_files(directory: Path) -> None:
    policies = policies_with(directory, PERMIT_ALL)
    with watching(policies, interval_s=0.01) as task:
        replace(directory / "ban.cedar", 'forbid(principal == User::"mallory", action, resource);')
        await wait_for(lambda: not policies.authorize("mallory", "execute", BOBS), timeout_s=5)

        replace(directory / "ban.cedar", "forbid(")
        await wait_for(lambda: policies.error is not None, timeout_s=5)
        assert not policies.authorize("mallory", "execute", BOBS)

        (directory / "ban.cedar").unlink()
        await wait_for(lambda: policies.error is None, timeout_s=5)
        assert policies.authorize("mallory", "execute", BOBS)
        assert not task.done()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
