//! Housekeeping as named tasks with a last run, a next run and a last error, run by the job
//! worker when due (between jobs) and at once by `rollcall tasks run NAME`.
//!
//! - `purge_files`: uploaded files, reports, outbox .eml files and sent or failed messages
//!   older than `[jobs] file_retention_days`.
//! - `purge_undo_data`: before/after images of jobs finished more than `[jobs] undo_days` ago
//!   (the personal data of deleted users goes with them; see docs/RETENTION.md).
//! - `rotate_audit`: closes the current audit file and starts the next (the chain continues).

use std::path::Path;

use rusqlite::params;
use serde::Serialize;

use crate::db;
use crate::error::{AppError, AppResult};
use crate::service::App;

/// Every task: name, what it does, how often it runs (seconds).
pub const TASKS: [(&str, &str, i64); 3] = [
    (
        "purge_files",
        "delete uploaded files and reports past their retention",
        6 * 3600,
    ),
    (
        "purge_undo_data",
        "purge before/after images past the undo window",
        6 * 3600,
    ),
    (
        "rotate_audit",
        "start a new audit log file (the chain continues)",
        24 * 3600,
    ),
];

#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    pub name: String,
    pub description: String,
    pub last_run: Option<String>,
    pub next_run: String,
    pub last_error: Option<String>,
    pub last_result: Option<String>,
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The tasks with their state (each is registered on first use, due at once).
pub fn list(app: &App) -> AppResult<Vec<TaskInfo>> {
    let mut out = Vec::new();
    for (name, description, _) in TASKS {
        app.conn.execute(
            "INSERT INTO tasks (name, next_run) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
            params![name, db::now()],
        )?;
        let (last_run, next_run, last_error, last_result) = app.conn.query_row(
            "SELECT last_run, next_run, last_error, last_result FROM tasks WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        out.push(TaskInfo {
            name: name.to_string(),
            description: description.to_string(),
            last_run,
            next_run,
            last_error,
            last_result,
        });
    }
    Ok(out)
}

/// Runs one task now and records the outcome; returns what it did.
pub fn run(app: &App, name: &str) -> AppResult<String> {
    let Some((_, _, every)) = TASKS.iter().find(|t| t.0 == name) else {
        return Err(AppError::Usage(format!(
            "no task {name:?}; tasks are: {}",
            TASKS.map(|t| t.0).join(", ")
        )));
    };
    let result = match name {
        "purge_files" => purge_files(app),
        "purge_undo_data" => purge_undo_data(app),
        _ => rotate_audit(app),
    };
    let now = time::OffsetDateTime::now_utc();
    let next = fmt_time(now + time::Duration::seconds(*every));
    let (error, done) = match &result {
        Ok(s) => (None, Some(s.clone())),
        Err(e) => (Some(e.to_string()), None),
    };
    app.conn.execute(
        "INSERT INTO tasks (name, last_run, next_run, last_error, last_result) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (name) DO UPDATE SET last_run = excluded.last_run, next_run = excluded.next_run,
             last_error = excluded.last_error, last_result = coalesce(excluded.last_result, tasks.last_result)",
        params![name, fmt_time(now), next, error, done],
    )?;
    result
}

/// Runs the tasks that are due; errors are recorded with the task, not raised.
pub fn run_due(app: &App) -> AppResult<()> {
    let now = db::now();
    for t in list(app)? {
        if t.next_run <= now {
            let _ = run(app, &t.name);
        }
    }
    Ok(())
}

fn days_ago(days: u32) -> String {
    fmt_time(time::OffsetDateTime::now_utc() - time::Duration::days(i64::from(days)))
}

fn remove(path: &Path) -> bool {
    std::fs::remove_file(path).is_ok()
}

fn purge_files(app: &App) -> AppResult<String> {
    let retention = crate::service::jobs_config(app)?;
    let cutoff = days_ago(retention.file_retention_days);
    // Files of uploads past retention, unless a job still waits to read them or a newer
    // upload has the same content.
    let mut st = app.conn.prepare(
        "SELECT u.id, u.stored_path FROM uploads u
         WHERE u.uploaded_at < ?1 AND u.stored_path <> ''
           AND NOT EXISTS (SELECT 1 FROM uploads v WHERE v.stored_path = u.stored_path
               AND (v.uploaded_at >= ?1
                    OR EXISTS (SELECT 1 FROM jobs j WHERE j.upload_id = v.id AND j.state IN ('queued', 'running', 'scheduled', 'awaiting_approval'))))",
    )?;
    let old: Vec<(i64, String)> = st
        .query_map([&cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut files = 0;
    for (id, path) in &old {
        files += usize::from(remove(Path::new(path)));
        files += usize::from(remove(&app.data.error_report(*id)));
        app.conn
            .execute("UPDATE uploads SET stored_path = '' WHERE id = ?1", [id])?;
    }
    let mut st = app
        .conn
        .prepare("SELECT id FROM jobs WHERE finished_at < ?1")?;
    let jobs: Vec<i64> = st
        .query_map([&cutoff], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in jobs {
        files += usize::from(remove(&app.data.results_report(id)));
    }
    // Messages: the .eml files of the outbox folder, and the queue's rows that are done
    // (they hold names, addresses and problems quoted from files).
    let keep_after = std::time::SystemTime::now()
        .checked_sub(std::time::Duration::from_secs(
            u64::from(retention.file_retention_days) * 86_400,
        ))
        .unwrap_or(std::time::UNIX_EPOCH);
    if let Ok(dir) = std::fs::read_dir(app.data.outbox_dir()) {
        for e in dir.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t <= keep_after);
            if old && e.path().extension().is_some_and(|x| x == "eml") {
                files += usize::from(remove(&e.path()));
            }
        }
    }
    let messages = app.conn.execute(
        "DELETE FROM mail_outbox WHERE state IN ('sent', 'failed') AND created_at <= ?1",
        [&cutoff],
    )?;
    Ok(format!(
        "{files} files deleted ({} uploads past {} days), {messages} sent or failed messages removed",
        old.len(),
        retention.file_retention_days
    ))
}

fn purge_undo_data(app: &App) -> AppResult<String> {
    let cutoff = days_ago(crate::service::jobs_config(app)?.undo_days);
    let tx = app.conn.unchecked_transaction()?;
    let n = tx.execute(
        "DELETE FROM job_changes WHERE job_id IN (SELECT id FROM jobs WHERE finished_at < ?1 AND changes_purged_at IS NULL
             AND NOT EXISTS (SELECT 1 FROM jobs u WHERE u.undo_of = jobs.id AND u.state IN ('queued', 'running', 'scheduled', 'awaiting_approval')))",
        [&cutoff],
    )?;
    let jobs = tx.execute(
        "UPDATE jobs SET changes_purged_at = ?2 WHERE finished_at < ?1 AND changes_purged_at IS NULL
             AND NOT EXISTS (SELECT 1 FROM jobs u WHERE u.undo_of = jobs.id AND u.state IN ('queued', 'running', 'scheduled', 'awaiting_approval'))",
        params![cutoff, db::now()],
    )?;
    tx.commit()?;
    Ok(format!("{n} before/after images of {jobs} jobs purged"))
}

fn rotate_audit(app: &App) -> AppResult<String> {
    Ok(match crate::audit::rotate(&app.data.audit_dir())? {
        Some(next) => format!("started {}", next.display()),
        None => "nothing to rotate (no entries in the current file)".into(),
    })
}
