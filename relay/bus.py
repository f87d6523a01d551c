"""The Redis Streams bus, used by both the gateway and the executors.

Each step that must be atomic is one Lua script, so its order guarantees hold under any number
of gateways and executors:

- accept: claim the execution record, emit `execution_queued`, then enqueue the request;
- start: emit `execution_started` only while no result exists, and only while the principal has
  a place (`max_active`); over its cap, park the entry on the principal's waiting list;
- settle: write the result once (first writer wins), emit the terminal event and
  `wasm_exec_completed` (after `execution_started`, for a run so short it never called start),
  give the place back and move parked entries back to the stream, acknowledge the entry;
- emit: an event of a running execution, only while it has no result.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Literal, NamedTuple

import msgspec
import redis
import redis.asyncio as aioredis
from msgspec import UNSET
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from relay.batching import Batcher
from relay.cid import GlyphName
from relay.connection import reader_link, shared_link
from relay.keys import Keys
from relay.memo import MemoAccept
from relay.redislink import RedisLink, fields_of
from relay.schemas import (
    PRIORITIES,
    BusMessage,
    ControlRefused,
    ExecuteResponse,
    ExecutionComplete,
    ExecutionError,
    ExecutionProgress,
    ExecutionStarted,
    OutputRef,
    Priority,
    WasmExecCompleted,
    WasmExecRequested,
    encode,
    now_iso,
    queued_template,
)


class Script:
    """A Lua script run by EVALSHA inside pipelines. (redis-py's own Script makes a pipeline send
    SCRIPT EXISTS first, every time: one more round trip than the work itself.)"""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    @classmethod
    def named(cls, name: str, libs: tuple[str, ...] = ()) -> Script:
        """The script `relay/lua/<name>.lua` (package data), after the text of each library
        `relay/lua/<lib>.lib.lua` in `libs` (Redis scripts cannot call each other: functions
        several scripts share are prepended to each)."""
        folder = resources.files("relay").joinpath("lua")
        parts = [folder.joinpath(f"{lib}.lib.lua").read_text() for lib in libs]
        return cls("\n".join([*parts, folder.joinpath(f"{name}.lua").read_text()]))

    def queue(self, pipe: Pipeline, keys: list[str], args: list[Any]) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    def command(self, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        """The EVALSHA command, for a link (relay.redislink)."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def run(self, client: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        """Run it on its own (loading it first if the server does not know it yet)."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


_GROUP_RECLAIM = Script.named("pipeline_reclaim")
"""Takes a consumer group's idle pending entries (the group is an argument)."""


