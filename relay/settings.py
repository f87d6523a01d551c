"""One frozen Settings object, read from the environment once at start.

A bad value stops the start with the variable's name (`SettingsError`), so a typo never turns
into a silent default at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

MIB = 1024 * 1024
# Package data (pyproject.toml): the policies a plain `pip install .` starts with.
DEFAULT_POLICY_DIR = Path(__file__).resolve().parent / "policies"


class SettingsError(ValueError):
    """A configuration variable has a value Relay cannot use."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    redis_url: str | None = None
    """`REDIS_URL`; None means an embedded Redis under `data_dir`."""
    data_dir: str = "./.relay"
    prefix: str = "relay"
    """`RELAY_STREAM_PREFIX`: every Redis key Relay writes starts with it."""
    api_keys: tuple[tuple[str, str], ...] = ()
    """`RELAY_API_KEYS`: (principal, key) pairs."""

    max_request_bytes: int = MIB
    max_module_bytes: int = 16 * MIB

    default_max_gas: int = 1_000_000_000
    default_max_memory_bytes: int = 64 * MIB
    default_max_time_ms: int = 5_000
    max_gas: int = 1_000_000_000_000
    max_memory_bytes: int = 1024 * MIB
    max_time_ms: int = 300_000

    sync_wait_ms: int = 30_000
    idempotency_ttl_ms: int = 300_000
    events_retention: int = 100_000
    """`RELAY_EVENTS_RETENTION`: approximate number of entries `relay:events` keeps."""
    requests_retention: int = 100_000

    executor_concurrency: int = max(os.cpu_count() or 1, 1)
    """Modules one executor runs at once (worker threads)."""
    executor_prefetch: int = 3 * max(os.cpu_count() or 1, 1)
    """Entries an executor takes beyond those running, so its Redis I/O goes out in batches.
    They wait for a free thread; their `max_time` only counts once they run."""
    max_output_bytes: int = MIB
    """Cap on the stdout/stderr a WASI module may produce (more is cut off)."""
    cors_origins: tuple[str, ...] = ()
    heartbeat_ttl_ms: int = 5_000

    jwt_secret: str | None = None
    """`RELAY_JWT_SECRET`: accept HS256 bearer tokens signed with it."""
    jwt_public_key: str | None = None
    """`RELAY_JWT_PUBLIC_KEY`: PEM (or a path to one); accept RS256/ES256 tokens it verifies."""
    jwt_audience: str | None = None
    token_secret: str | None = None
    """`RELAY_TOKEN_SECRET`: signs access tokens; unset, a secret kept in Redis is used."""
    sse_queue: int = 256
    """Events queued for one event stream before it is dropped as too slow."""
    max_pause_ms: int = 600_000
    lease_ms: int = 3_000
    """An entry whose executor has not renewed it for this long is taken over by a peer."""
    max_deliveries: int = 3
    drain_grace_ms: int = 30_000
    max_queue: int = 100_000
    """Accepted executions waiting for an executor; past it, execute answers 503."""
    stored_key_cache_ms: int = 5_000
    """How long a gateway trusts a stored API key it looked up: revocation takes this long."""

    rate_limit: int = 10
    """`RELAY_RATE_LIMIT`: requests per window and principal; 0 turns the default limit off
    (principals with their own `rate_limit` in principals.toml are still limited)."""
    rate_window_ms: int = 60_000
    policy_dir: str = str(DEFAULT_POLICY_DIR)
    access_log: bool = True
    log_format: str = "json"


def _integer(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {value}")
        return value

    return parse


_int = _integer(1)


def _api_keys(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        principal, sep, key = item.partition(":")
        if not sep or not principal or not key:
            raise SettingsError(f"{name} must be comma-separated principal:key pairs")
        pairs.append((principal, key))
    return tuple(pairs)


def _csv(name: str, raw: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in raw.split(","))))


def _whole_seconds_ms(name: str, raw: str) -> int:
    value = _int(name, raw)
    if value % 1000:
        raise SettingsError(f"{name} is in milliseconds and must be whole seconds, got {value}")
    return value


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    return lowered in ("1", "true", "yes", "on")


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.strip() not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw.strip()

    return parse


def _directory(name: str, raw: str) -> str:
    if not Path(raw).is_dir():
        raise SettingsError(f"{name} must name a directory, got {raw!r}")
    return raw


