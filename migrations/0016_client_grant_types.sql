-- The grant types a client registered (RFC 7591 §2). A client may redeem codes
-- (`authorization_code`, always present) and, only if it registered `refresh_token`, receive and
-- use refresh tokens. Clients registered before this column kept refresh tokens whenever
-- `offline_access` was granted, so they keep both.
ALTER TABLE oauth_clients
    ADD COLUMN grant_types text[] NOT NULL DEFAULT '{authorization_code,refresh_token}';
ALTER TABLE oauth_clients ALTER COLUMN grant_types DROP DEFAULT;
ALTER TABLE oauth_clients ADD CONSTRAINT oauth_clients_grant_types CHECK (
    grant_types <@ '{authorization_code,refresh_token}'::text[]
    AND 'authorization_code' = ANY (grant_types)
);
