-- InvalidateToken: delete the entry and leave a tombstone that refuses late Sets.
-- KEYS[1]  the entry, session_cache:<hash>
-- KEYS[2]  the tombstone, session_revoked:<hash>
-- ARGV[1]  the tombstone's ttl in seconds (the entries' ttl: no Set can outlive it)
-- Returns  the number of entries deleted (0 or 1)
redis.call('SET', KEYS[2], seconds(now_micros()), 'EX', ARGV[1])
return redis.call('DEL', KEYS[1])
