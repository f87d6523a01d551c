-- Pipelines (relay.pipelines): the state every transition script shares. `P` is the pipeline's
-- hash (relay.keys.Keys.pipeline); its nodes live in keys named P .. suffix:
--   :status node -> status        :attempts node -> attempts started   :results node -> JSON
--   :unmet node -> refs not yet completed (absent: none)   :dependents node -> JSON [ids]
--   :order node -> declaration index   :retry node -> "<retries>|<code>,<code>"
--   :current node -> request id of its latest attempt   :requests request id -> node
--   :ready zset of pending nodes whose refs are all completed, by declaration index
--   :active set of the nodes holding a place (queued, running or retrying)
-- The pipeline's hash counts nodes per status (`n_<status>`); `stop` is '' while it runs, or
-- `cancelled` / `failed` once it was cancelled (DELETE) or failed fast.

local PIPELINE_SUFFIXES = {':spec', ':status', ':attempts', ':results', ':unmet', ':dependents',
                           ':order', ':retry', ':current', ':requests', ':ready', ':active'}
local FINISHED = {completed = true, failed = true, skipped = true, cancelled = true}

local function pipeline_percent(P)
  local counts = redis.call('HMGET', P, 'total', 'n_completed', 'n_failed', 'n_skipped',
                            'n_cancelled')
  local total = tonumber(counts[1])
  local ended = 0
  for i = 2, 5 do ended = ended + tonumber(counts[i] or '0') end
  if total == 0 then return 100 end
  return math.floor(10000 * ended / total) / 100
end

-- Appends a pipeline event to relay:events for the pipeline's principal.
local function pipeline_emit(P, events, retention, body)
  local fields = redis.call('HMGET', P, 'principal', 'callback_url')
  emit_event(events, retention, body, fields[1], has_callback(fields[2]))
end

-- Moves `node` to `status`, keeping the counts, and emits `pipeline_progress`.
local function pipeline_set(P, pid, events, retention, now, node, status)
  local old = redis.call('HGET', P .. ':status', node)
  if old == status then return end
  redis.call('HSET', P .. ':status', node, status)
  if old then redis.call('HINCRBY', P, 'n_' .. old, -1) end
  redis.call('HINCRBY', P, 'n_' .. status, 1)
  pipeline_emit(P, events, retention,
    '{"type":"pipeline_progress","pipeline_id":"' .. pid .. '","node":"' .. node ..
    '","node_status":"' .. status .. '","progress":' .. pipeline_percent(P) ..
    ',"timestamp":"' .. now .. '"}')
end

-- Marks the pending dependents of `node`, and theirs, skipped (it failed).
local function pipeline_skip(P, pid, events, retention, now, node)
  local todo = {node}
  while #todo > 0 do
    local current = table.remove(todo)
    local dependents = redis.call('HGET', P .. ':dependents', current)
    if dependents then
      for _, dependent in ipairs(cjson.decode(dependents)) do
        if redis.call('HGET', P .. ':status', dependent) == 'pending' then
          pipeline_set(P, pid, events, retention, now, dependent, 'skipped')
          redis.call('ZREM', P .. ':ready', dependent)
          table.insert(todo, dependent)
        end
      end
    end
  end
end

-- Stops the pipeline (`reason`: cancelled or failed): pending and retrying nodes are cancelled
-- here; returns the request ids of the queued ones, for the caller to cancel where they run.
local function pipeline_stop(P, pid, events, retention, now, timers, reason)
  redis.call('HSET', P, 'stop', reason)
  local running = {}
  local statuses = redis.call('HGETALL', P .. ':status')
  for i = 1, #statuses, 2 do
    local node, status = statuses[i], statuses[i + 1]
    if status == 'pending' or status == 'retrying' then
      pipeline_set(P, pid, events, retention, now, node, 'cancelled')
      redis.call('SREM', P .. ':active', node)
      redis.call('ZREM', timers, pid .. '\n' .. node)
    elseif status == 'queued' then
      local request_id = redis.call('HGET', P .. ':current', node)
      if request_id then table.insert(running, request_id) end
    end
  end
  redis.call('DEL', P .. ':ready')
  return running
end

-- Gives the free places (under max_concurrency) to ready nodes, in declaration order.
local function pipeline_fill(P, pid, events, retention, now)
  if redis.call('HGET', P, 'stop') ~= '' then return end
  local free = tonumber(redis.call('HGET', P, 'max_concurrency')) - redis.call('SCARD', P .. ':active')
  if free <= 0 then return end
  for _, node in ipairs(redis.call('ZRANGE', P .. ':ready', 0, free - 1)) do
    redis.call('ZREM', P .. ':ready', node)
    redis.call('HINCRBY', P .. ':attempts', node, 1)
    redis.call('SADD', P .. ':active', node)
    pipeline_set(P, pid, events, retention, now, node, 'queued')
  end
end

-- Ends the pipeline once no node is pending, queued or retrying: its status, `finished_at`, the
-- one `pipeline_complete`, and its keys' expiry.
local function pipeline_finish(P, pid, events, retention, now, keep_ms)
  local state = redis.call('HMGET', P, 'status', 'n_pending', 'n_queued', 'n_retrying', 'stop',
                           'n_completed', 'total')
  if state[1] ~= 'running' then return end
  if tonumber(state[2] or '0') + tonumber(state[3] or '0') + tonumber(state[4] or '0') > 0 then
    return
  end
  local status = state[5]
  if status == '' then
    status = (tonumber(state[6] or '0') == tonumber(state[7])) and 'completed' or 'failed'
  end
  redis.call('HSET', P, 'status', status, 'finished_at', now)
  pipeline_emit(P, events, retention,
    '{"type":"pipeline_complete","pipeline_id":"' .. pid .. '","status":"' .. status ..
    '","timestamp":"' .. now .. '"}')
  redis.call('PEXPIRE', P, keep_ms)
  for _, suffix in ipairs(PIPELINE_SUFFIXES) do
    redis.call('PEXPIRE', P .. suffix, keep_ms)
  end
end

-- What every transition answers: {request ids to cancel, {node, attempt, ...} of every queued
-- node}. The caller accepts the queued nodes whose execution does not exist yet, so accepting
-- twice joins. While nodes are queued, the pipeline's watchdog timer is set WATCHDOG_MS ahead:
-- should the caller die between this script and its accepts, the timer runs this again.
local WATCHDOG_MS = 10000
local function pipeline_reply(P, pid, cancel, timers, now_ms)
  local queued = {}
  for _, node in ipairs(redis.call('SMEMBERS', P .. ':active')) do
    if redis.call('HGET', P .. ':status', node) == 'queued' then
      table.insert(queued, node)
      table.insert(queued, redis.call('HGET', P .. ':attempts', node))
    end
  end
  if #queued > 0 then
    redis.call('ZADD', timers, tonumber(now_ms) + WATCHDOG_MS, pid .. '\n')
  end
  return {cancel, queued}
end
