-- Buildsets, build requests and their claims, builds, steps, logs, workers.

CREATE TABLE builders (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT,
    tags_json TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE buildsets (
    id INTEGER PRIMARY KEY,
    external_idstring TEXT,
    reason TEXT NOT NULL,
    scheduler TEXT,
    submitted_at INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    complete_at INTEGER,
    results INTEGER,
    parent_buildid INTEGER,
    parent_relationship TEXT
);
CREATE INDEX buildsets_complete ON buildsets(complete);

CREATE TABLE buildset_sourcestamps (
    buildsetid INTEGER NOT NULL REFERENCES buildsets(id) ON DELETE CASCADE,
    sourcestampid INTEGER NOT NULL REFERENCES sourcestamps(id),
    PRIMARY KEY (buildsetid, sourcestampid)
);

CREATE TABLE buildset_properties (
    buildsetid INTEGER NOT NULL REFERENCES buildsets(id) ON DELETE CASCADE,
    property_name TEXT NOT NULL,
    property_value TEXT NOT NULL,
    PRIMARY KEY (buildsetid, property_name)
);

CREATE TABLE buildrequests (
    id INTEGER PRIMARY KEY,
    buildsetid INTEGER NOT NULL REFERENCES buildsets(id) ON DELETE CASCADE,
    builderid INTEGER NOT NULL REFERENCES builders(id),
    priority INTEGER NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0,
    results INTEGER,
    submitted_at INTEGER NOT NULL,
    complete_at INTEGER,
    waited_for INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX buildrequests_pending ON buildrequests(complete, builderid);

CREATE TABLE buildrequest_claims (
    brid INTEGER PRIMARY KEY REFERENCES buildrequests(id) ON DELETE CASCADE,
    masterid INTEGER NOT NULL REFERENCES masters(id),
    claimed_at INTEGER NOT NULL
);

CREATE TABLE workers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    info_json TEXT NOT NULL DEFAULT '{}',
    paused INTEGER NOT NULL DEFAULT 0,
    graceful INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE connected_workers (
    workerid INTEGER NOT NULL REFERENCES workers(id) ON DELETE CASCADE,
    masterid INTEGER NOT NULL REFERENCES masters(id) ON DELETE CASCADE,
    connected_at INTEGER NOT NULL,
    PRIMARY KEY (workerid, masterid)
);

CREATE TABLE builds (
    id INTEGER PRIMARY KEY,
    number INTEGER NOT NULL,
    builderid INTEGER NOT NULL REFERENCES builders(id),
    buildrequestid INTEGER NOT NULL REFERENCES buildrequests(id),
    workerid INTEGER REFERENCES workers(id),
    masterid INTEGER NOT NULL REFERENCES masters(id),
    started_at INTEGER NOT NULL,
    complete_at INTEGER,
    state_string TEXT NOT NULL DEFAULT '',
    results INTEGER,
    UNIQUE (builderid, number)
);
CREATE INDEX builds_request ON builds(buildrequestid);

CREATE TABLE build_properties (
    buildid INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value_json TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (buildid, name)
);

CREATE TABLE steps (
    id INTEGER PRIMARY KEY,
    number INTEGER NOT NULL,
    name TEXT NOT NULL,
    buildid INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    started_at INTEGER,
    complete_at INTEGER,
    state_string TEXT NOT NULL DEFAULT '',
    results INTEGER,
    urls_json TEXT NOT NULL DEFAULT '[]',
    hidden INTEGER NOT NULL DEFAULT 0,
    UNIQUE (buildid, number)
);

CREATE TABLE logs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL,
    stepid INTEGER NOT NULL REFERENCES steps(id) ON DELETE CASCADE,
    complete INTEGER NOT NULL DEFAULT 0,
    num_lines INTEGER NOT NULL DEFAULT 0,
    type TEXT NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0,
    UNIQUE (stepid, slug)
);

CREATE TABLE logchunks (
    logid INTEGER NOT NULL REFERENCES logs(id) ON DELETE CASCADE,
    first_line INTEGER NOT NULL,
    last_line INTEGER NOT NULL,
    content BLOB NOT NULL,
    compressed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (logid, first_line)
);
