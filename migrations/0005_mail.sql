-- rollcall schema 5: the mail outbox. A message is queued in the transaction of the event
-- that causes it and sent afterwards by the job worker; 'sending' is written (committed)
-- before the transport is called, so a crash in between leaves a message that is marked
-- failed rather than sent twice.
CREATE TABLE mail_outbox (
    id              INTEGER PRIMARY KEY,
    tenant          TEXT,
    event           TEXT NOT NULL,        -- upload_rejected, job_started, job_finished, ...
    recipient       TEXT NOT NULL,
    subject         TEXT NOT NULL,
    template        TEXT NOT NULL,
    context         TEXT NOT NULL,        -- JSON the bodies are rendered from at send time
    attachment_path TEXT,
    attachment_name TEXT,
    state           TEXT NOT NULL DEFAULT 'queued',  -- queued | sending | sent | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error      TEXT,
    message_id      TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    sent_at         TEXT
);
CREATE INDEX mail_outbox_due ON mail_outbox (state, next_attempt_at);

-- Getting Started messages sent to each user: when last, and how many.
ALTER TABLE users ADD COLUMN welcome_sent_at TEXT;
ALTER TABLE users ADD COLUMN welcome_count INTEGER NOT NULL DEFAULT 0;
