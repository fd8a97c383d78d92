//! The embedded SQLite database: opening with the house pragmas, the numbered migrations in
//! `migrations/` (embedded in the binary), and typed queries per table.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::config::DatabaseConfig;
use crate::error::{AppError, AppResult, StartupError};

/// Migrations in order; the schema version is the number of applied migrations.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_initial.sql")),
    (2, include_str!("../migrations/0002_audit.sql")),
    (3, include_str!("../migrations/0003_tasks.sql")),
    (4, include_str!("../migrations/0004_rules.sql")),
    (5, include_str!("../migrations/0005_mail.sql")),
    (6, include_str!("../migrations/0006_admins.sql")),
    (7, include_str!("../migrations/0007_web.sql")),
    (8, include_str!("../migrations/0008_settings.sql")),
    (9, include_str!("../migrations/0009_users_checks.sql")),
];

/// Newest schema this binary knows.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// SQLite's lookaside memory per connection (slot size, slots: 1 MiB): the small
/// allocations of every statement run (index records, bound text, cursors) come from it,
/// not from malloc. The default (40 slots of 1200 bytes) is taken up by the prepared
/// statements a pass keeps, so each write went to malloc and free (callgrind, 10,000
/// added users: the writing thread's instructions 627M -> 517M).
const LOOKASIDE_SLOT: usize = 512;
const LOOKASIDE_SLOTS: usize = 2048;

/// Opens (creating if needed) the database and brings its schema up to date.
pub fn open(path: &Path, cfg: &DatabaseConfig) -> Result<Connection, StartupError> {
    let fail = |e: rusqlite::Error| StartupError::Database {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut conn = Connection::open(path).map_err(fail)?;
    configure(&conn, cfg).map_err(fail)?;
    // Every transaction we open writes: it takes the write lock when it begins (waiting up
    // to the busy timeout). A deferred one that read first could not become a write while
    // another connection (the job worker, the web server) had written: "database is
    // locked" at once, without waiting. Read snapshots say BEGIN DEFERRED themselves.
    conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
    migrate(&mut conn, path)?;
    Ok(conn)
}

fn configure(conn: &Connection, cfg: &DatabaseConfig) -> rusqlite::Result<()> {
    // SAFETY: the handle is this connection's, just opened: nothing uses lookaside memory
    // yet (it can only be configured then); a NULL buffer lets SQLite allocate it. Should
    // it refuse, the connection keeps the default: only speed is at stake.
    unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            LOOKASIDE_SLOT as std::ffi::c_int,
            LOOKASIDE_SLOTS as std::ffi::c_int,
        );
    }
    conn.busy_timeout(std::time::Duration::from_millis(u64::from(
        cfg.busy_timeout_ms,
    )))?;
    // Larger pages mean fewer page splits and shallower trees for bulk inserts; this only
    // takes effect on a new, empty database (before the first table and WAL mode).
    conn.pragma_update(None, "page_size", 16384)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -i64::from(cfg.cache_mib) * 1024)?;
    Ok(())
}

/// Commits on a connection without waiting for the disk, until `restore` or `sync` (a guard
/// dropped without either syncs): with `synchronous = NORMAL` a WAL-mode commit is written
/// to the log but not fsync'd, and the next commit made in FULL mode syncs it together with
/// its own. The database stays consistent across a power cut either way; only commits made
/// meanwhile can be lost.
///
/// Used for the records an import makes before its job's pass, when this process runs the
/// job at once (`service::import`): the pass's commit makes them durable, and a power cut
/// before it loses a job that nobody was told about, never part of one. (Another commit,
/// of this process or another, may make them durable before the upload's own fsyncs are
/// done; a job whose stored copy a power cut then damaged fails when it runs, saying so:
/// `scheduler::run_job` checks the copy against its hash.)
pub struct Unsynced<'c> {
    conn: &'c Connection,
    restored: bool,
}

