//! Settings an operator changes in the web UI (mail and retention), kept in the database
//! (`settings`, one JSON object of overrides per section) over what `rollcall.toml` and
//! `ROLLCALL_*` say. `mail` and `jobs` give the effective sections; every use of them reads
//! these at the moment of use, so a change needs no restart.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::audit::{self, Event};
use crate::config::{JobsConfig, MailConfig};
use crate::db;
use crate::error::{AppError, AppResult};

/// The keys the UI may set, per section. (Paths of CA files and timeouts stay in the file.)
const MAIL_KEYS: &[&str] = &[
    "transport",
    "from",
    "support_contact",
    "sign_in_url",
    "web_url",
    "smtp_host",
    "smtp_port",
    "smtp_security",
    "smtp_username",
    "smtp_password",
    "attach_max_mib",
    "max_attempts",
];
const JOBS_KEYS: &[&str] = &["undo_days", "file_retention_days"];

fn keys(section: &str) -> AppResult<&'static [&'static str]> {
    match section {
        "mail" => Ok(MAIL_KEYS),
        "jobs" => Ok(JOBS_KEYS),
        other => Err(AppError::Usage(format!(
            "{other:?} is not a settings section; use mail or jobs"
        ))),
    }
}

/// The overrides of a section as stored.
pub fn overrides(conn: &Connection, section: &str) -> AppResult<Map<String, Value>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM settings WHERE section = ?1",
            [section],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default())
}

fn merge<T: Serialize + DeserializeOwned>(base: &T, over: &Map<String, Value>) -> AppResult<T> {
    let mut v = serde_json::to_value(base).map_err(|e| AppError::internal("settings", e))?;
    if let Some(o) = v.as_object_mut() {
        for (k, x) in over {
            o.insert(k.clone(), x.clone());
        }
    }
    serde_json::from_value(v)
        .map_err(|e| AppError::Usage(format!("a setting has the wrong type: {e}")))
}

/// The mail settings in effect: the configuration with the UI's overrides.
pub fn mail(conn: &Connection, base: &MailConfig) -> AppResult<MailConfig> {
    merge(base, &overrides(conn, "mail")?)
}

/// The jobs and retention settings in effect.
pub fn jobs(conn: &Connection, base: &JobsConfig) -> AppResult<JobsConfig> {
    merge(base, &overrides(conn, "jobs")?)
}

/// Checks a mail section that would be in effect.
fn check_mail(m: &MailConfig) -> AppResult<()> {
    if m.transport != "outbox" && m.transport != "smtp" {
        return Err(AppError::Usage("transport is outbox or smtp".into()));
    }
    if !["starttls", "tls", "none"].contains(&m.smtp_security.as_str()) {
        return Err(AppError::Usage(
            "smtp_security is starttls, tls or none".into(),
        ));
    }
    if m.transport == "smtp" && m.smtp_host.trim().is_empty() {
        return Err(AppError::Usage(
            "the smtp transport needs an smtp_host".into(),
        ));
    }
    crate::mail::mailbox(&m.from).map_err(|e| AppError::Usage(format!("from: {e}")))?;
    for (name, url) in [("sign_in_url", &m.sign_in_url), ("web_url", &m.web_url)] {
        let u = url.trim();
        if !(u.is_empty() || u.starts_with("https://") || u.starts_with("http://")) {
            return Err(AppError::Usage(format!(
                "{name} is an address starting with https:// or http://"
            )));
        }
        if u.chars()
            .any(|c| c.is_control() || c == '"' || c == '<' || c == '>')
        {
            return Err(AppError::Usage(format!(
                "{name} holds characters an address cannot"
            )));
        }
    }
    if m.attach_max_mib > 100 || m.max_attempts == 0 || m.max_attempts > 100 {
        return Err(AppError::Usage(
            "attach_max_mib is at most 100, max_attempts 1 to 100".into(),
        ));
    }
    Ok(())
}

fn check_jobs(j: &JobsConfig) -> AppResult<()> {
    for (name, days) in [
        ("undo_days", j.undo_days),
        ("file_retention_days", j.file_retention_days),
    ] {
        if !(1..=3650).contains(&days) {
            return Err(AppError::Usage(format!("{name} is 1 to 3650 days")));
        }
    }
    Ok(())
}

