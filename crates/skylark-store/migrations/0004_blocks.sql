-- Version 4: block lists, on the blocking account's shard beside its
-- settings. A row means `account` blocked `peer` since `at_ms`.
CREATE TABLE blocks (
    account int8 NOT NULL,
    peer    int8 NOT NULL,
    at_ms   int8 NOT NULL,
    PRIMARY KEY (account, peer)
);
