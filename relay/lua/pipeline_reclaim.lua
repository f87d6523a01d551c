-- Takes over the `pipelines` group's entries idle past ARGV[3] ms (their consumer died
-- mid-transition): {next cursor, {id, data}, ...}. Entries trimmed from the stream meanwhile
-- are acknowledged (Redis 6.2's XAUTOCLAIM would keep them pending forever).
-- KEYS: relay:events. ARGV: group, consumer, min idle ms, cursor, count.
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                         'COUNT', ARGV[5], 'JUSTID')
local out = {reply[1]}
for _, id in ipairs(reply[2]) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    local fields, data = found[1][2], ''
    for i = 1, #fields, 2 do
      if fields[i] == 'data' then data = fields[i + 1] end
    end
    table.insert(out, {id, data})
  end
end
return out
