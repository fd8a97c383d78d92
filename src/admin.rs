//! Administrator accounts: Argon2id password hashes, roles scoped to tenants, sign-in with
//! throttling and temporary lock-out, one-time passwords that must be changed, and the
//! console commands that are the way back in when every password is lost. Every change is
//! audited.
//!
//! Roles: `operator` (all tenants, rules, settings, administrators), `tenant_admin` (one
//! tenant's users and bulk uploads), `auditor` (read-only, the audit log).

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::audit::{self, Event};
use crate::db::{self, Tenant};
use crate::error::{AppError, AppResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Operator,
    TenantAdmin,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::TenantAdmin => "tenant_admin",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "operator" => Ok(Role::Operator),
            "tenant_admin" => Ok(Role::TenantAdmin),
            "auditor" => Ok(Role::Auditor),
            other => Err(format!(
                "{other:?} is not a role; use operator, tenant-admin or auditor"
            )),
        }
    }
}

/// An administrator account (never with its hash).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Admin {
    pub id: i64,
    pub username: String,
    pub email: Option<String>,
    pub role: Role,
    /// The tenant of a tenant admin (an auditor may be limited to one too).
    pub tenant_id: Option<i64>,
    pub tenant: Option<String>,
    pub disabled: bool,
    pub must_change_password: bool,
    pub created_at: String,
}

/// Failed sign-ins before an account is locked, and for how long.
pub const MAX_FAILURES: i64 = 5;
pub const LOCK_MINUTES: i64 = 15;
/// Shortest password an administrator may choose.
pub const MIN_PASSWORD_CHARS: usize = 12;

const SELECT: &str = "SELECT a.id, a.username, a.email, a.role, a.tenant_id, t.name, a.disabled, a.must_change_password, a.created_at
     FROM administrators a LEFT JOIN tenants t ON t.id = a.tenant_id";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Admin> {
    let role: String = r.get(3)?;
    Ok(Admin {
        id: r.get(0)?,
        username: r.get(1)?,
        email: r.get(2)?,
        role: role.parse().unwrap_or(Role::Auditor),
        tenant_id: r.get(4)?,
        tenant: r.get(5)?,
        disabled: r.get::<_, i64>(6)? != 0,
        must_change_password: r.get::<_, i64>(7)? != 0,
        created_at: r.get(8)?,
    })
}

pub fn list(conn: &Connection) -> AppResult<Vec<Admin>> {
    let mut st = conn.prepare(&format!("{SELECT} ORDER BY a.username_norm"))?;
    let v = st.query_map([], from_row)?.collect::<Result<_, _>>()?;
    Ok(v)
}

pub fn find(conn: &Connection, username: &str) -> AppResult<Option<Admin>> {
    Ok(conn
        .query_row(
            &format!("{SELECT} WHERE a.username_norm = ?1"),
            [db::norm(username)],
            from_row,
        )
        .optional()?)
}

fn get(conn: &Connection, username: &str) -> AppResult<Admin> {
    find(conn, username)?.ok_or_else(|| {
        AppError::Usage(format!(
            "there is no administrator {username:?} (see rollcall admin list)"
        ))
    })
}

/// A random password of 20 letters and digits, from the kernel's generator.
pub fn one_time_password() -> AppResult<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut bytes = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| AppError::internal("making a password", e))?;
    // Rejection sampling keeps every character equally likely.
    let limit = 256 - 256 % ALPHABET.len();
    let pw: String = bytes
        .iter()
        .filter(|b| (**b as usize) < limit)
        .take(20)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    if pw.len() < 20 {
        return one_time_password();
    }
    Ok(pw)
}

fn hash(password: &str) -> AppResult<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| AppError::internal("hashing a password", e))
}

fn check_username(name: &str) -> AppResult<()> {
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AppError::Usage(format!(
            "{name:?} is not a user name: use 1 to 64 letters, digits and . - _ @"
        )))
    }
}

