-- rollcall schema 3: named housekeeping tasks, run by the job worker when they are due and
-- runnable at once from the CLI (`rollcall tasks run NAME`).
CREATE TABLE tasks (
    name       TEXT PRIMARY KEY,
    last_run   TEXT,
    next_run   TEXT NOT NULL,
    last_error TEXT,
    last_result TEXT
);

-- Files taken from the drop folder (inbox/<tenant>/<operation>/): a file is claimed by moving
-- it into processing/, and its claim and its job are recorded in one transaction, so no file
-- is submitted twice, even across a crash.
CREATE TABLE inbox_claims (
    path       TEXT PRIMARY KEY,   -- the file in processing/
    tenant_id  INTEGER NOT NULL REFERENCES tenants(id),
    operation  TEXT NOT NULL,
    job_id     INTEGER REFERENCES jobs(id),
    claimed_at TEXT NOT NULL,
    done_at    TEXT
);