impl<'c> Unsynced<'c> {
    pub fn begin(conn: &'c Connection) -> AppResult<Unsynced<'c>> {
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Unsynced {
            conn,
            restored: false,
        })
    }

    /// Back to waiting for the disk at every commit (the house setting, see `open`), for
    /// a caller whose next commit makes what was committed meanwhile durable. (Should the
    /// setting fail, the guard is still held and its `Drop` tries again, with the sync.)
    pub fn restore(mut self) -> AppResult<()> {
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.restored = true;
        Ok(())
    }

    /// `restore`, and what was committed meanwhile is made durable now: the write-ahead log
    /// (the database's file with `-wal` appended, where those commits are) is fsync'd.
    pub fn sync(mut self) -> AppResult<()> {
        let synced = sync_now(self.conn);
        self.restored = synced.is_ok();
        synced
    }
}

/// Synced commits again, and the write-ahead log fsync'd (see `Unsynced::sync`).
fn sync_now(conn: &Connection) -> AppResult<()> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    if let Some(wal) = conn
        .path()
        .map(|p| format!("{p}-wal"))
        .filter(|w| Path::new(w).exists())
    {
        std::fs::File::open(&wal)
            .and_then(|f| f.sync_all())
            .map_err(|e| AppError::internal("syncing the database's log", e))?;
    }
    Ok(())
}

