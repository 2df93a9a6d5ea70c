-- The latest expiry of any access token issued from a grant, recorded before the token is
-- handed out: a revocation of the grant is kept (on every node) until then, whatever access-token
-- lifetime the node that minted it was configured with. NULL for grants whose tokens were issued
-- before this column existed (the revoking node's own lifetime is assumed, as before).
ALTER TABLE oauth_grants ADD COLUMN access_expires_at timestamptz;