/// Changes a section's overrides: a key with a value sets it, a key with `null` returns it
/// to the configuration file's. The result must be a working section; audited (the SMTP
/// password only as "changed").
pub fn update(
    conn: &Connection,
    actor: &str,
    section: &str,
    changes: &Map<String, Value>,
    base_mail: &MailConfig,
    base_jobs: &JobsConfig,
) -> AppResult<()> {
    let allowed = keys(section)?;
    let mut over = overrides(conn, section)?;
    for (k, v) in changes {
        if !allowed.contains(&k.as_str()) {
            return Err(AppError::Usage(format!(
                "{k:?} cannot be set here (settings of {section}: {})",
                allowed.join(", ")
            )));
        }
        if v.is_null() {
            over.remove(k);
        } else {
            over.insert(k.clone(), v.clone());
        }
    }
    match section {
        "mail" => check_mail(&merge(base_mail, &over)?)?,
        _ => check_jobs(&merge(base_jobs, &over)?)?,
    }
    let shown: Map<String, Value> = changes
        .iter()
        .map(|(k, v)| {
            let v = if k == "smtp_password" && !v.is_null() {
                Value::String("(changed)".into())
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    let tx = conn.unchecked_transaction()?;
    if over.is_empty() {
        tx.execute("DELETE FROM settings WHERE section = ?1", [section])?;
    } else {
        tx.execute(
            "INSERT INTO settings (section, value, updated_by, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (section) DO UPDATE SET value = ?2, updated_by = ?3, updated_at = ?4",
            params![section, Value::Object(over).to_string(), actor, db::now()],
        )?;
    }
    audit::record(
        &tx,
        &Event {
            actor: actor.to_string(),
            tenant: None,
            action: "settings.change",
            target: section.to_string(),
            details: serde_json::json!({ "changes": shown }),
        },
    )?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_merge_check_and_reset() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(&dir.path().join("t.db"), &Default::default()).unwrap();
        let (m, j) = (MailConfig::default(), JobsConfig::default());
        let set = |v: Value| v.as_object().unwrap().clone();
        update(
            &conn,
            "t",
            "jobs",
            &set(serde_json::json!({"undo_days": 7})),
            &m,
            &j,
        )
        .unwrap();
        assert_eq!(jobs(&conn, &j).unwrap().undo_days, 7);
        assert_eq!(jobs(&conn, &j).unwrap().file_retention_days, 90);
        // Wrong keys, types and values are refused and change nothing.
        for bad in [
            serde_json::json!({"undo_days": 0}),
            serde_json::json!({"undo_days": "soon"}),
            serde_json::json!({"data_dir": "/"}),
        ] {
            assert!(update(&conn, "t", "jobs", &set(bad), &m, &j).is_err());
        }
        assert!(
            update(
                &conn,
                "t",
                "mail",
                &set(serde_json::json!({"transport": "smtp"})),
                &m,
                &j
            )
            .is_err()
        );
        assert!(
            update(
                &conn,
                "t",
                "mail",
                &set(serde_json::json!({"web_url": "javascript:x"})),
                &m,
                &j
            )
            .is_err()
        );
        assert_eq!(jobs(&conn, &j).unwrap().undo_days, 7);
        update(&conn, "t", "mail", &set(serde_json::json!({"transport": "smtp", "smtp_host": "mx.example.com", "smtp_password": "s3cret"})), &m, &j).unwrap();
        let eff = mail(&conn, &m).unwrap();
        assert_eq!(
            (eff.transport.as_str(), eff.smtp_host.as_str()),
            ("smtp", "mx.example.com")
        );
        // null returns to the file's value; an empty section disappears.
        update(
            &conn,
            "t",
            "jobs",
            &set(serde_json::json!({"undo_days": null})),
            &m,
            &j,
        )
        .unwrap();
        assert_eq!(jobs(&conn, &j).unwrap().undo_days, 30);
        let n: i64 = conn
            .query_row("SELECT count(*) FROM settings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        // The password is not in the audit entry.
        let details: String = conn
            .query_row(
                "SELECT group_concat(details, ' ') FROM audit_outbox",
                [],
                |r| r.get(0),
            )
            .unwrap_or_default();
        assert!(!details.contains("s3cret"), "{details}");
    }
}
