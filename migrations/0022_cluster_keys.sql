-- The fingerprints of the keys every node of a cluster must share (the token root key and the
-- secrets key), recorded by the first node that starts on this database. A node started with
-- other keys is refused at start: its tokens would not verify on the other nodes, nor would
-- the secrets it sealed open there.
CREATE TABLE cluster_keys (
    name        text PRIMARY KEY,
    fingerprint text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
