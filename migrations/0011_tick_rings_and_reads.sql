-- One round trip from a committed write to its changes in the node's hands, where there were
-- three (tick, doorbell, read).
--
-- 1. A tick that cut a batch rings the doorbell itself, in its own transaction. The NOTIFY is
--    queued at the tick's commit, so listeners never wake before the tick they are told about is
--    visible. This is not a writer's transaction: ticks already serialise on the tick lock across
--    their commit, so the notify queue's commit lock adds no wait that was not there, and
--    document writes never take it. The one-argument `vibe_tick` stays for nodes of the previous
--    version during a rolling upgrade (they ring separately).
CREATE FUNCTION vibe_tick(lock_key bigint, channel text, node text) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    made bigint;
BEGIN
    made := vibe_tick(lock_key);
    IF made IS NOT NULL THEN
        PERFORM pg_notify(channel, node);
    END IF;
    RETURN made;
END
$$;

-- 2. The batch read, here rather than in the server so that a plain read and a tick-and-read
--    share one definition: up to `lim` changes after the cursor (after_tick, after_seq) in feed
--    order, across as many ticks as it takes, with one row (seq NULL) for each tick whose batch
--    holds nothing for this filter, so the cursor still moves past it. `base` is the tick that
--    cuts batch `after_tick`; no rows at all means nothing new, or that tick was pruned.
CREATE FUNCTION vibe_read(after_tick bigint, after_seq bigint, types text[], owner text, lim bigint)
RETURNS TABLE (
    base bigint, tick bigint, seq bigint, xid bigint, op "char", doc_id uuid, type text,
    owner_did text, rev bigint, created_at timestamptz, updated_at timestamptz,
    logged_at timestamptz, new_acl jsonb, new_data jsonb, old_acl jsonb, old_data jsonb)
LANGUAGE sql STABLE AS $$
    WITH b AS (SELECT max(ft.tick) AS tick FROM feed_ticks ft WHERE ft.tick < after_tick),
    t AS (
        SELECT ft.tick, ft.snapshot, lag(ft.snapshot) OVER (ORDER BY ft.tick) AS prev
        FROM feed_ticks ft WHERE ft.tick >= (SELECT b.tick FROM b)
        ORDER BY ft.tick LIMIT 1001)
    SELECT (SELECT b.tick FROM b), t.tick, c.seq, c.xid, c.op, c.doc_id, c.type, c.owner_did,
           c.rev, c.created_at, c.updated_at, c.logged_at, c.new_acl, c.new_data, c.old_acl,
           c.old_data
    FROM t LEFT JOIN LATERAL (
        SELECT * FROM changes c
        WHERE c.xid >= pg_snapshot_xmin(t.prev)::text::bigint
          AND c.xid < pg_snapshot_xmax(t.snapshot)::text::bigint
          AND pg_visible_in_snapshot(c.xid::text::xid8, t.snapshot)
          AND NOT pg_visible_in_snapshot(c.xid::text::xid8, t.prev)
          AND (t.tick > after_tick OR c.seq > after_seq)
          AND (cardinality(types) = 0 OR c.type = ANY(types))
          AND (owner IS NULL OR c.owner_did = owner)
        ORDER BY c.seq LIMIT lim) c ON true
    WHERE t.prev IS NOT NULL
    ORDER BY t.tick, c.seq NULLS FIRST LIMIT lim
$$;

-- 3. A tick and the first page after the cursor in one statement: the read runs after the tick
--    in the same transaction (a fresh snapshot per statement in a volatile function), so it sees
--    the batch just cut. It holds the tick lock until it returns, so callers keep `lim` small
--    and read the rest with `vibe_read`. `made` (on every row) is the tick cut, or NULL; with no
--    rows no tick was cut (a new tick always yields at least its own row).
CREATE FUNCTION vibe_tick_read(lock_key bigint, channel text, node text, after_tick bigint,
                               after_seq bigint, lim bigint)
RETURNS TABLE (
    made bigint, base bigint, tick bigint, seq bigint, xid bigint, op "char", doc_id uuid,
    type text, owner_did text, rev bigint, created_at timestamptz, updated_at timestamptz,
    logged_at timestamptz, new_acl jsonb, new_data jsonb, old_acl jsonb, old_data jsonb)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    cut bigint;
BEGIN
    cut := vibe_tick(lock_key, channel, node);
    RETURN QUERY SELECT cut, r.* FROM vibe_read(after_tick, after_seq, '{}', NULL, lim) r;
END
$$;
