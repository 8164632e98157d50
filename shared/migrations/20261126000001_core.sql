-- verimail's core tables. Released migrations are never edited: add a new file.

-- One row per request id (the CloudEvent id, the idempotency key). The worker
-- claims a row before sending and stores the outcome event it publishes, so a
-- redelivery re-publishes the very same outcome instead of sending again.
CREATE TABLE requests (
    id                TEXT PRIMARY KEY,
    user_id           TEXT,
    email             TEXT,
    purpose           TEXT,
    locale            TEXT,
    return_url        TEXT,
    context           JSONB,
    -- processing: claimed, no outcome yet; done: outcome decided (stored below).
    state             TEXT NOT NULL DEFAULT 'processing'
                      CHECK (state IN ('processing', 'done')),
    -- A worker holds the request until then; a redelivery after a crash may
    -- take it over once the lease has run out.
    lease_until       TIMESTAMPTZ,
    -- The throttle let this request through (a retry must not be throttled by itself).
    throttle_passed   BOOLEAN NOT NULL DEFAULT FALSE,
    attempts          INTEGER NOT NULL DEFAULT 0,
    first_attempt_at  TIMESTAMPTZ,
    sent_at           TIMESTAMPTZ,
    outcome_type      TEXT,
    outcome           BYTEA,
    outcome_published BOOLEAN NOT NULL DEFAULT FALSE,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Legacy itsdangerous tokens carry only an address: the gateway looks up the
-- latest mail sent to it.
CREATE INDEX requests_email_sent_at ON requests (email, sent_at DESC) WHERE sent_at IS NOT NULL;
-- Retention deletes old rows in small batches.
CREATE INDEX requests_created_at ON requests (created_at);

-- The last mail per user and purpose; one atomic upsert decides the throttle
-- across every worker.
CREATE TABLE throttle (
    user_id      TEXT NOT NULL,
    purpose      TEXT NOT NULL,
    last_sent_at TIMESTAMPTZ NOT NULL,
    request_id   TEXT NOT NULL,
    PRIMARY KEY (user_id, purpose)
);
CREATE INDEX throttle_last_sent_at ON throttle (last_sent_at);

-- One row per confirmed link. key = 'r:' || request_id for v1 tokens,
-- 'e:' || email for legacy itsdangerous tokens (which carry only the address).
CREATE TABLE confirmations (
    key         TEXT PRIMARY KEY,
    request_id  TEXT,
    user_id     TEXT,
    email       TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    verified_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX confirmations_verified_at ON confirmations (verified_at);

-- Verified events written in the confirmation's transaction; the relay
-- publishes each with confirms and deletes it only then.
CREATE TABLE outbox (
    id          TEXT PRIMARY KEY,
    routing_key TEXT NOT NULL,
    body        BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_created_at ON outbox (created_at);
