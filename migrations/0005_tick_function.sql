-- A tick in one round trip. The advisory lock must be held before the snapshot is taken (so
-- ticks are ordered and each sees at least what the previous one saw); inside a volatile
-- plpgsql function every statement takes a fresh snapshot, so the INSERT's is taken after the
-- lock. Called as a single statement in autocommit, the lock is released at its commit.
CREATE FUNCTION vibe_tick(lock_key bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    made bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    INSERT INTO feed_ticks (snapshot)
    SELECT pg_current_snapshot() WHERE EXISTS (
        SELECT 1 FROM changes c
        WHERE c.xid >= (SELECT pg_snapshot_xmin(snapshot)::text::bigint
                        FROM feed_ticks ORDER BY tick DESC LIMIT 1)
          AND c.xid < pg_snapshot_xmax(pg_current_snapshot())::text::bigint
          AND NOT pg_visible_in_snapshot(c.xid::text::xid8,
                (SELECT snapshot FROM feed_ticks ORDER BY tick DESC LIMIT 1))
          AND pg_visible_in_snapshot(c.xid::text::xid8, pg_current_snapshot()))
    RETURNING tick INTO made;
    RETURN made;
END
$$;
