-- The age columns only retention reads get BRIN indexes instead of B-trees
-- (issue 20). A B-tree on `requests.created_at` took an entry at the insert
-- and another at each update that moved the row (the conclusion), and the one
-- on `throttle.last_sent_at` one per throttle row written: three B-tree
-- inserts per mail, each a descent and a page write, for a sweep that runs
-- every five minutes. A BRIN index keeps a min/max per block range: rows are written in
-- time order, so a new row almost always falls inside its range's summary and
-- costs nothing, and the sweep still finds old rows without reading the
-- whole table.
DROP INDEX IF EXISTS requests_created_at;
CREATE INDEX IF NOT EXISTS requests_created_at_brin ON requests USING brin (created_at);

DROP INDEX IF EXISTS throttle_last_sent_at;
CREATE INDEX IF NOT EXISTS throttle_last_sent_at_brin ON throttle USING brin (last_sent_at);
