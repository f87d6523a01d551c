-- Session states (relay/states.py): references to stored states, and through them to their
-- pages. A script that takes or drops references is loaded with
-- Script.named(name, libs=("states",)), which puts this text before it.
--
-- A state is `<prefix>:state:<state_cid>`, a hash {manifest, size, refs}; each page of it is
-- `<prefix>:page:<sha256>`; `<prefix>:page-refs` counts, per page, the references to it from
-- referenced states' manifests. States and pages are written with a TTL (relay/states.py): an
-- unreferenced one is an orphan and expires. The first reference to a state makes it and its
-- pages permanent; dropping the last one deletes the state and the pages no other state holds.
-- The keys are built here from the prefix, as relay/keys.py builds them: fine on one Redis, not
-- on a Redis Cluster (a script may only touch keys it is given there): a known compromise.

-- The non-zero pages of a manifest (JSON), each with how often it appears.
local function state_page_counts(manifest)
  local counts = {}
  for _, page in ipairs(cjson.decode(manifest)['pages']) do
    if page ~= '' then
      counts[page] = (counts[page] or 0) + 1
    end
  end
  return counts
end

-- The state `state_cid` as stored: its key, its manifest (false when it is gone) and how many
-- references it has; nil for a null or empty state_cid (a module's fresh state, nothing to
-- hold).
local function state_record(prefix, state_cid)
  if type(state_cid) ~= 'string' or state_cid == '' then
    return nil
  end
  local key = prefix .. ':state:' .. state_cid
  local found = redis.call('HMGET', key, 'manifest', 'refs')
  return key, found[1], tonumber(found[2]) or 0
end

-- Takes one reference to the state `state_cid`. Returns true; or false, changing nothing, when
-- the state or one of its pages is gone (an orphan that expired, or a page whose last holder was
-- dropped since the state was saved): the caller must not commit it. A null or empty state_cid
-- (a module's fresh state) is nothing to hold: true.
local function state_ref(prefix, state_cid)
  local key, manifest, refs = state_record(prefix, state_cid)
  if not key then
    return true
  end
  if not manifest then
    return false
  end
  if refs > 0 then
    redis.call('HINCRBY', key, 'refs', 1)
    return true
  end
  local counts = state_page_counts(manifest)
  for page in pairs(counts) do
    if redis.call('EXISTS', prefix .. ':page:' .. page) == 0 then
      return false
    end
  end
  local page_refs = prefix .. ':page-refs'
  for page, n in pairs(counts) do
    redis.call('HINCRBY', page_refs, page, n)
    redis.call('PERSIST', prefix .. ':page:' .. page)
  end
  redis.call('HSET', key, 'refs', 1)
  redis.call('PERSIST', key)
  return true
end

-- Drops one reference to the state `state_cid`; the last one deletes it and every page of it
-- that no other referenced state holds. Returns true; false, changing nothing, when the state
-- holds no reference (it is gone, or an unreferenced orphan). A null or empty state_cid: true.
local function state_unref(prefix, state_cid)
  local key, manifest, refs = state_record(prefix, state_cid)
  if not key then
    return true
  end
  if not manifest or refs <= 0 then
    return false
  end
  if refs > 1 then
    redis.call('HINCRBY', key, 'refs', -1)
    return true
  end
  local page_refs = prefix .. ':page-refs'
  for page, n in pairs(state_page_counts(manifest)) do
    if redis.call('HINCRBY', page_refs, page, -n) <= 0 then
      redis.call('HDEL', page_refs, page)
      redis.call('DEL', prefix .. ':page:' .. page)
    end
  end
  redis.call('DEL', key)
  return true
end
