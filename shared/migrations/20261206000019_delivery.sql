-- Delivery through HTTP APIs (issue 18): the namespace-wide send budget and
-- the pauses of delivery targets. Released migrations are never edited: add a new file.

-- MAIL_RATE_LIMIT as one budget for every worker of a namespace, by GCRA
-- ("virtual scheduling"): `tat` is the theoretical arrival time, the first
-- free send slot. A worker reserves a block of consecutive slots in one
-- statement, timed on the database's clock, so the workers' clocks need not
-- agree and a fourth worker adds no budget. Idle time never builds credit
-- (the next slot is never before now), so there is no burst above the rate.
CREATE TABLE IF NOT EXISTS mail_rate_limit (
    namespace TEXT PRIMARY KEY,
    tat TIMESTAMPTZ NOT NULL
);

-- A target (an API's host, an SMTP server) that asked us to slow down
-- (Retry-After, SMTP 421/454) is paused for every worker of the namespace
-- until `paused_until`. `target` names it without secrets.
CREATE TABLE IF NOT EXISTS mail_target_pauses (
    namespace TEXT NOT NULL,
    target TEXT NOT NULL,
    paused_until TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (namespace, target)
);