fn check_scope(role: Role, tenant: Option<&Tenant>) -> AppResult<()> {
    match (role, tenant) {
        (Role::TenantAdmin, None) => Err(AppError::Usage(
            "a tenant admin belongs to one tenant: give --tenant".into(),
        )),
        (Role::Operator, Some(_)) => Err(AppError::Usage(
            "an operator has every tenant: leave out --tenant".into(),
        )),
        _ => Ok(()),
    }
}

fn audit_change(
    conn: &Connection,
    actor: &str,
    action: &'static str,
    a: &Admin,
    details: serde_json::Value,
) -> AppResult<()> {
    audit::record(
        conn,
        &Event {
            actor: actor.to_string(),
            tenant: a.tenant.clone(),
            action,
            target: a.username.clone(),
            details,
        },
    )
}

/// Creates an account with a one-time password (returned, shown once, to be changed at
/// the first sign-in).
pub fn create(
    conn: &Connection,
    actor: &str,
    username: &str,
    email: Option<&str>,
    role: Role,
    tenant: Option<&Tenant>,
) -> AppResult<(Admin, String)> {
    let username = username.trim();
    check_username(username)?;
    check_scope(role, tenant)?;
    if let Some(e) = email {
        crate::mail::mailbox(e).map_err(AppError::Usage)?;
    }
    if find(conn, username)?.is_some() {
        return Err(AppError::Usage(format!(
            "an administrator named {username:?} exists already"
        )));
    }
    let password = one_time_password()?;
    // Hashed before the transaction: it holds the database's write lock.
    let hashed = hash(&password)?;
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "INSERT INTO administrators (username, username_norm, email, role, tenant_id, password_hash, disabled, created_at, must_change_password)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, 1)",
        params![
            username,
            db::norm(username),
            email.map(str::trim),
            role.as_str(),
            tenant.map(|t| t.id),
            hashed,
            db::now()
        ],
    )?;
    let a = get(&tx, username)?;
    audit_change(
        &tx,
        actor,
        "admin.create",
        &a,
        serde_json::json!({"role": role.as_str(), "tenant": a.tenant, "email": a.email}),
    )?;
    tx.commit()?;
    Ok((a, password))
}

/// Enabled operators other than `except`.
fn other_operators(conn: &Connection, except: i64) -> AppResult<i64> {
    Ok(conn.query_row(
        "SELECT count(*) FROM administrators WHERE role = 'operator' AND disabled = 0 AND id <> ?1",
        [except],
        |r| r.get(0),
    )?)
}

pub fn set_role(
    conn: &Connection,
    actor: &str,
    username: &str,
    role: Role,
    tenant: Option<&Tenant>,
) -> AppResult<Admin> {
    check_scope(role, tenant)?;
    let before = get(conn, username)?;
    if before.role == Role::Operator
        && role != Role::Operator
        && !before.disabled
        && other_operators(conn, before.id)? == 0
    {
        return Err(AppError::Usage(format!(
            "{} is the last operator; make another operator first",
            before.username
        )));
    }
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "UPDATE administrators SET role = ?2, tenant_id = ?3 WHERE id = ?1",
        params![before.id, role.as_str(), tenant.map(|t| t.id)],
    )?;
    end_sessions(&tx, before.id)?;
    let after = get(&tx, username)?;
    audit_change(
        &tx,
        actor,
        "admin.role",
        &after,
        serde_json::json!({"from": {"role": before.role, "tenant": before.tenant}, "to": {"role": after.role, "tenant": after.tenant}}),
    )?;
    tx.commit()?;
    Ok(after)
}

