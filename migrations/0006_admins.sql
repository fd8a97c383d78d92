-- rollcall schema 6: what sign-in needs of administrator accounts: a one-time password to
-- change at the first sign-in, failed attempts and a temporary lock-out, and when the
-- password last changed.
ALTER TABLE administrators ADD COLUMN must_change_password INTEGER NOT NULL DEFAULT 0;
ALTER TABLE administrators ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0;
ALTER TABLE administrators ADD COLUMN locked_until TEXT;
ALTER TABLE administrators ADD COLUMN password_changed_at TEXT;
