-- Sessions (relay.sessions): what the accept and settle scripts do for a session's call.
-- A session's unfinished calls wait in its calls list in acceptance order; only the head is on
-- the requests stream, so calls run one at a time, in order, on any executor. The keys built
-- here from the prefix (an execution's record, the expiry index) are a known compromise: one
-- Redis serves them all (see docs/architecture.md).

local function session_now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end

-- The session's idle expiry moves to `ttl` after now.
local function session_touch(prefix, key, session_id)
  local ttl = tonumber(redis.call('HGET', key, 'ttl') or '0')
  local expires = session_now_ms() + ttl
  redis.call('HSET', key, 'expires_ms', expires)
  redis.call('ZADD', prefix .. ':session-expiry', expires, session_id)
end

-- nil when the principal may call the session now; otherwise the refusal: 'no-session'
-- (missing, or another principal's), 'session-closed' or 'session-exhausted' (a total used up,
-- or an explicit limit over what remains).
local function session_admit(key, principal, gas, gas_explicit, time_ms, time_explicit)
  local s = redis.call('HMGET', key, 'principal', 'closed', 'budget_calls', 'accepted',
                       'budget_gas', 'gas_used', 'budget_time', 'time_used')
  if s[1] ~= principal then
    return 'no-session'
  end
  if s[2] == '1' then
    return 'session-closed'
  end
  if s[3] ~= '' and tonumber(s[4]) >= tonumber(s[3]) then
    return 'session-exhausted'
  end
  local limits = {{s[5], s[6], gas, gas_explicit}, {s[7], s[8], time_ms, time_explicit}}
  for _, limit in ipairs(limits) do
    if limit[1] ~= '' then
      local remaining = tonumber(limit[1]) - tonumber(limit[2])
      if remaining <= 0 or (limit[4] == '1' and tonumber(limit[3]) > remaining) then
        return 'session-exhausted'
      end
    end
  end
  return nil
end

-- Queues an accepted call; true when it is the only unfinished one (publish it now).
local function session_enqueue(prefix, key, session_id, request_id)
  redis.call('HINCRBY', key, 'accepted', 1)
  session_touch(prefix, key, session_id)
  local history = key .. ':history'
  redis.call('RPUSH', history, request_id)
  redis.call('LTRIM', history, -1000, -1)
  return redis.call('RPUSH', key .. ':calls', request_id) == 1
end

-- Whether a successful call may commit: the session's state is still the one it started from.
local function session_fenced(key, base_state)
  return (redis.call('HGET', key, 'state_cid') or '') == base_state
end

-- Counts a finished call (its use, its result, its state when it succeeded: the settle script
-- took a reference to `new_state` already) and publishes the next call when this one was
-- running (`requests`: relay:requests). `state_unref` comes from states.lib.lua.
local function session_settled(prefix, key, session_id, request_id, gas, time_ms, result,
                               new_state, state_size, requests, retention)
  if redis.call('EXISTS', key) == 0 then
    return
  end
  redis.call('HINCRBY', key, 'calls', 1)
  redis.call('HINCRBY', key, 'gas_used', gas)
  redis.call('HINCRBYFLOAT', key, 'time_used', time_ms)
  redis.call('HSET', key, 'last_result', result)
  if new_state ~= '' then
    local old = redis.call('HGET', key, 'state_cid') or ''
    redis.call('HSET', key, 'state_cid', new_state, 'state_size', state_size)
    state_unref(prefix, old)
  end
  local calls = key .. ':calls'
  local head = redis.call('LINDEX', calls, 0)
  redis.call('LREM', calls, 1, request_id)
  session_touch(prefix, key, session_id)
  if head ~= request_id then
    return
  end
  while true do
    local next_id = redis.call('LINDEX', calls, 0)
    if not next_id then
      return
    end
    -- On its priority's stream (accept.lua records it; `requests`, the normal one, for a call
    -- accepted before priorities existed).
    local next_call = redis.call('HMGET', prefix .. ':exec:' .. next_id, 'request', 'stream')
    if next_call[1] then
      redis.call('XADD', next_call[2] or requests, 'MAXLEN', '~', retention, '*', 'data',
                 next_call[1])
      return
    end
    redis.call('LPOP', calls)  -- its record is gone: nothing left to run
  end
end
