-- An insert is logged in the document's own row, not in a row of `changes`: `log_xid` (the
-- inserting transaction, as `changes.xid`) and `log_seq` (its place in the feed, from the same
-- sequence as `changes.seq`) are column defaults, so an INSERT — through Vibe, in SQL or by COPY
-- — pays two defaults and one entry in a partial index instead of a trigger call and a second
-- heap row with copies of the document (measured: 0.93 of a feed-less insert's throughput
-- against 0.85 with the trigger; docs/benchmarks.md).
--
-- A batch is now the rows of `changes` *and* the documents whose `log_xid` lies in it. Such a
-- row is its insert's image only until it changes, so the first UPDATE or DELETE of a row that
-- still carries its insert turns that insert into a `changes` row first (same xid and seq, so
-- the same place in the same batch; the image it was inserted with) and clears the two columns,
-- in the writing transaction. A reader's snapshot sees either the marked row or the log row,
-- never both and never neither: one insert, one change, at one cursor.

-- No default yet: existing rows stay unmarked (their inserts were logged by the trigger), and
-- adding a column without a default does not rewrite the table.
ALTER TABLE documents ADD COLUMN log_xid bigint, ADD COLUMN log_seq bigint;
ALTER TABLE documents
    ALTER COLUMN log_xid SET DEFAULT pg_current_xact_id()::text::bigint,
    ALTER COLUMN log_seq SET DEFAULT nextval('changes_seq_seq');
-- Partial: rows whose insert was logged elsewhere (before this migration, or after an update)
-- cost the index nothing.
CREATE INDEX documents_log_xid ON documents (log_xid) WHERE log_xid IS NOT NULL;

-- Updates and deletes: logged before the row changes, which is when the insert it may still
-- carry can be moved to the log and its marks cleared (an AFTER trigger cannot change the row).
-- The row lock is held and concurrent updates re-checked by then, so OLD is the version being
-- replaced and NEW the one being stored.
CREATE FUNCTION vibe_log_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.log_xid IS NOT NULL THEN
        INSERT INTO changes (seq, xid, op, doc_id, type, owner_did, rev, created_at, updated_at,
                             logged_at, new_acl, new_data)
        VALUES (OLD.log_seq, OLD.log_xid, 'i', OLD.id, OLD.type, OLD.owner_did, OLD.rev,
                OLD.created_at, OLD.updated_at, OLD.created_at, OLD.acl, OLD.data);
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, old_acl, old_data)
        VALUES ('d', OLD.id, OLD.type, OLD.owner_did, OLD.rev, OLD.created_at, OLD.updated_at, OLD.acl, OLD.data);
        RETURN OLD;
    END IF;
    NEW.log_xid := NULL;
    NEW.log_seq := NULL;
    IF NEW.type <> OLD.type OR NEW.owner_did <> OLD.owner_did THEN
        -- Moving a document between types or owners is a delete there and an insert here.
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, old_acl, old_data)
        VALUES ('d', OLD.id, OLD.type, OLD.owner_did, OLD.rev, OLD.created_at, OLD.updated_at, OLD.acl, OLD.data);
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, new_acl, new_data)
        VALUES ('i', NEW.id, NEW.type, NEW.owner_did, NEW.rev, NEW.created_at, NEW.updated_at, NEW.acl, NEW.data);
    ELSE
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, new_acl, new_data, old_acl, old_data)
        VALUES ('u', NEW.id, NEW.type, NEW.owner_did, NEW.rev, NEW.created_at, NEW.updated_at, NEW.acl, NEW.data, OLD.acl, OLD.data);
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER documents_change_log ON documents;
CREATE TRIGGER documents_change_log
BEFORE UPDATE OR DELETE ON documents
FOR EACH ROW EXECUTE FUNCTION vibe_log_write();
DROP FUNCTION vibe_log_change();

-- A tick is cut when anything became visible since the last one: a log row or a marked insert.
CREATE OR REPLACE FUNCTION vibe_tick(lock_key bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    made bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    INSERT INTO feed_ticks (snapshot)
    SELECT pg_current_snapshot()
    FROM (SELECT snapshot AS prev, pg_snapshot_xmin(snapshot)::text::bigint AS lo
          FROM feed_ticks ORDER BY tick DESC LIMIT 1) last
    WHERE EXISTS (
        SELECT 1 FROM changes c
        WHERE c.xid >= last.lo
          AND c.xid < pg_snapshot_xmax(pg_current_snapshot())::text::bigint
          AND NOT pg_visible_in_snapshot(c.xid::text::xid8, last.prev)
          AND pg_visible_in_snapshot(c.xid::text::xid8, pg_current_snapshot()))
       OR EXISTS (
        SELECT 1 FROM documents d
        WHERE d.log_xid IS NOT NULL
          AND d.log_xid >= last.lo
          AND d.log_xid < pg_snapshot_xmax(pg_current_snapshot())::text::bigint
          AND NOT pg_visible_in_snapshot(d.log_xid::text::xid8, last.prev)
          AND pg_visible_in_snapshot(d.log_xid::text::xid8, pg_current_snapshot()))
    RETURNING tick INTO made;
    RETURN made;
END
$$;

-- The batch read over both sources, in `seq` order (one sequence numbers both).
CREATE OR REPLACE FUNCTION vibe_read(after_tick bigint, after_seq bigint, types text[], owner text, lim bigint)
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
        SELECT * FROM (
            (SELECT l.seq, l.xid, l.op, l.doc_id, l.type, l.owner_did, l.rev, l.created_at,
                    l.updated_at, l.logged_at, l.new_acl, l.new_data, l.old_acl, l.old_data
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
            (SELECT d.log_seq, d.log_xid, 'i'::"char", d.id, d.type, d.owner_did, d.rev,
                    d.created_at, d.updated_at, d.created_at, d.acl, d.data, NULL::jsonb,
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
