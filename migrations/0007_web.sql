-- rollcall schema 7: what the web server needs: sign-in sessions, API tokens, and indexes
-- for the users page (search by name prefix, keyset pagination by name).

-- A browser session. The cookie carries a random token; only its SHA-256 is stored, so a
-- copy of the database cannot be used to sign in. `csrf` is sent back by the page on every
-- state-changing request.
CREATE TABLE web_sessions (
    token_hash   TEXT PRIMARY KEY,
    admin_id     INTEGER NOT NULL REFERENCES administrators(id) ON DELETE CASCADE,
    csrf         TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    client       TEXT
) WITHOUT ROWID;
CREATE INDEX web_sessions_admin ON web_sessions (admin_id);

-- A bearer token for scripts, created and revoked by an operator; scoped to a role and
-- (for tenant admins, and optionally auditors) a tenant. Stored as SHA-256 only.
CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    role         TEXT NOT NULL CHECK (role IN ('operator', 'tenant_admin', 'auditor')),
    tenant_id    INTEGER REFERENCES tenants(id),
    created_by   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT,
    CHECK (role <> 'tenant_admin' OR tenant_id IS NOT NULL)
);

-- Users page (keyset pages on an index, so page 1000 is as quick as page 1): sorted by
-- name, searched by last- or first-name prefix (ASCII case-insensitive), a team's users
-- and the few deactivated users found without walking everyone else.
CREATE INDEX users_tenant_name ON users (tenant_id, lower(last_name), lower(first_name), id);
CREATE INDEX users_tenant_first ON users (tenant_id, lower(first_name), lower(last_name), id);
CREATE INDEX users_team_email ON users (team_id, email_norm) WHERE team_id IS NOT NULL;
CREATE INDEX users_deactivated_email ON users (tenant_id, email_norm) WHERE status = 'deactivated';
CREATE INDEX users_deactivated_name ON users (tenant_id, lower(last_name), lower(first_name), id) WHERE status = 'deactivated';
