-- An event during a run (progress, output, paused, resumed), only while no result exists: a
-- stalled executor that lost its run must not speak after the end. ARGV[3] sets the status.
local record = redis.call('HMGET', KEYS[1], 'principal', 'result', 'gas_seen', 'callback',
                          'pipeline', 'batch')  -- followed, when any (accept.lua)
if not record[1] or record[2] then
  return 0
end
if ARGV[4] ~= '' then
  -- Progress: a re-run (after a takeover) starts from zero; publish nothing below the highest
  -- gas already published, so `gas_used` never goes back.
  if tonumber(ARGV[4]) <= tonumber(record[3] or '-1') then
    return 0
  end
  redis.call('HSET', KEYS[1], 'gas_seen', ARGV[4])
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'status', ARGV[3])
end
redis.call('RPUSH', KEYS[1] .. ':events',  -- the execution's index (accept.lua)
           emit_event(KEYS[2], ARGV[2], ARGV[1], record[1], record[4] or record[5] or record[6]))
return 1
