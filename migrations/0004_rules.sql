-- rollcall schema 4: the active (last good) version of each tenant's Lua rules. The scripts
-- themselves are kept, so that a broken edit leaves the last good version in use even
-- across a restart.
CREATE TABLE rule_sets (
    tenant_id       INTEGER PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
    hash            TEXT NOT NULL,
    origin          TEXT NOT NULL,
    scripts         TEXT NOT NULL,  -- JSON [{name, source}]
    description     TEXT NOT NULL,  -- JSON: declared columns and rules
    loaded_at       TEXT NOT NULL,
    rejected_hash   TEXT,           -- a newer version that did not load
    rejected_reason TEXT
);
