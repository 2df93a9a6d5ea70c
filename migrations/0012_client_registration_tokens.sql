-- Client registration management (RFC 7592): a client registered through `/oauth/register`
-- reads, updates and deletes its registration with a registration access token. The row keeps
-- the token's SHA-256 only; a new token replaces it in every answer that must carry one.
-- NULL: a client registered by an operator (`/v1/admin/clients`), managed there.
ALTER TABLE oauth_clients ADD COLUMN registration_token_hash bytea;
CREATE UNIQUE INDEX oauth_clients_registration_token ON oauth_clients (registration_token_hash)
    WHERE registration_token_hash IS NOT NULL;
