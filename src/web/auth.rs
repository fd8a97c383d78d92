//! Who is asking, and what they may do: browser sessions (an HttpOnly, SameSite=Strict
//! cookie plus a CSRF token the page sends back), bearer API tokens, and the access rules
//! of the three roles. Tokens are random and stored only as SHA-256.
//!
//! Access: an operator reaches every tenant; a tenant admin only its own; an auditor reads
//! its own tenant (or every tenant when it has none) and changes nothing. Another tenant's
//! data answers "not found", so its existence is not revealed either.

use std::io::Read;

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::{ApiError, ApiResult};
use crate::admin::{Admin, Role};
use crate::audit::{self, Event};
use crate::config::WebConfig;
use crate::db::{self, Tenant};
use crate::error::{AppError, AppResult};

pub const COOKIE: &str = "rollcall_session";

/// The signed-in administrator (or API token) of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// As recorded in uploads, jobs and the audit log: `web:NAME` or `token:NAME`.
    pub actor: String,
    pub name: String,
    pub admin_id: Option<i64>,
    pub email: Option<String>,
    pub role: Role,
    pub tenant_id: Option<i64>,
    pub tenant: Option<String>,
    /// Set for a browser session: its CSRF token and the hash of its cookie.
    pub session: Option<(String, String)>,
    pub must_change_password: bool,
}

impl Principal {
    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }

    /// Refuses unless the principal is an operator.
    pub fn need_operator(&self) -> ApiResult<()> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "Only an operator can do this; ask one of your operators.",
            ))
        }
    }

    /// Whether the principal may see `tenant` at all.
    pub fn sees(&self, tenant: &Tenant) -> bool {
        match self.role {
            Role::Operator => true,
            Role::TenantAdmin => self.tenant_id == Some(tenant.id),
            Role::Auditor => self.tenant_id.is_none_or(|t| t == tenant.id),
        }
    }

    /// The tenant named in a request, when the principal may see it (else "not found",
    /// the same answer as for a tenant that does not exist). `write` refuses auditors.
    pub fn tenant(&self, conn: &Connection, name: &str, write: bool) -> ApiResult<Tenant> {
        let missing = || ApiError::not_found(format!("There is no tenant {name:?}."));
        let t = db::find_tenant(conn, name)?.ok_or_else(missing)?;
        if !self.sees(&t) {
            return Err(missing());
        }
        if write && self.role == Role::Auditor {
            return Err(ApiError::forbidden(
                "Auditors can read but not change anything.",
            ));
        }
        Ok(t)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "email": self.email,
            "role": self.role,
            "tenant": self.tenant,
            "must_change_password": self.must_change_password,
            "csrf_token": self.session.as_ref().map(|s| &s.0),
            "kind": if self.session.is_some() { "session" } else { "token" },
        })
    }
}

/// 32 random bytes from the kernel, as hex.
pub fn random_token() -> AppResult<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| AppError::internal("making a random token", e))?;
    Ok(hex::encode(bytes))
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Starts a session for a signed-in administrator; returns (cookie token, CSRF token).
pub fn create_session(
    conn: &Connection,
    admin: &Admin,
    client: &str,
    cfg: &WebConfig,
) -> AppResult<(String, String)> {
    let token = random_token()?;
    let csrf = random_token()?;
    let now = db::now();
    let max = time::Duration::hours(cfg.session_max_hours.max(1) as i64);
    // Sessions that ended long ago are cleared as new ones start.
    conn.execute(
        "DELETE FROM web_sessions WHERE expires_at < ?1",
        [now.as_str()],
    )?;
    conn.execute(
        "INSERT INTO web_sessions (token_hash, admin_id, csrf, created_at, last_seen_at, expires_at, client) VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)",
        params![token_hash(&token), admin.id, csrf, now, db::now_plus(max), client],
    )?;
    Ok((token, csrf))
}

