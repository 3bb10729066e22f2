-- Which master runs each clustered service (a change source, a scheduler
-- that reads changes or keeps timers) of a multiMaster fleet, and until
-- when (Unix seconds): renewed with the master's heartbeat, taken over by
-- another once it expires or its master is declared dead.

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    masterid INTEGER NOT NULL REFERENCES masters(id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL
);
