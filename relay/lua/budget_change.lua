-- Replaces the limits of (ARGV[3] 'replace') or deletes ('delete') the budget KEYS[1], for the
-- caller ARGV[1], only if it created the budget: checked and done at once, so a change never
-- lands on a budget deleted meanwhile. ARGV[2] the prefix (its sets' keys are built from it, as
-- in budgets.lib.lua), ARGV[4] the budget's id; for 'replace', ARGV[5] the principal the body
-- named ('' for none) and ARGV[6..9] window, max_gas, max_time, max_executions ('' for none).
-- Returns 'gone' (no such budget, or not the caller's to see), 'forbidden' (the caller is its
-- principal, not its creator: a quota), 'principal' (the body names another principal), or
-- {'ok', the budget's fields after the change}.
local b = redis.call('HMGET', KEYS[1], 'principal', 'created_by')
if not b[1] or (b[1] ~= ARGV[1] and b[2] ~= ARGV[1]) then
  return 'gone'
end
if b[2] ~= ARGV[1] then
  return 'forbidden'
end
if ARGV[3] == 'delete' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ARGV[2] .. ':budgets:' .. b[1], ARGV[4])
  redis.call('ZREM', ARGV[2] .. ':budgets-visible:' .. b[1], ARGV[4])
  redis.call('ZREM', ARGV[2] .. ':budgets-visible:' .. b[2], ARGV[4])
  return {'ok', {}}
end
if ARGV[5] ~= '' and ARGV[5] ~= b[1] then
  return 'principal'
end
redis.call('HSET', KEYS[1], 'window', ARGV[6], 'max_gas', ARGV[7], 'max_time', ARGV[8],
           'max_executions', ARGV[9])
return {'ok', redis.call('HGETALL', KEYS[1])}
