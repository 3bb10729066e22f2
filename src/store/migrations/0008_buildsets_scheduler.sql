-- A Dependent scheduler reads its upstream's buildsets after the last one
-- it has handled, whichever master completed them.

CREATE INDEX buildsets_scheduler ON buildsets(scheduler, id);
