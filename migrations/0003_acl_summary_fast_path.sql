-- The ACL summary columns called a LANGUAGE sql function on every write, which PostgreSQL parses
-- and plans on each call (it cannot be inlined: it aggregates). Now: a plpgsql function (its
-- plan is cached per session), called only when the ACL has the list at all, so documents with
-- the default ACL pay nothing.

CREATE OR REPLACE FUNCTION vibe_acl_dids(acl jsonb, op text, list text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF jsonb_typeof(acl -> op -> list) IS DISTINCT FROM 'array' THEN
        RETURN '{}';
    END IF;
    RETURN coalesce(
        (SELECT array_agg(entry #>> '{}' ORDER BY entry #>> '{}')
         FROM jsonb_array_elements(acl -> op -> list) AS entry
         WHERE jsonb_typeof(entry) = 'string' AND entry #>> '{}' LIKE 'did:%'),
        '{}');
END
$$;

DROP INDEX documents_read_allow;
ALTER TABLE documents
    DROP COLUMN read_allow_dids,
    DROP COLUMN read_deny_dids;
ALTER TABLE documents
    ADD COLUMN read_allow_dids text[] GENERATED ALWAYS AS (
        CASE WHEN acl -> 'read' ? 'allow' THEN vibe_acl_dids(acl, 'read', 'allow') ELSE '{}' END) STORED,
    ADD COLUMN read_deny_dids text[] GENERATED ALWAYS AS (
        CASE WHEN acl -> 'read' ? 'deny' THEN vibe_acl_dids(acl, 'read', 'deny') ELSE '{}' END) STORED;
CREATE INDEX documents_read_allow ON documents USING gin (read_allow_dids);
