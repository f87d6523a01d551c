-- A budget (KEYS[1], id ARGV[2], prefix ARGV[1]) and its use of the window Redis's clock is in
-- now (budgets.lib.lua): {principal, created_by, window start, window end, gas_used,
-- time_used, executions, reserved gas, reserved time, max_gas, max_time, max_executions}
-- (-1 for a limit not set), or false when there is no such budget.
local w = budget_window(ARGV[1], ARGV[2], budget_now_ms(), nil)
if not w then
  return false
end
local b = redis.call('HMGET', KEYS[1], 'principal', 'created_by')
return {b[1], b[2], w.start, w.ends, w.gas_used, w.time_used, w.executions, w.reserved_gas,
        w.reserved_time, w.max_gas or -1, w.max_time or -1, w.max_executions or -1}
