"""Settings: read from the environment by their one declaration, and documented from it.

A user configures Relay through environment variables and learns them from the README's table
and docs/configuration.md; these tests hold the three (code, README, docs) to one another, and
check what a wrong value does at start.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.cli import main as relay_main
from relay.settings import (
    DEFAULT_POLICY_DIR,
    LIMITS,
    SETTINGS,
    VARIABLES,
    Settings,
    SettingsError,
    Variable,
    _int,
    _whole_seconds_ms,
    declared,
    load,
)
from tests.conftest import ROOT

GENERATOR = ROOT / "scripts" / "gen_config_docs.py"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    """scripts/gen_config_docs.py, which writes both documents from the declaration."""
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_table() -> list[str]:
    """The table lines of the README's Configuration section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Configuration\n"):]
    section = section[: section.index("\n## ", 1)]
    return [line for line in section.splitlines() if line.startswith("|")]


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    """{variable: [default, unit, meaning]} of a Markdown configuration table."""
    assert lines[0] == "| variable | default | unit | meaning |", lines[0]
    rows = {}
    for line in lines[2:]:
        variable, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 3, line
        rows[variable.strip("`")] = cells
    return rows


# --- the documents agree with the declaration ---


def test_the_readme_table_lists_every_variable_with_its_default() -> None:
    rows = table_rows(readme_table())
    assert set(rows) == set(VARIABLES), (
        "README's configuration table: missing "
        f"{sorted(set(VARIABLES) - set(rows))}, unknown {sorted(set(rows) - set(VARIABLES))}")
    for name, (default, unit, meaning) in rows.items():
        setting = VARIABLES[name]
        assert meaning and unit == (setting.variable.unit or "—"), name
        value = re.fullmatch(r"`([^`]*)`", default)
        if value:
            # Shown as a value the variable can be set to: set to it, it gives the default.
            assert setting.variable.parse(name, value.group(1)) == setting.default, name
        else:
            assert default == setting.variable.shown_default, name


def test_the_readme_table_is_the_generated_one(generator: ModuleType) -> None:
    """Byte for byte what the generator writes, so a changed default or meaning cannot be
    forgotten in the README."""
    readme = (ROOT / "README.md").read_text()
    assert readme == generator.readme_with_table(readme), (
        "README.md's configuration table is stale: run python scripts/gen_config_docs.py")
    assert "\n".join(readme_table()) + "\n" == generator.markdown_table()


def test_docs_configuration_is_the_generated_one_and_lists_every_variable(
        generator: ModuleType) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert text == generator.configuration_md(), (
        "docs/configuration.md is stale: run python scripts/gen_config_docs.py")
    listed = re.findall(r"^\| `([A-Z0-9_]+)` \|", text, re.MULTILINE)
    assert sorted(listed) == sorted(VARIABLES), "each variable once, in its group's table"
    assert "](http" not in text, "the docs link only inside the repository"


def test_the_generator_s_check_passes_on_the_repository() -> None:
    """What a contributor runs after changing a setting; it exits 1 on stale documents."""
    checked = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=ROOT,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


# --- the declaration itself ---


def test_every_field_of_settings_is_declared_with_its_variable() -> None:
    assert [setting.field for setting in SETTINGS] == list(Settings.__struct_fields__)
    assert load({}) == Settings(), "an empty environment gives the declared defaults"
    for setting in SETTINGS:
        assert setting.variable.name.startswith(("RELAY_", "REDIS_")), setting.variable.name
        assert setting.variable.doc and "\n" not in setting.variable.doc, setting.field


def test_a_half_written_declaration_fails_at_import() -> None:
    class Unannotated(msgspec.Struct, frozen=True, kw_only=True):
        limit: int = 1

    class Twice(msgspec.Struct, frozen=True, kw_only=True):
        a: Annotated[int, Variable("RELAY_X", _int, LIMITS, "", "a")] = 1
        b: Annotated[int, Variable("RELAY_X", _int, LIMITS, "", "b")] = 2

    with pytest.raises(TypeError, match=r"Unannotated\.limit needs exactly one Variable"):
        declared(Unannotated)
    with pytest.raises(TypeError, match="declared twice"):
        declared(Twice)


@pytest.mark.parametrize("setting", [
    pytest.param(setting, id=setting.variable.name) for setting in SETTINGS
    if type(setting.default) is int])
