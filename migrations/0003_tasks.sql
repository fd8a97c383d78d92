-- rollcall schema 3: named housekeeping tasks, run by the job worker when they are due and
-- runnable at once from the CLI (`rollcall tasks run NAME`).
CREATE TABLE tasks (
    name       TEXT PRIMARY KEY,
    last_run   TEXT,
    next_run   TEXT NOT NULL,
    last_error TEXT,
    last_result TEXT
);
