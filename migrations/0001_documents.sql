-- Users, documents and the global index of public documents.

CREATE TABLE users (
    did        text PRIMARY KEY,
    handle     text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The DID strings listed in one ACL list (`acl -> op -> list`); "*" and predicate entries are
-- left out. IMMUTABLE so that it can derive stored generated columns.
CREATE FUNCTION vibe_acl_dids(acl jsonb, op text, list text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(entry #>> '{}' ORDER BY entry #>> '{}'), '{}')
    FROM jsonb_array_elements(
        CASE WHEN jsonb_typeof(acl -> op -> list) = 'array' THEN acl -> op -> list ELSE '[]' END
    ) AS entry
    WHERE jsonb_typeof(entry) = 'string' AND entry #>> '{}' LIKE 'did:%'
$$;

CREATE TABLE documents (
    id          uuid PRIMARY KEY,
    owner_did   text NOT NULL,
    type        text NOT NULL CHECK (type ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    rev         bigint NOT NULL DEFAULT 1,
    acl         jsonb NOT NULL DEFAULT '{}',
    data        jsonb NOT NULL,
    -- ACL summary for SQL filters, derived from `acl` so it can never disagree with it.
    read_public     boolean GENERATED ALWAYS AS (coalesce((acl -> 'read' -> 'allow') ? '*', false)) STORED,
    read_allow_dids text[]  GENERATED ALWAYS AS (vibe_acl_dids(acl, 'read', 'allow')) STORED,
    read_deny_dids  text[]  GENERATED ALWAYS AS (vibe_acl_dids(acl, 'read', 'deny')) STORED
);

-- The caller's documents of one type, newest first (the list endpoint's keyset order).
CREATE INDEX documents_owner_type_created ON documents (owner_did, type, created_at DESC, id DESC);
-- Recently changed documents of a type.
CREATE INDEX documents_type_updated ON documents (type, updated_at DESC);
-- Containment queries over app-defined fields (`data @> '{"tag": "x"}'`).
CREATE INDEX documents_data ON documents USING gin (data jsonb_path_ops);
-- Documents shared with a DID.
CREATE INDEX documents_read_allow ON documents USING gin (read_allow_dids);
-- Public documents of a type, newest first (global feeds).
CREATE INDEX documents_public_type_created ON documents (type, created_at DESC, id DESC) WHERE read_public;

-- The global index: one row per public document, so global feeds are range scans.
CREATE TABLE doc_refs (
    doc_id     uuid PRIMARY KEY REFERENCES documents (id) ON DELETE CASCADE,
    type       text NOT NULL,
    owner_did  text NOT NULL,
    ref        text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX doc_refs_type_created ON doc_refs (type, created_at DESC, doc_id DESC);
CREATE INDEX doc_refs_owner_type ON doc_refs (owner_did, type);

-- Keeps doc_refs equal to the set of public documents, in the writer's transaction.
CREATE FUNCTION vibe_sync_doc_ref() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.read_public THEN
        INSERT INTO doc_refs (doc_id, type, owner_did, ref, created_at, updated_at)
        VALUES (NEW.id, NEW.type, NEW.owner_did,
                NEW.owner_did || '/' || NEW.type || '/' || NEW.id, NEW.created_at, NEW.updated_at)
        ON CONFLICT (doc_id) DO UPDATE SET updated_at = EXCLUDED.updated_at;
    ELSIF TG_OP = 'UPDATE' AND OLD.read_public THEN
        DELETE FROM doc_refs WHERE doc_id = NEW.id;
    END IF;
    RETURN NULL;
END
$$;

-- Private documents (the common case) fire no trigger at all.
CREATE TRIGGER documents_doc_ref_insert
AFTER INSERT ON documents
FOR EACH ROW WHEN (NEW.read_public)
EXECUTE FUNCTION vibe_sync_doc_ref();

CREATE TRIGGER documents_doc_ref_update
AFTER UPDATE ON documents
FOR EACH ROW WHEN (NEW.read_public OR OLD.read_public)
EXECUTE FUNCTION vibe_sync_doc_ref();
