-- Skylark's schema, version 1. Every shard holds every table; the
-- directory tables (meta counters, accounts, devices, verifications, push)
-- are used on the directory shard only, the per-account tables on the
-- shard that owns the account or group. Ids and sequence numbers are
-- unsigned 63-bit values stored in int8.

-- Named values: the server id, secrets, the shard identity (bytea).
CREATE TABLE meta (
    key   text  PRIMARY KEY,
    value bytea NOT NULL
);

-- Id allocators (next value to hand out); updated in committed transactions,
-- so an id is never handed out twice, even across a crash.
CREATE TABLE id_counters (
    name text PRIMARY KEY,
    next int8 NOT NULL
);

CREATE TABLE accounts (
    id            int8 PRIMARY KEY,
    phone         text NOT NULL UNIQUE,
    created_at_ms int8 NOT NULL
);

CREATE TABLE devices (
    id            int8  PRIMARY KEY,
    account_id    int8  NOT NULL,
    public_key    bytea NOT NULL,
    name          text  NOT NULL,
    created_at_ms int8  NOT NULL,
    removed_at_ms int8,
    last_seen_ms  int8
);
CREATE INDEX devices_active ON devices (account_id, id) WHERE removed_at_ms IS NULL;

CREATE TABLE verifications (
    id            text  PRIMARY KEY,
    created_at_ms int8  NOT NULL,
    record        jsonb NOT NULL
);

-- Push targets, by device (directory shard).
CREATE TABLE push (
    device int8  PRIMARY KEY,
    target jsonb NOT NULL
);

-- Per account (or group), on its shard.

-- The account's log: entries in the binary record encoding.
CREATE TABLE log (
    account int8  NOT NULL,
    seq     int8  NOT NULL,
    entry   bytea NOT NULL,
    PRIMARY KEY (account, seq)
);

-- Forwards not yet acknowledged by their destination.
CREATE TABLE outbox (
    account int8  NOT NULL,
    seq     int8  NOT NULL,
    item    bytea NOT NULL,
    PRIMARY KEY (account, seq)
);

CREATE TABLE counters (
    account     int8 PRIMARY KEY,
    next_seq    int8 NOT NULL,
    next_outbox int8 NOT NULL
);

CREATE TABLE client_ids (
    account   int8 NOT NULL,
    device    int8 NOT NULL,
    client_id text NOT NULL,
    seq       int8 NOT NULL,
    PRIMARY KEY (account, device, client_id)
);

-- Highest outbox sequence applied from each source.
CREATE TABLE inbound (
    account int8 NOT NULL,
    source  int8 NOT NULL,
    hwm     int8 NOT NULL,
    PRIMARY KEY (account, source)
);

-- Per-device delivery cursors.
CREATE TABLE cursors (
    account int8 NOT NULL,
    device  int8 NOT NULL,
    seq     int8 NOT NULL,
    PRIMARY KEY (account, device)
);

-- High-water marks per peer: slot 0 delivered and 1 read receipts received
-- from the peer, 2 the account's read marker for the peer's messages, 3 the
-- highest of the peer's sequence numbers the account received.
CREATE TABLE receipts (
    account int8 NOT NULL,
    peer    int8 NOT NULL,
    slot    int2 NOT NULL,
    hwm     int8 NOT NULL,
    PRIMARY KEY (account, peer, slot)
);

CREATE TABLE contacts (
    account int8 NOT NULL,
    peer    int8 NOT NULL,
    PRIMARY KEY (account, peer)
);

CREATE TABLE settings (
    account    int8  PRIMARY KEY,
    visibility jsonb NOT NULL
);

CREATE TABLE groups (
    id   int8  PRIMARY KEY,
    meta jsonb NOT NULL
);

-- Members of each group, on the group's shard.
CREATE TABLE memberships (
    member   int8 NOT NULL,
    group_id int8 NOT NULL,
    PRIMARY KEY (member, group_id)
);
