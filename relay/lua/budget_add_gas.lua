-- Reserves ARGV[2] more gas for the execution KEYS[1] (`additional_gas`) in every budget of its
-- principal (budgets.lib.lua; prefix ARGV[1]), then raises its gas budget (`extra_gas`), while
-- it has no result. Returns 'ok', 'finished' (a result, or no record), or
-- {'budget', '<seconds to wait> <budget id> gas'}.
local record = redis.call('HMGET', KEYS[1], 'principal', 'result', 'budgets')
if not record[1] or record[2] then
  return 'finished'
end
local gas = tonumber(ARGV[2])
local verdict, windows = budgets_check_more(ARGV[1], record[1], record[3], gas)
if verdict ~= 'ok' then
  return {verdict, windows}
end
budgets_reserve(KEYS[1], windows, gas, 0, false, record[3])
redis.call('HINCRBY', KEYS[1], 'extra_gas', ARGV[2])
return 'ok'
