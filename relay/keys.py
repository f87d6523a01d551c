"""Every Redis key Relay uses, built in one place.

All keys start with the configured prefix (`RELAY_STREAM_PREFIX`), so several deployments, or
tests, can share one Redis server without seeing each other.
"""

from __future__ import annotations


class Keys:
    __slots__ = ("api_keys", "control", "dead", "deliveries", "environment_versions",
                 "environments", "events", "executors", "followed", "metrics",
                 "modules", "name_owners", "pipeline_timers", "prefix", "queued", "rate_limits",
                 "requests", "session_expiry", "token_secret")

    EXECUTOR_GROUP = "executors"
    PIPELINE_GROUP = "pipelines"
    """The consumer group on `followed` that advances pipelines (relay.scheduler)."""
    WEBHOOK_GROUP = "webhooks"
    """The consumer group on `followed` that queues webhook deliveries (relay.deliverer)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.requests = f"{prefix}:requests"
        """Stream of `wasm_exec_requested`, read by executors in group `executors`."""
        self.events = f"{prefix}:events"
        """Stream of lifecycle events and `wasm_exec_completed`."""
        self.followed = f"{prefix}:events:followed"
        """The events that the webhook deliverer or the pipeline scheduler may act on, copied
        from `events` under the same ids (relay/lua/events.lib.lua)."""
        self.dead = f"{prefix}:dead"
        """Stream of request entries given up on after too many deliveries."""
        self.deliveries = f"{prefix}:deliveries"
        """Hash entry id -> times a peer took it over (XAUTOCLAIM JUSTID counts none)."""
        self.queued = f"{prefix}:queued"
        """Counter of accepted executions not yet started (for `position`)."""
        self.modules = f"{prefix}:modules"
        """Sorted set of stored module CIDs, scored by upload time (ms)."""
        self.name_owners = f"{prefix}:name-owners"
        """Hash name -> principal that first bound it."""
        self.executors = f"{prefix}:executors"
        """Sorted set of executor consumer names, scored by last heartbeat (ms)."""
        self.api_keys = f"{prefix}:api-keys"
        """Hash sha256(key) hex -> JSON {principal, id, created_at} of stored API keys."""
        self.metrics = f"{prefix}:metrics"
        """Hash of cluster-wide counters and histogram buckets (see relay.metrics)."""
        self.token_secret = f"{prefix}:token-secret"
        """The secret access tokens are signed with, when RELAY_TOKEN_SECRET is not set."""
        self.control = f"{prefix}:control"
        """Pub/sub channel: pause, resume and cancel requests for the executor running one."""
        self.session_expiry = f"{prefix}:session-expiry"
        """Sorted set of session ids, scored by when each expires (ms): the sweeper's work."""
        self.environments = f"{prefix}:environments"
        """Hash name -> JSON of an environment as PUT (relay.environments); the shipped ones
        are here only once changed."""
        self.environment_versions = f"{prefix}:environment-versions"
        """Hash name -> an environment's version; kept when it is deleted, so a name made
        again never reuses a version (memoized results are keyed by name and version)."""
        self.rate_limits = f"{prefix}:ratelimit"
        """Prefix of the rate limits' windows (`rate_window`)."""
        self.pipeline_timers = f"{prefix}:pipeline-timers"
        """Sorted set of `<pipeline id>\n<node>` (a node's retry) or `<pipeline id>\n` (look
        at the pipeline again), scored by when each is due (ms): the scheduler's timers."""

    def rate_window(self, scope: str, principal: str, limit: int, window_s: int) -> str:
        """Counter of a principal's requests in the current window of its rate limit
        (relay.pipeline.ratelimit): `scope` "" for executes, "upload" for uploads. New numbers
        start a window of their own."""
        return f"{self.rate_limits}:{scope}:{limit}:{window_s}:{principal}"

    def execution(self, request_id: str) -> str:
        """Hash holding one execution's owner, status and result."""
        return f"{self.prefix}:exec:{request_id}"

    def execution_events(self, request_id: str) -> str:
        """List of the `relay:events` entry ids of one execution's client events, in order, so
        its history is read without scanning the stream; it expires with the record. The Lua
        scripts that append those events name it as the record's key + `:events`."""
        return f"{self.execution(request_id)}:events"

    def memo(self, digest: str, principal: str | None) -> str:
        """Hash holding one memoized result (relay.memo): the producing run's response
        (`result`), `gas`, `memory` and request id (`of`). `principal` None: the global scope,
        shared by every principal (a principal's name has no `:`, so the two never meet)."""
        scope = "global" if principal is None else f"p:{principal}"
        return f"{self.prefix}:memo:{scope}:{digest}"

    def streams(self, principal: str) -> str:
        """Sorted set of the principal's open event streams on every gateway, each scored by
        when its lease ends (Redis time, ms): `relay.gateway.slots`."""
        return f"{self.prefix}:streams:{principal}"

    def active(self, principal: str) -> str:
        """Set of the principal's executions that hold a place: running or paused (at most its
        `max_active`). Added by the start script, removed by the settle script."""
        return f"{self.prefix}:active:{principal}"

    def waiting(self, principal: str, priority: str = "normal") -> str:
        """List of the principal's parked request entries (`data`) of one priority, started
        while it had no place free; the settle script moves them back to their requests stream
        as places free, high ones first. It builds the high and low lists as the normal one +
        `:high` / `:low` (a principal's name has no `:`)."""
        base = f"{self.prefix}:waiting:{principal}"
        return base if priority == "normal" else f"{base}:{priority}"

    def requests_of(self, priority: str) -> str:
        """The requests stream of a priority: `relay:requests` for normal (as in v1),
        `relay:requests:high` and `relay:requests:low`; all read in group `executors`. The
        settle script builds the other two from the first the same way."""
        return self.requests if priority == "normal" else f"{self.requests}:{priority}"

    def deliveries_of(self, priority: str) -> str:
        """`deliveries` for the entries of one priority's requests stream (each stream numbers
        its own entries, so two streams can hold the same id)."""
        return self.deliveries if priority == "normal" else f"{self.deliveries}:{priority}"

    def queued_of(self, priority: str) -> str:
        """Counter of accepted executions of one priority not yet started (the per-priority
        part of `queued`; the queue depth gauge reads the high and low ones, and takes normal
        as the rest of `queued`)."""
        return f"{self.queued}:{priority}"

    def session(self, session_id: str) -> str:
        """Hash holding one session: owner, module, budget and use, committed state."""
        return f"{self.prefix}:session:{session_id}"

    def session_calls(self, session_id: str) -> str:
        """List of the request ids of a session's unfinished calls, in acceptance order: the
        head is the one on `relay:requests`, the others wait behind it (relay.lua.accept)."""
        return f"{self.session(session_id)}:calls"

    def session_history(self, session_id: str) -> str:
        """List of the request ids of every call a session accepted (its events' replay)."""
        return f"{self.session(session_id)}:history"

    def sessions(self, principal: str) -> str:
        """Sorted set of the principal's sessions, scored by creation time (ms)."""
        return f"{self.prefix}:sessions:{principal}"

    def module_holds(self, cid: str) -> str:
        """Counter of the live sessions and snapshots that use a module: while above zero the
        module cannot be deleted."""
        return f"{self.prefix}:module-holds:{cid}"

    def snapshot(self, snapshot_id: str) -> str:
        """Hash holding one snapshot: owner, session, module, the state it holds a reference
        to, its size, label and creation time (relay.snapshots)."""
        return f"{self.prefix}:snapshot:{snapshot_id}"

    def snapshots(self, principal: str) -> str:
        """Sorted set of the principal's snapshots, scored by creation time (Redis time, µs)."""
        return f"{self.prefix}:snapshots:{principal}"

    def module(self, cid: str) -> str:
        """Hash holding one module's binary (`wasm`), metadata (`meta`) and `owner`."""
        return f"{self.prefix}:module:{cid}"

    def module_usage(self, principal: str) -> str:
        """Hash `count`, `bytes`: the modules the principal owns (its quota's use)."""
        return f"{self.prefix}:module-usage:{principal}"

    def module_names(self, cid: str) -> str:
        """Set of the `name@tag`s bound to a module (a module with names is not deleted)."""
        return f"{self.prefix}:module-names:{cid}"

    def name(self, name: str) -> str:
        """Hash tag -> CID for one glyph name."""
        return f"{self.prefix}:name:{name}"

    def state(self, state_cid: str) -> str:
        """Hash {manifest, size, refs} of one stored session state (relay.states): its
        manifest's JSON, its memory's bytes, and how many sessions and snapshots hold it. Written
        with a TTL (an orphan: no `refs`) until the first holder PERSISTs it. The Lua library
        states.lib.lua builds this key from the prefix too."""
        return f"{self.prefix}:state:{state_cid}"

    def page(self, sha256: str) -> str:
        """String: one 64 KiB page of state memory, zstd-compressed, named by the SHA-256 of
        its raw bytes; shared by every state that has it (states.lib.lua builds it too)."""
        return f"{self.prefix}:page:{sha256}"

    @property
    def page_refs(self) -> str:
        """Hash sha256 -> how many references held states' manifests make to that page; a
        page is deleted when its count drops to zero (states.lib.lua builds it too)."""
        return f"{self.prefix}:page-refs"

    def blob(self, cid: str) -> str:
        """Hash {size, chunks} of one stored output blob (relay.blobs), named by the CID of its
        bytes; written after its chunks, so a blob whose hash exists is whole. The Lua library
        blobs.lib.lua builds this key and the chunks' from the prefix too."""
        return f"{self.prefix}:blob:{cid}"

    def blob_chunk(self, cid: str, index: int) -> str:
        """String: bytes [index * CHUNK, (index + 1) * CHUNK) of a blob (relay.blobs)."""
        return f"{self.blob(cid)}:{index}"

    def budget(self, budget_id: str) -> str:
        """Hash holding one budget's principal, creator, limits and `created_ms` (relay.budgets).
        Its use of the window that starts at S (ms) is the hash `<this key>:<S>`: `gas_used`,
        `time_used`, `executions`, `reserved_gas`, `reserved_time`, expiring a window after the
        window ends. The Lua library budgets.lib.lua builds both from the prefix."""
        return f"{self.prefix}:budget:{budget_id}"

    def budgets(self, principal: str) -> str:
        """Set of the ids of the budgets an execution of `principal` counts toward (read by
        the accept script: empty for most principals, so they pay nothing more)."""
        return f"{self.prefix}:budgets:{principal}"

    def visible_budgets(self, principal: str) -> str:
        """Sorted set (every score 0, so ordered by id, which starts with its creation time) of
        the budgets `principal` may see: those it is the principal of, and those it created."""
        return f"{self.prefix}:budgets-visible:{principal}"

    def pipeline(self, pipeline_id: str) -> str:
        """Hash holding one pipeline's owner, status, settings and counts (relay.pipelines).
        Its nodes live in hashes and sets named by this key + a suffix (`:spec`, `:status`,
        `:attempts`, `:results`, `:unmet`, `:dependents`, `:order`, `:retry`, `:current`,
        `:requests`, `:ready`, `:active`), which the pipeline scripts build from it too."""
        return f"{self.prefix}:pipeline:{pipeline_id}"

    def batch(self, batch_id: str) -> str:
        """Hash of one batch (relay.batches); `:waiting` and `:ended` beside it."""
        return f"{self.prefix}:batch:{batch_id}"

    def executions(self, principal: str) -> str:
        """Sorted set of the principal's executions, `<acceptance ms, 13 digits>:<request id>`,
        all of score 0 (so in time order by lex): `GET /executions` (relay.gateway.listing).
        The accept script names it from the prefix."""
        return f"{self.prefix}:executions:{principal}"

    def pipelines(self, principal: str) -> str:
        """Sorted set of the principal's pipelines, scored by creation time (ms)."""
        return f"{self.prefix}:pipelines:{principal}"

    @property
    def webhook_due(self) -> str:
        """Sorted set of webhook delivery ids, scored by when each is due (ms), or by when the
        lease of the deliverer sending it ends (relay.webhooks)."""
        return f"{self.prefix}:webhook-due"

    def webhook(self, delivery_id: str) -> str:
        """Hash holding one webhook delivery (relay.webhooks): `url`, `principal`, `body`, the
        key of its `log`, and the number of the last `attempt` made."""
        return f"{self.prefix}:webhook:{delivery_id}"

    def webhook_log(self, kind: str, owner_id: str) -> str:
        """List of the JSON records of every delivery attempt for one execution or pipeline
        (`kind`); this key + `:owner` holds the principal it belongs to (the Lua scripts build
        that one from this key)."""
        return f"{self.prefix}:webhook-log:{kind}:{owner_id}"

    def webhook_secret(self, principal: str) -> str:
        """Hash of a principal's webhook signing secrets: `current`, and `previous` with
        `rotated_ms` (when it was replaced) after a rotation."""
        return f"{self.prefix}:webhook-secret:{principal}"
