-- The broker's confirmation of an outcome, as a narrow row of its own (issue 20).
--
-- Before, the worker recorded it by setting `requests.outcome_published`: an
-- update of the whole wide row (the outcome's bytes, the context) that could
-- not stay on its page, so every index of `requests` got a new entry for it
-- (four for a sent mail), the second such update of the row after the
-- conclusion. A row here is one small tuple and one index entry.
--
-- Keyed by the outcome's event id too: a replayed dead letter reopens its
-- request and concludes it with a new outcome (a new id), so a mark of the
-- old outcome never speaks for the new one, and marking needs no lock on the
-- request. Retention deletes a request's marks with the request.
--
-- `requests.outcome_published` stays, read beside this table: a worker of an
-- earlier release, still running during a rolling upgrade, sets it.
CREATE TABLE IF NOT EXISTS published (
    request_id TEXT COLLATE "C" NOT NULL,
    outcome_id TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (request_id, outcome_id)
);

INSERT INTO published (request_id, outcome_id)
SELECT id, convert_from(outcome, 'UTF8')::jsonb ->> 'id'
FROM requests
WHERE outcome_published AND outcome IS NOT NULL
  AND convert_from(outcome, 'UTF8')::jsonb ->> 'id' IS NOT NULL
ON CONFLICT DO NOTHING;
