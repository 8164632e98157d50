-- One-time codes (issue 16). Released migrations are never edited: add a new file.

-- The code of a mail lives with its request: only a keyed hash of it
-- (HMAC-SHA256 under a key derived from VERIMAIL_SECRET_KEY, bound to the
-- request id), written together with `sent_at` when the mail is recorded as
-- sent, so the stored hash is always that of the mail that went out last.
-- `code_attempts` counts wrong tries; the gateway increments it with a
-- single conditional UPDATE, so gateways racing each other never count past
-- CODE_MAX_ATTEMPTS. Adding a nullable column and a column with a constant
-- default rewrites no rows (PostgreSQL 11+).
ALTER TABLE requests
    ADD COLUMN code_hash BYTEA,
    ADD COLUMN code_attempts INTEGER NOT NULL DEFAULT 0;

-- The gateway checks the code of the latest mail sent to a user for a purpose.
-- Built here in the migration's transaction, which holds off writes to
-- `requests` while it runs (short at the sizes RETENTION_HOURS keeps); a large
-- deployment can build it beforehand without blocking, with the same
-- statement as CREATE INDEX CONCURRENTLY, and this one then does nothing.
CREATE INDEX IF NOT EXISTS requests_user_purpose_sent_at
    ON requests (user_id, purpose, sent_at DESC)
    WHERE sent_at IS NOT NULL;
