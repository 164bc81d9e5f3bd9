-- Removes an entry that Get found expired, invalidated or corrupt, but only if it still
-- holds the value Get read: a fresh entry that a concurrent Set wrote stays.
-- KEYS[1]  the entry
-- ARGV[1]  the value Get read
-- Returns  the number of entries deleted (0 or 1)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