/// A guard dropped without `restore` or `sync` (an error on the way) syncs: the commits made
/// meanwhile are durable before the caller reports anything.
impl Drop for Unsynced<'_> {
    fn drop(&mut self) {
        if !self.restored
            && let Err(e) = sync_now(self.conn)
        {
            eprintln!("rollcall: cannot make the database's last commits durable: {e}");
        }
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StartupError> {
    let fail = |e: rusqlite::Error| StartupError::Database {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let current: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(fail)?;
    let known = schema_version();
    if current > known {
        return Err(StartupError::DatabaseTooNew {
            path: path.to_path_buf(),
            found: current,
            known,
        });
    }
    if current > 0 && current < known {
        // An older database is copied before it is migrated forward: the way back is a file.
        let dir = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("backups");
        let stamp = now().replace([':', '.'], "-");
        let copy = dir.join(format!("before-schema-{known}-from-{current}-{stamp}.db"));
        // A large roster takes a while (1M users: about 15 s for the copy and the rebuild
        // of schema 9): say what is happening rather than seem to hang.
        eprintln!(
            "rollcall: upgrading the database from schema {current} to {known}; a copy of it is kept as {}",
            copy.display()
        );
        std::fs::create_dir_all(&dir).map_err(|e| StartupError::Database {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        conn.execute("VACUUM INTO ?1", [copy.to_string_lossy()])
            .map_err(fail)?;
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction().map_err(fail)?;
        tx.execute_batch(sql).map_err(fail)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
    }
    Ok(())
}

/// Current UTC time in RFC 3339 with seconds.
pub fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The time `d` from now, in the form of `now`.
pub fn now_plus(d: time::Duration) -> String {
    let t = time::OffsetDateTime::now_utc() + d;
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Case-insensitive key for names and emails.
/// How long until an RFC 3339 time, at most `cap` (zero when it has passed; `cap` when it
/// cannot be read).
pub fn duration_until(t: &str, cap: std::time::Duration) -> std::time::Duration {
    match time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
        Ok(at) => {
            let secs = (at - time::OffsetDateTime::now_utc()).as_seconds_f64();
            if secs <= 0.0 {
                std::time::Duration::ZERO
            } else {
                std::time::Duration::from_secs_f64(secs).min(cap)
            }
        }
        Err(_) => cap,
    }
}

pub fn norm(s: &str) -> String {
    s.trim().to_lowercase()
}

#[derive(Debug, Clone, Serialize)]
pub struct Tenant {
    pub id: i64,
    pub name: String,
}

pub fn create_tenant(conn: &Connection, name: &str) -> AppResult<Tenant> {
    let name = name.trim();
    check_name("tenant", name)?;
    if find_tenant(conn, name)?.is_some() {
        return Err(AppError::Usage(format!(
            "a tenant named {name:?} exists already"
        )));
    }
    let folder = crate::model::folder_name(name);
    if folder.is_empty() {
        return Err(AppError::Usage(format!(
            "a tenant name needs a letter or digit ({name:?} has none)"
        )));
    }
    // Two tenants may not share the folder of their rules and email templates.
    if let Some(other) = list_tenants(conn)?
        .into_iter()
        .find(|t| crate::model::folder_name(&t.name) == folder)
    {
        return Err(AppError::Usage(format!(
            "{name:?} is too close to the existing tenant {:?} (both would use the folder rules/{folder}); choose another name",
            other.name
        )));
    }
    conn.execute(
        "INSERT INTO tenants (name, name_norm, created_at) VALUES (?1, ?2, ?3)",
        params![name, norm(name), now()],
    )?;
    Ok(Tenant {
        id: conn.last_insert_rowid(),
        name: name.to_string(),
    })
}

pub fn find_tenant(conn: &Connection, name: &str) -> AppResult<Option<Tenant>> {
    Ok(conn
        .query_row(
            "SELECT id, name FROM tenants WHERE name_norm = ?1",
            [norm(name)],
            |r| {
                Ok(Tenant {
                    id: r.get(0)?,
                    name: r.get(1)?,
                })
            },
        )
        .optional()?)
}

/// The tenant of that name, or a usage error listing the tenants that exist.
pub fn tenant(conn: &Connection, name: &str) -> AppResult<Tenant> {
    if let Some(t) = find_tenant(conn, name)? {
        return Ok(t);
    }
    let names: Vec<String> = list_tenants(conn)?.into_iter().map(|t| t.name).collect();
    Err(AppError::Usage(if names.is_empty() {
        format!(
            "no tenant named {name:?}; there are no tenants yet (create one with `rollcall tenant create NAME`)"
        )
    } else {
        format!(
            "no tenant named {name:?}; tenants are: {}",
            names.join(", ")
        )
    }))
}

pub fn list_tenants(conn: &Connection) -> AppResult<Vec<Tenant>> {
    let mut st = conn.prepare("SELECT id, name FROM tenants ORDER BY name_norm")?;
    let rows = st.query_map([], |r| {
        Ok(Tenant {
            id: r.get(0)?,
            name: r.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn check_name(what: &str, name: &str) -> AppResult<()> {
    if name.is_empty() {
        return Err(AppError::Usage(format!("a {what} name cannot be empty")));
    }
    if name.chars().count() > 100 {
        return Err(AppError::Usage(format!(
            "a {what} name can have at most 100 characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(AppError::Usage(format!(
            "a {what} name cannot contain control characters"
        )));
    }
    Ok(())
}

/// A tenant's settings (the `settings` JSON of `tenants`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct TenantSettings {
    /// Deactivating or deleting more than this share (percent) of the tenant's users in one
    /// job needs a typed confirmation.
    pub large_change_percent: u32,
    /// ... or more than this many users, when set.
    pub large_change_count: Option<u64>,
    /// Delete and deactivate jobs wait for a second administrator's approval.
    pub require_approval: bool,
    /// Files dropped in the tenant's inbox folder are submitted when valid (else only
    /// checked, with the results beside them).
    pub drop_folder_submit: bool,
    /// Email addresses told when a job waits for a second administrator's approval.
    pub approvers: Vec<String>,
    /// Tenant admins may change their pools' seats (else only operators).
    pub tenant_admins_edit_seats: bool,
}

impl Default for TenantSettings {
    fn default() -> Self {
        TenantSettings {
            large_change_percent: 20,
            large_change_count: None,
            require_approval: false,
            drop_folder_submit: false,
            approvers: Vec::new(),
            tenant_admins_edit_seats: false,
        }
    }
}

pub fn tenant_settings(conn: &Connection, tenant_id: i64) -> AppResult<TenantSettings> {
    let text: String = conn.query_row(
        "SELECT settings FROM tenants WHERE id = ?1",
        [tenant_id],
        |r| r.get(0),
    )?;
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

pub fn set_tenant_settings(conn: &Connection, tenant_id: i64, s: &TenantSettings) -> AppResult<()> {
    let text = serde_json::to_string(s).map_err(|e| AppError::internal("saving settings", e))?;
    conn.execute(
        "UPDATE tenants SET settings = ?2 WHERE id = ?1",
        params![tenant_id, text],
    )?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct Team {
    pub id: i64,
    pub name: String,
}

pub fn add_team(conn: &Connection, tenant_id: i64, name: &str) -> AppResult<Team> {
    let name = name.trim();
    check_name("team", name)?;
    let n = conn.execute(
        "INSERT INTO teams (tenant_id, name, name_norm, created_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant_id, name_norm) DO NOTHING",
        params![tenant_id, name, norm(name), now()],
    )?;
    if n == 0 {
        return Err(AppError::Usage(format!(
            "a team named {name:?} exists already"
        )));
    }
    Ok(Team {
        id: conn.last_insert_rowid(),
        name: name.to_string(),
    })
}

pub fn list_teams(conn: &Connection, tenant_id: i64) -> AppResult<Vec<Team>> {
    let mut st =
        conn.prepare("SELECT id, name FROM teams WHERE tenant_id = ?1 ORDER BY name_norm")?;
    let rows = st.query_map([tenant_id], |r| {
        Ok(Team {
            id: r.get(0)?,
            name: r.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[derive(Debug, Clone, Serialize)]
pub struct Pool {
    pub id: i64,
    pub name: String,
    pub seats: i64,
    /// Active users holding a seat.
    pub used: i64,
}

impl Pool {
    pub fn free(&self) -> i64 {
        self.seats - self.used
    }
}

/// Creates the pool or changes its seats. Fewer seats than are in use is refused.
pub fn set_pool(conn: &Connection, tenant_id: i64, name: &str, seats: i64) -> AppResult<Pool> {
    let name = name.trim();
    check_name("licence pool", name)?;
    if seats < 0 {
        return Err(AppError::Usage("seats cannot be negative".into()));
    }
    let existing = list_pools(conn, tenant_id)?
        .into_iter()
        .find(|p| norm(&p.name) == norm(name));
    if let Some(p) = existing {
        if seats < p.used {
            return Err(AppError::Usage(format!(
                "licence pool {:?} has {} active users; it cannot have fewer seats than that (deactivate users or move them to another pool first)",
                p.name, p.used
            )));
        }
        conn.execute(
            "UPDATE licence_pools SET seats = ?1 WHERE id = ?2",
            params![seats, p.id],
        )?;
        return Ok(Pool { seats, ..p });
    }
    conn.execute(
        "INSERT INTO licence_pools (tenant_id, name, name_norm, seats, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![tenant_id, name, norm(name), seats, now()],
    )?;
    Ok(Pool {
        id: conn.last_insert_rowid(),
        name: name.to_string(),
        seats,
        used: 0,
    })
}

/// The name of a tenant's pool as it is spelt, found in any case (without counting seats).
pub fn pool_name(conn: &Connection, tenant_id: i64, name: &str) -> AppResult<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT name FROM licence_pools WHERE tenant_id = ?1 AND name_norm = ?2",
            params![tenant_id, norm(name)],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn list_pools(conn: &Connection, tenant_id: i64) -> AppResult<Vec<Pool>> {
    let mut st = conn.prepare(
        "SELECT p.id, p.name, p.seats,
                (SELECT count(*) FROM users u WHERE u.pool_id = p.id AND u.status = 'active')
         FROM licence_pools p WHERE p.tenant_id = ?1 ORDER BY p.name_norm",
    )?;
    let rows = st.query_map([tenant_id], |r| {
        Ok(Pool {
            id: r.get(0)?,
            name: r.get(1)?,
            seats: r.get(2)?,
            used: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A user as stored, with team and pool names resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub job_title: Option<String>,
    pub team_id: Option<i64>,
    pub team: Option<String>,
    pub role: String,
    pub language: String,
    pub pool_id: i64,
    pub pool: String,
    pub status: String,
    pub custom: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

pub const USER_COLUMNS: &str = "u.id, u.email, u.first_name, u.last_name, u.job_title, u.team_id, t.name, u.role, u.language, u.pool_id, p.name, u.status, u.custom, u.created_at, u.updated_at";
pub const USER_FROM: &str =
    "users u LEFT JOIN teams t ON t.id = u.team_id JOIN licence_pools p ON p.id = u.pool_id";

pub fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        email: r.get(1)?,
        first_name: r.get(2)?,
        last_name: r.get(3)?,
        job_title: r.get(4)?,
        team_id: r.get(5)?,
        team: r.get(6)?,
        role: r.get(7)?,
        language: r.get(8)?,
        pool_id: r.get(9)?,
        pool: r.get(10)?,
        status: r.get(11)?,
        custom: r.get(12)?,
        created_at: r.get(13)?,
        updated_at: r.get(14)?,
    })
}

/// Every user of a tenant in email order, handed to `f` one at a time (no list in memory).
pub fn for_each_user(
    conn: &Connection,
    tenant_id: i64,
    status: Option<&str>,
    mut f: impl FnMut(&User) -> AppResult<()>,
) -> AppResult<()> {
    let sql = format!(
        "SELECT {USER_COLUMNS} FROM {USER_FROM} WHERE u.tenant_id = ?1 AND (?2 IS NULL OR u.status = ?2) ORDER BY u.email_norm"
    );
    let mut st = conn.prepare(&sql)?;
    let mut rows = st.query(params![tenant_id, status])?;
    while let Some(r) = rows.next()? {
        f(&user_from_row(r)?)?;
    }
    Ok(())
}

/// Counts of users per status.
pub fn user_counts(conn: &Connection, tenant_id: i64) -> AppResult<HashMap<String, i64>> {
    let mut st =
        conn.prepare("SELECT status, count(*) FROM users WHERE tenant_id = ?1 GROUP BY status")?;
    let rows = st.query_map([tenant_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsynced_guard_ends_in_synced_commits_however_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("t.db"), &DatabaseConfig::default()).unwrap();
        let sync = |c: &Connection| -> i64 {
            c.pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(sync(&conn), 2);
        let g = Unsynced::begin(&conn).unwrap();
        assert_eq!(sync(&conn), 1);
        g.restore().unwrap();
        assert_eq!(sync(&conn), 2);
        Unsynced::begin(&conn).unwrap().sync().unwrap();
        assert_eq!(sync(&conn), 2);
        // Dropped on an error's way out: synced commits again.
        {
            let _g = Unsynced::begin(&conn).unwrap();
            conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
                .unwrap();
            assert_eq!(sync(&conn), 1);
        }
        assert_eq!(sync(&conn), 2);
    }

    #[test]
    fn migrates_and_refuses_newer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = open(&path, &DatabaseConfig::default()).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema_version());
        conn.pragma_update(None, "user_version", 999).unwrap();
        drop(conn);
        let e = open(&path, &DatabaseConfig::default()).unwrap_err();
        assert!(matches!(e, StartupError::DatabaseTooNew { found: 999, .. }));
        assert!(e.to_string().contains("newer rollcall"));
    }

    #[test]
    fn an_older_database_is_copied_before_it_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = open(&path, &DatabaseConfig::default()).unwrap();
        // Make it look like schema 2: without what the later migrations add.
        conn.execute_batch(
            "DROP TABLE settings; DROP TABLE web_sessions; DROP TABLE api_tokens; DROP INDEX users_tenant_name; DROP INDEX users_tenant_first; DROP INDEX users_deactivated_email; DROP INDEX users_team_email; DROP INDEX users_deactivated_name; ALTER TABLE administrators DROP COLUMN must_change_password; ALTER TABLE administrators DROP COLUMN failed_logins; ALTER TABLE administrators DROP COLUMN locked_until; ALTER TABLE administrators DROP COLUMN password_changed_at; DROP TABLE mail_outbox; ALTER TABLE users DROP COLUMN welcome_sent_at; ALTER TABLE users DROP COLUMN welcome_count; DROP TABLE rule_sets; DROP TABLE inbox_claims; DROP TABLE tasks; PRAGMA user_version = 2;",
        )
        .unwrap();
        drop(conn);
        let conn = open(&path, &DatabaseConfig::default()).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema_version());
        let copies: Vec<_> = std::fs::read_dir(dir.path().join("backups"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(copies.len(), 1);
        assert!(
            copies[0].starts_with(&format!("before-schema-{}-from-2-", schema_version())),
            "{copies:?}"
        );
        // A current database is not copied again.
        drop(conn);
        open(&path, &DatabaseConfig::default()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("backups"))
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn writing_a_user_builds_no_temporary_btree_and_schema_9_keeps_every_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = open(&path, &DatabaseConfig::default()).unwrap();
        let insert = "INSERT INTO users (tenant_id, email, email_norm, first_name, last_name, role, language, pool_id, status, created_at, updated_at) VALUES (?1, ?2, ?2, 'Ada', 'Lovelace', ?3, 'en', ?4, 'active', 't', 't')";
        let update = "UPDATE users SET role = ?2, status = ?3 WHERE id = ?1";
        // An IN list in a CHECK would show as OpenEphemeral in the program of every write.
        let ephemeral = |conn: &Connection, sql: &str| -> bool {
            let mut st = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
            // Unbound parameters are NULL: EXPLAIN only compiles the statement.
            let mut ops = st.raw_query();
            let mut found = false;
            while let Some(r) = ops.next().unwrap() {
                found |= r.get::<_, String>(1).unwrap() == "OpenEphemeral";
            }
            found
        };
        assert!(!ephemeral(&conn, insert));
        assert!(!ephemeral(&conn, update));

        // A schema 8 database (the check as an IN list) with users in it.
        let t = create_tenant(&conn, "Acme").unwrap();
        let pool = set_pool(&conn, t.id, "Standard", 10).unwrap();
        conn.execute_batch(
            "PRAGMA foreign_keys = OFF;
             CREATE TABLE users_old AS SELECT * FROM users;
             DROP TABLE users;",
        )
        .unwrap();
        let old_users = include_str!("../migrations/0001_initial.sql");
        let start = old_users.find("CREATE TABLE users (").unwrap();
        let end = start + old_users[start..].find(");").unwrap() + 2;
        let old = old_users[start..end].replace(
            "UNIQUE (tenant_id, email_norm)",
            "welcome_sent_at TEXT, welcome_count INTEGER NOT NULL DEFAULT 0, UNIQUE (tenant_id, email_norm)",
        );
        assert!(old.contains("role IN ('Learner', 'Manager', 'Admin')"));
        conn.execute_batch(&old).unwrap();
        conn.execute_batch("DROP TABLE users_old; PRAGMA foreign_keys = ON;")
            .unwrap();
        assert!(ephemeral(&conn, insert), "the old check is an IN list");
        for (i, role) in ["Learner", "Manager", "Admin"].iter().enumerate() {
            conn.execute(
                insert,
                params![t.id, format!("u{i}@example.com"), role, pool.id],
            )
            .unwrap();
        }
        conn.execute(
            "UPDATE users SET id = 42, welcome_count = 2, custom = '{\"k\":1}' WHERE email = 'u1@example.com'",
            [],
        )
        .unwrap();
        let rows = |conn: &Connection| -> Vec<String> {
            let mut st = conn
                .prepare("SELECT json_array(id, tenant_id, email, role, status, custom, welcome_count) FROM users ORDER BY id")
                .unwrap();
            st.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let before = rows(&conn);
        conn.pragma_update(None, "user_version", 8).unwrap();
        drop(conn);

        let conn = open(&path, &DatabaseConfig::default()).unwrap();
        assert_eq!(rows(&conn), before);
        assert!(!ephemeral(&conn, insert));
        assert!(!ephemeral(&conn, update));
        // The rules are the same: a role or status outside the lists is refused.
        let bad = conn.execute(insert, params![t.id, "x@example.com", "Boss", pool.id]);
        assert!(bad.unwrap_err().to_string().contains("CHECK"));
        let bad = conn.execute(update, params![42, "Admin", "gone"]);
        assert!(bad.unwrap_err().to_string().contains("CHECK"));
        conn.execute(update, params![42, "Admin", "deactivated"])
            .unwrap();
        let indexes: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'users' AND sql IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 6);
    }

    #[test]
    fn writes_take_their_memory_from_the_lookaside() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("t.db"), &DatabaseConfig::default()).unwrap();
        let t = create_tenant(&conn, "Acme").unwrap();
        let pool = set_pool(&conn, t.id, "Standard", 10).unwrap();
        // As a pass does: many statements prepared and kept, then one written per user.
        let kept: Vec<_> = (0..40)
            .map(|i| {
                conn.prepare(&format!(
                    "SELECT id, email, first_name FROM users WHERE tenant_id = ?1 AND email_norm = ?2 AND {i} = {i}"
                ))
                .unwrap()
            })
            .collect();
        let mut insert = conn
            .prepare("INSERT INTO users (tenant_id, email, email_norm, first_name, last_name, job_title, role, language, pool_id, status, created_at, updated_at) VALUES (?1, ?2, ?2, 'Ada', 'Lovelace', 'Engineer', 'Learner', 'en', ?3, 'active', ?4, ?4)")
            .unwrap();
        let status = |op: i32, reset: bool| {
            let (mut cur, mut high) = (0, 0);
            // SAFETY: the handle is open; the two out-pointers are valid for the call.
            let rc = unsafe {
                rusqlite::ffi::sqlite3_db_status(
                    conn.handle(),
                    op,
                    &mut cur,
                    &mut high,
                    i32::from(reset),
                )
            };
            assert_eq!(rc, 0);
            (cur, high)
        };
        let misses =
            |reset: bool| status(rusqlite::ffi::SQLITE_DBSTATUS_LOOKASIDE_MISS_FULL, reset).1;
        // In use (a disabled lookaside would have no misses either).
        assert!(status(rusqlite::ffi::SQLITE_DBSTATUS_LOOKASIDE_USED, false).0 > 40);
        let tx = conn.unchecked_transaction().unwrap();
        misses(true);
        for i in 0..500 {
            insert
                .execute(params![
                    t.id,
                    format!("user{i}@example.com"),
                    pool.id,
                    "2026-12-02T00:00:00Z"
                ])
                .unwrap();
        }
        assert_eq!(misses(false), 0, "allocations of the writes went to malloc");
        tx.commit().unwrap();
        drop(kept);
    }

    #[test]
    fn tenants_teams_pools() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("t.db"), &DatabaseConfig::default()).unwrap();
        let t = create_tenant(&conn, " Acme ").unwrap();
        assert_eq!(t.name, "Acme");
        assert!(create_tenant(&conn, "ACME").is_err());
        assert!(
            tenant(&conn, "nope")
                .unwrap_err()
                .to_string()
                .contains("Acme")
        );
        add_team(&conn, t.id, "Sales").unwrap();
        assert!(add_team(&conn, t.id, "sales").is_err());
        set_pool(&conn, t.id, "Standard", 10).unwrap();
        let p = set_pool(&conn, t.id, "standard", 12).unwrap();
        assert_eq!(p.seats, 12);
        assert_eq!(list_pools(&conn, t.id).unwrap().len(), 1);
        assert!(set_pool(&conn, t.id, "x", -1).is_err());
    }
}
