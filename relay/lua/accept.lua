-- Accepts an execution: claims its record unless a live one exists (a replay or a join),
-- then emits `execution_queued` and enqueues the request, all or nothing. Refuses when the
-- glyph name the request used moved (`moved`), when not permitted (`forbidden`, only for a new
-- execution: a replay needs no new authorization) or when too much is queued (`full`).

-- A new execution joins its principal's list (relay.gateway.listing: GET /executions): members
-- `<acceptance time, ms, 13 digits>-<sequence, 10 digits>:<request id>` (the time and sequence
-- of its `execution_queued` id, which only grows), all of score 0, so that the list is in
-- acceptance order by lex, executions of one millisecond too, and a page starts exactly after
-- the last one's member. The record names its
-- member ('listed'), so an execution accepted again (retryable) is listed once. The list keeps
-- the newest 100000 and lives a week past the last one; ids whose record has expired are
-- dropped as the list is read. (Numbers given to redis.call as strings: Redis formats a Lua
-- number with snprintf on every call, a few thousand instructions each.)
local LISTED_TRIM, LISTED_TTL_MS = '-100001', '604800000'  -- ranks 0 to TRIM: all but 100000
-- Lists the execution as of `event_id`, its `execution_queued`. Returns its member, for the
-- record's `listed`.
local function list_execution(previous, event_id)
  local list = ARGV[14] .. ':executions:' .. ARGV[1]
  local ms, seq = string.match(event_id, '^(%d+)-(%d+)$')
  local member = string.format('%013d-%010d:%s', tonumber(ms), tonumber(seq), ARGV[19])
  if previous then
    redis.call('ZREM', list, previous)
  end
  redis.call('ZADD', list, '0', member)
  redis.call('ZREMRANGEBYRANK', list, '0', LISTED_TRIM)
  redis.call('PEXPIRE', list, LISTED_TTL_MS)
  return member