pub fn set_disabled(
    conn: &Connection,
    actor: &str,
    username: &str,
    disabled: bool,
) -> AppResult<Admin> {
    let before = get(conn, username)?;
    if disabled && before.role == Role::Operator && other_operators(conn, before.id)? == 0 {
        return Err(AppError::Usage(format!(
            "{} is the last enabled operator; make another operator first",
            before.username
        )));
    }
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "UPDATE administrators SET disabled = ?2, failed_logins = 0, locked_until = NULL WHERE id = ?1",
        params![before.id, disabled as i64],
    )?;
    if disabled {
        end_sessions(&tx, before.id)?;
    }
    let after = get(&tx, username)?;
    audit_change(
        &tx,
        actor,
        if disabled {
            "admin.disable"
        } else {
            "admin.enable"
        },
        &after,
        serde_json::json!({}),
    )?;
    tx.commit()?;
    Ok(after)
}

/// Signs an administrator out of every browser (after a role, password or state change).
fn end_sessions(conn: &Connection, admin_id: i64) -> AppResult<()> {
    conn.execute("DELETE FROM web_sessions WHERE admin_id = ?1", [admin_id])?;
    Ok(())
}

/// A new one-time password (returned, shown once); also lifts a lock-out.
pub fn reset_password(conn: &Connection, actor: &str, username: &str) -> AppResult<String> {
    let a = get(conn, username)?;
    let password = one_time_password()?;
    let hashed = hash(&password)?;
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "UPDATE administrators SET password_hash = ?2, must_change_password = 1, failed_logins = 0, locked_until = NULL, password_changed_at = ?3 WHERE id = ?1",
        params![a.id, hashed, db::now()],
    )?;
    end_sessions(&tx, a.id)?;
    audit_change(
        &tx,
        actor,
        "admin.password_reset",
        &a,
        serde_json::json!({}),
    )?;
    tx.commit()?;
    Ok(password)
}

/// An administrator's own password change: the current one must be right, the new one
/// long enough and different.
/// `keep_session` is the web session making the change (it stays signed in).
pub fn change_password(
    conn: &Connection,
    username: &str,
    current: &str,
    new: &str,
    keep_session: Option<&str>,
) -> AppResult<()> {
    let a = get(conn, username)?;
    let stored: String = conn.query_row(
        "SELECT coalesce(password_hash, '') FROM administrators WHERE id = ?1",
        [a.id],
        |r| r.get(0),
    )?;
    if Argon2::default()
        .verify_password(current.as_bytes(), stored.as_str())
        .is_err()
    {
        return Err(AppError::Refused(
            "the current password is not right".into(),
        ));
    }
    if new.chars().count() < MIN_PASSWORD_CHARS {
        return Err(AppError::Usage(format!(
            "a password needs at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if new == current {
        return Err(AppError::Usage(
            "the new password must differ from the current one".into(),
        ));
    }
    let hashed = hash(new)?;
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "UPDATE administrators SET password_hash = ?2, must_change_password = 0, password_changed_at = ?3 WHERE id = ?1",
        params![a.id, hashed, db::now()],
    )?;
    // Other browsers signed in as this administrator sign in again with the new password.
    tx.execute(
        "DELETE FROM web_sessions WHERE admin_id = ?1 AND token_hash IS NOT ?2",
        params![a.id, keep_session],
    )?;
    audit_change(
        &tx,
        &format!("admin:{}", a.username),
        "admin.password_change",
        &a,
        serde_json::json!({}),
    )?;
    tx.commit()?;
    Ok(())
}

/// Why a sign-in was refused. The words shown never say whether the name exists.
#[derive(Debug, PartialEq)]
pub enum SignInError {
    Wrong,
    /// No such account (said exactly as `Wrong`; the web server also locks such a name
    /// after as many failures, so that neither words nor lock-out tell names apart).
    Unknown,
    Locked {
        until: String,
    },
    Disabled,
}

impl fmt::Display for SignInError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignInError::Wrong | SignInError::Unknown => {
                f.write_str("The user name or password is not right.")
            }
            SignInError::Locked { until } => write!(
                f,
                "Too many failed sign-ins: this account is locked until {until}. An operator can unlock it with rollcall admin reset-password."
            ),
            SignInError::Disabled => f.write_str("This account is disabled; ask an operator."),
        }
    }
}

fn minutes_from_now(m: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::minutes(m))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| db::now())
}