async def create_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create consumer group `group` on `stream` (and the stream) unless it exists."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def read_group(link: RedisLink, stream: str, group: str, consumer: str,
                     count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Up to `count` new entries of `stream` for `consumer` of `group` (XREADGROUP, not
    blocking), as (entry id, fields), over a link: the gateway's webhook deliverer and
    pipeline scheduler read every event this way."""
    reply = await link.execute("XREADGROUP", "GROUP", group, consumer, "COUNT", count,
                               "STREAMS", stream, ">")
    return [(entry_id, fields_of(fields)) for _, entries in reply or ()
            for entry_id, fields in entries]


async def reclaimed(client: aioredis.Redis, stream: str, group: str, consumer: str,
                    min_idle_ms: int, count: int) -> AsyncIterator[list[tuple[bytes, bytes]]]:
    """The entries of `group` pending longer than `min_idle_ms` (their consumer died), taken
    over by `consumer`: (entry id, `data`), `count` at most at a time."""
    cursor: bytes | str = "0-0"
    while True:
        cursor, *entries = await _GROUP_RECLAIM.run(
            client, [stream], [group, consumer, min_idle_ms, cursor, count])
        if entries:
            yield [(entry_id, data) for entry_id, data in entries]
        if cursor in (b"0-0", "0-0"):
            return


Call = tuple[Script, list[str], list[Any]]


# The scripts live in relay/lua/. Every entry of relay:events carries, beside `data`, the field
# `user`: the principal the execution belongs to. The gateways route events to subscribers by it
# without decoding them.

_ACCEPT = Script.named("accept", libs=("events", "sessions", "budgets", "blobs", "ratelimit"))

_START = Script.named("start", libs=("events",))

_SETTLE = Script.named("settle", libs=("events", "states", "sessions", "budgets", "blobs"))

_RENEW = Script.named("renew")

_RECLAIM = Script.named("reclaim")

_EMIT = Script.named("emit", libs=("events",))

_TAKE = Script.named("take")


SESSION_REFUSALS = ("no-session", "session-closed", "session-exhausted")
"""What the accept script answers for a session call it refuses."""


class RateWindow(NamedTuple):
    """A principal's rate-limit window, for the accept script to count its request in
    (relay.pipeline.ratelimit)."""

    key: str
    limit: int
    window_ms: int


class Accepted(NamedTuple):
    """What the accept script found: `new`, or the existing record's status and result."""

    status: str
    fingerprint: str
    result: bytes | None
    budget: str = ""
    """Status `budget` (over a budget of the principal's): `<seconds to wait> <budget id>
    <limit>`; `lower` (fits once its omitted limits are lowered): `<gas> <time>`, -1 for no
    limit (relay.budgets reads both)."""
    rate_used: int = 0
    """With a `rate` window: its count after this request (status `ratelimited`: over it,
    and nothing else was decided)."""
    rate_left_ms: int = 0
    """With a `rate` window: the ms it has left."""

    @property
    def is_new(self) -> bool:
        return self.status == "new"

    @property
    def name_moved(self) -> bool:
        return self.status == "moved"

    @property
    def forbidden(self) -> bool:
        return self.status == "forbidden"

    @property
    def full(self) -> bool:
        return self.status == "full"

    @property
    def hit(self) -> bool:
        """Answered from a memoized result (`result`), finished already (relay.memo)."""
        return self.status == "hit"

    @property
    def existing(self) -> bool:
        """A record of this request id exists already: the request is a repeat."""
        return self.status not in ("new", "moved", "forbidden", "full", "budget", "lower",
                                   "hit", "ratelimited", *SESSION_REFUSALS)



def _memo_arguments(memo: MemoAccept | None) -> list[Any]:
    """The accept script's ARGV[20..26] (see accept.lua)."""
    if memo is None:
        return ["", 0, "", "", "", "", 0]
    hit = memo.hit
    return [memo.memory, memo.ttl_ms, hit.of if hit else "", hit.response if hit else "",
            hit.complete if hit else "", hit.completed if hit else "", memo.record_ttl_ms]


class Commit(NamedTuple):
    """A successful session call's new state (stored already: relay.states), for its settle."""

    base: str
    """The state the call started from ("" for the module's fresh state)."""
    state_cid: str
    size: int


def priority_of(request: WasmExecRequested) -> Priority:
    """The request's priority (its entry leaves `normal` out)."""
    return "normal" if request.priority is UNSET else request.priority


Entry = bytes
"""What an executor holds an entry by: its id on `relay:requests`, or `<priority>/<id>` on the
high or low stream (each stream numbers its own entries: two can hold the same id)."""


def entry_of(priority: str, entry_id: bytes) -> Entry:
    return entry_id if priority == "normal" else priority.encode() + b"/" + entry_id


def _locate(entry: Entry) -> tuple[str, bytes]:
    """(priority, id on its stream)."""
    level, slash, entry_id = entry.partition(b"/")
    return (level.decode(), entry_id) if slash else ("normal", entry)


def _by_level(entries: list[Entry]) -> dict[str, list[bytes]]:
    """Entries' ids on each stream that holds some."""
    by_level: dict[str, list[bytes]] = {}
    for entry in entries:
        level, entry_id = _locate(entry)
        by_level.setdefault(level, []).append(entry_id)
    return by_level


Verdict = Literal["started", "finished", "parked", "lost"]
"""What the start script decided: run it; nothing to run (it has a result); parked, as its
principal has no place free (the entry went to its waiting list); or not this consumer's entry
any more (a peer took it over)."""
_VERDICTS: dict[int, Verdict] = {1: "started", 0: "finished", 2: "parked", -1: "lost"}


