-- Cluster mode, version 2: membership (on the directory shard) and actor
-- ownership with fencing (on each actor's own shard, beside its rows, so a
-- write and the check of its epoch are one transaction). Times are the
-- database's clock, so the nodes' clocks need not agree.

-- One row per node that has joined; live while beat_at is within its lease.
CREATE TABLE nodes (
    id         text        PRIMARY KEY,
    address    text        NOT NULL,
    beat_at    timestamptz NOT NULL,
    lease_ms   int8        NOT NULL,
    draining   bool        NOT NULL DEFAULT false
);

-- Who owns each actor (account or group) and under which epoch. The epoch
-- only grows: every acquisition takes the next one. node is NULL once the
-- owner released the actor.
CREATE TABLE owners (
    actor int8 PRIMARY KEY,
    node  text,
    epoch int8 NOT NULL
);

-- Fencing: called at the start of a group commit with the epoch each
-- write carries. Locks the owners' rows (FOR SHARE, so a takeover waits
-- until this commit is over, and this commit sees a takeover that came
-- first), and fails the whole statement if any epoch is not current. The
-- error (SQLSTATE SKF01) lists the stale writes' actor:epoch pairs in its
-- detail, so the committer can answer those writes "fenced" and commit the
-- others (a current write of the same actor included).
CREATE FUNCTION skylark_fence(actors int8[], epochs int8[]) RETURNS int8
LANGUAGE plpgsql AS $$
DECLARE
    stale text;
BEGIN
    IF cardinality(actors) = 0 THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM owners WHERE actor = ANY (actors) ORDER BY actor FOR SHARE;
    SELECT string_agg(f.actor::text || ':' || f.epoch::text, ',') INTO stale
      FROM unnest(actors, epochs) AS f(actor, epoch)
      LEFT JOIN owners o ON o.actor = f.actor AND o.epoch = f.epoch
     WHERE o.actor IS NULL;
    IF stale IS NOT NULL THEN
        RAISE EXCEPTION 'stale ownership epoch' USING ERRCODE = 'SKF01', DETAIL = stale;
    END IF;
    RETURN cardinality(actors);
END
$$;
