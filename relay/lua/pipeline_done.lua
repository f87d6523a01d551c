-- A node's attempt ended (its `wasm_exec_completed`, or its inputs did not fit: failed with
-- `invalid_input` without running). Only once: an attempt that is not the node's current one,
-- or a node no longer queued, changes nothing (a redelivered completion).
-- KEYS: pipeline, relay:events, timers.
-- ARGV: pipeline id, node ('': the one whose attempt the request is), request id, outcome
-- (completed|failed|cancelled), error code, the result's JSON, now (RFC 3339), events
-- retention, ms to keep a finished pipeline, now (ms), the backoff's random factor in [0.5, 1].
local P, pid, node = KEYS[1], ARGV[1], ARGV[2]
local events, timers, now, retention = KEYS[2], KEYS[3], ARGV[7], ARGV[8]
if redis.call('EXISTS', P) == 0 then
  return {{}, {}}
end
if node == '' then  -- a completion read from the bus: the script finds its node (one round trip)
  node = redis.call('HGET', P .. ':requests', ARGV[3])
  if not node then
    return {{}, {}}
  end
end
local cancel = {}
if redis.call('HGET', P .. ':current', node) == ARGV[3]
    and redis.call('HGET', P .. ':status', node) == 'queued' then
  local outcome, code = ARGV[4], ARGV[5]
  local stop = redis.call('HGET', P, 'stop')
  redis.call('HSET', P .. ':results', node, ARGV[6])
  if outcome == 'completed' then
    redis.call('SREM', P .. ':active', node)
    pipeline_set(P, pid, events, retention, now, node, 'completed')
    local dependents = redis.call('HGET', P .. ':dependents', node)
    if dependents then
      for _, dependent in ipairs(cjson.decode(dependents)) do
        if redis.call('HINCRBY', P .. ':unmet', dependent, -1) <= 0
            and redis.call('HGET', P .. ':status', dependent) == 'pending' and stop == '' then
          redis.call('ZADD', P .. ':ready', redis.call('HGET', P .. ':order', dependent),
                     dependent)
        end
      end
    end
  else
    local attempts = tonumber(redis.call('HGET', P .. ':attempts', node))
    local rule = redis.call('HGET', P .. ':retry', node) or '0|'
    local sep = string.find(rule, '|', 1, true)
    local retries = tonumber(string.sub(rule, 1, sep - 1))
    local codes = ',' .. string.sub(rule, sep + 1) .. ','
    if stop == '' and attempts <= retries and outcome == 'failed'
        and (code == 'internal' or string.find(codes, ',' .. code .. ',', 1, true)) then
      -- It keeps its place while it waits: 0.5 s x 2^k x the factor, k = retries so far.
      pipeline_set(P, pid, events, retention, now, node, 'retrying')
      local due = tonumber(ARGV[10]) + math.floor(500 * 2 ^ (attempts - 1) * tonumber(ARGV[11]))
      redis.call('ZADD', timers, due, pid .. '\n' .. node)
    else
      redis.call('SREM', P .. ':active', node)
      pipeline_set(P, pid, events, retention, now, node,
                   outcome == 'cancelled' and 'cancelled' or 'failed')
      pipeline_skip(P, pid, events, retention, now, node)
      if stop == '' and redis.call('HGET', P, 'fail_fast') == '1' then
        cancel = pipeline_stop(P, pid, events, retention, now, timers, 'failed')
      end
    end
  end
  pipeline_fill(P, pid, events, retention, now)
  pipeline_finish(P, pid, events, retention, now, ARGV[9])
end
return pipeline_reply(P, pid, cancel, timers, ARGV[10])
