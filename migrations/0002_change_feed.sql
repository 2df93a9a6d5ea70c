-- The change feed: one log row per committed document write, and ticks that cut the log into
-- globally ordered batches (the PgQ method; see ARCHITECTURE.md, "The change feed").

CREATE TABLE changes (
    seq        bigserial PRIMARY KEY,
    -- The writing transaction; a batch is the rows whose xid became visible between two ticks.
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    op         "char" NOT NULL CHECK (op IN ('i', 'u', 'd')),
    doc_id     uuid NOT NULL,
    type       text NOT NULL,
    owner_did  text NOT NULL,
    rev        bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    logged_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- New image (insert, update) and old image (update, delete): a change alone says whether a
    -- document entered, changed in, or left a query's result, even when replayed much later.
    new_acl    jsonb,
    new_data   jsonb,
    old_acl    jsonb,
    old_data   jsonb
);
CREATE INDEX changes_xid ON changes (xid);

CREATE FUNCTION vibe_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.type <> OLD.type OR NEW.owner_did <> OLD.owner_did) THEN
        -- Moving a document between types or owners is a delete there and an insert here.
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, old_acl, old_data)
        VALUES ('d', OLD.id, OLD.type, OLD.owner_did, OLD.rev, OLD.created_at, OLD.updated_at, OLD.acl, OLD.data);
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, new_acl, new_data)
        VALUES ('i', NEW.id, NEW.type, NEW.owner_did, NEW.rev, NEW.created_at, NEW.updated_at, NEW.acl, NEW.data);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, new_acl, new_data)
        VALUES ('i', NEW.id, NEW.type, NEW.owner_did, NEW.rev, NEW.created_at, NEW.updated_at, NEW.acl, NEW.data);
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, new_acl, new_data, old_acl, old_data)
        VALUES ('u', NEW.id, NEW.type, NEW.owner_did, NEW.rev, NEW.created_at, NEW.updated_at, NEW.acl, NEW.data, OLD.acl, OLD.data);
    ELSE
        INSERT INTO changes (op, doc_id, type, owner_did, rev, created_at, updated_at, old_acl, old_data)
        VALUES ('d', OLD.id, OLD.type, OLD.owner_did, OLD.rev, OLD.created_at, OLD.updated_at, OLD.acl, OLD.data);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER documents_change_log
AFTER INSERT OR UPDATE OR DELETE ON documents
FOR EACH ROW EXECUTE FUNCTION vibe_log_change();

-- Ticks: snapshots taken one at a time (under an advisory lock), so each sees at least what the
-- previous one saw. Batch N = log rows visible in tick N's snapshot and not in tick N-1's.
CREATE TABLE feed_ticks (
    tick       bigserial PRIMARY KEY,
    snapshot   pg_snapshot NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO feed_ticks (snapshot) VALUES (pg_current_snapshot());
