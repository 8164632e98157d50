-- The conclusion of a request, an update that stays on its page (issue 20).
--
-- The conclusion sets `sent_at`, and two indexes held it (`requests_email_sent_at`,
-- `requests_user_purpose_sent_at`); for a mail sent through an HTTP API it also
-- sets the indexed `provider_message_id`. An update of an indexed column cannot
-- be a heap-only (HOT) update, so each conclusion wrote its new row version
-- wherever there was room and an entry into every index of `requests`: four per
-- sent mail (the primary key, `created_at`, the two `sent_at` indexes), five
-- through an API.
--
-- The lookups the `sent_at` indexes served (the latest mail sent to an address,
-- for a legacy link or a provider's notice; the latest code of a user for a
-- purpose) read the few rows of one address or user, so indexes without
-- `sent_at` serve them as well. The provider's message id goes to a narrow table
-- of its own, as the published marks did (`20261206000020_published.sql`). The
-- conclusion then writes no indexed column; the claim's insert adds the two new
-- entries instead: six B-tree entries per sent mail in `requests` become four.
--
-- HOT also needs room on the row's page for the new version, and the conclusion
-- grows the row by about 500 bytes (the outcome's ~460 and the code's hash) on a
-- claim of 250-300: a page is filled to 30 % by inserts. Claims spread over time
-- are then all concluded on their page; a page's worth concluded in one batch
-- finds room for about four in five (docs/performance.md). The space is not
-- lost: the concluded rows fill the page, and the table ends about as large as
-- before. Only pages written from now on follow the fill factor.
--
-- On a large table, build the two indexes first without blocking writes, and
-- this migration skips them (docs/operations.md has the statements).
CREATE INDEX IF NOT EXISTS requests_email ON requests (email);
CREATE INDEX IF NOT EXISTS requests_user_purpose ON requests (user_id, purpose);
DROP INDEX IF EXISTS requests_email_sent_at;
DROP INDEX IF EXISTS requests_user_purpose_sent_at;
ALTER TABLE requests SET (fillfactor = 30);

-- A mail's id at the provider (HTTP API delivery), by which a provider's notice
-- finds the request. `requests.provider_message_id` and its index stay, read
-- beside this table: a worker of an earlier release, still running during a
-- rolling upgrade, writes it. Retention deletes these rows with their requests
-- (by the primary key's request id); a notice finds them by the provider's id.
CREATE TABLE IF NOT EXISTS provider_messages (
    request_id          TEXT NOT NULL,
    provider_message_id TEXT NOT NULL,
    PRIMARY KEY (request_id, provider_message_id)
);
CREATE INDEX IF NOT EXISTS provider_messages_provider_message_id
    ON provider_messages (provider_message_id);
