-- Ping: answers only where the service may read and write. The shebang line that the
-- service puts before every script makes Redis refuse it on a replica (READONLY) and
-- on a primary that has fewer replicas than min-replicas-to-write (NOREPLICAS), so a
-- PING that a demoted primary would still answer cannot pass for health.
return 'PONG'