end
-- The request's count under its principal's rate limit (ratelimit.lib.lua) comes first: a
-- request over it is refused (`ratelimited`) before anything else is decided, and every reply
-- ends with the window's count and the ms it has left. KEYS[9] the window, ARGV[29] the limit
-- ('' when not limited here: unlimited, or counted already), ARGV[30] the window's length.
local rate_used, rate_left = 0, 0
-- Its events are followed (events.lib.lua) when it has a webhook callback (ARGV[#ARGV]), is a
-- pipeline's node (ARGV[27]) or a batch's item (ARGV[31], its batch id): the record keeps the
-- three, from which the scripts that emit its later events tell the same.
local followed = ARGV[#ARGV] ~= '' or ARGV[27] ~= '' or ARGV[31] ~= ''
if ARGV[29] ~= '' then
  rate_used, rate_left = rate_count(KEYS[9], '1', ARGV[30])
  if rate_used > tonumber(ARGV[29]) then
    return {'ratelimited', '', false, '', rate_used, rate_left}
  end
end

local function accept()
  if ARGV[9] ~= '' then
    local bound = redis.call('HGET', KEYS[5], ARGV[9])
    if bound ~= ARGV[3] then
      return {'moved', '', false}
    end
  end
  local found = redis.call('HMGET', KEYS[1], 'status', 'fingerprint', 'result', 'retryable',
                           'listed')
  if found[1] and found[4] ~= '1' then
    return {found[1], found[2], found[3]}
  end
  if ARGV[10] == '1' then
    return {'forbidden', '', false}
  end
  -- Memoized results (relay.memo). KEYS[7] the entry; ARGV[20] the memory a run of this request
  -- would record in it ('' for no memo), ARGV[28] its stack, ARGV[21] its TTL. A hit, when the
  -- entry is still the one the gateway read (ARGV[22], its producing request id), is answered
  -- with the bodies made from it (ARGV[23..25]): finished at once, like any execution, with
  -- nothing queued and no budget reserved.
  -- A hit whose output is a blob (blobs.lib.lua) holds it as long as the record made from it; one
  -- whose blob has expired is a miss (it runs, and its settle stores the entry again).
  local function memo_blob_held(prefix, entry, ttl_ms)
    local blob = redis.call('HGET', entry, 'blob')
    return not blob or blob_hold(prefix, blob, ttl_ms)
  end
  if ARGV[20] ~= '' and ARGV[22] ~= '' and redis.call('HGET', KEYS[7], 'of') == ARGV[22]
      and memo_blob_held(ARGV[14], KEYS[7], ARGV[26]) then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'principal', ARGV[1], 'fingerprint', ARGV[2], 'status',
               'completed', 'cid', ARGV[3], 'created_at', ARGV[4], 'request', ARGV[5],
               'result', ARGV[23])
    if ARGV[#ARGV] ~= '' then  -- its webhook callback, as below
      redis.call('HSET', KEYS[1], 'callback', ARGV[#ARGV])
    end
    local ids = {}
    for _, event in ipairs({ARGV[6] .. '0}', ARGV[24]}) do
      table.insert(ids, emit_event(KEYS[3], ARGV[7], event, ARGV[1], followed))
    end
    redis.call('RPUSH', KEYS[1] .. ':events', unpack(ids))  -- the execution's index, as below
    emit_event(KEYS[3], ARGV[7], ARGV[25], ARGV[1], followed)
    redis.call('HSET', KEYS[1], 'listed', list_execution(found[5], ids[1]))
    redis.call('PEXPIRE', KEYS[1], ARGV[26])
    redis.call('PEXPIRE', KEYS[1] .. ':events', ARGV[26])
    return {'hit', ARGV[2], ARGV[23]}
  end
  -- A session's call (sessions.lib.lua): refused when its session is not the caller's, closed or
  -- out of budget; queued behind the session's unfinished calls.
  local session = ARGV[13]
  if session ~= '' then
    local refusal = session_admit(KEYS[6], ARGV[1], ARGV[16], ARGV[15], ARGV[18], ARGV[17])
    if refusal then
      return {refusal, '', false}
    end
  end
  -- Budgets (budgets.lib.lua): a new execution must fit every budget of its principal; refused
  -- (`budget`), or sent back to have its omitted limits lowered (`lower`). Reserved below.
  local budget_verdict, budget_windows = budgets_check(ARGV[14], ARGV[1], ARGV[16], ARGV[15],
                                                       ARGV[18], ARGV[17])
  if budget_verdict ~= 'ok' then
    return {budget_verdict, '', false, budget_windows}
  end
  if tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[11]) then
    return {'full', '', false}
  end
  local position = redis.call('INCR', KEYS[4]) - 1
  if position < 0 then
    redis.call('SET', KEYS[4], 1)
    position = 0
  end
  redis.call('INCR', KEYS[8])  -- its priority's part of the count (relay.keys.Keys.queued_of)
  local queued = emit_event(KEYS[3], ARGV[7], ARGV[6] .. position .. '}', ARGV[1], followed)
  -- A record found is an earlier attempt's (retryable): replaced whole.
  local again = found[1] or found[2]
  if again then
    redis.call('DEL', KEYS[1])
  end
  -- 'max_active': the principal's cap on running and paused executions, as it was at accept
  -- (start.lua).
  redis.call('HSET', KEYS[1], 'principal', ARGV[1], 'fingerprint', ARGV[2], 'status', 'queued',
             'cid', ARGV[3], 'created_at', ARGV[4], 'request', ARGV[5], 'max_active', ARGV[12],
             'listed', list_execution(found[5], queued))
  budgets_reserve(KEYS[1], budget_windows, ARGV[16], ARGV[18], true)  -- budgets.lib.lua
  if session ~= '' then
    -- 'stream': the requests stream of its priority, where the settle of the call before it
    -- publishes it (sessions.lib.lua).
    redis.call('HSET', KEYS[1], 'session', session, 'stream', KEYS[2])
  end
  if ARGV[27] ~= '' then  -- a pipeline node's (GET /executions/{id} shows it)
    redis.call('HSET', KEYS[1], 'pipeline', ARGV[27])
  end
  -- The last argument: the execution's webhook callback, JSON ('' for none), which the
  -- deliverer reads with the record (relay.deliverer).
  if ARGV[#ARGV] ~= '' then
    redis.call('HSET', KEYS[1], 'callback', ARGV[#ARGV])
  end
  if ARGV[31] ~= '' then  -- a batch's item's
    redis.call('HSET', KEYS[1], 'batch', ARGV[31])
  end
  if ARGV[20] ~= '' then  -- its settle stores a success as the memo entry (settle.lua)
    redis.call('HSET', KEYS[1], 'memo', KEYS[7], 'memo_memory', ARGV[20], 'memo_ttl', ARGV[21],
               'memo_stack', ARGV[28])
  end
  -- The execution's index of its client events (relay.keys.Keys.execution_events), so its
  -- history is read without scanning the stream. It lives as long as the record (an earlier
  -- attempt's events stay listed, as they stay in the stream, and lose their expiry).
  redis.call('RPUSH', KEYS[1] .. ':events', queued)
  if again then
    redis.call('PERSIST', KEYS[1] .. ':events')
  end
  if session == '' or session_enqueue(ARGV[14], KEYS[6], session, ARGV[19]) then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'data', ARGV[5])
  end
  return {'new', ARGV[2], false}
end

local reply = accept()
reply[4] = reply[4] or ''
reply[5], reply[6] = rate_used, rate_left
return reply
