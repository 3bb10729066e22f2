-- MasterLocks of several masters on one database: who holds which lock,
-- taken with the claim of the request that needs it and given back when
-- its build ends (or its master stops or is declared dead).

CREATE TABLE lock_holders (
    name TEXT NOT NULL,
    brid INTEGER NOT NULL REFERENCES buildrequests(id) ON DELETE CASCADE,
    masterid INTEGER NOT NULL REFERENCES masters(id) ON DELETE CASCADE,
    exclusive INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, brid)
);
CREATE INDEX lock_holders_master ON lock_holders(masterid);
