-- Budgets (relay.budgets): what the accept, settle and budget scripts do with a principal's
-- budgets. The keys are built here from the prefix, like the sessions' (one Redis serves them
-- all; see docs/architecture.md), as relay.keys.Keys builds them:
--   <prefix>:budgets:<principal>   set of the ids of the principal's budgets
--   <prefix>:budget:<id>           hash: window, created_ms, max_gas, max_time, max_executions
--   <prefix>:budget:<id>:<start>   hash: its use of the window that starts at <start> (ms):
--                                  gas_used, time_used, executions, reserved_gas, reserved_time
-- An execution keeps what it reserved in its record, field `budgets`: `<id> <start> <gas>
-- <time>` per budget, `;` between, so its settle releases it from the window it was reserved
-- in, even once that window has rolled over. Times are Redis's clock, so gateways' clocks need
-- not agree.

local function budget_now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end

-- One budget's limits (nil: none) and its use of the window that starts at `start` (nil: the
-- one `now` is in); nil when the budget is gone.
local function budget_window(prefix, id, now, start)
  local key = prefix .. ':budget:' .. id
  local b = redis.call('HMGET', key, 'window', 'created_ms', 'max_gas', 'max_time',
                       'max_executions')
  if not b[1] then
    return nil
  end
  local window, created = tonumber(b[1]), tonumber(b[2])
  start = tonumber(start) or created + math.floor(math.max(now - created, 0) / window) * window
  local usage = key .. ':' .. string.format('%d', start)
  local u = redis.call('HMGET', usage, 'gas_used', 'time_used', 'executions', 'reserved_gas',
                       'reserved_time')
  return {id = id, usage = usage, start = start, ends = start + window, window = window,
          max_gas = tonumber(b[3]), max_time = tonumber(b[4]),
          max_executions = tonumber(b[5]), gas_used = tonumber(u[1]) or 0,
          time_used = tonumber(u[2]) or 0, executions = tonumber(u[3]) or 0,
          reserved_gas = tonumber(u[4]) or 0, reserved_time = tonumber(u[5]) or 0}
end