class Bus:
    """Publish, read and settle executions on the two streams.

    Concurrent calls of one kind are coalesced into one pipeline (`Batcher`), so a busy gateway
    or executor pays one round trip per batch rather than per execution. The scripts of the
    execute path, and the executors' reads, go over links (relay.redislink).
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, *, events_retention: int,
                 requests_retention: int, max_queue: int = 2**62,
                 starvation_ms: int = 5000) -> None:
        self.client = client
        self.link = shared_link(client)
        self._reader: RedisLink | None = None
        """The executor's link for its blocking reads, made on its first."""
        self.keys = keys
        self.events_retention = events_retention
        self.requests_retention = requests_retention
        self.max_queue = max_queue
        """Accepted executions not yet started, past which accept answers `full`."""
        self._accepts = Batcher(self._send)
        self._starts = Batcher(self._send)
        self._finishes = Batcher(self._send)
        self._emits = Batcher(self._send)
        self.starvation_ms = starvation_ms
        """An entry waiting longer than this is read before any accepted after it, whatever
        their priorities (RELAY_PRIORITY_STARVATION_MS)."""
        self._streams = [keys.requests_of(priority) for priority in PRIORITIES]
        self._cursors = dict.fromkeys(PRIORITIES, b"0-0")
        """Where the next XAUTOCLAIM scan of each requests stream goes on from."""
        self._drained: list[bytes] | None = None
        """Each requests stream's last delivered id when the last read found them all drained
        (None: it did not), from which the next read waits for new entries."""

    async def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """One script, over the link (loaded first if Redis does not know it); an error reply
        is raised."""
        [reply] = await self._send([(script, keys, args)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _send(self, calls: list[Call]) -> list[Any]:
        """Run scripts in one pipeline; load them and rerun the ones Redis did not know."""
        results = await self.link.pipeline([script.command(keys, args)
                                            for script, keys, args in calls])
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:  # first use on this server, or after SCRIPT FLUSH / a restart
            for script in {calls[i][0] for i in unknown}:
                await self.client.script_load(script.source)
            retried = await self._send([calls[i] for i in unknown])
            for i, result in zip(unknown, retried, strict=True):
                results[i] = result
        return results

    # --- gateway ---

    async def accept(self, request: WasmExecRequested, fingerprint: str,
                     name: GlyphName | None = None, *, permitted: bool = True,
                     max_active: int = 2**62, explicit: frozenset[str] = frozenset(),
                     memo: MemoAccept | None = None, callback: bytes = b"",
                     rate: RateWindow | None = None) -> Accepted:
        """Claim `request.request_id` and enqueue it, unless a live record exists already.

        With `name`, only while that name still points at `request.cid`; otherwise the status
        is `moved` and nothing happened. Not `permitted`: an existing record is still reported
        (a replay needs no new authorization) but nothing new is queued: status `forbidden`.
        `max_active`: the principal's cap on executions running or paused at once, kept in the
        record for the start script. A session call (`request.session_id`) is refused with
        status `no-session`, `session-closed` or `session-exhausted` (its `explicit` limits
        over what remains); otherwise it waits behind the session's unfinished calls. A new
        execution reserves its `max_gas`, `max_time` and one execution in every budget of its
        principal (relay.budgets), or is refused: status `budget`, or `lower` when it would fit
        with the limits it left out (not in `explicit`) lowered (see `Accepted.budget`).
        With `memo` (relay.memo), a new execution is answered by its hit, if it has one and the
        entry is unchanged (status `hit`, its `result` the response); otherwise a success of it
        becomes the entry.
        `callback`: the JSON of its webhook callback (relay.webhooks), kept in a new record.
        `rate`: the request is counted in this window first, and refused (status `ratelimited`)
        when over its limit.
        """
        keys = self.keys
        name_key, tag = (keys.name(name.name), name.tag) if name else (keys.queued, "")
        session = request.session_id or ""
        status, found_fingerprint, result, budget, rate_used, rate_left = await self._accepts((
            _ACCEPT,
            [keys.execution(request.request_id), keys.requests_of(priority_of(request)),
             keys.events, keys.queued, name_key,
             keys.session(session) if session else keys.queued,
             memo.key if memo else keys.queued, keys.queued_of(priority_of(request)),
             rate.key if rate else keys.queued],
            [
                request.user_id,
                fingerprint,
                request.cid,
                request.timestamp,
                encode(request),
                queued_template(request.request_id, request.cid, request.timestamp,
                                request.session_id, request.pipeline_id),
                self.events_retention,
                self.requests_retention,
                tag,
                "0" if permitted else "1",
                self.max_queue,
                max_active,
                session,
                keys.prefix,
                "1" if "max_gas" in explicit else "0",
                request.policy.max_gas,
                "1" if "max_time" in explicit else "0",
                request.policy.max_time,
                request.request_id,
                *_memo_arguments(memo),
                request.pipeline_id or "",
                memo.stack if memo else "",
                rate.limit if rate else "",
                rate.window_ms if rate else "",
                request.batch_id or "",  # a batch's item's events are followed too
                callback,  # the last argument: accept.lua reads it as ARGV[#ARGV]
            ],
        ))
        return Accepted(status.decode(), found_fingerprint.decode(), result, budget.decode(),
                        rate_used, rate_left)

    # --- executor ---

    async def ensure_group(self) -> None:
        """Create the executors' group on every requests stream (idempotent); both services
        call it at start."""
        for stream in self._streams:
            await create_group(self.client, stream, Keys.EXECUTOR_GROUP)

    async def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[Entry, bytes]]:
        """Up to `count` new request entries for this consumer, (entry, `data`), in the order
        to start them: high before normal before low, except that an entry waiting longer than
        `starvation_ms` comes before every entry accepted after it. One round trip while there
        is work. Once a read found the streams drained, the next one waits up to `block_ms`
        for an entry added since, and takes as above (none if a peer was faster), also in one
        round trip."""
        take: Call = (_TAKE, self._streams, [Keys.EXECUTOR_GROUP, consumer, count,
                                            self.starvation_ms])
        if self._drained is None or block_ms <= 0:
            [reply] = await self._send([take])
            return await self._taken(reply, count)
        # XREAD, not XREADGROUP: it only wakes this reader, taking nothing, so the take script
        # decides what is taken; from each stream's last delivered id at the last take, so an
        # entry added since wakes it at once. Sent with the script in one pipeline: Redis runs
        # the script as soon as the read returns, without another round trip. The script is
        # given those ids too: what was added since on one stream alone, it takes at less cost.
        if self._reader is None:
            self._reader = reader_link(self.client)
        _, reply = await self._reader.pipeline(
            [("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", *self._streams,
              *self._drained), _TAKE.command(take[1], [*take[2], *self._drained])],
            block_ms=block_ms)
        if isinstance(reply, NoScriptError):  # first use on this server: load it, take again
            [reply] = await self._send([take])
        return await self._taken(reply, count)

    async def close_reader(self) -> None:
        """Close the link `read` blocks on (the executor stops)."""
        if self._reader is not None:
            await self._reader.aclose()
            self._reader = None

    async def _taken(self, reply: Any, count: int) -> list[tuple[Entry, bytes]]:
        """The take script's entries. Fewer than `count`: every stream is drained, and
        `_drained` holds their last delivered ids; else it is None."""
        self._drained = None
        if isinstance(reply, redis.ResponseError) and "NOGROUP" in str(reply):
            await self.ensure_group()  # a stream was deleted under us: recreate and go on
            return []
        if isinstance(reply, Exception):
            raise reply
        tails, entries = reply[:len(PRIORITIES)], reply[len(PRIORITIES):]
        if len(entries) < count:
            self._drained = tails
        return [(entry_of(PRIORITIES[level - 1], entry_id), data)
                for level, entry_id, data in entries]

    async def start(self, started: ExecutionStarted, request: WasmExecRequested,
                    entry: Entry, consumer: str) -> Verdict:
        """Mark the execution running and emit `execution_started`, taking one of its
        principal's places; or park the entry `consumer` holds, if the principal has none free
        (see `Verdict`)."""
        keys = self.keys
        level, entry_id = _locate(entry)
        priority = priority_of(request)
        verdict = await self._starts((
            _START,
            [keys.execution(started.request_id), keys.events, keys.queued,
             keys.active(request.user_id), keys.waiting(request.user_id, priority),
             keys.requests_of(level), keys.deliveries_of(level), keys.queued_of(priority)],
            [started.executor_node, encode(started), self.events_retention, request.request_id,
             entry_id, Keys.EXECUTOR_GROUP, consumer],
        ))
        return _VERDICTS[int(verdict)]

    async def finish(self, entry_id: Entry, request: WasmExecRequested,
                     response: ExecuteResponse, ttl_ms: int, consumer: str,
                     started: ExecutionStarted | None = None,
                     commit: Commit | None = None) -> bool:
        """Store the result (first writer wins), emit the terminal events, acknowledge; only
        while `consumer` still holds the entry. True when this call wrote the result.

        `started`: the run never called `start`, so this emits `execution_started` first.
        `commit`: a successful session call's new state, committed with the result only while
        the session's state is still the one the call started from.
        """
        return await self._settle(request, response, ttl_ms, entry_id=entry_id,
                                  consumer=consumer, started=started, commit=commit)

    async def cancel_queued(self, request: WasmExecRequested, response: ExecuteResponse,
                            ttl_ms: int) -> bool:
        """Settle an execution no executor has started yet as `response` (cancelled); False
        when it is no longer queued."""
        return await self._settle(request, response, ttl_ms, only_if="queued")

    async def _settle(self, request: WasmExecRequested, response: ExecuteResponse, ttl_ms: int,
                      *, entry_id: Entry = b"", only_if: str = "", consumer: str = "",
                      started: ExecutionStarted | None = None,
                      commit: Commit | None = None) -> bool:
        keys = self.keys
        session = request.session_id or ""
        priority = priority_of(request)
        # The entry's stream, to acknowledge it on (a cancel of a queued one has no entry).
        level, entry_id = _locate(entry_id) if entry_id else (priority, b"")
        tagged = session or UNSET  # the session a call's events carry
        if request.memoize is True and response.cached is UNSET:
            response = msgspec.structs.replace(response, cached=False)  # it ran (relay.memo)
        terminal: ExecutionComplete | ExecutionError
        if response.error is None:
            terminal = ExecutionComplete(request_id=request.request_id, duration=response.duration,
                                         gas_used=response.gas_used, output=response.output,
                                         timestamp=now_iso(), session_id=tagged,
                                         cached=response.cached)
            status = "completed"
            terminal.output_ref = response.output_ref  # set: a blob (relay.blobs)
        else:
            terminal = ExecutionError(request_id=request.request_id, error=response.error,
                                      timestamp=now_iso(), session_id=tagged)
            status = "cancelled" if response.error.code == "cancelled" else "failed"
        if request.pipeline_id is not None:
            terminal.pipeline_id = request.pipeline_id  # a pipeline node's events carry it
        completed = WasmExecCompleted(
            **msgspec.structs.asdict(request),
            success=response.success, output=response.output, error=response.error,
            gas_used=response.gas_used, duration=response.duration,
            executed_at=response.executed_at, state_cid=response.state_cid,
            cached=response.cached, memo_of=response.memo_of,
        )
        completed.output_ref = response.output_ref
        # Infrastructure failures are not kept as the answer: a retry of the same request runs.
        retryable = "1" if response.error is not None and response.error.code == "internal" else "0"
        written = await self._finishes((
            _SETTLE,
            [keys.execution(request.request_id), keys.events, keys.requests_of(level),
             keys.queued, keys.deliveries_of(level), keys.active(request.user_id),
             keys.waiting(request.user_id), keys.session(session) if session else keys.queued,
             keys.requests, keys.queued_of(priority)],
            [Keys.EXECUTOR_GROUP, entry_id, encode(response), status, retryable,
             encode(terminal), encode(completed), self.events_retention, ttl_ms, only_if,
             consumer, encode(started) if started else b"", request.request_id,
             self.requests_retention, session, keys.prefix,
             commit.base if commit else "", commit.state_cid if commit else "",
             commit.size if commit else 0, response.gas_used, response.duration,
             response.output_ref.cid if isinstance(response.output_ref, OutputRef) else ""],
        ))
        return bool(written == 1)

    async def emit(self, request_id: str, event: BusMessage, status: str = "") -> bool:
        """Append an event of a running execution (and set its status); False once it has a
        result, or for progress below what was already published."""
        gas = str(event.gas_used) if isinstance(event, ExecutionProgress) else ""
        emitted = await self._emits((
            _EMIT, [self.keys.execution(request_id), self.keys.events],
            [encode(event), self.events_retention, status, gas],
        ))
        return bool(emitted)

    async def refuse(self, refusal: ControlRefused) -> None:
        """Tell the gateway waiting on a control request that this executor refused it. Its
        `user` is empty, so no client stream carries it: it is an answer, not an event."""
        await self.client.xadd(self.keys.events, {"data": encode(refusal), "user": ""},
                               maxlen=self.events_retention, approximate=True)

    async def ack(self, entry: Entry) -> None:
        level, entry_id = _locate(entry)
        await self.client.xack(self.keys.requests_of(level), Keys.EXECUTOR_GROUP, entry_id)

    # --- leases: an executor holds each entry it runs; peers take over what lapses ---

    async def renew(self, consumer: str, entries: list[Entry]) -> set[Entry]:
        """Reset the idle time of the entries `consumer` still holds; returns those (the others
        were taken over by a peer after this executor stalled). One round trip."""
        by_level = _by_level(entries)
        if not by_level:
            return set()
        replies = await self._send([(_RENEW, [self.keys.requests_of(level)],
                                     [Keys.EXECUTOR_GROUP, consumer, *ids])
                                    for level, ids in by_level.items()])
        kept: set[Entry] = set()
        for level, reply in zip(by_level, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            kept.update(entry_of(level, entry_id) for entry_id in reply)
        return kept

    async def hand_back(self, consumer: str, entries: list[Entry]) -> None:
        """Make entries this executor will not finish claimable by peers at once."""
        for level, ids in _by_level(entries).items():
            await self.client.xclaim(self.keys.requests_of(level), Keys.EXECUTOR_GROUP,
                                     consumer, 0, ids, idle=2**40, justid=True)

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int, max_deliveries: int,
                      ) -> tuple[list[tuple[Entry, bytes]], list[tuple[Entry, bytes]]]:
        """Take over entries idle past their lease (their executor died or stalled), up to
        `count` in all, from the high stream first, then normal, then low.

        Returns (entries to run again, entries delivered more than `max_deliveries` times,
        which the caller dead-letters). Entries trimmed away meanwhile are acknowledged.
        """
        again: list[tuple[Entry, bytes]] = []
        dead: list[tuple[Entry, bytes]] = []
        for level in PRIORITIES:
            if count <= 0:
                break
            [reply] = await self._send([(
                _RECLAIM, [self.keys.requests_of(level), self.keys.deliveries_of(level)],
                [Keys.EXECUTOR_GROUP, consumer, min_idle_ms, self._cursors[level], count])])
            if isinstance(reply, Exception):
                raise reply
            self._cursors[level] = reply[0]
            for entry_id, reclaims, data in reply[1:]:
                # + the first delivery, which the take script made
                found = dead if reclaims + 1 > max_deliveries else again
                found.append((entry_of(level, entry_id), data))
                count -= 1
        return again, dead

    async def dead_letter(self, entry: Entry, data: bytes, reason: str) -> None:
        """Keep a request given up on in `relay:dead`, for an operator to look at: its `entry`
        id on its requests `stream`."""
        level, entry_id = _locate(entry)
        await self.client.xadd(self.keys.dead, {"entry": entry_id, "data": data,
                                                "stream": self.keys.requests_of(level),
                                                "reason": reason, "at": now_iso()},
                               maxlen=self.requests_retention, approximate=True)

    async def heartbeat(self, executor_node: str) -> None:
        await self.client.zadd(self.keys.executors, {executor_node: int(time.time() * 1000)})

    async def live_executors(self, ttl_ms: int) -> int:
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zremrangebyscore(self.keys.executors, 0, now_ms - 10 * ttl_ms)
        pipe.zcount(self.keys.executors, now_ms - ttl_ms, "+inf")
        _, count = await pipe.execute()
        return int(count)

    async def last_event_id(self) -> bytes:
        """The id of the newest entry of `relay:events` (`0-0` when empty)."""
        newest: list[Any] = await self.client.xrevrange(self.keys.events, count=1)
        return newest[0][0] if newest else b"0-0"
