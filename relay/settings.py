"""One frozen Settings object, read from the environment once at start.

Each setting is declared once, as a field of `Settings`: its type and default as usual, and in
its `Annotated` metadata a `Variable` giving the environment variable, the parser, the unit and a
one-line meaning. `load()` reads the environment by it, and scripts/gen_config_docs.py writes the
README's configuration table and docs/configuration.md from it (tests/relay/test_settings.py
checks both documents against it).

A bad value stops the start with the variable's name (`SettingsError`), so a typo never turns
into a silent default at run time.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import msgspec

from relay.cid import GLYPH_SCHEME, NAME_RULE, InvalidCid, is_name, parse_reference
from relay.principals import RULE as PRINCIPAL_RULE
from relay.principals import is_principal
from relay.schemas import DEFAULT_MAX_STACK

MIB = 1024 * 1024
CPUS = max(os.cpu_count() or 1, 1)
# Package data (pyproject.toml): the policies a plain `pip install .` starts with.
DEFAULT_POLICY_DIR = Path(__file__).resolve().parent / "policies"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_HMAC_SECRET_BYTES = 32
# Wasm runs on the executor's own threads' stacks, and wasmtime refuses a wasm stack over its
# async stack size (2 MiB) by aborting the process: RELAY_MAX_STACK may not go past it.
MAX_STACK_BYTES = 2 * MIB


class SettingsError(ValueError):
    """A configuration variable has a value Relay cannot use."""


# --- parsers: (variable name, raw text) -> value, or SettingsError naming the variable ---

Parser = Callable[[str, str], Any]


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
_count_or_zero = _integer(0)


def _stack_bytes(name: str, raw: str) -> int:
    value = _int(name, raw)
    if value > MAX_STACK_BYTES:
        raise SettingsError(f"{name} must be at most {MAX_STACK_BYTES}, got {value}")
    return value


def _api_keys(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        principal, sep, key = item.partition(":")
        if not sep or not principal or not key:
            raise SettingsError(f"{name} must be comma-separated principal:key pairs")
        if not is_principal(principal):
            raise SettingsError(f"{name}: the principal {principal!r} is not a principal name "
                                f"({PRINCIPAL_RULE})")
        pairs.append((principal, key))
    return tuple(pairs)


def _csv(name: str, raw: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in raw.split(","))))


def _module_references(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated CIDs (made canonical) and `glyph://NAME@TAG` names."""
    references = []
    for item in _csv(name, raw):
        try:
            parsed = parse_reference(item)
        except InvalidCid as exc:
            raise SettingsError(f"{name}: {item!r} is neither a CID nor a glyph name: "
                                f"{exc}") from None
        references.append(parsed if isinstance(parsed, str)
                          else f"{GLYPH_SCHEME}{parsed.name}@{parsed.tag}")
    return tuple(references)


def _whole_seconds_ms(name: str, raw: str) -> int:
    """Milliseconds that are whole seconds: the rate limiter's windows are counted in seconds."""
    value = _int(name, raw)
    if value % 1000:
        raise SettingsError(f"{name} is in milliseconds and must be whole seconds, got {value}")
    return value


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _durations(name: str, raw: str) -> tuple[int, ...]:
    """Comma-separated durations with units (`5s,5m,2h`), as milliseconds."""
    delays = []
    for part in raw.split(","):
        found = _DURATION.fullmatch(part)
        if found is None:
            raise SettingsError(f"{name} must be comma-separated durations such as 5s,5m,2h "
                                f"(units ms, s, m, h, d), got {part.strip()!r}")
        delays.append(round(float(found.group(1)) * _UNIT_MS[found.group(2)]))
    return tuple(delays)


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


def _log_level(name: str, raw: str) -> str:
    # `logging` accepts only upper-case names; `info` is what people type.
    return _choice(*LOG_LEVELS)(name, raw.upper())


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


def _environment_name(name: str, raw: str) -> str:
    if not is_name(raw.strip()):
        raise SettingsError(f"{name} must be an environment name ({NAME_RULE}), got {raw!r}")
    return raw.strip()