/// A well-formed hash that matches no password, checked when there is nothing real to check.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0000000000000000000000000000000000000000000";

/// Checks a password; counts failures and locks the account for `LOCK_MINUTES` after
/// `MAX_FAILURES`. Audited either way.
pub fn sign_in(
    conn: &Connection,
    username: &str,
    password: &str,
    from: &str,
) -> AppResult<Result<Admin, SignInError>> {
    let row: Option<(i64, String, i64, Option<String>)> = conn
        .query_row(
            "SELECT id, coalesce(password_hash, ''), failed_logins, locked_until FROM administrators WHERE username_norm = ?1",
            [db::norm(username)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let record = |action: &'static str, tenant: Option<String>, details: serde_json::Value| {
        audit::record(
            conn,
            &Event {
                actor: format!("web:{}", username.chars().take(64).collect::<String>()),
                tenant,
                action,
                target: username.chars().take(64).collect(),
                details,
            },
        )
    };
    let Some((id, stored, _, locked_until)) = row else {
        // Spend the same time as a real check, so timing does not tell names apart.
        let _ = Argon2::default().verify_password(password.as_bytes(), DUMMY_HASH);
        record(
            "admin.sign_in_failed",
            None,
            serde_json::json!({"from": from}),
        )?;
        return Ok(Err(SignInError::Unknown));
    };
    let now = db::now();
    if let Some(until) = locked_until.filter(|u| u.as_str() > now.as_str()) {
        // As slow as a checked password, so timing does not tell a locked account apart.
        let _ = Argon2::default().verify_password(password.as_bytes(), DUMMY_HASH);
        record(
            "admin.sign_in_failed",
            None,
            serde_json::json!({"from": from, "locked": true}),
        )?;
        return Ok(Err(SignInError::Locked { until }));
    }
    let a = get(conn, username)?;
    let ok = Argon2::default()
        .verify_password(password.as_bytes(), stored.as_str())
        .is_ok();
    if !ok {
        // Counted in the database itself, so attempts made at the same time all count.
        let failures: i64 = conn.query_row(
            "UPDATE administrators SET failed_logins = failed_logins + 1 WHERE id = ?1 RETURNING failed_logins",
            [id],
            |r| r.get(0),
        )?;
        let lock = (failures >= MAX_FAILURES).then(|| minutes_from_now(LOCK_MINUTES));
        if let Some(until) = &lock {
            conn.execute(
                "UPDATE administrators SET failed_logins = 0, locked_until = ?2 WHERE id = ?1",
                params![id, until],
            )?;
        }
        record(
            if lock.is_some() {
                "admin.locked"
            } else {
                "admin.sign_in_failed"
            },
            a.tenant.clone(),
            serde_json::json!({"from": from, "failures": failures}),
        )?;
        return Ok(Err(match lock {
            Some(until) => SignInError::Locked { until },
            None => SignInError::Wrong,
        }));
    }
    if a.disabled {
        record(
            "admin.sign_in_failed",
            a.tenant.clone(),
            serde_json::json!({"from": from, "disabled": true}),
        )?;
        return Ok(Err(SignInError::Disabled));
    }
    conn.execute(
        "UPDATE administrators SET failed_logins = 0, locked_until = NULL WHERE id = ?1",
        [id],
    )?;
    record(
        "admin.sign_in",
        a.tenant.clone(),
        serde_json::json!({"from": from}),
    )?;
    Ok(Ok(a))
}

/// On a database without administrators: an operator named `operator` with a one-time
/// password, returned to be printed on the console (and nowhere else).
pub fn ensure_first_operator(conn: &Connection) -> AppResult<Option<(Admin, String)>> {
    let n: i64 = conn.query_row("SELECT count(*) FROM administrators", [], |r| r.get(0))?;
    if n > 0 {
        return Ok(None);
    }
    create(
        conn,
        "system:first-start",
        "operator",
        None,
        Role::Operator,
        None,
    )
    .map(Some)
}
