-- Takes and drops references to stored states (state_ref / state_unref, states.lib.lua), for
-- holders other than a session's own commits: snapshots, and the sessions branched from them.
-- ARGV: prefix, then items "+<state_cid>" (take one) or "-<state_cid>" (drop one), in order.
-- Returns, per item, 1 when done; 0 when a taken state was gone (nothing was taken) or a dropped
-- one was not held.
local prefix = ARGV[1]
local done = {}
for i = 2, #ARGV do
  local sign, state_cid = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 2)
  local ok
  if sign == '+' then
    ok = state_ref(prefix, state_cid)
  elseif sign == '-' then
    ok = state_unref(prefix, state_cid)
  else
    return redis.error_reply('state_refs: an item is +<state_cid> or -<state_cid>')
  end
  done[#done + 1] = ok and 1 or 0
end
return done
