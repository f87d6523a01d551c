-- DELETE /pipelines/{id}: pending and retrying nodes are cancelled; the request ids of the
-- queued ones are returned for the caller to cancel (their ends then finish the pipeline).
-- KEYS: pipeline, relay:events, timers.
-- ARGV: pipeline id, now (RFC 3339), events retention, ms to keep a finished pipeline, now (ms).
local P, pid = KEYS[1], ARGV[1]
local state = redis.call('HMGET', P, 'status', 'stop')
if not state[1] then
  return {'missing'}
end
if state[1] ~= 'running' then
  return {'finished'}
end
local cancel = {}
if state[2] == '' then
  cancel = pipeline_stop(P, pid, KEYS[2], ARGV[3], ARGV[2], KEYS[3], 'cancelled')
else  -- stopping already (fail_fast): cancel what still runs, again
  for _, node in ipairs(redis.call('SMEMBERS', P .. ':active')) do
    table.insert(cancel, redis.call('HGET', P .. ':current', node))
  end
end
pipeline_finish(P, pid, KEYS[2], ARGV[3], ARGV[2], ARGV[4])
local reply = pipeline_reply(P, pid, cancel, KEYS[3], ARGV[5])
return {'ok', reply[1], reply[2]}
