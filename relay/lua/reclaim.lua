-- Takes over entries idle past their lease. JUSTID because it behaves alike on Redis 6.2 and 7
-- (without it, 6.2 returns trimmed entries as nils and keeps them pending forever); it counts no
-- delivery and returns no data, so the script counts deliveries itself and reads each entry,
-- acknowledging those trimmed meanwhile. Returns {cursor, {id, takeovers, data}...}.
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                         'COUNT', ARGV[5], 'JUSTID')
local out = {reply[1]}
for _, id in ipairs(reply[2]) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    local fields, data = found[1][2], false
    for i = 1, #fields, 2 do
      if fields[i] == 'data' then data = fields[i + 1] end
    end
    table.insert(out, {id, redis.call('HINCRBY', KEYS[2], id, 1), data})
  end
end
return out
