-- rollcall schema 1: tenants, administrators, teams, licence pools, users, uploads, jobs and
-- the per-row changes a job made (before and after images, enough to undo it).
-- Times are UTC in RFC 3339. Names are compared case-insensitively through *_norm columns.

CREATE TABLE tenants (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    name_norm   TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    settings    TEXT NOT NULL DEFAULT '{}'   -- JSON: safeguards, drop folder (see TenantSettings)
);

CREATE TABLE administrators (
    id            INTEGER PRIMARY KEY,
    username      TEXT NOT NULL,
    username_norm TEXT NOT NULL UNIQUE,
    email         TEXT,
    role          TEXT NOT NULL CHECK (role IN ('operator', 'tenant_admin', 'auditor')),
    tenant_id     INTEGER REFERENCES tenants(id),
    password_hash TEXT,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    CHECK (role <> 'tenant_admin' OR tenant_id IS NOT NULL)
);

CREATE TABLE teams (
    id         INTEGER PRIMARY KEY,
    tenant_id  INTEGER NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    name_norm  TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name_norm)
);

CREATE TABLE licence_pools (
    id         INTEGER PRIMARY KEY,
    tenant_id  INTEGER NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    name_norm  TEXT NOT NULL,
    seats      INTEGER NOT NULL CHECK (seats >= 0),
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name_norm)
);

-- Standard fields plus the tenant's custom attributes (a JSON object, keyed by column name).
CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    tenant_id   INTEGER NOT NULL REFERENCES tenants(id),
    email       TEXT NOT NULL,
    email_norm  TEXT NOT NULL,
    first_name  TEXT NOT NULL,
    last_name   TEXT NOT NULL,
    job_title   TEXT,
    team_id     INTEGER REFERENCES teams(id),
    role        TEXT NOT NULL CHECK (role IN ('Learner', 'Manager', 'Admin')),
    language    TEXT NOT NULL,
    pool_id     INTEGER NOT NULL REFERENCES licence_pools(id),
    status      TEXT NOT NULL CHECK (status IN ('active', 'deactivated')),
    custom      TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    UNIQUE (tenant_id, email_norm)
);
CREATE INDEX users_pool_status ON users (pool_id, status);

CREATE TABLE uploads (
    id            INTEGER PRIMARY KEY,
    tenant_id     INTEGER NOT NULL REFERENCES tenants(id),
    operation     TEXT NOT NULL,
    file_name     TEXT NOT NULL,
    file_sha256   TEXT NOT NULL,
    file_size     INTEGER NOT NULL,
    stored_path   TEXT NOT NULL,
    -- pending: submitted and not yet read (an import straight to the queue)
    status        TEXT NOT NULL CHECK (status IN ('pending', 'validated', 'rejected')),
    rows_total    INTEGER NOT NULL DEFAULT 0,
    error_count   INTEGER NOT NULL DEFAULT 0,
    warning_count INTEGER NOT NULL DEFAULT 0,
    result        TEXT,            -- JSON: totals, licence forecast, normalisations
    uploaded_by   TEXT NOT NULL,
    uploaded_at   TEXT NOT NULL
);
CREATE INDEX uploads_tenant ON uploads (tenant_id, id);

CREATE TABLE upload_problems (
    upload_id   INTEGER NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    severity    TEXT NOT NULL CHECK (severity IN ('error', 'warning')),
    sheet       TEXT NOT NULL,
    row_number  INTEGER,
    col_letter  TEXT,
    col_name    TEXT,
    value       TEXT,
    code        TEXT NOT NULL,
    message     TEXT NOT NULL,
    PRIMARY KEY (upload_id, seq)
) WITHOUT ROWID;

-- One job at a time for the whole appliance, in id order. A job's changes and its move to
-- 'succeeded' commit in one transaction; a job found 'running' at start never committed and
-- is queued again.
CREATE TABLE jobs (
    id           INTEGER PRIMARY KEY,
    tenant_id    INTEGER NOT NULL REFERENCES tenants(id),
    upload_id    INTEGER REFERENCES uploads(id),  -- NULL for an undo job
    operation    TEXT NOT NULL,    -- add, update, deactivate, reactivate, delete, or undo
    undo_of      INTEGER REFERENCES jobs(id),     -- the job an undo job reverts
    undone_by    INTEGER REFERENCES jobs(id),     -- the undo job that reverted this one
    changes_purged_at TEXT,        -- when the before/after images passed the undo window
    state        TEXT NOT NULL CHECK (state IN ('scheduled', 'awaiting_approval', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    submitted_by TEXT NOT NULL,
    submitted_at TEXT NOT NULL,
    not_before   TEXT,             -- held in 'scheduled' until this time
    options      TEXT NOT NULL DEFAULT '{}',  -- JSON: warnings acknowledged, ...
    started_at   TEXT,
    finished_at  TEXT,
    cancelled_by TEXT,
    approved_by  TEXT,             -- the second administrator, when the tenant requires one
    rows_total   INTEGER NOT NULL DEFAULT 0,
    rows_done    INTEGER NOT NULL DEFAULT 0,
    result       TEXT,             -- JSON: totals and licence forecast of the applied file
    error        TEXT
);
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_upload ON jobs (upload_id);

-- One row per changed user: the image before (NULL for a created user) and after (NULL for a
-- deleted user), as JSON objects of every field.
CREATE TABLE job_changes (
    job_id     INTEGER NOT NULL REFERENCES jobs(id),
    row_number INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    action     TEXT NOT NULL,
    before     TEXT,
    after      TEXT,
    note       TEXT,               -- the file's Reason for the row, if any
    PRIMARY KEY (job_id, row_number)
) WITHOUT ROWID;
