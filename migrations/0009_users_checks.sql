-- rollcall schema 9: the users table's role check written as comparisons.
--
-- SQLite compiles `role IN ('Learner', 'Manager', 'Admin')` (an IN list of three or more)
-- into a temporary b-tree built on every insert and every update of a role: a quarter of
-- the instructions of writing a user (`valgrind --tool=callgrind`, 10,000 added users).
-- The same rule as comparisons costs next to nothing. A CHECK cannot be altered in SQLite,
-- so the table is rebuilt (the documented way: new table, copy, drop, rename, indexes);
-- no table refers to users by a foreign key. Columns, ids, constraints and indexes are
-- as before.
CREATE TABLE users_rebuilt (
    id              INTEGER PRIMARY KEY,
    tenant_id       INTEGER NOT NULL REFERENCES tenants(id),
    email           TEXT NOT NULL,
    email_norm      TEXT NOT NULL,
    first_name      TEXT NOT NULL,
    last_name       TEXT NOT NULL,
    job_title       TEXT,
    team_id         INTEGER REFERENCES teams(id),
    role            TEXT NOT NULL CHECK (role = 'Learner' OR role = 'Manager' OR role = 'Admin'),
    language        TEXT NOT NULL,
    pool_id         INTEGER NOT NULL REFERENCES licence_pools(id),
    status          TEXT NOT NULL CHECK (status = 'active' OR status = 'deactivated'),
    custom          TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    welcome_sent_at TEXT,
    welcome_count   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant_id, email_norm)
);
INSERT INTO users_rebuilt (id, tenant_id, email, email_norm, first_name, last_name, job_title,
                           team_id, role, language, pool_id, status, custom, created_at,
                           updated_at, welcome_sent_at, welcome_count)
    SELECT id, tenant_id, email, email_norm, first_name, last_name, job_title, team_id, role,
           language, pool_id, status, custom, created_at, updated_at, welcome_sent_at,
           welcome_count
    FROM users ORDER BY id;
DROP TABLE users;
ALTER TABLE users_rebuilt RENAME TO users;
CREATE INDEX users_pool_status ON users (pool_id, status);
CREATE INDEX users_tenant_name ON users (tenant_id, lower(last_name), lower(first_name), id);
CREATE INDEX users_tenant_first ON users (tenant_id, lower(first_name), lower(last_name), id);
CREATE INDEX users_team_email ON users (team_id, email_norm) WHERE team_id IS NOT NULL;
CREATE INDEX users_deactivated_email ON users (tenant_id, email_norm) WHERE status = 'deactivated';
CREATE INDEX users_deactivated_name ON users (tenant_id, lower(last_name), lower(first_name), id) WHERE status = 'deactivated';
