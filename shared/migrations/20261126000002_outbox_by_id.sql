-- The outbox relay takes events in id order: ids are UUIDv7, which begin with
-- their creation time in milliseconds, so id order is creation order (to the
-- millisecond, across gateways up to their clocks' skew: events are
-- independent, and none waits behind another). The primary key serves that
-- order, so the created_at index goes: one index entry fewer to insert and to
-- delete per verified event.
DROP INDEX IF EXISTS outbox_created_at;