def _hmac_secret(name: str, raw: str) -> str:
    """A secret an HMAC is keyed with: HS256 is only as strong as its key, and RFC 7518 (3.2)
    asks for at least as many bits as the hash has."""
    secret = _str(name, raw)
    if len(secret.encode()) < MIN_HMAC_SECRET_BYTES:
        raise SettingsError(f"{name} must be at least {MIN_HMAC_SECRET_BYTES} bytes long, got "
                            f"{len(secret.encode())}")
    return secret


# --- the declaration ---

# Groups, in the order the documentation shows them (scripts/gen_config_docs.py says what
# each means).
REDIS, LIMITS, AUTH = "redis", "limits", "auth"
EXECUTOR, EVENTS, LOGS = "executor", "events", "logs"
GROUPS = (REDIS, LIMITS, AUTH, EXECUTOR, EVENTS, LOGS)


class Variable(NamedTuple):
    """How a setting is read from the environment and documented."""

    name: str
    """The environment variable, as the contract names it."""
    parse: Parser
    group: str
    unit: str
    """What a number counts (`ms`, `bytes`, ...); "" for what is not a quantity."""
    doc: str
    """One line: what the setting means to a user."""
    shown_default: str | None = None
    """The default as the documentation shows it, when it is no value the variable could be
    set to (unset, computed at start). Otherwise the default is shown as the variable's text."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting: a field's default is the setting's default; its `Variable` says the rest.
    Field names carry the unit (`*_ms`, `*_bytes`); variable names are the contract's."""

    redis_url: Annotated[str | None, Variable(
        "REDIS_URL", _str, REDIS, "URL",
        "`redis://`, `rediss://` or `unix://` URL of Redis 6.2+ or Valkey",
        "unset: an embedded Redis")] = None
    data_dir: Annotated[str, Variable(
        "RELAY_DATA_DIR", _str, REDIS, "path",
        "where the embedded Redis keeps its data and `relay dev` its key")] = "./.relay"
    prefix: Annotated[str, Variable(
        "RELAY_STREAM_PREFIX", _str, REDIS, "",
        "start of every Redis key and stream Relay writes")] = "relay"

    max_request_bytes: Annotated[int, Variable(
        "RELAY_MAX_REQUEST_BYTES", _int, LIMITS, "bytes",
        "largest JSON body (413 above)")] = MIB
    max_module_bytes: Annotated[int, Variable(
        "RELAY_MAX_MODULE_BYTES", _int, LIMITS, "bytes",
        "largest module upload (413 above)")] = 16 * MIB
    # Parsing and validating are CPU work on the gateway: half its CPUs at most, so that the
    # other half keeps answering everyone else.
    max_uploads: Annotated[int, Variable(
        "RELAY_MAX_UPLOADS", _int, LIMITS, "uploads",
        "module uploads one gateway reads and validates at once; more wait up to 5 s, then 503",
        "half the CPU count, at least 1")] = max(CPUS // 2, 1)
    max_modules: Annotated[int, Variable(
        "RELAY_MAX_MODULES", _int, LIMITS, "modules",
        "modules one principal may have stored (`max_modules` in `principals.toml` "
        "overrides it)")] = 1_000
    max_module_storage_bytes: Annotated[int, Variable(
        "RELAY_MAX_MODULE_STORAGE_BYTES", _int, LIMITS, "bytes",
        "total size of the modules one principal may have stored (`max_module_storage` in "
        "`principals.toml` overrides it)")] = 1024 * MIB
    default_max_gas: Annotated[int, Variable(
        "RELAY_DEFAULT_MAX_GAS", _int, LIMITS, "fuel",
        "gas of an execution that asks for none")] = 1_000_000_000
    max_gas: Annotated[int, Variable(
        "RELAY_MAX_GAS", _int, LIMITS, "fuel",
        "most gas an execution may ask for")] = 1_000_000_000_000
    default_max_memory_bytes: Annotated[int, Variable(
        "RELAY_DEFAULT_MAX_MEMORY", _int, LIMITS, "bytes",
        "linear memory of an execution that asks for no limit")] = 64 * MIB
    max_memory_bytes: Annotated[int, Variable(
        "RELAY_MAX_MEMORY", _int, LIMITS, "bytes",
        "most linear memory an execution may ask for")] = 1024 * MIB
    default_max_time_ms: Annotated[int, Variable(
        "RELAY_DEFAULT_MAX_TIME", _int, LIMITS, "ms",
        "running time of an execution that asks for no limit")] = 5_000
    max_time_ms: Annotated[int, Variable(
        "RELAY_MAX_TIME", _int, LIMITS, "ms",
        "most running time an execution may ask for")] = 300_000
    max_stack_bytes: Annotated[int, Variable(
        "RELAY_MAX_STACK", _stack_bytes, LIMITS, "bytes",
        "wasm stack of an execution that asks for no limit, and the most it may ask for "
        f"(at most {MAX_STACK_BYTES}); deeper recursion is `stack_overflow`")] = DEFAULT_MAX_STACK
    max_output_bytes: Annotated[int, Variable(
        "RELAY_MAX_OUTPUT_BYTES", _int, LIMITS, "bytes",
        "stdout and stderr together a WASI module may write; writes past it fail in the "
        "module (`EFBIG`)")] = 64 * MIB
    default_environment: Annotated[str, Variable(
        "RELAY_DEFAULT_ENVIRONMENT", _environment_name, LIMITS, "name",
        "environment of an execution or session that names none (`wasi`: WASI with stdio, "
        "clocks and randomness, the global ceilings; `pure`: no WASI)")] = "wasi"
    inline_output_bytes: Annotated[int, Variable(
        "RELAY_INLINE_OUTPUT_BYTES", _int, LIMITS, "bytes",
        "largest output answered inline; a larger one is stored as a blob (`output_ref`, "
        "`GET /executions/{id}/output`) that lives as long as the execution's record")] = 65536
    max_table_elements: Annotated[int, Variable(
        "RELAY_MAX_TABLE_ELEMENTS", _int, LIMITS, "elements",
        "table elements an execution may hold, all its tables together (each of a module's "
        "n tables gets 1/n of it)")] = 100_000
    max_queue: Annotated[int, Variable(
        "RELAY_MAX_QUEUE", _int, LIMITS, "executions",
        "accepted executions waiting for an executor before execute answers 503")] = 100_000
    max_active: Annotated[int, Variable(
        "RELAY_MAX_ACTIVE", _int, LIMITS, "executions",
        "executions of one principal running or paused at once; the rest wait queued "
        "(`max_active` in `principals.toml` overrides it)")] = 16
    rate_limit: Annotated[int, Variable(
        "RELAY_RATE_LIMIT", _count_or_zero, LIMITS, "requests",
        "execute requests per window and principal; 0 turns the default limit off "
        "(principals with a `rate_limit` of their own in `principals.toml` stay limited)")] = 10
    rate_window_ms: Annotated[int, Variable(
        "RELAY_RATE_WINDOW", _whole_seconds_ms, LIMITS, "ms",
        "the rate limit's window, in whole seconds")] = 60_000

    api_keys: Annotated[tuple[tuple[str, str], ...], Variable(
        "RELAY_API_KEYS", _api_keys, AUTH, "",
        "`principal:key,principal:key`; `relay dev` makes a dev key when unset",
        "none")] = ()
    jwt_secret: Annotated[str | None, Variable(
        "RELAY_JWT_SECRET", _hmac_secret, AUTH, "",
        "accept HS256 bearer tokens signed with it (at least 32 bytes)", "none")] = None
    jwt_public_key: Annotated[str | None, Variable(
        "RELAY_JWT_PUBLIC_KEY", _pem, AUTH, "PEM",
        "PEM text, or a path to one: accept RS256/ES256 bearer tokens it verifies",
        "none")] = None
    jwt_audience: Annotated[str | None, Variable(
        "RELAY_JWT_AUDIENCE", _str, AUTH, "",
        "the `aud` bearer tokens must carry", "none")] = None
    token_secret: Annotated[str | None, Variable(
        "RELAY_TOKEN_SECRET", _str, AUTH, "",
        "signs the access tokens of `POST /auth/tokens`",
        "made once, kept in Redis")] = None
    stored_key_cache_ms: Annotated[int, Variable(
        "RELAY_STORED_KEY_CACHE", _count_or_zero, AUTH, "ms",
        "how long a gateway trusts a stored key it looked up, so a revocation takes this "
        "long (0: ask Redis every time)")] = 5_000
    policy_dir: Annotated[str, Variable(
        "RELAY_POLICY_DIR", _directory, AUTH, "path",
        "directory of the Cedar policies (`*.cedar`) and `principals.toml`",
        "`relay/policies/` in the package")] = str(DEFAULT_POLICY_DIR)

    executor_concurrency: Annotated[int, Variable(
        "RELAY_EXECUTOR_CONCURRENCY", _int, EXECUTOR, "executions",
        "executions one executor runs at once (threads)", "CPU count")] = CPUS
    # Taken entries wait for a free thread; their max_time only counts once they run.
    executor_prefetch: Annotated[int, Variable(
        "RELAY_EXECUTOR_PREFETCH", _count_or_zero, EXECUTOR, "entries",
        "entries an executor takes beyond those it runs, so its Redis I/O is batched; "
        "0 for long-running work", "3 × CPU count")] = 3 * CPUS
    heartbeat_ttl_ms: Annotated[int, Variable(
        "RELAY_HEARTBEAT_TTL", _int, EXECUTOR, "ms",
        "an executor not heard from for this long is no longer counted in health")] = 5_000
    lease_ms: Annotated[int, Variable(
        "RELAY_LEASE", _int, EXECUTOR, "ms",
        "time without renewal after which a peer takes over an executor's entry")] = 3_000
    max_deliveries: Annotated[int, Variable(
        "RELAY_MAX_DELIVERIES", _int, EXECUTOR, "deliveries",
        "deliveries of one request entry before it is dead-lettered")] = 3
    priority_starvation_ms: Annotated[int, Variable(
        "RELAY_PRIORITY_STARVATION_MS", _count_or_zero, EXECUTOR, "ms",
        "how long a queued execution waits before it is taken ahead of every one accepted "
        "after it, whatever their priorities")] = 5_000
    drain_grace_ms: Annotated[int, Variable(
        "RELAY_DRAIN_GRACE", _count_or_zero, EXECUTOR, "ms",
        "how long a stopping executor lets its runs finish before handing them back")] = 30_000
    # None: concurrency - 1, so that pauses never hold every thread.
    executor_max_paused: Annotated[int | None, Variable(
        "RELAY_EXECUTOR_MAX_PAUSED", _count_or_zero, EXECUTOR, "executions",
        "paused executions one executor holds at once; a pause beyond is 409 "
        "`too-many-paused`", "concurrency − 1")] = None
    max_pause_ms: Annotated[int, Variable(
        "RELAY_MAX_PAUSE", _int, EXECUTOR, "ms",
        "how long an execution may stay paused before it is cancelled")] = 600_000
    module_cache_dir: Annotated[str | None, Variable(
        "RELAY_MODULE_CACHE_DIR", _str, EXECUTOR, "path",
        "where an executor keeps the modules it compiled, so that after a restart it loads "
        "them instead of compiling them again (created mode 700; refused when others may "
        "write to it)", "RELAY_DATA_DIR/modules")] = None
    module_cache_bytes: Annotated[int, Variable(
        "RELAY_MODULE_CACHE_BYTES", _count_or_zero, EXECUTOR, "bytes",
        "most bytes of compiled modules kept in RELAY_MODULE_CACHE_DIR, the least recently "
        "used removed first; 0 turns the cache off")] = 1024 * MIB
    preload: Annotated[tuple[str, ...], Variable(
        "RELAY_PRELOAD", _module_references, EXECUTOR, "",
        "comma-separated CIDs or `glyph://NAME@TAG` names an executor compiles (or loads from "
        "RELAY_MODULE_CACHE_DIR) when it starts, before it takes work; one it cannot find is "
        "logged and skipped", "none")] = ()

    session_ttl_ms: Annotated[int, Variable(
        "RELAY_SESSION_TTL", _int, EXECUTOR, "ms",
        "how long an idle session lives after its last call (a session's own `ttl` may say "
        "otherwise)")] = 86_400_000
    max_sessions: Annotated[int, Variable(
        "RELAY_MAX_SESSIONS", _int, EXECUTOR, "sessions",
        "sessions one principal may hold at once (closed ones count until they expire); one "
        "more is 403 `quota-exceeded`")] = 1000
    max_snapshots: Annotated[int, Variable(
        "RELAY_MAX_SNAPSHOTS", _int, EXECUTOR, "snapshots",
        "snapshots one principal may keep; one more is 403 `quota-exceeded`")] = 1000
    max_batch: Annotated[int, Variable(
        "RELAY_MAX_BATCH", _int, EXECUTOR, "items",
        "items one batch may have; more is 400 (the 1 MiB body holds them all)")] = 100
    max_pipeline_nodes: Annotated[int, Variable(
        "RELAY_MAX_PIPELINE_NODES", _int, EXECUTOR, "nodes",
        "nodes one pipeline may have; more is 400")] = 10_000
    max_budgets: Annotated[int, Variable(
        "RELAY_MAX_BUDGETS", _int, EXECUTOR, "budgets",
        "budgets one principal may have (each of its executions checks them all); one more "
        "spending cap is 403 `quota-exceeded` (an administrator's quota is never refused)")] = 32
    max_state_bytes: Annotated[int, Variable(
        "RELAY_MAX_STATE_BYTES", _int, EXECUTOR, "bytes",
        "largest memory a session may keep between calls")] = 268_435_456

    sync_wait_ms: Annotated[int, Variable(
        "RELAY_SYNC_WAIT", _int, EVENTS, "ms",
        "how long a sync caller waits for the result before getting a 202 instead")] = 30_000
    idempotency_ttl_ms: Annotated[int, Variable(
        "RELAY_IDEMPOTENCY_TTL", _int, EVENTS, "ms",
        "how long an execution's record and result are kept after it ends")] = 300_000
    memo_scope: Annotated[str, Variable(
        "RELAY_MEMO_SCOPE", _choice("principal", "global"), EVENTS, "",
        "whose stored results a `memoize` request may be answered with: the caller's own "
        "(`principal`) or every principal's (`global`)")] = "principal"
    memo_ttl_ms: Annotated[int, Variable(
        "RELAY_MEMO_TTL", _int, EVENTS, "ms",
        "how long a memoized result is kept after the run that produced it")] = 86_400_000
    events_retention: Annotated[int, Variable(
        "RELAY_EVENTS_RETENTION", _int, EVENTS, "entries",
        "entries the events stream (`relay:events`) keeps, approximately")] = 100_000
    requests_retention: Annotated[int, Variable(
        "RELAY_REQUESTS_RETENTION", _int, EVENTS, "entries",
        "entries each requests stream (`relay:requests`, and `:high`, `:low`) keeps, "
        "approximately")] = 100_000
    sse_queue: Annotated[int, Variable(
        "RELAY_SSE_QUEUE", _int, EVENTS, "events",
        "events one event stream may fall behind before it is dropped as too slow")] = 256
    max_streams: Annotated[int, Variable(
        "RELAY_MAX_STREAMS", _int, EVENTS, "streams",
        "event streams (SSE and WebSocket together) one principal may hold open at once, "
        "counted across all gateways; one more is 429 `too-many-streams`")] = 64
    webhook_schedule_ms: Annotated[tuple[int, ...], Variable(
        "RELAY_WEBHOOK_SCHEDULE", _durations, EVENTS, "durations",
        "delays before each retry of a webhook delivery that failed, each times a random "
        "factor in [0.8, 1.2]; then it is given up",
        "`5s,5m,30m,2h,5h,10h,10h`")] = (5_000, 300_000, 1_800_000, 7_200_000, 18_000_000,
                                       36_000_000, 36_000_000)
    webhook_timeout_ms: Annotated[int, Variable(
        "RELAY_WEBHOOK_TIMEOUT", _int, EVENTS, "ms",
        "how long a webhook receiver has to answer an attempt")] = 15_000
    webhook_rotation_grace_ms: Annotated[int, Variable(
        "RELAY_WEBHOOK_ROTATION_GRACE", _count_or_zero, EVENTS, "ms",
        "after a rotation of a signing secret, how long deliveries carry a signature by the "
        "old secret too")] = 86_400_000
    webhook_allow_http: Annotated[bool, Variable(
        "RELAY_WEBHOOK_ALLOW_HTTP", _bool, EVENTS, "",
        "allow `http://` callback URLs (only `https://` otherwise)")] = False
    webhook_allow_private: Annotated[bool, Variable(
        "RELAY_WEBHOOK_ALLOW_PRIVATE", _bool, EVENTS, "",
        "allow callback URLs whose host is or resolves to an address that is not globally "
        "routable (loopback, private, link-local ...): for tests and closed networks only")] = False

    cors_origins: Annotated[tuple[str, ...], Variable(
        "RELAY_CORS_ORIGINS", _csv, LOGS, "",
        "comma-separated origins allowed to call the API from a browser", "none")] = ()
    access_log: Annotated[bool, Variable(
        "RELAY_ACCESS_LOG", _bool, LOGS, "",
        "one log line per HTTP request")] = True
    log_format: Annotated[str, Variable(
        "RELAY_LOG_FORMAT", _choice("json", "text"), LOGS, "",
        "`json` lines or plain `text` (`relay dev` defaults to `text`)")] = "json"
    log_level: Annotated[str, Variable(
        "RELAY_LOG_LEVEL", _log_level, LOGS, "",
        f"least severe log records written: {', '.join(LOG_LEVELS)}")] = "INFO"


class Setting(NamedTuple):
    """One setting as declared: the `Settings` field, its default and its `Variable`."""

    field: str
    default: Any
    variable: Variable


def declared(struct: type[msgspec.Struct]) -> tuple[Setting, ...]:
    """The settings `struct` declares, in order. Raises TypeError for a field without exactly
    one `Variable`, an unknown group or a variable named twice: run on `Settings` at import, so
    the declaration cannot go half-written."""
    hints = typing.get_type_hints(struct, include_extras=True)
    found = []
    for field in msgspec.structs.fields(struct):
        variables = [meta for meta in getattr(hints[field.name], "__metadata__", ())
                     if isinstance(meta, Variable)]
        if len(variables) != 1:
            raise TypeError(f"{struct.__name__}.{field.name} needs exactly one Variable")
        if variables[0].group not in GROUPS:
            raise TypeError(f"{struct.__name__}.{field.name}: unknown group "
                            f"{variables[0].group!r}")
        found.append(Setting(field.name, field.default, variables[0]))
    names = [setting.variable.name for setting in found]
    if len(set(names)) != len(names):
        raise TypeError(f"a variable is declared twice: {sorted(names)}")
    return tuple(found)


SETTINGS = declared(Settings)
VARIABLES = {setting.variable.name: setting for setting in SETTINGS}
"""Each setting by its environment variable."""
CEILINGS = (
    ("default_max_gas", "max_gas"),
    ("default_max_memory_bytes", "max_memory_bytes"),
    ("default_max_time_ms", "max_time_ms"),
)


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from `environ` (default: `os.environ`); `overrides` win (tests, CLI).

    An empty variable counts as unset. Raises SettingsError naming the variable whose value
    cannot be used, or the default that is above its ceiling.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = env.get(setting.variable.name)
        if raw is not None and raw != "":
            values[setting.field] = setting.variable.parse(setting.variable.name, raw)
    values.update(overrides)
    settings = Settings(**values)
    if settings.max_queue > settings.requests_retention:
        # Queued entries trimmed from the stream would never run, and their records would stay
        # `queued`, holding their idempotency keys, until they expire.
        raise SettingsError(
            f"RELAY_MAX_QUEUE ({settings.max_queue}) is above RELAY_REQUESTS_RETENTION "
            f"({settings.requests_retention}): queued requests would be trimmed from the "
            "stream before they run")
    for default, ceiling in CEILINGS:
        if getattr(settings, default) > getattr(settings, ceiling):
            raise SettingsError(
                f"{_variable_of(default)} ({getattr(settings, default)}) is above its ceiling "
                f"{_variable_of(ceiling)} ({getattr(settings, ceiling)})")
    return settings


def _variable_of(field: str) -> str:
    return next(setting.variable.name for setting in SETTINGS if setting.field == field)
