-- Settles an execution: the executor when a run ends (with the entry to acknowledge), or the
-- gateway cancelling one still queued (no entry; only while its status is still `queued`).
if ARGV[2] ~= '' then
  -- A run whose lease a peer took over (it stalled) must not write anything.
  local pending = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], '1')
  if not pending[1] or pending[1][2] ~= ARGV[11] then
    return -1
  end
  redis.call('HDEL', KEYS[5], ARGV[2])
end
local written = 0
local record = redis.call('HMGET', KEYS[1], 'principal', 'status', 'result', 'max_active',
                          'request', 'budgets', 'callback', 'pipeline', 'batch', 'started',
                          'memo', 'memo_memory', 'memo_ttl', 'memo_stack')
-- Its events are copied for the deliverer and the scheduler (events.lib.lua) when it has a
-- callback, or is a pipeline's node or a batch's item (accept.lua).
local followed = record[7] or record[8] or record[9]
-- A session call's new state commits only on the state it started from (sessions.lib.lua),
-- and only once it holds a reference to it (a stored state whose pages all still exist).
local session, new_state = ARGV[15], ARGV[18]
if session ~= '' and new_state ~= '' and record[1] and not record[3]
    and not (session_fenced(KEYS[8], ARGV[17]) and state_ref(ARGV[16], new_state)) then
  return -1
end
-- A large output's blob (blobs.lib.lua) lives at least as long as the result naming it; one
-- that expired before this settle (its executor stalled that long) cannot be named: the entry
-- stays pending and the run is done again.
if ARGV[22] ~= '' and record[1] and not record[3] and not blob_hold(ARGV[16], ARGV[22], ARGV[9])
    then
  return -1
end
if record[1] and not record[3] and (ARGV[10] == '' or record[2] == ARGV[10]) then
  -- 'started': it left the queue (start.lua, or here): counted out of it once.
  local index = {}  -- its events for the execution's index (accept.lua)
  if not record[10] then
    redis.call('DECR', KEYS[4])
    redis.call('DECR', KEYS[10])  -- its priority's part (relay.keys.Keys.queued_of)
    if ARGV[12] ~= '' then
      table.insert(index, emit_event(KEYS[2], ARGV[8], ARGV[12], record[1], followed))
    end
  end
  redis.call('HSET', KEYS[1], 'result', ARGV[3], 'status', ARGV[4], 'retryable', ARGV[5],
             'started', '1')
  table.insert(index, emit_event(KEYS[2], ARGV[8], ARGV[6], record[1], followed))
  redis.call('RPUSH', KEYS[1] .. ':events', unpack(index))
  -- wasm_exec_completed is for bus consumers, not clients: not in the index.
  emit_event(KEYS[2], ARGV[8], ARGV[7], record[1], followed)
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
  redis.call('PEXPIRE', KEYS[1] .. ':events', ARGV[9])
  written = 1
  -- Budgets (budgets.lib.lua): the reservation becomes what the run measured, once.
  budgets_settle(ARGV[16], record[6], ARGV[20], ARGV[21], ARGV[5])
  -- Memoized results (relay.memo): a success of a request whose accept named a memo entry
  -- becomes that entry (replacing an older one), for RELAY_MEMO_TTL. A failure never does.
  local memo = {record[11], record[12], record[13], record[14]}
  if ARGV[4] == 'completed' then
    if memo[1] then
      redis.call('DEL', memo[1])
      redis.call('HSET', memo[1], 'of', ARGV[13], 'result', ARGV[3], 'gas', ARGV[20],
                 'memory', memo[2])
      if memo[4] then  -- a record accepted before `max_stack` existed has none
        redis.call('HSET', memo[1], 'stack', memo[4])
      end
      redis.call('PEXPIRE', memo[1], memo[3])
      if ARGV[22] ~= '' then  -- its output's blob lives as long as the entry (blobs.lib.lua)
        redis.call('HSET', memo[1], 'blob', ARGV[22])
        blob_hold(ARGV[16], ARGV[22], memo[3])
      end
    end
  end
  if session ~= '' then
    session_settled(ARGV[16], KEYS[8], session, ARGV[13], ARGV[20], ARGV[21], ARGV[3],
                    new_state, ARGV[19], KEYS[9], ARGV[14])
  end
end
-- Places (see start.lua). Once the execution has a result its place is given back, whoever
-- settles it, exactly once (SREM); the principal's parked entries then go back to their
-- streams, high ones first, as many as places are free, and at least one (records accepted
-- under other caps may differ). A settle refused above (lease lost) or a queued-only cancel of
-- a started run frees nothing. KEYS[7] is the principal's normal waiting list and KEYS[9]
-- `relay:requests`: the high and low ones are named after them (relay.keys.Keys.waiting).
if written == 1 or record[3] or not record[1] then
  local levels = {':high', '', ':low'}
  if redis.call('SREM', KEYS[6], ARGV[13]) == 1 then
    local free = math.max(tonumber(record[4] or '1') - redis.call('SCARD', KEYS[6]), 1)
    for _, level in ipairs(levels) do
      while free > 0 do
        local parked = redis.call('LPOP', KEYS[7] .. level)
        if not parked then break end
        redis.call('XADD', KEYS[9] .. level, 'MAXLEN', '~', ARGV[14], '*', 'data', parked)
        free = free - 1
      end
    end
  elseif written == 1 and ARGV[10] == 'queued' and record[5] then
    for _, level in ipairs(levels) do  -- cancelled while it may have been parked
      redis.call('LREM', KEYS[7] .. level, 1, record[5])
    end
  end
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
end
return written
