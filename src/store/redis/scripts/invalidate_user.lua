-- InvalidateUser: move the user's marker to now, never back, never shortening its life.
-- KEYS[1]  the marker, user_invalidated:<user_id>
-- ARGV[1]  the marker's ttl in seconds
-- Returns  the instant recorded, in micros
local at = now_micros()
local ttl_ms = tonumber(ARGV[1]) * 1000
local current = redis.call('GET', KEYS[1])
if current then
  local current_at = to_micros(current)
  if current_at and current_at > at then
    at = current_at
  end
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > ttl_ms then
    ttl_ms = pttl
  end
end
redis.call('SET', KEYS[1], seconds(at), 'PX', ttl_ms)
return at
