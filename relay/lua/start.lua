-- Emits `execution_started` only while the execution has no result, and only while its
-- principal has a place: at most `max_active` (stored in the record at accept; none for a
-- record an older gateway wrote) of its executions run or stay paused at once, their ids in the
-- set KEYS[4]. Over the cap the entry is parked instead, still `queued`: pushed on the principal's
-- waiting list KEYS[5] (of its priority) and acknowledged (and deleted) in KEYS[6], its
-- stream, so executors take other work; the settle script moves it back to its stream when a
-- place frees. Counting and parking are one script, so no place can free in between and leave
-- it parked for nothing.
-- A run taken over by a peer (its executor died) is a member already: it keeps its one place.
-- Returns 1 started, 0 nothing to run (a result exists), 2 parked, -1 the entry is no longer
-- this consumer's (a peer took it over): nothing done.
local record = redis.call('HMGET', KEYS[1], 'principal', 'result', 'max_active', 'request',
                          'callback', 'pipeline', 'batch')  -- followed, when any (accept.lua)
if not record[1] or record[2] then
  return 0
end
if redis.call('SISMEMBER', KEYS[4], ARGV[4]) == 0 then
  if record[3] and redis.call('SCARD', KEYS[4]) >= tonumber(record[3]) then
    local pending = redis.call('XPENDING', KEYS[6], ARGV[6], ARGV[5], ARGV[5], 1)
    if not pending[1] or pending[1][2] ~= ARGV[7] then
      return -1
    end
    redis.call('RPUSH', KEYS[5], record[4])
    redis.call('XACK', KEYS[6], ARGV[6], ARGV[5])
    redis.call('XDEL', KEYS[6], ARGV[5])
    redis.call('HDEL', KEYS[7], ARGV[5])
    return 2
  end
  redis.call('SADD', KEYS[4], ARGV[4])
end
if redis.call('HSETNX', KEYS[1], 'started', '1') == 1 then
  redis.call('DECR', KEYS[3])
  redis.call('DECR', KEYS[8])  -- its priority's part (relay.keys.Keys.queued_of)
end
redis.call('HSET', KEYS[1], 'status', 'running', 'executor', ARGV[1])
redis.call('RPUSH', KEYS[1] .. ':events',  -- the execution's index (accept.lua)
           emit_event(KEYS[2], ARGV[3], ARGV[2], record[1], record[5] or record[6] or record[7]))
return 1
