-- Keys compared byte by byte (issue 20). Request ids, user ids and purposes
-- are opaque keys: nothing sorts them for a person. Under the database's
-- linguistic collation (en_US.UTF-8, C.UTF-8: anything but "C") every
-- comparison in their indexes went through strcoll; with "C" it is a memcmp.
-- In the profile of PostgreSQL under the worker, text comparisons were about a
-- tenth of its CPU: every batch reaches its rows by these keys, and every
-- insert walks their indexes.
--
-- The change rewrites no table; the indexes on these columns are rebuilt
-- (on a large table, run this migration at a quiet hour). A parameter of the
-- default collation meets these columns in the columns' collation, so the
-- indexes keep serving every query. `email` keeps its collation: the
-- suppression list's `lower(email)` index is matched against it.
ALTER TABLE requests
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C",
    ALTER COLUMN purpose TYPE TEXT COLLATE "C";

ALTER TABLE throttle
    ALTER COLUMN user_id TYPE TEXT COLLATE "C",
    ALTER COLUMN purpose TYPE TEXT COLLATE "C",
    ALTER COLUMN request_id TYPE TEXT COLLATE "C";
