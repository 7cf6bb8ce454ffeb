-- Leadership: which pgherald instance captures each source (see pgherald/leadership.py).
-- Every lock here is a session-level advisory lock on a bigint key, held on the one
-- connection the lock belongs to; the server drops it when that session ends.

-- name: try_lock
SELECT pg_try_advisory_lock(%(key)s::bigint)

-- name: unlock
SELECT pg_advisory_unlock(%(key)s::bigint)

-- name: holder
-- Who holds a key: the server process of the lock session and what it says of itself.
-- A bigint key is stored as classid (high 32 bits) and objid (low 32 bits), objsubid 1;
-- advisory locks belong to one database.
SELECT l.pid, a.application_name, host(a.client_addr), a.client_hostname
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.granted
  AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %(high)s
  AND l.objid::bigint = %(low)s
LIMIT 1

-- name: keepalives
-- The lock session's TCP keepalives, from the server's side: a leader whose host vanishes
-- without closing its connection (power loss, a cut network) loses its locks within
-- about ten seconds instead of the operating system's default of two hours. No effect
-- on a Unix-domain socket, where a dead client is noticed at once.
SELECT set_config('tcp_keepalives_idle', '5', false),
       set_config('tcp_keepalives_interval', '2', false),
       set_config('tcp_keepalives_count', '3', false)

-- name: user_timeout
-- The same for data the server sent and the vanished host never acknowledged (PG 12+).
SELECT set_config('tcp_user_timeout', '10000', false)

-- name: slot_holder
-- The server process streaming a replication slot, and who it says it is.
SELECT s.active_pid, a.application_name, host(a.client_addr)
FROM pg_replication_slots s
LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid
WHERE s.slot_name = %(slot)s AND s.active_pid IS NOT NULL

-- name: wal_sender_timeout
-- How long the server waits before it ends a walsender whose client stopped answering (ms).
SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'
