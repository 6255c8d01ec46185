-- Version 3: the MLS key-package directory, on the directory shard beside
-- the devices. A claim takes a device's oldest package out (lowest seq);
-- the last-resort package is handed out when none is left and is never
-- consumed. Both are opaque to the server.
CREATE TABLE key_packages (
    device  int8  NOT NULL,
    seq     int8  GENERATED ALWAYS AS IDENTITY,
    package bytea NOT NULL,
    PRIMARY KEY (device, seq)
);

CREATE TABLE last_resort_keys (
    device  int8  PRIMARY KEY,
    package bytea NOT NULL
);
