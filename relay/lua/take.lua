-- Takes up to ARGV[3] new entries for consumer ARGV[2] of group ARGV[1] from the requests
-- streams KEYS[1..3] (high, normal, low), one at a time in the order executors take work: the
-- head of the highest level that has one, unless the oldest head of all has waited longer than
-- ARGV[4] ms (an entry's id is the time it was added), which then goes first, so nothing
-- accepted after a starving entry is taken before it. Deciding and reading are one script, so
-- the order holds across executors. Returns each stream's last delivered id after the take
-- (from which a blocking XREAD wakes on the next entry: relay.bus.Bus.read), then
-- {level, id, data} for each entry taken, in the order taken.
--
-- ARGV[5..7], given when the consumer's last take found every stream drained: each stream's
-- last delivered id then. Only entries added after them can be new, since delivered ids only
-- grow; when those are on one stream alone, its own order is the order to take them in, and
-- XREADGROUP alone takes them, without every stream's delivered id and the walk over the heads
-- (TIME, 3 XINFO and an XRANGE fewer: about a third of the take that wakes on a lone request).
local group, consumer, count, starving = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

-- The first entry after `after` on a stream, or nil (ids only are used; XRANGE has no JUSTID).
local function head(stream, after)
  local found = redis.call('XRANGE', stream, '(' .. after, '+', 'COUNT', '1')
  return found[1] and found[1][1]
end

-- The entries `reply` (of XREADGROUP on one stream) holds, as {id, data}.
local function entries_of(reply)
  local found = {}
  for _, entry in ipairs(reply and reply[1][2] or {}) do
    local data = ''
    for i = 1, #entry[2], 2 do
      if entry[2][i] == 'data' then data = entry[2][i + 1] end
    end
    table.insert(found, {entry[1], data})
  end
  return found
end

-- The reply: each stream's last delivered id after the take (its last entry in `read`, else
-- `delivered`'s), then {level, id, data} for each entry read, in `order` (a level an entry).
local function result(delivered, order, read)
  local out, next_of = {}, {1, 1, 1}
  for level = 1, #KEYS do
    local here = read[level] or {}
    out[level] = here[#here] and here[#here][1] or delivered[level]
  end
  for _, level in ipairs(order) do
    local entry = read[level][next_of[level]]
    next_of[level] = next_of[level] + 1
    table.insert(out, {level, entry[1], entry[2]})
  end
  return out
end

if #ARGV >= 7 then
  local drained, only = {ARGV[5], ARGV[6], ARGV[7]}, nil
  for level, stream in ipairs(KEYS) do
    if head(stream, drained[level]) then
      only = only == nil and level or false
    end
  end
  if only == nil then
    return result(drained, {}, {})  -- nothing added since: still drained
  end
  if only then
    local taken = entries_of(redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
                                        'STREAMS', KEYS[only], '>'))
    if taken[1] then
      local order = {}
      for _ = 1, #taken do
        table.insert(order, only)
      end
      return result(drained, order, {[only] = taken})
    end
    -- A peer took them all: the full take below finds the stream's last delivered id.
  end
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function older(a, b)
  local a_ms, a_seq = id_parts(a)
  local b_ms, b_seq = id_parts(b)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end

local delivered, heads = {}, {}
for level, stream in ipairs(KEYS) do
  -- An error reply (no such stream) is a table with `err`: the stream has no group either.
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if not groups.err then
    for _, info in ipairs(groups) do
      local fields = {}
      for i = 1, #info, 2 do
        fields[info[i]] = info[i + 1]
      end
      if fields['name'] == group then
        delivered[level] = fields['last-delivered-id']
      end
    end
  end
  if not delivered[level] then
    return redis.error_reply('NOGROUP no group ' .. group .. ' on ' .. stream)
  end
  heads[level] = head(stream, delivered[level])
end

local order, taken = {}, {0, 0, 0}
for _ = 1, count do
  local pick, oldest = nil, nil
  for level = 1, #KEYS do
    if heads[level] then
      pick = pick or level
      if not oldest or older(heads[level], heads[oldest]) then
        oldest = level
      end
    end
  end
  if not pick then
    break
  end
  if now_ms - id_parts(heads[oldest]) > starving then
    pick = oldest
  end
  table.insert(order, pick)
  taken[pick] = taken[pick] + 1
  heads[pick] = head(KEYS[pick], heads[pick])
end

-- Each level's entries taken are the first ones after its last delivered id: exactly what
-- XREADGROUP `>` hands out.
local read = {}
for level = 1, #KEYS do
  if taken[level] > 0 then
    read[level] = entries_of(redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT',
                                        taken[level], 'STREAMS', KEYS[level], '>'))
  end
end
return result(delivered, order, read)
