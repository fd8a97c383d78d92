-- rollcall schema 8: settings an operator changes in the web UI (mail, retention). Each row
-- is one section's overrides as a JSON object; they take precedence over rollcall.toml
-- and ROLLCALL_* variables, and removing a key returns to those.
CREATE TABLE settings (
    section    TEXT PRIMARY KEY CHECK (section IN ('mail', 'jobs')),
    value      TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
