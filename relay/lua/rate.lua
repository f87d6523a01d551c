-- Counts requests under a rate limit (ratelimit.lib.lua) on their own: a request refused
-- before its accept, a batch's items, an upload. KEYS[1] the window, ARGV[1] how many, ARGV[2]
-- the window's length (ms). Returns {count after, ms left}.
local count, left = rate_count(KEYS[1], ARGV[1], ARGV[2])
return {count, left}
