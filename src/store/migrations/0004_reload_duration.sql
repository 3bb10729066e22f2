-- How long each reload took, from its trigger to the new config applied
-- (or to the error), in milliseconds.
ALTER TABLE reloads ADD COLUMN duration_ms REAL NOT NULL DEFAULT 0;
