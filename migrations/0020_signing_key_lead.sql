-- A rotated ID-token signing key is published before it signs: `signs_from` is when it starts,
-- and the key it replaces is retired then (not at the rotation), so every node has the new key in
-- its JWKS, and relying parties' cached key sets have had time to expire, before a token signed
-- with it exists. Keys made before this column signed at once, as the default keeps.
ALTER TABLE oidc_signing_keys ADD COLUMN signs_from timestamptz NOT NULL DEFAULT now();
