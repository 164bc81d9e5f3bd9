-- InvalidateToken: delete the entry and leave a tombstone that refuses late Sets.
-- KEYS[1]  the entry, session_cache:<hash>
-- KEYS[2]  the tombstone, session_revoked:{session_cache:<hash>} (the entry's slot)
-- KEYS[3]  outside Cluster only: the tombstone's old name, session_revoked:<hash>, which a
--          release from before the rename still reads during a rolling upgrade
-- ARGV[1]  the tombstones' ttl in seconds (the entries' ttl: no Set can outlive it)
-- Returns  the number of entries deleted (0 or 1)
local at = seconds(now_micros())
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], at, 'EX', ARGV[1])
end
return redis.call('DEL', KEYS[1])
