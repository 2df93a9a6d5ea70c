-- A change of a document's id or `created_at` made in SQL (the API never makes one) is logged
-- as a delete and an insert, like a move between types, owners or parents. Logged as one update
-- it kept the old id in live windows for good, and a query filtering on `createdAt` judged the
-- old version by the new time, so a document moved out of its range stayed in its window.

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
       OR NEW.parent IS DISTINCT FROM OLD.parent
       OR NEW.id <> OLD.id OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        -- Moving a document between types, owners or parents, renaming it or changing when it
        -- was made (in SQL; the API never does) is a delete there and an insert here.
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
