-- Creates a budget, unless its principal has as many as it may already: every execution of a
-- principal walks all of its budgets, in the accept and settle scripts, while Redis serves no
-- one else (10 000 budgets: 120 ms a call), so their number is bounded.
-- KEYS: the budget hash, its principal's budgets, the principal's and the creator's visible
-- budgets.
-- ARGV: budget id, the most budgets the principal may have ('' for no bound: an
-- administrator's quota for another principal), then the hash's field, value, ...
-- Returns 1 created, 0 refused.
if ARGV[2] ~= '' and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
return 1
