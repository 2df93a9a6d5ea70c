-- Certificates and ACL predicates in SQL.
--
-- A certificate is a document of the reserved type `vibe.certificate` (only the server writes
-- it): owner = the issuer DID, data = {subject, type, issued_at, expires_at, signature}. Being a
-- document, its issue and revocation (delete) travel through the change feed in order with
-- every other write, which is how every node's realtime tree learns of them.

-- Does the caller hold, for every predicate of some predicate entry in `acl -> op -> list`, a
-- valid certificate of that type from that issuer?
CREATE FUNCTION vibe_acl_preds_hold(acl jsonb, op text, list text, caller text) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT caller IS NOT NULL AND EXISTS (
        SELECT 1
        FROM jsonb_array_elements(
            CASE WHEN jsonb_typeof(acl -> op -> list) = 'array' THEN acl -> op -> list ELSE '[]' END
        ) AS entry
        WHERE jsonb_typeof(entry) = 'array'
          AND NOT EXISTS (
              SELECT 1 FROM jsonb_array_elements(entry) AS p
              WHERE NOT EXISTS (
                  SELECT 1 FROM documents c
                  WHERE c.type = 'vibe.certificate'
                    AND c.data ->> 'subject' = caller
                    AND c.owner_did = p ->> 'issuer'
                    AND c.data ->> 'type' = p ->> 'type'
                    AND (c.data ->> 'expires_at' IS NULL
                         OR (c.data ->> 'expires_at')::timestamptz > now()))))
$$;

-- Does the read rule hold a predicate entry (in allow or deny)? Only then is the function above
-- evaluated, so documents without predicates pay nothing.
CREATE FUNCTION vibe_acl_has_predicates(acl jsonb, op text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF jsonb_typeof(acl -> op) IS DISTINCT FROM 'object' THEN
        RETURN false;
    END IF;
    RETURN EXISTS (
        SELECT 1 FROM jsonb_array_elements(
            CASE WHEN jsonb_typeof(acl -> op -> 'allow') = 'array' THEN acl -> op -> 'allow' ELSE '[]' END
            || CASE WHEN jsonb_typeof(acl -> op -> 'deny') = 'array' THEN acl -> op -> 'deny' ELSE '[]' END
        ) AS entry
        WHERE jsonb_typeof(entry) = 'array');
END
$$;

ALTER TABLE documents
    ADD COLUMN read_deny_public boolean GENERATED ALWAYS AS (
        coalesce((acl -> 'read' -> 'deny') ? '*', false)) STORED,
    ADD COLUMN read_predicates boolean GENERATED ALWAYS AS (
        CASE WHEN acl ? 'read' THEN vibe_acl_has_predicates(acl, 'read') ELSE false END) STORED;

-- Certificates held by a subject, by issuer and type (the predicate test's probe).
CREATE INDEX documents_certificates
    ON documents ((data ->> 'subject'), owner_did, (data ->> 'type'))
    WHERE type = 'vibe.certificate';
