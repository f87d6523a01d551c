-- Settles an execution: the executor when a run ends (with the entry to acknowledge), or the
-- gateway cancelling one still queued (no entry; only while its status is still `queued`).
if ARGV[2] ~= '' then
  -- A run whose lease a peer took over (it stalled) must not write anything.
  local pending = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1)
  if not pending[1] or pending[1][2] ~= ARGV[11] then
    return -1
  end
  redis.call('HDEL', KEYS[5], ARGV[2])
end
local written = 0
local record = redis.call('HMGET', KEYS[1], 'principal', 'status', 'result')
if record[1] and not record[3] and (ARGV[10] == '' or record[2] == ARGV[10]) then
  if redis.call('HSETNX', KEYS[1], 'started', '1') == 1 then
    redis.call('DECR', KEYS[4])
    if ARGV[12] ~= '' then
      redis.call('RPUSH', KEYS[1] .. ':events',  -- the execution's index (accept.lua)
                 redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'data', ARGV[12],
                            'user', record[1]))
    end
  end
  redis.call('HSET', KEYS[1], 'result', ARGV[3], 'status', ARGV[4], 'retryable', ARGV[5])
  redis.call('RPUSH', KEYS[1] .. ':events',
             redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'data', ARGV[6], 'user',
                        record[1]))
  -- wasm_exec_completed is for bus consumers, not clients: not in the index.
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'data', ARGV[7], 'user', record[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
  redis.call('PEXPIRE', KEYS[1] .. ':events', ARGV[9])
  written = 1
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
end
return written
