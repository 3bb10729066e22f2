-- The push grid reads a page of buildsets with their requests and changes.

CREATE INDEX buildrequests_buildset ON buildrequests(buildsetid);
