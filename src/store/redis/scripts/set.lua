-- Set: check and write in one atomic step.
-- KEYS[1]  the entry, session_cache:<hash>
-- KEYS[2]  the token's logout tombstone, session_revoked:{session_cache:<hash>}
-- KEYS[3]  outside Cluster only: the user's marker, user_invalidated:<user_id>. In Cluster
--          it lives in another slot; the service checks the fence against it before this
--          script runs, and a Get's marker read covers a marker written in between
--          (SPEC §8).
-- KEYS[4]  outside Cluster only: the tombstone's old name, session_revoked:<hash>
-- ARGV[1]  the entry's JSON up to and including "cached_at":
-- ARGV[2]  session_expire in micros
-- ARGV[3]  the fence in micros, or '' for none
-- ARGV[4]  the configured ttl in seconds
-- ARGV[5]  the clock-skew margin in micros (SPEC §8)
-- ARGV[6]  the markers' ttl in seconds: how far back a fence can still be checked
-- Returns  {'stored', ttl} | {'revoked', 0} | {'stale', 0} | {'expired', 0}
--          | {'fence-out-of-range', 0}
local now = now_micros()
local fence = tonumber(ARGV[3])
-- The rule is store::fence_in_range.
if fence and (fence > now + tonumber(ARGV[5]) or fence < now - tonumber(ARGV[6]) * 1000000) then
  return {'fence-out-of-range', 0}
end
if redis.call('EXISTS', KEYS[2]) == 1 or (KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1) then
  return {'revoked', 0}
end
if fence and KEYS[3] then
  local marker = redis.call('GET', KEYS[3])
  if marker then
    local at = to_micros(marker)
    -- An unreadable marker counts as a revocation: fail closed. The rule is
    -- store::marker_revokes_fence.
    if (not at) or at >= fence - tonumber(ARGV[5]) then
      return {'stale', 0}
    end
  end
end
local remaining = tonumber(ARGV[2]) - now
if remaining <= 0 then
  return {'expired', 0}
end
local ttl = math.min(tonumber(ARGV[4]), math.max(1, math.floor(remaining / 1000000)))
-- The session is no fresher than the validation that began at the fence.
local cached_at = now
if fence and fence < now then
  cached_at = fence
end
redis.call('SET', KEYS[1], ARGV[1] .. seconds(cached_at) .. '}', 'EX', ttl)
return {'stored', ttl}
