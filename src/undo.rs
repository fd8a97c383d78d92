//! Undo: reverting a succeeded job from its recorded before-images, as a new job that is
//! queued, run by the worker and audited like any other.
//!
//! A user changed since the job (its current image differs from the job's after-image), or
//! an email taken again by someone else, is a conflict: the undo stops, changes nothing and
//! lists every conflict. Images are kept for `[jobs] undo_days` (default 30) after the job;
//! past that the job can no longer be undone (see docs/RETENTION.md).

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use crate::audit::{self, Event};
use crate::bulk::image_json;
use crate::db::{self, USER_COLUMNS, USER_FROM, User};
use crate::error::{AppError, AppResult};
use crate::service::{self, App};

/// tenant, state, operation, finished, undone by, purged at, tenant name.
type JobFacts = (
    i64,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    String,
);
/// row, user, action, before, after.
type ChangeRow = (i64, i64, String, Option<String>, Option<String>);

/// One reason an undo cannot go ahead.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Conflict {
    /// Row of the original file.
    pub row: i64,
    pub email: String,
    pub reason: String,
}

/// Queues the undo of a succeeded job; returns the new job's id.
pub fn submit(app: &App, job_id: i64) -> AppResult<i64> {
    // Checked and queued in one write transaction, so two undos cannot both pass.
    let tx =
        rusqlite::Transaction::new_unchecked(&app.conn, rusqlite::TransactionBehavior::Immediate)?;
    let row: Option<JobFacts> = tx
        .query_row(
            "SELECT j.tenant_id, j.state, j.operation, j.finished_at, j.undone_by, j.changes_purged_at, t.name
             FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE j.id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?;
    let Some((tenant_id, state, op, finished, undone_by, purged, tenant)) = row else {
        return Err(AppError::Usage(format!("there is no job {job_id}")));
    };
    if state != "succeeded" {
        return Err(AppError::Usage(format!(
            "job {job_id} is {state}; only a job that succeeded can be undone"
        )));
    }
    if op == "undo" {
        return Err(AppError::Usage(format!(
            "job {job_id} is itself an undo; submit the original file again instead"
        )));
    }
    if let Some(by) = undone_by {
        return Err(AppError::Usage(format!(
            "job {job_id} was already undone by job {by}"
        )));
    }
    let days = crate::service::jobs_config(app)?.undo_days;
    let too_old = purged.is_some()
        || finished.as_deref().is_some_and(|f| {
            let fmt = time::format_description::well_known::Rfc3339;
            time::OffsetDateTime::parse(f, &fmt).is_ok_and(|t| {
                time::OffsetDateTime::now_utc() - t > time::Duration::days(days as i64)
            })
        });
    if too_old {
        return Err(AppError::Usage(format!(
            "job {job_id} finished more than {days} days ago; its before-images are no longer kept, so it cannot be undone"
        )));
    }
    let waiting: Option<i64> = tx
        .query_row(
            "SELECT id FROM jobs WHERE undo_of = ?1 AND state IN ('queued', 'running', 'scheduled', 'awaiting_approval')",
            [job_id],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(w) = waiting {
        return Err(AppError::Usage(format!(
            "the undo of job {job_id} is already waiting as job {w}"
        )));
    }
    tx.execute(
        "INSERT INTO jobs (tenant_id, upload_id, operation, undo_of, state, submitted_by, submitted_at)
         VALUES (?1, NULL, 'undo', ?2, 'queued', ?3, ?4)",
        params![tenant_id, job_id, app.actor, db::now()],
    )?;
    let id = tx.last_insert_rowid();
    audit::record(
        &tx,
        &Event {
            actor: app.actor.clone(),
            tenant: Some(tenant),
            action: "job.submitted",
            target: format!("job {id}"),
            details: serde_json::json!({ "job": id, "operation": "undo", "undo_of": job_id }),
        },
    )?;
    tx.commit()?;
    service::flush_audit(app)?;
    crate::scheduler::wake(&app.data);
    Ok(id)
}

fn user_by_id(conn: &Connection, id: i64) -> AppResult<Option<User>> {
    Ok(conn
        .query_row(
            &format!("SELECT {USER_COLUMNS} FROM {USER_FROM} WHERE u.id = ?1"),
            [id],
            db::user_from_row,
        )
        .optional()?)
}

/// A recorded image's fields (see `model::IMAGE_KEYS`).
struct Restored {
    email: String,
    first_name: String,
    last_name: String,
    job_title: Option<String>,
    team_id: Option<i64>,
    role: String,
    language: String,
    pool_id: i64,
    status: String,
    custom: Option<String>,
}

fn restored(image: &str) -> AppResult<Restored> {
    let v: Value =
        serde_json::from_str(image).map_err(|e| AppError::internal("reading a before-image", e))?;
    let s = |i: usize| v.get(i).and_then(Value::as_str).map(str::to_string);
    let n = |i: usize| v.get(i).and_then(Value::as_i64);
    let bad = || AppError::internal("reading a before-image", "a field is missing");
    Ok(Restored {
        email: s(0).ok_or_else(bad)?,
        first_name: s(1).ok_or_else(bad)?,
        last_name: s(2).ok_or_else(bad)?,
        job_title: s(3),
        team_id: n(4),
        role: s(6).ok_or_else(bad)?,
        language: s(7).ok_or_else(bad)?,
        pool_id: n(8).ok_or_else(bad)?,
        status: s(10).ok_or_else(bad)?,
        custom: s(11),
    })
}

/// Reverts job `of` inside the caller's transaction, recording the reverting changes under
/// `job_id`. Returns the number of users reverted, or every conflict (nothing is changed then:
/// the caller rolls back).
pub fn apply(
    conn: &Connection,
    tenant_id: i64,
    job_id: i64,
    of: i64,
) -> AppResult<Result<u64, Vec<Conflict>>> {
    let mut conflicts = Vec::new();
    let mut reverted = 0u64;
    let now = db::now();
    // Checked again here: the job may have been undone or purged since the undo was queued.
    let (undone_by, purged): (Option<i64>, Option<String>) = conn.query_row(
        "SELECT undone_by, changes_purged_at FROM jobs WHERE id = ?1",
        [of],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if let Some(by) = undone_by {
        return Ok(Err(vec![Conflict {
            row: 0,
            email: String::new(),
            reason: format!("job {of} was already undone by job {by}"),
        }]));
    }
    if purged.is_some() {
        return Ok(Err(vec![Conflict {
            row: 0,
            email: String::new(),
            reason: format!("the before-images of job {of} were purged (past the undo window)"),
        }]));
    }
    let mut st = conn.prepare(
        "SELECT row_number, user_id, action, before, after FROM job_changes WHERE job_id = ?1 ORDER BY row_number DESC",
    )?;
    let rows: Vec<ChangeRow> = st
        .query_map([of], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut record = conn.prepare(
        "INSERT INTO job_changes (job_id, row_number, user_id, action, before, after) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut restore = conn.prepare(
        "UPDATE users SET email = ?2, email_norm = ?3, first_name = ?4, last_name = ?5, job_title = ?6, team_id = ?7, role = ?8, language = ?9, pool_id = ?10, status = ?11, custom = ?12, updated_at = ?13 WHERE id = ?1",
    )?;
    for (row, user_id, action, before, after) in rows {
        if action == "unchanged" {
            continue;
        }
        let email_of = |img: &Option<String>| {
            img.as_deref()
                .and_then(|i| restored(i).ok())
                .map(|r| r.email)
                .unwrap_or_default()
        };
        let current = user_by_id(conn, user_id)?;
        if action == "delete" {
            let Some(before) = before else { continue };
            let b = restored(&before)?;
            let taken: Option<String> = conn
                .query_row(
                    "SELECT email FROM users WHERE tenant_id = ?1 AND email_norm = ?2",
                    params![tenant_id, b.email.to_lowercase()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(e) = taken {
                conflicts.push(Conflict {
                    row,
                    email: b.email.clone(),
                    reason: format!("a user with the email {e} exists again, so the deleted user cannot come back"),
                });
                continue;
            }
            let id_free = current.is_none();
            conn.execute(
                "INSERT INTO users (id, tenant_id, email, email_norm, first_name, last_name, job_title, team_id, role, language, pool_id, status, custom, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14)",
                params![if id_free { Some(user_id) } else { None }, tenant_id, b.email, b.email.to_lowercase(), b.first_name, b.last_name, b.job_title, b.team_id, b.role, b.language, b.pool_id, b.status, b.custom, now],
            )?;
            let id = conn.last_insert_rowid();
            let back = user_by_id(conn, id)?.map(|u| image_json(&u));
            record.execute(params![
                job_id,
                row,
                id,
                "create",
                Option::<String>::None,
                back
            ])?;
            reverted += 1;
            continue;
        }
        let Some(cur) = current else {
            conflicts.push(Conflict {
                row,
                email: email_of(&after),
                reason: "the user was deleted since".into(),
            });
            continue;
        };
        let now_image = image_json(&cur);
        if Some(&now_image) != after.as_ref() {
            conflicts.push(Conflict {
                row,
                email: cur.email.clone(),
                reason: "the user was changed since; undoing would overwrite that change".into(),
            });
            continue;
        }
        if action == "create" {
            conn.execute("DELETE FROM users WHERE id = ?1", [user_id])?;
            record.execute(params![
                job_id,
                row,
                user_id,
                "delete",
                now_image,
                Option::<String>::None
            ])?;
        } else {
            let Some(before) = before else { continue };
            let b = restored(&before)?;
            let back_norm = b.email.to_lowercase();
            if back_norm != cur.email.to_lowercase() {
                let taken: Option<String> = conn
                    .query_row(
                        "SELECT email FROM users WHERE tenant_id = ?1 AND email_norm = ?2 AND id <> ?3",
                        params![tenant_id, back_norm, user_id],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(e) = taken {
                    conflicts.push(Conflict {
                        row,
                        email: cur.email.clone(),
                        reason: format!("its old email {e} belongs to another user now"),
                    });
                    continue;
                }
            }
            restore.execute(params![
                user_id,
                b.email,
                b.email.to_lowercase(),
                b.first_name,
                b.last_name,
                b.job_title,
                b.team_id,
                b.role,
                b.language,
                b.pool_id,
                b.status,
                b.custom,
                now
            ])?;
            let inverse = match action.as_str() {
                "deactivate" => "reactivate",
                "reactivate" => "deactivate",
                other => other,
            };
            let back = user_by_id(conn, user_id)?.map(|u| image_json(&u));
            record.execute(params![job_id, row, user_id, inverse, now_image, back])?;
        }
        reverted += 1;
    }
    // Users coming back need their seats.
    for p in db::list_pools(conn, tenant_id)? {
        if p.used > p.seats {
            conflicts.push(Conflict {
                row: 0,
                email: String::new(),
                reason: format!(
                    "licence pool {} would have {} active users for {} seats; free {} seats first",
                    p.name,
                    p.used,
                    p.seats,
                    p.used - p.seats
                ),
            });
        }
    }
    if !conflicts.is_empty() {
        conflicts.sort_by_key(|c| c.row);
        return Ok(Err(conflicts));
    }
    conn.execute(
        "UPDATE jobs SET undone_by = ?2 WHERE id = ?1",
        params![of, job_id],
    )?;
    Ok(Ok(reverted))
}