-- How long a reservation of `gas` and `time` (nil: not asked; and one execution when `count`)
-- must wait in window `w`, and the limit that holds it: 0 when it fits; 1 s when only open
-- reservations stand in the way (each ends within its execution's max_time); else until the
-- window ends. A limit the request left out (`*_lowerable`) is lowered to what remains, so it
-- fits while anything does.
local function budget_wait(w, now, gas, gas_lowerable, time, time_lowerable, count)
  local until_end = math.max(1, math.ceil((w.ends - now) / 1000))
  if count and w.max_executions and w.executions >= w.max_executions then
    return until_end, 'executions'
  end
  local wait, what = 0, nil
  local limits = {{'gas', w.max_gas, w.gas_used, w.reserved_gas, gas, gas_lowerable},
                  {'time', w.max_time, w.time_used, w.reserved_time, time, time_lowerable}}
  for _, limit in ipairs(limits) do
    local name, max, used, reserved, ask, lowerable = unpack(limit, 1, 6)  -- nils inside
    if max and ask then
      local need = lowerable and 1 or ask
      if used + need > max then
        return until_end, name
      end
      if used + reserved + need > max then
        wait, what = 1, name
      end
    end
  end
  return wait, what
end

-- The reservation a record keeps (its `budgets` field), by budget id.
local function budget_held(field)
  local held, order = {}, {}
  for id, start, gas, time in string.gmatch(field or '', '([%w_]+) (%d+) (%d+) (%d+)') do
    held[id] = {start = start, gas = tonumber(gas), time = tonumber(time)}
    table.insert(order, id)
  end
  return held, order
end

-- Whether one more execution of `principal` reserving `gas` and `time` (ms) fits every one of
-- its budgets, in their current windows. `*_explicit` is '1' for a limit the request set: it
-- is refused when over what remains, where an omitted one is lowered to that. Returns
--   'ok', the windows to reserve in (none for a principal without budgets);
--   'lower', '<gas> <time>': it fits once its omitted limits are lowered to those (-1: no
--     limit); the caller asks again with them;
--   'budget', '<seconds to wait> <budget id> <limit>': it does not fit.
local function budgets_check(prefix, principal, gas, gas_explicit, time, time_explicit)
  local ids = redis.call('SMEMBERS', prefix .. ':budgets:' .. principal)
  if #ids == 0 then
    return 'ok', {}
  end
  local now = budget_now_ms()
  gas, time = tonumber(gas), tonumber(time)
  local windows, longest, blocker, gas_left, time_left = {}, 0, '', -1, -1
  for _, id in ipairs(ids) do
    local w = budget_window(prefix, id, now, nil)
    if w then
      table.insert(windows, w)
      local wait, what = budget_wait(w, now, gas, gas_explicit ~= '1', time,
                                     time_explicit ~= '1', true)
      if wait > longest then
        longest, blocker = wait, id .. ' ' .. what
      end
      if w.max_gas then
        local left = w.max_gas - w.gas_used - w.reserved_gas
        gas_left = gas_left < 0 and left or math.min(gas_left, left)
      end
      if w.max_time then
        local left = w.max_time - w.time_used - w.reserved_time
        time_left = time_left < 0 and left or math.min(time_left, left)
      end
    end
  end
  if longest > 0 then
    return 'budget', string.format('%d %s', longest, blocker)
  end
  if (gas_left >= 0 and gas > gas_left) or (time_left >= 0 and time > time_left) then
    return 'lower', string.format('%d %d', gas_left, time_left)
  end
  return 'ok', windows
end

-- Whether `gas` more for a running execution (additional_gas) fits every budget of its
-- principal: in the window the execution reserved in (`held`, its record's `budgets`), or the
-- current one for a budget created since. Returns 'ok' and the windows, or 'budget' as above.
local function budgets_check_more(prefix, principal, held, gas)
  local ids = redis.call('SMEMBERS', prefix .. ':budgets:' .. principal)
  local reserved = budget_held(held)
  local now = budget_now_ms()
  local windows, longest, blocker = {}, 0, ''
  for _, id in ipairs(ids) do
    local w = budget_window(prefix, id, now, reserved[id] and reserved[id].start)
    if w then
      table.insert(windows, w)
      local wait, what = budget_wait(w, now, gas, false, nil, false, false)
      if wait > longest then
        longest, blocker = wait, id .. ' ' .. what
      end
    end
  end
  if longest > 0 then
    return 'budget', string.format('%d %s', longest, blocker)
  end
  return 'ok', windows
end

-- Reserves `gas` and `time` (and one execution when `count`) in each window, and adds them to
-- `held`, the reservation the execution's record keeps (nil for a record just written). A
-- window's use expires a window after it ends.
local function budgets_reserve(record_key, windows, gas, time, count, held_field)
  if #windows == 0 then
    return
  end
  local held, order = budget_held(held_field)
  for _, w in ipairs(windows) do
    redis.call('HINCRBY', w.usage, 'reserved_gas', gas)
    redis.call('HINCRBY', w.usage, 'reserved_time', time)
    if count then
      redis.call('HINCRBY', w.usage, 'executions', 1)
    end
    redis.call('PEXPIREAT', w.usage, w.ends + w.window)
    local h = held[w.id]
    if h then
      h.gas, h.time = h.gas + gas, h.time + time
    else
      held[w.id] = {start = w.start, gas = gas, time = time}
      table.insert(order, w.id)
    end
  end
  local parts = {}
  for _, id in ipairs(order) do
    local h = held[id]
    table.insert(parts, string.format('%s %d %d %d', id, h.start, h.gas, h.time))
  end
  redis.call('HSET', record_key, 'budgets', table.concat(parts, ';'))
end

-- The reservation `held` (a record's `budgets`) becomes what the run measured: `gas`, and
-- `duration` (ms) rounded up, each at most what it reserved (the sandbox stops a run at its
-- limits; a deadline seen a tick late is not charged). A run that ended `internal`
-- (`retryable`: not kept, so a retry runs again) does not count as an execution. A window
-- whose use has expired is long over: nothing to release.
local function budgets_settle(prefix, held, gas, duration, retryable)
  if not held then
    return
  end
  gas, duration = tonumber(gas), math.ceil(tonumber(duration))
  for id, start, reserved_gas, reserved_time in
      string.gmatch(held, '([%w_]+) (%d+) (%d+) (%d+)') do
    local usage = prefix .. ':budget:' .. id .. ':' .. start
    if redis.call('EXISTS', usage) == 1 then
      reserved_gas, reserved_time = tonumber(reserved_gas), tonumber(reserved_time)
      redis.call('HINCRBY', usage, 'reserved_gas', -reserved_gas)
      redis.call('HINCRBY', usage, 'reserved_time', -reserved_time)
      redis.call('HINCRBY', usage, 'gas_used', math.min(gas, reserved_gas))
      redis.call('HINCRBY', usage, 'time_used', math.min(duration, reserved_time))
      if retryable == '1' then
        redis.call('HINCRBY', usage, 'executions', -1)
      end
    end
  end
end
