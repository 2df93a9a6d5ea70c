-- Documents made under another one: `parent` is set at creation and never changes through the
-- API. The parent's ACL `create` rule says who may make documents under it (checked by the
-- server with the parent row locked FOR SHARE, so a concurrent change of that rule or a delete
-- of the parent waits for the create, or the create for them). No foreign key: a child outlives
-- its parent (a deleted room does not take its members' messages with it), and a parent that
-- is gone simply admits no further children.
ALTER TABLE documents ADD COLUMN parent uuid;
-- "The children of X", newest first: the live and one-shot queries on `parent`.
CREATE INDEX documents_parent ON documents (parent, type, created_at DESC, id DESC)
    WHERE parent IS NOT NULL;

-- The change log carries the parent like the owner, so live queries on `parent` match a change
-- by its images alone.
ALTER TABLE changes ADD COLUMN parent uuid;

CREATE OR REPLACE FUNCTION vibe_log_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.log_xid IS NOT NULL THEN
        INSERT INTO changes (seq, xid, op, doc_id, type, owner_did, parent, rev, created_at,
                             updated_at, logged_at, new_acl, new_data)
        VALUES (OLD.log_seq, OLD.log_xid, 'i', OLD.id, OLD.type, OLD.owner_did, OLD.parent,
                OLD.rev, OLD.created_at, OLD.updated_at, OLD.created_at, OLD.acl, OLD.data);
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO changes (op, doc_id, type, owner_did, parent, rev, created_at, updated_at,
                             old_acl, old_data)
        VALUES ('d', OLD.id, OLD.type, OLD.owner_did, OLD.parent, OLD.rev, OLD.created_at,
                OLD.updated_at, OLD.acl, OLD.data);
        RETURN OLD;
    END IF;
    NEW.log_xid := NULL;
    NEW.log_seq := NULL;
    IF NEW.type <> OLD.type OR NEW.owner_did <> OLD.owner_did
       OR NEW.parent IS DISTINCT FROM OLD.parent THEN
        -- Moving a document between types, owners or parents (in SQL; the API never does) is a
        -- delete there and an insert here.
        INSERT INTO changes (op, doc_id, type, owner_did, parent, rev, created_at, updated_at,
                             old_acl, old_data)
        VALUES ('d', OLD.id, OLD.type, OLD.owner_did, OLD.parent, OLD.rev, OLD.created_at,
                OLD.updated_at, OLD.acl, OLD.data);
        INSERT INTO changes (op, doc_id, type, owner_did, parent, rev, created_at, updated_at,
                             new_acl, new_data)
        VALUES ('i', NEW.id, NEW.type, NEW.owner_did, NEW.parent, NEW.rev, NEW.created_at,
                NEW.updated_at, NEW.acl, NEW.data);
    ELSE
        INSERT INTO changes (op, doc_id, type, owner_did, parent, rev, created_at, updated_at,
                             new_acl, new_data, old_acl, old_data)
        VALUES ('u', NEW.id, NEW.type, NEW.owner_did, NEW.parent, NEW.rev, NEW.created_at,
                NEW.updated_at, NEW.acl, NEW.data, OLD.acl, OLD.data);
    END IF;
    RETURN NEW;
END
$$;

-- The reads gain a column, which CREATE OR REPLACE cannot do, and nodes of the previous version
-- hold prepared statements over `vibe_read` / `vibe_tick_read` whose result type must not change
-- under them (PostgreSQL refuses such a statement until it is prepared again): those two stay as
-- they are for those nodes during a rolling upgrade, and this version reads through the two
-- below — the same definitions as 0013's and 0011's (+ 0014's plan setting), with `parent` after
-- `owner_did`. A later migration drops the old pair.
CREATE FUNCTION vibe_feed_read(after_tick bigint, after_seq bigint, types text[], owner text, lim bigint)
RETURNS TABLE (
    base bigint, tick bigint, seq bigint, xid bigint, op "char", doc_id uuid, type text,
    owner_did text, parent uuid, rev bigint, created_at timestamptz, updated_at timestamptz,
    logged_at timestamptz, new_acl jsonb, new_data jsonb, old_acl jsonb, old_data jsonb)
LANGUAGE sql STABLE AS $$
    WITH b AS (SELECT max(ft.tick) AS tick FROM feed_ticks ft WHERE ft.tick < after_tick),
    t AS (
        SELECT ft.tick, ft.snapshot, lag(ft.snapshot) OVER (ORDER BY ft.tick) AS prev
        FROM feed_ticks ft WHERE ft.tick >= (SELECT b.tick FROM b)
        ORDER BY ft.tick LIMIT 1001)
    SELECT (SELECT b.tick FROM b), t.tick, c.seq, c.xid, c.op, c.doc_id, c.type, c.owner_did,
           c.parent, c.rev, c.created_at, c.updated_at, c.logged_at, c.new_acl, c.new_data,
           c.old_acl, c.old_data
    FROM t LEFT JOIN LATERAL (
        SELECT * FROM (
            (SELECT l.seq, l.xid, l.op, l.doc_id, l.type, l.owner_did, l.parent, l.rev,
                    l.created_at, l.updated_at, l.logged_at, l.new_acl, l.new_data, l.old_acl,
                    l.old_data
             FROM changes l
             WHERE l.xid >= pg_snapshot_xmin(t.prev)::text::bigint
               AND l.xid < pg_snapshot_xmax(t.snapshot)::text::bigint
               AND pg_visible_in_snapshot(l.xid::text::xid8, t.snapshot)
               AND NOT pg_visible_in_snapshot(l.xid::text::xid8, t.prev)
               AND (t.tick > after_tick OR l.seq > after_seq)
               AND (cardinality(types) = 0 OR l.type = ANY(types))
               AND (owner IS NULL OR l.owner_did = owner)
             ORDER BY l.seq LIMIT lim)
            UNION ALL
            (SELECT d.log_seq, d.log_xid, 'i'::"char", d.id, d.type, d.owner_did, d.parent,
                    d.rev, d.created_at, d.updated_at, d.created_at, d.acl, d.data, NULL::jsonb,
                    NULL::jsonb
             FROM documents d
             WHERE d.log_xid IS NOT NULL
               AND d.log_xid >= pg_snapshot_xmin(t.prev)::text::bigint
               AND d.log_xid < pg_snapshot_xmax(t.snapshot)::text::bigint
               AND pg_visible_in_snapshot(d.log_xid::text::xid8, t.snapshot)
               AND NOT pg_visible_in_snapshot(d.log_xid::text::xid8, t.prev)
               AND (t.tick > after_tick OR d.log_seq > after_seq)
               AND (cardinality(types) = 0 OR d.type = ANY(types))
               AND (owner IS NULL OR d.owner_did = owner)
             ORDER BY d.log_seq LIMIT lim)
        ) u ORDER BY u.seq LIMIT lim) c ON true
    WHERE t.prev IS NOT NULL
    ORDER BY t.tick, c.seq NULLS FIRST LIMIT lim
$$;

CREATE FUNCTION vibe_feed_tick_read(lock_key bigint, channel text, node text, after_tick bigint,
                               after_seq bigint, lim bigint)
RETURNS TABLE (
    made bigint, base bigint, tick bigint, seq bigint, xid bigint, op "char", doc_id uuid,
    type text, owner_did text, parent uuid, rev bigint, created_at timestamptz,
    updated_at timestamptz, logged_at timestamptz, new_acl jsonb, new_data jsonb, old_acl jsonb,
    old_data jsonb)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    cut bigint;
BEGIN
    cut := vibe_tick(lock_key, channel, node);
    RETURN QUERY SELECT cut, r.* FROM vibe_feed_read(after_tick, after_seq, '{}', NULL, lim) r;
END
$$;