def _pem(name: str, raw: str) -> str:
    """PEM text, or the path of a file holding it (easier to pass around than a multi-line
    variable)."""
    text = raw.strip()
    if not text.startswith("-----BEGIN"):
        try:
            text = Path(text).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{name} must be PEM text or a readable file: {exc}") from None
    if "PUBLIC KEY-----" not in text:
        raise SettingsError(f"{name} must hold a PEM public key")
    return text


def _str(name: str, raw: str) -> str:
    if not raw.strip():
        raise SettingsError(f"{name} must not be empty")
    return raw.strip()


# Environment variable -> (field, parser). The contract names the variables; fields carry units.
_VARIABLES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "REDIS_URL": ("redis_url", _str),
    "RELAY_DATA_DIR": ("data_dir", _str),
    "RELAY_STREAM_PREFIX": ("prefix", _str),
    "RELAY_API_KEYS": ("api_keys", _api_keys),
    "RELAY_MAX_REQUEST_BYTES": ("max_request_bytes", _int),
    "RELAY_MAX_MODULE_BYTES": ("max_module_bytes", _int),
    "RELAY_DEFAULT_MAX_GAS": ("default_max_gas", _int),
    "RELAY_DEFAULT_MAX_MEMORY": ("default_max_memory_bytes", _int),
    "RELAY_DEFAULT_MAX_TIME": ("default_max_time_ms", _int),
    "RELAY_MAX_GAS": ("max_gas", _int),
    "RELAY_MAX_MEMORY": ("max_memory_bytes", _int),
    "RELAY_MAX_TIME": ("max_time_ms", _int),
    "RELAY_SYNC_WAIT": ("sync_wait_ms", _int),
    "RELAY_IDEMPOTENCY_TTL": ("idempotency_ttl_ms", _int),
    "RELAY_EVENTS_RETENTION": ("events_retention", _int),
    "RELAY_REQUESTS_RETENTION": ("requests_retention", _int),
    "RELAY_EXECUTOR_CONCURRENCY": ("executor_concurrency", _int),
    "RELAY_EXECUTOR_PREFETCH": ("executor_prefetch", _integer(0)),
    "RELAY_MAX_OUTPUT_BYTES": ("max_output_bytes", _int),
    "RELAY_CORS_ORIGINS": ("cors_origins", _csv),
    "RELAY_HEARTBEAT_TTL": ("heartbeat_ttl_ms", _int),
    "RELAY_JWT_SECRET": ("jwt_secret", _str),
    "RELAY_JWT_PUBLIC_KEY": ("jwt_public_key", _pem),
    "RELAY_JWT_AUDIENCE": ("jwt_audience", _str),
    "RELAY_STORED_KEY_CACHE": ("stored_key_cache_ms", _integer(0)),
    "RELAY_TOKEN_SECRET": ("token_secret", _str),
    "RELAY_SSE_QUEUE": ("sse_queue", _int),
    "RELAY_MAX_PAUSE": ("max_pause_ms", _int),
    "RELAY_LEASE": ("lease_ms", _int),
    "RELAY_MAX_DELIVERIES": ("max_deliveries", _int),
    "RELAY_DRAIN_GRACE": ("drain_grace_ms", _integer(0)),
    "RELAY_MAX_QUEUE": ("max_queue", _int),
    "RELAY_RATE_LIMIT": ("rate_limit", _integer(0)),
    "RELAY_RATE_WINDOW": ("rate_window_ms", _whole_seconds_ms),
    "RELAY_POLICY_DIR": ("policy_dir", _directory),
    "RELAY_ACCESS_LOG": ("access_log", _bool),
    "RELAY_LOG_FORMAT": ("log_format", _choice("json", "text")),
}


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from `environ` (default: `os.environ`); `overrides` win (tests, CLI)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for variable, (field, parse) in _VARIABLES.items():
        raw = env.get(variable)
        if raw is not None and raw != "":
            values[field] = parse(variable, raw)
    values.update(overrides)
    settings = Settings(**values)
    for default, ceiling in (
        ("default_max_gas", "max_gas"),
        ("default_max_memory_bytes", "max_memory_bytes"),
        ("default_max_time_ms", "max_time_ms"),
    ):
        if getattr(settings, default) > getattr(settings, ceiling):
            raise SettingsError(f"the default {default} is above its ceiling {ceiling}")
    return settings
