-- rollcall schema 2: the audit outbox and the anchor of the hash-chained audit log.
--
-- Audit entries are written here in the same transaction as the change they record and
-- appended to the log files (audit/audit-NNNNNN.jsonl) after commit. An 'entry' row holds one
-- entry's fields; a 'job' row stands for one entry per row of job_changes of that job, so a
-- million-row import adds one outbox row, not a million. Each appended line names the outbox
-- row (and job row) it came from, so an append interrupted by a crash resumes exactly once.

-- AUTOINCREMENT: ids never come back after rows are deleted, so a line's source id orders
-- it against every later row.
CREATE TABLE audit_outbox (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     TEXT NOT NULL CHECK (kind IN ('entry', 'job')),
    time     TEXT NOT NULL,
    actor    TEXT NOT NULL,
    tenant   TEXT,
    action   TEXT NOT NULL,
    target   TEXT NOT NULL,
    details  TEXT NOT NULL,       -- JSON object
    job_id   INTEGER REFERENCES jobs(id)
);

-- The last entry appended to the log: verify compares the files' end with it, so a removed
-- last entry is found too.
CREATE TABLE audit_anchor (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq  INTEGER NOT NULL,
    last_hash TEXT NOT NULL
);
