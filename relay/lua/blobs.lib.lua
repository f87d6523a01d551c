-- Output blobs (relay/blobs.py): `<prefix>:blob:<cid>`, a hash {size, chunks}, and its chunks
-- `<prefix>:blob:<cid>:<i>`, strings of at most 1 MiB. The executor writes them with a TTL before
-- its settle; each new reference (a result naming the blob) makes every key of it live at least
-- as long as that reference, so two executions with the same output share one blob, which
-- outlives both. Scripts that hold blobs are loaded with Script.named(name, libs=("blobs",)).
-- The keys are built here from the prefix, as relay/keys.py builds them: fine on one Redis, not
-- on a Redis Cluster (the compromise states.lib.lua makes too).

-- Makes the blob `cid` live at least `ttl_ms` more (a key that has longer keeps it: Redis 6.2
-- has no PEXPIRE GT). Returns true; or false, changing nothing, when it is not whole (never
-- written, or expired meanwhile).
local function blob_hold(prefix, cid, ttl_ms)
  local key = prefix .. ':blob:' .. cid
  local chunks = tonumber(redis.call('HGET', key, 'chunks'))
  if not chunks then
    return false
  end
  local all = {key}
  for i = 0, chunks - 1 do
    all[#all + 1] = key .. ':' .. i
  end
  if redis.call('EXISTS', unpack(all)) ~= #all then
    return false
  end
  local ttl = tonumber(ttl_ms)
  for _, name in ipairs(all) do
    local left = redis.call('PTTL', name)
    if left >= 0 and left < ttl then  -- (-1: kept without a TTL: left so)
      redis.call('PEXPIRE', name, ttl)
    end
  end
  return true
end
