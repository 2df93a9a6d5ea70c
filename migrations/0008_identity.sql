-- Identity: accounts, the OpenID Connect provider's state, consent, and token revocation.
-- Every secret a client or browser holds (session id, code, refresh token, client secret) is
-- stored as its SHA-256 only, so a database dump cannot replay them.

-- Accounts. `handle` is lower-case (validated by the server); the Ed25519 key behind the DID is
-- sealed with the node's secrets key (XChaCha20-Poly1305, nonce || ciphertext).
ALTER TABLE users
    ADD COLUMN password_hash text,
    ADD COLUMN sealed_key    bytea,
    ADD COLUMN profile       jsonb NOT NULL DEFAULT '{}';

-- Keys that sign ID tokens (RS256). The newest unretired key signs; every key still inside its
-- publication window stays in the JWKS so tokens it signed keep verifying after a rotation.
CREATE TABLE oidc_signing_keys (
    kid         text PRIMARY KEY,
    sealed_key  bytea NOT NULL,     -- PKCS#8 DER, sealed like users.sealed_key
    public_jwk  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz
);

-- OAuth clients (apps). `scopes` is the app's manifest: the most it may ask a user for.
CREATE TABLE oauth_clients (
    id                        text PRIMARY KEY,
    name                      text NOT NULL,
    secret_hash               bytea,           -- NULL: a public client (PKCE required)
    redirect_uris             text[] NOT NULL,
    post_logout_redirect_uris text[] NOT NULL DEFAULT '{}',
    scopes                    text[] NOT NULL,
    created_at                timestamptz NOT NULL DEFAULT now()
);

-- Signed-in browsers at the provider (the cookie holds the id; the row its hash).
CREATE TABLE user_sessions (
    id_hash    bytea PRIMARY KEY,
    user_did   text NOT NULL REFERENCES users (did) ON DELETE CASCADE,
    auth_time  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX user_sessions_expires ON user_sessions (expires_at);

-- An authorization request waiting for its login and consent forms. The browser holds the id in
-- a SameSite cookie and the form carries the CSRF token; both must match.
CREATE TABLE oauth_interactions (
    id         uuid PRIMARY KEY,
    csrf_hash  bytea NOT NULL,
    client_id  text NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    request    jsonb NOT NULL,
    user_did   text REFERENCES users (did) ON DELETE CASCADE,
    auth_time  timestamptz,
    expires_at timestamptz NOT NULL
);
CREATE INDEX oauth_interactions_expires ON oauth_interactions (expires_at);

-- What a user allowed an app. One row per (user, app); revoking deletes it.
CREATE TABLE consents (
    user_did   text NOT NULL REFERENCES users (did) ON DELETE CASCADE,
    client_id  text NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    scopes     text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_did, client_id)
);

-- A grant: one authorization code and the family of tokens issued from it. Revoking the grant
-- revokes every access and refresh token of the family.
CREATE TABLE oauth_grants (
    id              uuid PRIMARY KEY,
    user_did        text NOT NULL REFERENCES users (did) ON DELETE CASCADE,
    client_id       text NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    scopes          text[] NOT NULL,
    nonce           text,
    auth_time       timestamptz NOT NULL,
    code_hash       bytea NOT NULL UNIQUE,
    code_challenge  text,
    redirect_uri    text NOT NULL,
    code_expires_at timestamptz NOT NULL,
    code_used_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX oauth_grants_user_client ON oauth_grants (user_did, client_id);

-- Refresh tokens. Using one marks it used and issues its successor; presenting a used one again
-- is a replay, and revokes the whole grant.
CREATE TABLE oauth_refresh_tokens (
    token_hash bytea PRIMARY KEY,
    grant_id   uuid NOT NULL REFERENCES oauth_grants (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX oauth_refresh_tokens_grant ON oauth_refresh_tokens (grant_id);

-- What every node must refuse although the signature is good: a grant (`grant:<uuid>`) or one
-- access token with all its attenuations (`token:<revocation id hex>`). Nodes read rows after
-- the last `seq` they saw; rows older than any token they concern are pruned.
CREATE TABLE token_revocations (
    seq        bigserial PRIMARY KEY,
    revoked    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX token_revocations_expires ON token_revocations (expires_at);
