-- The conclusion of a request, an update that stays on its page (issue 20).
--
-- The conclusion sets `sent_at`, and two indexes held it (`requests_email_sent_at`,
-- `requests_user_purpose_sent_at`). An update of an indexed column cannot be a
-- heap-only (HOT) update, so each conclusion wrote its new row version wherever
-- there was room and an entry into every index of `requests`: four per sent mail
-- (the primary key, `created_at` and the two `sent_at` indexes).
--
-- The lookups those indexes served (the latest mail sent to an address, for a
-- provider's bounce notice; the latest code of a user for a purpose) read the
-- few rows of one address or one user, so indexes without `sent_at` serve them
-- as well, and the conclusion writes no indexed column. The claim's insert adds
-- their two entries instead: six B-tree entries per sent mail in `requests`
-- become four.
--
-- HOT also needs room on the row's page for the new version, and the conclusion
-- grows the row (the outcome's bytes, about 500 of them, and the code's hash):
-- a page is filled to 30 % by inserts, so the claims of one page can all be
-- concluded on it. The space is not lost: the concluded rows fill the page, and
-- the table ends about as large as before (docs/performance.md). Only pages
-- written from now on follow the fill factor.
--
-- On a large table, build the two indexes first without blocking writes
-- (`CREATE INDEX CONCURRENTLY requests_email ON requests (email)`, and
-- `... requests_user_purpose ON requests (user_id, purpose)`): this migration
-- then skips them and only drops the old two (docs/operations.md).
CREATE INDEX IF NOT EXISTS requests_email ON requests (email);
CREATE INDEX IF NOT EXISTS requests_user_purpose ON requests (user_id, purpose);
DROP INDEX IF EXISTS requests_email_sent_at;
DROP INDEX IF EXISTS requests_user_purpose_sent_at;
ALTER TABLE requests SET (fillfactor = 30);
