-- Version 4: block lists, contact names, profiles and two-step verification
-- PINs, each on the account's shard beside its settings; users' reports, on the directory
-- shard. A `blocks` row means `account`
-- blocked `peer` since `at_ms`; a `pins` row holds the account's PIN record
-- (an Argon2id hash, never the PIN, and the count of wrong guesses).
CREATE TABLE blocks (
    account int8 NOT NULL,
    peer    int8 NOT NULL,
    at_ms   int8 NOT NULL,
    PRIMARY KEY (account, peer)
);

-- The names an account gave its contacts (synced to its devices).
CREATE TABLE contact_names (
    account int8 NOT NULL,
    peer    int8 NOT NULL,
    name    text NOT NULL,
    PRIMARY KEY (account, peer)
);

-- An account's profile (name, about, who may see them).
CREATE TABLE profiles (
    account int8  PRIMARY KEY,
    record  jsonb NOT NULL
);

CREATE TABLE pins (
    account int8  PRIMARY KEY,
    record  jsonb NOT NULL
);

CREATE TABLE reports (
    id     int8  PRIMARY KEY,
    record jsonb NOT NULL
);
