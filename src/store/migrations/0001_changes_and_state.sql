-- Changes and the state of the objects that produce and consume them.
-- Times are Unix seconds, as in Buildbot's database.

CREATE TABLE masters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    active INTEGER NOT NULL DEFAULT 0,
    last_active INTEGER NOT NULL
);

CREATE TABLE sourcestamps (
    id INTEGER PRIMARY KEY,
    branch TEXT,
    revision TEXT,
    repository TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    codebase TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL
);

CREATE TABLE changes (
    changeid INTEGER PRIMARY KEY,
    author TEXT NOT NULL,
    committer TEXT,
    comments TEXT NOT NULL,
    branch TEXT,
    revision TEXT,
    revlink TEXT,
    when_timestamp INTEGER NOT NULL,
    category TEXT,
    repository TEXT NOT NULL DEFAULT '',
    codebase TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    sourcestampid INTEGER NOT NULL REFERENCES sourcestamps(id),
    -- Which change source made it ('HgPoller:<repo>', 'change_hook', ...).
    source TEXT NOT NULL DEFAULT ''
);
CREATE INDEX changes_branch ON changes(branch);
CREATE INDEX changes_revision ON changes(revision);

CREATE TABLE change_files (
    changeid INTEGER NOT NULL REFERENCES changes(changeid) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    filename TEXT NOT NULL,
    PRIMARY KEY (changeid, position)
);

-- value_json is Buildbot's [value, source] pair.
CREATE TABLE change_properties (
    changeid INTEGER NOT NULL REFERENCES changes(changeid) ON DELETE CASCADE,
    property_name TEXT NOT NULL,
    property_value TEXT NOT NULL,
    PRIMARY KEY (changeid, property_name)
);

-- Pollers and schedulers are objects with named JSON state, as in Buildbot.
CREATE TABLE objects (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    class_name TEXT NOT NULL,
    UNIQUE (name, class_name)
);

CREATE TABLE object_state (
    objectid INTEGER NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value_json TEXT NOT NULL,
    PRIMARY KEY (objectid, name)
);

-- Changes a scheduler has classified and not yet turned into a buildset.
CREATE TABLE scheduler_changes (
    schedulerid INTEGER NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
    changeid INTEGER NOT NULL REFERENCES changes(changeid) ON DELETE CASCADE,
    important INTEGER NOT NULL,
    PRIMARY KEY (schedulerid, changeid)
);

-- Every reconfiguration attempt, applied or not.
CREATE TABLE reloads (
    id INTEGER PRIMARY KEY,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    trigger TEXT NOT NULL,
    applied INTEGER NOT NULL DEFAULT 0,
    diff TEXT NOT NULL DEFAULT '',
    errors TEXT NOT NULL DEFAULT '',
    files_json TEXT NOT NULL DEFAULT '[]'
);