/// The administrator of a session cookie, if the session is live (not past its idle or
/// absolute end, account enabled). Marks it used.
pub fn session(conn: &Connection, token: &str, cfg: &WebConfig) -> AppResult<Option<Principal>> {
    let hash = token_hash(token);
    let row: Option<(i64, String, String, String)> = conn
        .query_row(
            "SELECT admin_id, csrf, last_seen_at, expires_at FROM web_sessions WHERE token_hash = ?1",
            [hash.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((admin_id, csrf, last_seen, expires)) = row else {
        return Ok(None);
    };
    let now = db::now();
    let idle = time::Duration::minutes(cfg.session_idle_minutes.max(1) as i64);
    let idle_end =
        time::OffsetDateTime::parse(&last_seen, &time::format_description::well_known::Rfc3339)
            .map(|t| t + idle)
            .ok();
    let idle_over = idle_end.is_none_or(|t| t < time::OffsetDateTime::now_utc());
    if expires.as_str() <= now.as_str() || idle_over {
        conn.execute("DELETE FROM web_sessions WHERE token_hash = ?1", [&hash])?;
        return Ok(None);
    }
    let Some(a) = admin_by_id(conn, admin_id)? else {
        return Ok(None);
    };
    if a.disabled {
        return Ok(None);
    }
    // Marked used at most every 30 seconds, not on every request.
    let stale =
        time::OffsetDateTime::parse(&last_seen, &time::format_description::well_known::Rfc3339)
            .map(|t| t + time::Duration::seconds(30) < time::OffsetDateTime::now_utc())
            .unwrap_or(true);
    if stale {
        touch(
            conn,
            "UPDATE web_sessions SET last_seen_at = ?2 WHERE token_hash = ?1",
            params![hash, now],
        )?;
    }
    Ok(Some(Principal {
        actor: format!("web:{}", a.username),
        name: a.username,
        admin_id: Some(a.id),
        email: a.email,
        role: a.role,
        tenant_id: a.tenant_id,
        tenant: a.tenant,
        session: Some((csrf, hash)),
        must_change_password: a.must_change_password,
    }))
}

/// A bookkeeping write (when a session or token was last used) that never waits: while a
/// job holds the database's write lock it is skipped, so reading pages stays quick.
fn touch(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> AppResult<()> {
    let before: i64 = conn.query_row("PRAGMA busy_timeout", [], |r| r.get(0))?;
    conn.busy_timeout(std::time::Duration::ZERO)?;
    let done = conn.execute(sql, args);
    conn.busy_timeout(std::time::Duration::from_millis(before.max(0) as u64))?;
    match done {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn admin_by_id(conn: &Connection, id: i64) -> AppResult<Option<Admin>> {
    let name: Option<String> = conn
        .query_row(
            "SELECT username FROM administrators WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    match name {
        Some(n) => crate::admin::find(conn, &n),
        None => Ok(None),
    }
}

/// Whether the session or token a principal came with still holds (for long-lived
/// answers such as the job event stream, which otherwise outlive a sign-out). A session
/// watching a job counts as used.
pub fn still_valid(conn: &Connection, p: &Principal) -> AppResult<bool> {
    let now = db::now();
    if let Some((_, hash)) = &p.session {
        let live: Option<String> = conn
            .query_row(
                "SELECT s.last_seen_at FROM web_sessions s JOIN administrators a ON a.id = s.admin_id
                 WHERE s.token_hash = ?1 AND s.expires_at > ?2 AND a.disabled = 0",
                params![hash, now],
                |r| r.get(0),
            )
            .optional()?;
        let Some(last_seen) = live else {
            return Ok(false);
        };
        if last_seen < db::now_plus(time::Duration::seconds(-30)) {
            touch(
                conn,
                "UPDATE web_sessions SET last_seen_at = ?2 WHERE token_hash = ?1",
                params![hash, now],
            )?;
        }
        return Ok(true);
    }
    let name = p.actor.strip_prefix("token:").unwrap_or("");
    let live: i64 = conn.query_row(
        "SELECT count(*) FROM api_tokens WHERE name = ?1 AND revoked_at IS NULL",
        [name],
        |r| r.get(0),
    )?;
    Ok(live > 0)
}

pub fn end_session(conn: &Connection, hash: &str) -> AppResult<()> {
    conn.execute("DELETE FROM web_sessions WHERE token_hash = ?1", [hash])?;
    Ok(())
}

/// The principal of a bearer token, if it exists and is not revoked.
pub fn bearer(conn: &Connection, token: &str) -> AppResult<Option<Principal>> {
    type Row = (
        i64,
        String,
        String,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    let row: Option<Row> = conn
        .query_row(
            "SELECT k.id, k.name, k.role, k.tenant_id, t.name, k.last_used_at FROM api_tokens k LEFT JOIN tenants t ON t.id = k.tenant_id
             WHERE k.token_hash = ?1 AND k.revoked_at IS NULL",
            [token_hash(token)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?;
    let Some((id, name, role, tenant_id, tenant, last_used)) = row else {
        return Ok(None);
    };
    // Marked used at most once a minute.
    let now = db::now();
    let minute_ago = db::now_plus(time::Duration::minutes(-1));
    if last_used.is_none_or(|t| t < minute_ago) {
        touch(
            conn,
            "UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1",
            params![id, now],
        )?;
    }
    Ok(Some(Principal {
        actor: format!("token:{name}"),
        name,
        admin_id: None,
        email: None,
        role: role.parse().unwrap_or(Role::Auditor),
        tenant_id,
        tenant,
        session: None,
        must_change_password: false,
    }))
}

/// An API token as listed (never its secret).
#[derive(Debug, serde::Serialize)]
pub struct TokenInfo {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub tenant: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

pub fn list_tokens(conn: &Connection) -> AppResult<Vec<TokenInfo>> {
    let mut st = conn.prepare(
        "SELECT k.id, k.name, k.role, t.name, k.created_by, k.created_at, k.last_used_at, k.revoked_at
         FROM api_tokens k LEFT JOIN tenants t ON t.id = k.tenant_id ORDER BY k.id",
    )?;
    let v = st
        .query_map([], |r| {
            Ok(TokenInfo {
                id: r.get(0)?,
                name: r.get(1)?,
                role: r.get(2)?,
                tenant: r.get(3)?,
                created_by: r.get(4)?,
                created_at: r.get(5)?,
                last_used_at: r.get(6)?,
                revoked_at: r.get(7)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(v)
}

/// Creates a token; returns its id and the secret (shown once).
pub fn create_token(
    conn: &Connection,
    actor: &str,
    name: &str,
    role: Role,
    tenant: Option<&Tenant>,
) -> AppResult<(i64, String)> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(AppError::Usage(
            "a token needs a name of 1 to 64 characters".into(),
        ));
    }
    if role == Role::TenantAdmin && tenant.is_none() {
        return Err(AppError::Usage(
            "a tenant admin token needs a tenant".into(),
        ));
    }
    if role == Role::Operator && tenant.is_some() {
        return Err(AppError::Usage(
            "an operator token reaches every tenant; give no tenant".into(),
        ));
    }
    let secret = format!("rc_{}", random_token()?);
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "INSERT INTO api_tokens (name, token_hash, role, tenant_id, created_by, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![name, token_hash(&secret), role.as_str(), tenant.map(|t| t.id), actor, db::now()],
    )?;
    let id = tx.last_insert_rowid();
    audit::record(
        &tx,
        &Event {
            actor: actor.to_string(),
            tenant: tenant.map(|t| t.name.clone()),
            action: "token.create",
            target: name.to_string(),
            details: serde_json::json!({"token": id, "role": role.as_str()}),
        },
    )?;
    tx.commit()?;
    Ok((id, secret))
}

/// Revokes a token; false when there is no live token `id`.
pub fn revoke_token(conn: &Connection, actor: &str, id: i64) -> AppResult<bool> {
    let tx = conn.unchecked_transaction()?;
    let name: Option<String> = tx
        .query_row(
            "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL RETURNING name",
            params![id, db::now()],
            |r| r.get(0),
        )
        .optional()?;
    let Some(name) = name else {
        return Ok(false);
    };
    audit::record(
        &tx,
        &Event {
            actor: actor.to_string(),
            tenant: None,
            action: "token.revoke",
            target: name,
            details: serde_json::json!({"token": id}),
        },
    )?;
    tx.commit()?;
    Ok(true)
}

/// The value of one cookie of a `Cookie` header.
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The `Set-Cookie` value of a session (or of its removal when `token` is empty).
pub fn session_cookie(token: &str, secure: bool, max_age_secs: u64) -> String {
    let secure = if secure { "; Secure" } else { "" };
    if token.is_empty() {
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
    } else {
        format!(
            "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_secrets() {
        assert_eq!(
            cookie(Some("a=1; rollcall_session=abc; b=2"), COOKIE),
            Some("abc")
        );
        assert_eq!(cookie(Some("rollcall_sessionx=abc"), COOKIE), None);
        assert_eq!(cookie(None, COOKIE), None);
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        let c = session_cookie("t", true, 60);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert!(session_cookie("", false, 0).contains("Max-Age=0"));
        assert_eq!(random_token().unwrap().len(), 64);
    }
}
