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

/// Changes settings: `changes` maps a section (`mail`, `jobs`) to its keys; a key with a
/// value sets it, a key with `null` returns it to the configuration file's. Every section
/// must come out working, or nothing is saved; one transaction, audited (the SMTP password
/// only as "changed").
///
/// Pointing mail at another SMTP server (host, port, security, transport) needs the
/// password again in the same change whenever one is set: otherwise the password of the
/// configuration file could be sent to a server of the operator's choosing.
pub fn update(
    conn: &Connection,
    actor: &str,
    changes: &Map<String, Value>,
    base_mail: &MailConfig,
    base_jobs: &JobsConfig,
) -> AppResult<()> {
    // Per section: its overrides after the change, and the change itself (for the audit).
    type Planned<'a> = (&'a str, Map<String, Value>, Map<String, Value>);
    let mut planned: Vec<Planned<'_>> = Vec::new();
    for (section, section_changes) in changes {
        let section = section.as_str();
        let allowed = keys(section)?;
        let section_changes = section_changes
            .as_object()
            .ok_or_else(|| AppError::Usage(format!("{section} takes an object of settings")))?;
        let mut over = overrides(conn, section)?;
        for (k, v) in section_changes {
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
        if section == "mail" {
            let before = mail(conn, base_mail)?;
            let after: MailConfig = merge(base_mail, &over)?;
            check_mail(&after)?;
            let server_changed = before.transport != after.transport
                || before.smtp_host != after.smtp_host
                || before.smtp_port != after.smtp_port
                || before.smtp_security != after.smtp_security;
            if server_changed
                && !after.smtp_password.is_empty()
                && !section_changes.contains_key("smtp_password")
            {
                return Err(AppError::Usage(
                    "changing the SMTP server (transport, host, port or security) needs its password (smtp_password) in the same change".into(),
                ));
            }
        } else {
            check_jobs(&merge(base_jobs, &over)?)?;
        }
        planned.push((section, over, section_changes.clone()));
    }
    let tx = conn.unchecked_transaction()?;
    for (section, over, section_changes) in planned {
        if over.is_empty() {
            tx.execute("DELETE FROM settings WHERE section = ?1", [section])?;
        } else {
            tx.execute(
                "INSERT INTO settings (section, value, updated_by, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (section) DO UPDATE SET value = ?2, updated_by = ?3, updated_at = ?4",
                params![section, Value::Object(over).to_string(), actor, db::now()],
            )?;
        }
        let shown: Map<String, Value> = section_changes
            .into_iter()
            .map(|(k, v)| {
                let v = if k == "smtp_password" && !v.is_null() {
                    Value::String("(changed)".into())
                } else {
                    v
                };
                (k, v)
            })
            .collect();
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
    }
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
        let change = |v: Value| update(&conn, "t", v.as_object().unwrap(), &m, &j);
        change(serde_json::json!({"jobs": {"undo_days": 7}})).unwrap();
        assert_eq!(jobs(&conn, &j).unwrap().undo_days, 7);
        assert_eq!(jobs(&conn, &j).unwrap().file_retention_days, 90);
        // Wrong sections, keys, types and values are refused and change nothing, also when
        // another section of the same change is right.
        for bad in [
            serde_json::json!({"jobs": {"undo_days": 0}}),
            serde_json::json!({"jobs": {"undo_days": "soon"}}),
            serde_json::json!({"jobs": {"data_dir": "/"}}),
            serde_json::json!({"jobs": 5}),
            serde_json::json!({"web": {"listen": "0.0.0.0:1"}}),
            serde_json::json!({"mail": {"transport": "smtp"}}),
            serde_json::json!({"mail": {"web_url": "javascript:x"}}),
            serde_json::json!({"mail": {"support_contact": "desk"}, "jobs": {"undo_days": 0}}),
        ] {
            assert!(change(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(jobs(&conn, &j).unwrap().undo_days, 7);
        assert_eq!(mail(&conn, &m).unwrap().support_contact, "");
        change(serde_json::json!({"mail": {"transport": "smtp", "smtp_host": "mx.example.com", "smtp_password": "s3cret"}}))
            .unwrap();
        let eff = mail(&conn, &m).unwrap();
        assert_eq!(
            (eff.transport.as_str(), eff.smtp_host.as_str()),
            ("smtp", "mx.example.com")
        );
        // Another server needs the password again: it is not sent where it was not meant.
        let e = change(serde_json::json!({"mail": {"smtp_host": "evil.example"}})).unwrap_err();
        assert!(e.to_string().contains("needs its password"), "{e}");
        assert_eq!(mail(&conn, &m).unwrap().smtp_host, "mx.example.com");
        change(
            serde_json::json!({"mail": {"smtp_host": "mx2.example.com", "smtp_password": "other"}}),
        )
        .unwrap();
        // null returns to the file's value; an empty section disappears.
        change(serde_json::json!({"jobs": {"undo_days": null}})).unwrap();
        assert_eq!(jobs(&conn, &j).unwrap().undo_days, 30);
        let n: i64 = conn
            .query_row("SELECT count(*) FROM settings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        // The password is not in the audit entries.
        let details: String = conn
            .query_row(
                "SELECT group_concat(details, ' ') FROM audit_outbox",
                [],
                |r| r.get(0),
            )
            .unwrap_or_default();
        assert!(
            !details.contains("s3cret") && !details.contains("other"),
            "{details}"
        );
    }
}