def test_each_numeric_variable_sets_its_own_field(setting: Any) -> None:
    # Twice the default stays under every ceiling (and is whole seconds where it must be);
    # the queue may not outgrow the requests stream's retention, so it gets half.
    value = setting.default // 2 if setting.field == "max_queue" else setting.default * 2
    loaded = load({setting.variable.name: f"{value:_}"})  # `_` groups digits, as in Python
    assert getattr(loaded, setting.field) == value
    others = {s.field for s in SETTINGS} - {setting.field}
    assert all(getattr(loaded, field) == getattr(Settings(), field) for field in others)


# --- parsing: what a wrong value does at start ---


@pytest.mark.parametrize(("variable", "raw", "message"), [
    ("RELAY_MAX_GAS", "lots", "RELAY_MAX_GAS must be an integer, got 'lots'"),
    ("RELAY_SYNC_WAIT", "1.5", "RELAY_SYNC_WAIT must be an integer"),
    ("RELAY_LEASE", "0", "RELAY_LEASE must be at least 1, got 0"),
    ("RELAY_DRAIN_GRACE", "-1", "RELAY_DRAIN_GRACE must be at least 0, got -1"),
    ("RELAY_API_KEYS", "alice", "RELAY_API_KEYS must be comma-separated principal:key pairs"),
    ("RELAY_LOG_FORMAT", "xml", "RELAY_LOG_FORMAT must be one of json, text"),
    ("RELAY_LOG_LEVEL", "loud", "RELAY_LOG_LEVEL must be one of DEBUG, INFO"),
    ("RELAY_STREAM_PREFIX", "  ", "RELAY_STREAM_PREFIX must not be empty"),
    ("RELAY_PRELOAD", "glyph://calculator,calc ulator",
     "RELAY_PRELOAD: 'calc ulator' is neither a CID nor a glyph name"),
])
def test_a_bad_value_names_its_variable(variable: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load({variable: raw})
    assert message in str(refused.value)


def test_zero_is_allowed_where_it_means_off() -> None:
    loaded = load({"RELAY_RATE_LIMIT": "0", "RELAY_DRAIN_GRACE": "0",
                   "RELAY_EXECUTOR_PREFETCH": "0", "RELAY_STORED_KEY_CACHE": "0"})
    assert (loaded.rate_limit, loaded.drain_grace_ms) == (0, 0)
    assert (loaded.executor_prefetch, loaded.stored_key_cache_ms) == (0, 0)


def test_preload_names_cids_and_glyph_names() -> None:
    # A CID in any form is made canonical, a glyph name gets its tag.
    cid_v0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    loaded = load({"RELAY_PRELOAD": f" glyph://calculator@quantum, glyph://counter,{cid_v0},"})
    assert loaded.preload[:2] == ("glyph://calculator@quantum", "glyph://counter@latest")
    assert loaded.preload[2].startswith("bafkrei") and len(loaded.preload) == 3


def test_an_empty_variable_is_unset_and_overrides_win() -> None:
    assert load({"RELAY_MAX_TIME": "", "REDIS_URL": ""}) == Settings()
    assert load({"RELAY_LEASE": "9000"}, lease_ms=1234).lease_ms == 1234


@pytest.mark.parametrize(("default", "ceiling", "environ"), [
    ("RELAY_DEFAULT_MAX_GAS", "RELAY_MAX_GAS", {"RELAY_DEFAULT_MAX_GAS": "2000000000000"}),
    ("RELAY_DEFAULT_MAX_MEMORY", "RELAY_MAX_MEMORY", {"RELAY_MAX_MEMORY": "1048576"}),
    ("RELAY_DEFAULT_MAX_TIME", "RELAY_MAX_TIME",
     {"RELAY_DEFAULT_MAX_TIME": "9000", "RELAY_MAX_TIME": "8000"}),
])
def test_a_default_above_its_ceiling_stops_the_start(default: str, ceiling: str,
                                                      environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as refused:
        load(environ)
    assert f"{default} (" in str(refused.value) and f"above its ceiling {ceiling} (" in str(
        refused.value)


def test_a_default_equal_to_its_ceiling_is_fine() -> None:
    assert load({"RELAY_DEFAULT_MAX_TIME": "8000", "RELAY_MAX_TIME": "8000"}).max_time_ms == 8000


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("False", False), ("no", False), ("off", False),
])
def test_booleans(raw: str, expected: bool) -> None:
    assert load({"RELAY_ACCESS_LOG": raw}).access_log is expected


def test_a_boolean_that_is_neither_is_refused() -> None:
    with pytest.raises(SettingsError, match="RELAY_ACCESS_LOG must be true or false, got 'maybe'"):
        load({"RELAY_ACCESS_LOG": "maybe"})


