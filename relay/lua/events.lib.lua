-- Appends an event to relay:events (`events`) for `user`, returning its id. When `followed`
-- (its execution, pipeline or batch has a webhook callback, or the execution is a pipeline
-- node or a batch item), a copy goes to relay:events:followed, under the same id: the webhook
-- deliverer and the pipeline scheduler read that stream, not every event of every execution
-- (relay.deliverer, relay.scheduler). An id the copy cannot take (relay:events recreated
-- behind a clock gone backwards) gets a new one.
local function emit_event(events, retention, data, user, followed)
  local id = redis.call('XADD', events, 'MAXLEN', '~', retention, '*', 'data', data, 'user',
                        user)
  if followed then
    local copies = events .. ':followed'
    local copied = redis.pcall('XADD', copies, 'MAXLEN', '~', retention, id, 'data', data,
                               'user', user)
    if type(copied) == 'table' and copied.err then
      redis.call('XADD', copies, 'MAXLEN', '~', retention, '*', 'data', data, 'user', user)
    end
  end
  return id
end

-- Whether a pipeline's or batch's stored `callback_url` (from HMGET: false when missing) names
-- one: those without store ''.
local function has_callback(callback_url)
  return callback_url ~= false and callback_url ~= ''
end
