-- The provider's own id of a sent mail (issue 18 writes it, issue 17 reads it).
-- Released migrations are never edited: add a new file.

-- An HTTP API (SES, Postmark, SendGrid, Mailgun) answers a send with its own
-- message id, and some rewrite our Message-ID (SES does): their bounce and
-- complaint notifications name the mail by that id, so it is kept with the
-- request to tie a notification to the mail it concerns. NULL for SMTP and
-- file delivery, whose notifications carry our Message-ID.
ALTER TABLE requests ADD COLUMN provider_message_id TEXT;

-- Webhooks look a mail up by it; only rows sent through an API have one.
CREATE INDEX IF NOT EXISTS requests_provider_message_id
    ON requests (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
