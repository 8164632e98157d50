-- The age columns that only retention reads, indexed by BRIN (issue 20).
--
-- `requests.created_at` and `throttle.last_sent_at` are read by nothing but
-- the retention sweep (`created_at < cutoff`, a batch at a time), yet each had
-- a B-tree that every mail paid for: an entry for the new `requests` row at
-- the claim, another for the row version the conclusion writes (the update
-- changes indexed columns, so it cannot be HOT), and one for each new or
-- refreshed `throttle` row. Rows are appended in roughly time order, which is
-- what a BRIN index summarises: a few pages of ranges instead of an entry per
-- row, and an insert into an already summarised range costs next to nothing.
-- The sweep reads whole 128-page ranges and rechecks the rows, which is what
-- a batch delete of old rows needs anyway.
--
-- Built in the migration's transaction, which holds off writes to the table
-- while it runs (a BRIN index builds in one pass over the table).
CREATE INDEX IF NOT EXISTS requests_created_at_brin ON requests USING brin (created_at);
DROP INDEX IF EXISTS requests_created_at;

CREATE INDEX IF NOT EXISTS throttle_last_sent_at_brin ON throttle USING brin (last_sent_at);
DROP INDEX IF EXISTS throttle_last_sent_at;