@pytest.fixture(scope="module")
def public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_a_public_key_is_pem_text_or_the_path_of_a_file_holding_it(
        public_pem: str, tmp_path: Path) -> None:
    assert load({"RELAY_JWT_PUBLIC_KEY": public_pem}).jwt_public_key == public_pem.strip()
    path = tmp_path / "jwt.pem"
    path.write_text(public_pem)
    assert load({"RELAY_JWT_PUBLIC_KEY": str(path)}).jwt_public_key == public_pem.strip()


def test_a_public_key_that_is_missing_or_private_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="RELAY_JWT_PUBLIC_KEY must be PEM text or a readable"):
        load({"RELAY_JWT_PUBLIC_KEY": str(tmp_path / "absent.pem")})
    private = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    with pytest.raises(SettingsError, match="RELAY_JWT_PUBLIC_KEY must hold a PEM public key"):
        load({"RELAY_JWT_PUBLIC_KEY": private})


def test_the_rate_window_is_whole_seconds_in_milliseconds() -> None:
    assert _whole_seconds_ms("RELAY_RATE_WINDOW", "3000") == 3000
    assert load({"RELAY_RATE_WINDOW": "1_000"}).rate_window_ms == 1000
    with pytest.raises(SettingsError, match="RELAY_RATE_WINDOW is in milliseconds and must be "
                                            "whole seconds, got 1500"):
        load({"RELAY_RATE_WINDOW": "1500"})
    with pytest.raises(SettingsError, match="RELAY_RATE_WINDOW must be at least 1"):
        _whole_seconds_ms("RELAY_RATE_WINDOW", "0")


def test_api_keys_and_origins_are_comma_separated() -> None:
    loaded = load({"RELAY_API_KEYS": "alice:k1, bob:k:2,", "RELAY_CORS_ORIGINS":
                   "https://a.example, https://b.example"})
    assert loaded.api_keys == (("alice", "k1"), ("bob", "k:2"))
    assert loaded.cors_origins == ("https://a.example", "https://b.example")


def test_the_policy_dir_must_exist_and_defaults_to_the_packaged_policies(tmp_path: Path) -> None:
    assert Path(Settings().policy_dir) == DEFAULT_POLICY_DIR
    assert (DEFAULT_POLICY_DIR / "default.cedar").is_file()
    assert DEFAULT_POLICY_DIR.parent == Path(sys.modules["relay"].__file__ or "").parent
    assert load({"RELAY_POLICY_DIR": str(tmp_path)}).policy_dir == str(tmp_path)
    with pytest.raises(SettingsError, match="RELAY_POLICY_DIR must name a directory"):
        load({"RELAY_POLICY_DIR": str(tmp_path / "absent")})


def test_the_log_level_is_a_setting_in_any_case() -> None:
    level = load({"RELAY_LOG_LEVEL": "warning"}).log_level
    assert level == "WARNING" and isinstance(logging.getLevelName(level), int)
    assert Settings().log_level == "INFO"


def test_a_bad_variable_stops_the_relay_command_before_it_starts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RELAY_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as stopped:
        relay_main(["executor"])
    assert stopped.value.code == 2
    assert "relay: configuration error: RELAY_LOG_LEVEL must be one of" in capsys.readouterr().err


# --- combinations and values that would be unsafe (issue 13, item 11) ---


def test_a_queue_longer_than_the_requests_stream_keeps_stops_the_start() -> None:
    with pytest.raises(SettingsError) as refused:
        load({"RELAY_MAX_QUEUE": "200000"})
    assert "RELAY_MAX_QUEUE" in str(refused.value)
    assert "RELAY_REQUESTS_RETENTION" in str(refused.value)
    assert load({"RELAY_MAX_QUEUE": "50", "RELAY_REQUESTS_RETENTION": "50"}).max_queue == 50


def test_an_hs256_secret_under_32_bytes_stops_the_start() -> None:
    with pytest.raises(SettingsError) as refused:
        load({"RELAY_JWT_SECRET": "x" * 31})
    assert "RELAY_JWT_SECRET" in str(refused.value) and "32" in str(refused.value)
    assert load({"RELAY_JWT_SECRET": "é" * 16}).jwt_secret == "é" * 16  # 32 bytes in UTF-8


@pytest.mark.parametrize("principal", ["a b", "tab\there", "x" * 129])
def test_a_configured_key_needs_a_principal_name(principal: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load({"RELAY_API_KEYS": f"{principal}:key"})
    assert "RELAY_API_KEYS" in str(refused.value)
    assert load({"RELAY_API_KEYS": "auth0|5f1e@x.example:key"}).api_keys == (
        ("auth0|5f1e@x.example", "key"),)
