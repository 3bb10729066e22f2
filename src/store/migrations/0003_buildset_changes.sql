-- Which changes a buildset was made for (a treeStableTimer buildset has
-- several; the sourcestamp is the newest's).

CREATE TABLE buildset_changes (
    buildsetid INTEGER NOT NULL REFERENCES buildsets(id) ON DELETE CASCADE,
    changeid INTEGER NOT NULL REFERENCES changes(changeid) ON DELETE CASCADE,
    PRIMARY KEY (buildsetid, changeid)
);
CREATE INDEX buildset_changes_change ON buildset_changes(changeid);
