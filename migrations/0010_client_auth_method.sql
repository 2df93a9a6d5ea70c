-- The token endpoint authentication method each client registered with (RFC 7591
-- `token_endpoint_auth_method`), so registration and the admin API report what was asked for.
-- A confidential client may still authenticate with either secret method; a public one with none.
ALTER TABLE oauth_clients ADD COLUMN auth_method text NOT NULL DEFAULT 'client_secret_basic';
UPDATE oauth_clients SET auth_method = 'none' WHERE secret_hash IS NULL;
ALTER TABLE oauth_clients ALTER COLUMN auth_method DROP DEFAULT;
ALTER TABLE oauth_clients ADD CONSTRAINT oauth_clients_auth_method CHECK (
    auth_method IN ('client_secret_basic', 'client_secret_post', 'none')
    AND (auth_method = 'none') = (secret_hash IS NULL)
);
