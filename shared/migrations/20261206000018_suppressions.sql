-- Deliverability (issue 17): the suppression list, webhook receipts, SNS
-- signing certificates. Released migrations are never edited: add a new file.

-- Addresses that must not be mailed. One entry per address, compared
-- case-insensitively (the unique index is on lower(email)); `email` keeps the
-- spelling first seen. Retention never deletes these rows: they are what
-- protects the sender's reputation.
CREATE TABLE suppressions (
    email      TEXT NOT NULL,
    reason     TEXT NOT NULL
               CHECK (reason IN ('bounce', 'complaint', 'recipient_rejected', 'manual')),
    -- Who added it: `mailgun`, `sendgrid`, `postmark`, `ses` (a webhook),
    -- `worker` (SUPPRESS_ON_REJECT), `api` or `cli`.
    source     TEXT NOT NULL,
    -- The provider's or the mail server's words, or the operator's note.
    detail     TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The worker's claim statement looks every request's address up here.
CREATE UNIQUE INDEX suppressions_email ON suppressions (lower(email));
-- /metrics counts entries by reason.
CREATE INDEX suppressions_reason ON suppressions (reason);

-- One row per provider notification acted on: the same notification
-- delivered again (providers retry until they see a 2xx, and may send twice)
-- finds its row and has no second effect. Written in the transaction that
-- suppresses and queues the event. Rows older than RETENTION_HOURS go:
-- providers stop retrying within days.
CREATE TABLE webhook_receipts (
    provider    TEXT NOT NULL,
    event_key   TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_key)
);
CREATE INDEX webhook_receipts_received_at ON webhook_receipts (received_at);

-- SNS signing certificates, by their SigningCertURL (only
-- https://sns.<region>.amazonaws.com/….pem is ever fetched): fetched once,
-- shared by every gateway, kept in memory in front of this table.
CREATE TABLE sns_certificates (
    url        TEXT PRIMARY KEY,
    pem        TEXT NOT NULL,
    fetched_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
