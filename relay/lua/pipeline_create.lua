-- Creates a pipeline from its staged node keys (written by relay.pipelines under
-- KEYS[1] .. ':staging:' .. ARGV[12], with a TTL), unless one with this id exists already (an
-- idempotency key used again): then the staged keys are dropped and its fingerprint returned.
-- KEYS: pipeline, the principal's index, relay:events, timers.
-- ARGV: pipeline id, principal, now (RFC 3339), events retention, max_concurrency, fail_fast,
-- node count, now (ms), fingerprint, callback_url, callback_events, staging nonce.
local P, pid, events, retention, now = KEYS[1], ARGV[1], KEYS[3], ARGV[4], ARGV[3]
local staged = P .. ':staging:' .. ARGV[12]
if redis.call('EXISTS', P) == 1 then
  for _, suffix in ipairs(PIPELINE_SUFFIXES) do redis.call('DEL', staged .. suffix) end
  return {'exists', redis.call('HGET', P, 'fingerprint')}
end
for _, suffix in ipairs(PIPELINE_SUFFIXES) do
  if redis.call('EXISTS', staged .. suffix) == 1 then
    redis.call('RENAME', staged .. suffix, P .. suffix)
    redis.call('PERSIST', P .. suffix)
  end
end
redis.call('HSET', P, 'principal', ARGV[2], 'status', 'running', 'stop', '',
           'max_concurrency', ARGV[5], 'fail_fast', ARGV[6], 'total', ARGV[7],
           'n_pending', ARGV[7], 'created_at', now, 'created_ms', ARGV[8],
           'fingerprint', ARGV[9], 'callback_url', ARGV[10], 'callback_events', ARGV[11])
redis.call('ZADD', KEYS[2], ARGV[8], pid)
pipeline_fill(P, pid, events, retention, now)
local reply = pipeline_reply(P, pid, {}, KEYS[4], ARGV[8])
return {'new', '', reply[1], reply[2]}
