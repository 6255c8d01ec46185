-- Version 5: disappearing messages. One row per stored copy of a message
-- or group post whose payload must be purged at `expires_at` (server
-- clock, ms), on the shard of the account whose log holds the copy. The
-- sweeper purges the log entry's payload and deletes the row.
CREATE TABLE expiries (
    expires_at int8 NOT NULL,
    account    int8 NOT NULL,
    seq        int8 NOT NULL,
    PRIMARY KEY (expires_at, account, seq)
);
