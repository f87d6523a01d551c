-- A pipeline timer came due: a node's retry (its next attempt is queued) or, with no node, the
-- pipeline's watchdog (nothing changes: the reply lists its queued nodes again).
-- KEYS: pipeline, relay:events, timers.
-- ARGV: pipeline id, node or '', now (RFC 3339), events retention, now (ms).
local P, pid, node = KEYS[1], ARGV[1], ARGV[2]
redis.call('ZREM', KEYS[3], pid .. '\n' .. node)
if redis.call('EXISTS', P) == 0 then
  return {{}, {}}
end
if node ~= '' and redis.call('HGET', P .. ':status', node) == 'retrying' then
  redis.call('HINCRBY', P .. ':attempts', node, 1)
  pipeline_set(P, pid, KEYS[2], ARGV[4], ARGV[3], node, 'queued')
end
return pipeline_reply(P, pid, {}, KEYS[3], ARGV[5])
