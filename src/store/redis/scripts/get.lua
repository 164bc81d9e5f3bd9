-- Get: the entry and the store's clock, and on one Redis the marker too.
-- KEYS[1]  the entry, session_cache:<hash>
-- ARGV[1]  'marker' to read the entry user's marker here, in the same round trip. Only
--          outside Cluster: the marker is in the user's slot, which this script cannot
--          declare before it has read the entry, and which in Cluster lives on another
--          node. In Cluster the service reads the marker after this script (SPEC §8).
-- Returns  {entry or nil, the entry user's marker or nil, the store's clock in micros}.
-- The service judges expiry and invalidation; this only gathers what it needs.
local now = now_micros()
local value = redis.call('GET', KEYS[1])
local marker = false
if value and ARGV[1] == 'marker' then
  -- Both this service and the Python one write user_id first; the pattern spares a
  -- JSON parse on the hot path, and anything else falls back to cjson.
  local user_id = string.match(value, '^{"user_id": ?"([^"\\]+)"')
  if not user_id then
    local ok, decoded = pcall(cjson.decode, value)
    if ok and type(decoded) == 'table' and type(decoded.user_id) == 'string' then
      user_id = decoded.user_id
    end
  end
  if user_id and user_id ~= '' then
    marker = redis.call('GET', 'user_invalidated:' .. user_id)
  end
end
return {value, marker, now}
