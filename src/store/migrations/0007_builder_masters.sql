-- Which masters have each builder in their running config (Buildbot's
-- builder_masters): a master reads the queue of its own builders only.

CREATE TABLE builder_masters (
    builderid INTEGER NOT NULL REFERENCES builders(id) ON DELETE CASCADE,
    masterid INTEGER NOT NULL REFERENCES masters(id) ON DELETE CASCADE,
    PRIMARY KEY (builderid, masterid)
);
CREATE INDEX builder_masters_master ON builder_masters(masterid);
