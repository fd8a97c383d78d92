//! The job queue and its one worker.
//!
//! Jobs persist in SQLite and run one at a time for the whole data directory, in id order.
//! Whoever holds `run/scheduler.lock` is the worker: `rollcall serve`, `rollcall jobs work`,
//! or an `import` that finds nobody else holding it. Submitting wakes the worker at once
//! through a datagram on `run/wake.sock`. A job's changes and its move to `succeeded` commit
//! in one transaction, so a job found `running` when the worker starts never committed
//! anything and is queued again: never half-applied, never applied twice. What follows a
//! commit (the audit append, the results workbook) is redone at start when a crash cut it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::audit::{self, Event};
use crate::bulk::{self, EffectSink, Mode, Outcome, Request};
use crate::config::DataDir;
use crate::db;
use crate::error::{AppError, AppResult};
use crate::model::Operation;
use crate::service::{self, App, PendingSync, StoredFile};
use crate::sheet::reader::Starting;
use crate::sheet::report;

/// Held by the one worker of a data directory; released when dropped.
pub struct WorkerLock {
    _file: File,
    socket: Option<UnixDatagram>,
}

impl WorkerLock {
    /// Takes the lock if nobody holds it.
    pub fn try_take(data: &DataDir) -> AppResult<Option<WorkerLock>> {
        let path = data.scheduler_lock();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| AppError::internal(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let sock = data.wake_socket();
        let _ = std::fs::remove_file(&sock);
        // A path too long for a socket leaves the worker polling once a second instead.
        let socket = UnixDatagram::bind(&sock).ok();
        Ok(Some(WorkerLock {
            _file: file,
            socket,
        }))
    }

    /// Waits for a wake-up or the timeout.
    fn wait(&self, timeout: Duration) {
        match &self.socket {
            Some(s) => {
                let _ = s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))));
                let mut buf = [0u8; 16];
                let _ = s.recv(&mut buf);
            }
            None => std::thread::sleep(timeout.min(Duration::from_secs(1))),
        }
    }
}

/// Tells the worker, whichever process it is, that a job is waiting.
pub fn wake(data: &DataDir) {
    if let Ok(s) = UnixDatagram::unbound() {
        let _ = s.send_to(b"w", data.wake_socket());
    }
}

/// Options of a submission.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct JobOptions {
    /// The warnings of the file were acknowledged by the submitter.
    #[serde(default)]
    pub acknowledge_warnings: bool,
    /// The typed confirmation of a large deactivation or deletion ("DELETE 152 USERS").
    #[serde(default)]
    pub confirm: Option<String>,
    /// The submitter's email address: told when the job starts and when it ends.
    #[serde(default)]
    pub notify: Option<String>,
    /// Send each user an add job creates a Getting Started message.
    #[serde(default)]
    pub getting_started: bool,
    /// The licence pool of rows whose Licence Pool cell is empty (add, reactivate).
    #[serde(default)]
    pub default_pool: Option<String>,
}

/// Queues a job for a stored upload; returns (upload id, job id).
pub fn submit(
    app: &App,
    tenant: &db::Tenant,
    op: Operation,
    stored: &StoredFile,
    file_name: &str,
    opts: &JobOptions,
    not_before: Option<&str>,
) -> AppResult<(i64, i64)> {
    let ids = submit_to_run(app, tenant, op, stored, file_name, opts, not_before)?;
    service::flush_audit(app)?;
    wake(&app.data);
    Ok(ids)
}

/// `submit` for the process that holds the worker lock and runs the queue next
/// (`service::import`): the submission's audit entries wait in the outbox, committed with
/// it, for the flush after the job, which appends them with the job's (one fsync'd append
/// before the first row instead of two), and no worker needs waking.
pub fn submit_to_run(
    app: &App,
    tenant: &db::Tenant,
    op: Operation,
    stored: &StoredFile,
    file_name: &str,
    opts: &JobOptions,
    not_before: Option<&str>,
) -> AppResult<(i64, i64)> {
    let tx = app.conn.unchecked_transaction()?;
    let ids = submit_in(
        &tx, &app.actor, tenant, op, stored, file_name, opts, not_before,
    )?;
    notify_if_awaiting(app, &tx, ids.1)?;
    tx.commit()?;
    Ok(ids)
}

/// `submit` inside the caller's transaction (the caller commits, flushes the audit log and
/// wakes the worker).
#[allow(clippy::too_many_arguments)]
pub fn submit_in(
    tx: &Connection,
    actor: &str,
    tenant: &db::Tenant,
    op: Operation,
    stored: &StoredFile,
    file_name: &str,
    opts: &JobOptions,
    not_before: Option<&str>,
) -> AppResult<(i64, i64)> {
    let upload_id = insert_upload(tx, actor, tenant, op, stored, file_name, "pending")?;
    let job_id = queue_job(tx, actor, tenant, op, upload_id, opts, not_before)?;
    Ok((upload_id, job_id))
}

/// Records an upload (its outcome is saved by whoever validates it).
pub fn insert_upload(
    tx: &Connection,
    actor: &str,
    tenant: &db::Tenant,
    op: Operation,
    stored: &StoredFile,
    file_name: &str,
    status: &str,
) -> AppResult<i64> {
    tx.execute(
        "INSERT INTO uploads (tenant_id, operation, file_name, file_sha256, file_size, stored_path, status, uploaded_by, uploaded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![tenant.id, op.as_str(), file_name, stored.sha256, stored.size as i64, stored.path.to_string_lossy(), status, actor, db::now()],
    )?;
    Ok(tx.last_insert_rowid())
}

/// Queues a job for an upload, audited as a submission.
fn queue_job(
    tx: &Connection,
    actor: &str,
    tenant: &db::Tenant,
    op: Operation,
    upload_id: i64,
    opts: &JobOptions,
    not_before: Option<&str>,
) -> AppResult<i64> {
    let now = db::now();
    let (file_name, sha): (String, String) = tx.query_row(
        "SELECT file_name, file_sha256 FROM uploads WHERE id = ?1",
        [upload_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let settings = db::tenant_settings(tx, tenant.id)?;
    let state =
        if settings.require_approval && matches!(op, Operation::Deactivate | Operation::Delete) {
            "awaiting_approval"
        } else if not_before.is_some_and(|t| t > now.as_str()) {
            "scheduled"
        } else {
            "queued"
        };
    let options = serde_json::to_string(opts).map_err(|e| AppError::internal("job options", e))?;
    tx.execute(
        "INSERT INTO jobs (tenant_id, upload_id, operation, state, submitted_by, submitted_at, not_before, options)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![tenant.id, upload_id, op.as_str(), state, actor, now, not_before, options],
    )?;
    let job_id = tx.last_insert_rowid();
    audit::record(
        tx,
        &Event {
            actor: actor.to_string(),
            tenant: Some(tenant.name.clone()),
            action: "job.submitted",
            target: format!("job {job_id}"),
            details: serde_json::json!({
                "job": job_id, "upload": upload_id, "operation": op.as_str(), "file": file_name,
                "sha256": sha, "not_before": not_before,
                "warnings_acknowledged": opts.acknowledge_warnings,
            }),
        },
    )?;
    Ok(job_id)
}

/// Submits an upload validated earlier (`rollcall upload`, the web UI): the job re-checks
/// every row against the roster as it is when it runs.
pub fn submit_upload(
    app: &App,
    upload_id: i64,
    opts: &JobOptions,
    not_before: Option<&str>,
) -> AppResult<i64> {
    // Checked and queued in one write transaction, so two submissions cannot both pass.
    let tx = rusqlite::Transaction::new_unchecked(&app.conn, TransactionBehavior::Immediate)?;
    let row: Option<(i64, String, String, String, i64)> = tx
        .query_row(
            "SELECT u.tenant_id, t.name, u.operation, u.status, u.warning_count FROM uploads u JOIN tenants t ON t.id = u.tenant_id WHERE u.id = ?1",
            [upload_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((tenant_id, tenant_name, op, status, warnings)) = row else {
        return Err(AppError::Usage(format!("there is no upload {upload_id}")));
    };
    if status != "validated" {
        return Err(AppError::Refused(format!(
            "upload {upload_id} is {status}: only a valid upload can be submitted; fix the file and upload it again"
        )));
    }
    if warnings > 0 && !opts.acknowledge_warnings {
        return Err(AppError::Refused(format!(
            "upload {upload_id} has {warnings} warnings; acknowledge them to submit (--yes)"
        )));
    }
    let taken: Option<(i64, String)> = tx
        .query_row(
            "SELECT id, state FROM jobs WHERE upload_id = ?1 AND state NOT IN ('failed', 'cancelled') ORDER BY id DESC LIMIT 1",
            [upload_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((job, state)) = taken {
        return Err(AppError::Usage(format!(
            "upload {upload_id} was already submitted as job {job} ({state})"
        )));
    }
    let op: Operation = op.parse().map_err(AppError::Usage)?;
    let tenant = db::Tenant {
        id: tenant_id,
        name: tenant_name,
    };
    // The pool chosen when the file was checked goes with it into the job.
    let mut opts = opts.clone();
    if opts.default_pool.is_none() {
        opts.default_pool = tx.query_row(
            "SELECT json_extract(result, '$.default_pool') FROM uploads WHERE id = ?1",
            [upload_id],
            |r| r.get(0),
        )?;
    }
    let opts = &opts;
    let job = queue_job(&tx, &app.actor, &tenant, op, upload_id, opts, not_before)?;
    notify_if_awaiting(app, &tx, job)?;
    tx.commit()?;
    service::flush_audit(app)?;
    wake(&app.data);
    Ok(job)
}

/// Approves a job waiting for a second administrator (not the one who submitted it).
pub fn approve(app: &App, job_id: i64) -> AppResult<()> {
    let row: Option<(String, String, Option<String>, String)> = app
        .conn
        .query_row(
            "SELECT j.state, j.submitted_by, j.not_before, t.name FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE j.id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((state, submitter, not_before, tenant)) = row else {
        return Err(AppError::Usage(format!("there is no job {job_id}")));
    };
    if state != "awaiting_approval" {
        return Err(AppError::Usage(format!(
            "job {job_id} is {state}; it does not wait for approval"
        )));
    }
    if submitter == app.actor {
        return Err(AppError::Usage(format!(
            "job {job_id} was submitted by {submitter}; a second administrator must approve it"
        )));
    }
    let now = db::now();
    let next = if not_before.as_deref().is_some_and(|t| t > now.as_str()) {
        "scheduled"
    } else {
        "queued"
    };
    let tx = app.conn.unchecked_transaction()?;
    let n = tx.execute(
        "UPDATE jobs SET state = ?2, approved_by = ?3 WHERE id = ?1 AND state = 'awaiting_approval'",
        params![job_id, next, app.actor],
    )?;
    if n == 0 {
        return Err(AppError::Usage(format!(
            "job {job_id} no longer waits for approval (it was cancelled or approved meanwhile)"
        )));
    }
    audit::record(
        &tx,
        &Event {
            actor: app.actor.clone(),
            tenant: Some(tenant),
            action: "job.approved",
            target: format!("job {job_id}"),
            details: serde_json::json!({ "job": job_id, "submitted_by": submitter }),
        },
    )?;
    if let Some((to, tenant, mut ctx)) = job_mail_context(&tx, job_id)? {
        ctx["approved_by"] = serde_json::Value::String(app.actor.clone());
        ctx["not_before"] = serde_json::json!(not_before);
        service::queue_mail(app, &tx, "approval_granted", &tenant, &to, ctx, None)?;
    }
    tx.commit()?;
    service::flush_audit(app)?;
    wake(&app.data);
    Ok(())
}

/// Cancels a job that has not started.
pub fn cancel(app: &App, job_id: i64) -> AppResult<()> {
    let tx = app.conn.unchecked_transaction()?;
    let n = tx.execute(
        "UPDATE jobs SET state = 'cancelled', cancelled_by = ?2, finished_at = ?3
         WHERE id = ?1 AND state IN ('queued', 'scheduled', 'awaiting_approval')",
        params![job_id, app.actor, db::now()],
    )?;
    if n == 0 {
        let state: Option<String> = tx
            .query_row("SELECT state FROM jobs WHERE id = ?1", [job_id], |r| {
                r.get(0)
            })
            .optional()?;
        return Err(AppError::Usage(match state {
            None => format!("there is no job {job_id}"),
            Some(s) => {
                format!("job {job_id} is {s}; only a job that has not started can be cancelled")
            }
        }));
    }
    let tenant: String = tx.query_row(
        "SELECT t.name FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE j.id = ?1",
        [job_id],
        |r| r.get(0),
    )?;
    audit::record(
        &tx,
        &Event {
            actor: app.actor.clone(),
            tenant: Some(tenant),
            action: "job.cancelled",
            target: format!("job {job_id}"),
            details: serde_json::json!({ "job": job_id }),
        },
    )?;
    tx.commit()?;
    service::flush_audit(app)?;
    Ok(())
}

/// Puts back in the queue every job a crash left `running` (its transaction never
/// committed), appends audit entries a crash left in the outbox, and writes missing results
/// workbooks. Only the lock holder may call this.
pub fn recover(app: &App) -> AppResult<u64> {
    let n = app.conn.execute(
        "UPDATE jobs SET state = 'queued', started_at = NULL WHERE state = 'running'",
        [],
    )?;
    service::flush_audit(app)?;
    let mut st = app.conn.prepare(
        "SELECT id, operation FROM jobs WHERE state = 'succeeded' ORDER BY id DESC LIMIT 20",
    )?;
    let done: Vec<(i64, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (id, op) in done {
        let path = app.data.results_report(id);
        if !path.exists() && op == "undo" {
            report::write_results_workbook(&app.conn, id, "Undo", &path)?;
        } else if !path.exists()
            && let Ok(op) = op.parse::<Operation>()
        {
            report::write_results_workbook(&app.conn, id, &format!("{} users", op.title()), &path)?;
        }
    }
    Ok(n as u64)
}

/// The next job to run: scheduled jobs whose time has come are queued first.
pub fn next_job(conn: &Connection) -> AppResult<Option<i64>> {
    conn.execute(
        "UPDATE jobs SET state = 'queued' WHERE state = 'scheduled' AND not_before <= ?1",
        [db::now()],
    )?;
    Ok(conn
        .query_row(
            "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

/// How long until the next scheduled job is due (capped).
fn next_due(conn: &Connection, cap: Duration) -> Duration {
    let next: Option<String> = conn
        .query_row(
            "SELECT min(not_before) FROM jobs WHERE state = 'scheduled'",
            [],
            |r| r.get(0),
        )
        .ok()
        .flatten();
    next.map_or(cap, |t| db::duration_until(&t, cap))
}

/// What running one job did.
#[derive(Debug)]
pub struct JobRun {
    pub job_id: i64,
    pub upload_id: i64,
    pub applied: bool,
    pub outcome: Outcome,
    pub needs_acknowledgement: bool,
    /// The phrase a large deactivation or deletion must be confirmed with.
    pub needs_confirmation: Option<String>,
    pub error_report: Option<std::path::PathBuf>,
    pub results_report: Option<std::path::PathBuf>,
}

/// Options of running a job that benchmarks turn off to time stages apart.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub results_workbook: bool,
    pub flush_audit: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            results_workbook: true,
            flush_audit: true,
        }
    }
}

/// Writes the job's progress where the CLI and the UI read it (at most twice a second).
struct ProgressFile<'a> {
    path: std::path::PathBuf,
    job_id: i64,
    total: i64,
    started: Instant,
    last: Option<Instant>,
    tmp: &'a Path,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct Progress {
    pub job: i64,
    pub rows_done: u64,
    /// 0 when not known before the file is read.
    pub rows_total: i64,
    pub elapsed_secs: f64,
    /// Seconds left at the current speed, when the total is known.
    pub eta_secs: Option<f64>,
}

impl ProgressFile<'_> {
    fn update(&mut self, rows: u64, force: bool) {
        let now = Instant::now();
        if !force
            && self
                .last
                .is_some_and(|l| now - l < Duration::from_millis(500))
        {
            return;
        }
        self.last = Some(now);
        let elapsed = (now - self.started).as_secs_f64();
        let rate = rows as f64 / elapsed.max(1e-3);
        let p = Progress {
            job: self.job_id,
            rows_done: rows,
            rows_total: self.total,
            elapsed_secs: elapsed,
            eta_secs: (self.total > 0 && rate > 0.0)
                .then(|| (self.total as f64 - rows as f64).max(0.0) / rate),
        };
        let tmp = self
            .tmp
            .join(format!("job-{}.progress.partial", self.job_id));
        if let Ok(text) = serde_json::to_vec(&p)
            && std::fs::write(&tmp, text).is_ok()
        {
            let _ = std::fs::rename(&tmp, &self.path);
        }
    }
}

/// Reads a running job's progress, if it is running.
pub fn progress(data: &DataDir, job_id: i64) -> Option<Progress> {
    let text = std::fs::read(data.progress_file(job_id)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// What `service::import` prepared for a job it runs at once, while it recorded the job.
/// `Ahead::default()` for a job run from the queue.
#[derive(Default)]
pub struct Ahead<'c> {
    /// A file worker already started on the job's stored file.
    pub worker: Option<Starting>,
    /// The stored file's fsyncs, still running: the job's outcome is committed after them.
    pub stored: Option<PendingSync>,
    /// The job was recorded without waiting for the disk: its 'running' commit is made so
    /// too, then the connection waits for the disk again; the pass's commit syncs them all.
    pub unsynced: Option<db::Unsynced<'c>>,
}

impl Ahead<'_> {
    /// Undoes what was prepared, for a job that does not run now: the worker stops, the
    /// connection waits for the disk again, and the job's records and its stored file are
    /// on disk on return.
    pub fn settle(self) -> AppResult<()> {
        drop(self.worker);
        // The file first: a job that names it is durable only after it.
        let stored = self.stored.map_or(Ok(()), PendingSync::wait);
        match self.unsynced {
            Some(u) if stored.is_ok() => u.sync(),
            // Set back to synced commits in any case (on drop).
            _ => stored,
        }
    }
}

/// Runs one queued job: validates and applies its file in one transaction.
///
/// `ahead` holds what `import` prepared for it (see `Ahead`). `None` when the job was not
/// queued (any more), or failed before its pass, recorded so with its reason (its stored
/// copy no longer matching its hash: `service::check_stored`).
pub fn run_job(
    app: &App,
    job_id: i64,
    run: RunOptions,
    mut ahead: Ahead<'_>,
    on_effect: &mut EffectSink<'_>,
    on_rows: &mut dyn FnMut(u64),
) -> AppResult<Option<JobRun>> {
    let started_at = db::now();
    let tx = app.conn.unchecked_transaction()?;
    let n = tx.execute(
        "UPDATE jobs SET state = 'running', started_at = ?2 WHERE id = ?1 AND state = 'queued'",
        params![job_id, started_at],
    )?;
    if n == 0 {
        drop(tx);
        ahead.settle()?;
        return Ok(None);
    }
    notify_started(app, &tx, job_id, &started_at)?;
    tx.commit()?;
    // Whatever goes wrong from here, the job must not stay 'running' (it would be retried
    // for ever and hold up the queue): it fails with the reason, its transaction undone.
    let restored = ahead.unsynced.take().map_or(Ok(()), db::Unsynced::restore);
    match restored.and_then(|()| run_started(app, job_id, run, ahead, on_effect, on_rows)) {
        Ok(r) => Ok(r),
        Err(e) => {
            let _ = std::fs::remove_file(app.data.progress_file(job_id));
            let still_running: bool = app
                .conn
                .query_row(
                    "SELECT state = 'running' FROM jobs WHERE id = ?1",
                    [job_id],
                    |r| r.get(0),
                )
                .unwrap_or(false);
            if still_running {
                fail_job(
                    app,
                    job_id,
                    &format!("the job stopped on an internal error: {e}"),
                )?;
            }
            Err(e)
        }
    }
}

/// The body of `run_job` once the job is marked running.
fn run_started(
    app: &App,
    job_id: i64,
    run: RunOptions,
    ahead: Ahead<'_>,
    on_effect: &mut EffectSink<'_>,
    on_rows: &mut dyn FnMut(u64),
) -> AppResult<Option<JobRun>> {
    let (operation, undo_of): (String, Option<i64>) = app.conn.query_row(
        "SELECT operation, undo_of FROM jobs WHERE id = ?1",
        [job_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if operation == "undo" {
        return run_undo(app, job_id, undo_of.unwrap_or_default(), run).map(Some);
    }
    type JobRow = (
        i64,
        i64,
        String,
        String,
        String,
        String,
        String,
        String,
        i64,
        String,
        i64,
    );
    let (tenant_id, upload_id, op, options, tenant_name, file_name, stored_path, sha, size, submitted_by, rows_known): JobRow =
        app.conn.query_row(
            "SELECT j.tenant_id, j.upload_id, j.operation, j.options, t.name, u.file_name, u.stored_path, u.file_sha256, u.file_size, j.submitted_by, u.rows_total
             FROM jobs j JOIN tenants t ON t.id = j.tenant_id JOIN uploads u ON u.id = j.upload_id WHERE j.id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?)),
        )?;
    let op: Operation = op.parse().map_err(AppError::Usage)?;
    let opts: JobOptions = serde_json::from_str(&options).unwrap_or_default();
    let tenant = db::Tenant {
        id: tenant_id,
        name: tenant_name,
    };
    let stored = StoredFile {
        sha256: sha,
        size: size as u64,
        path: stored_path.into(),
    };
    let tmp = app.data.run_dir();
    let mut pf = ProgressFile {
        path: app.data.progress_file(job_id),
        job_id,
        total: rows_known,
        started: Instant::now(),
        last: None,
        tmp: &tmp,
    };
    pf.update(0, true);
    // A file stored by an earlier process is checked against its hash first: a power cut
    // can leave the records of a job durable and its file not (see `db::Unsynced`).
    if ahead.stored.is_none()
        && let Err(reason) = service::check_stored(&stored)
    {
        let _ = std::fs::remove_file(&pf.path);
        fail_job(app, job_id, &reason)?;
        return Ok(None);
    }
    let users_before: i64 = app.conn.query_row(
        "SELECT count(*) FROM users WHERE tenant_id = ?1",
        [tenant.id],
        |r| r.get(0),
    )?;
    // The rules as they are now (an edited script is picked up; a change is audited).
    let rules = service::active_rules(app, &tenant)?;
    let db_path = app.data.database();
    let tx = rusqlite::Transaction::new_unchecked(&app.conn, TransactionBehavior::Immediate)?;
    // Without a count from an earlier validation, the reader's estimate gives the ETA.
    let estimate = std::cell::Cell::new(0u64);
    let outcome = bulk::process(
        &tx,
        &app.reader,
        &Request {
            tenant: &tenant,
            op,
            path: &stored.path,
            file_name: &file_name,
            file_sha256: Some(&stored.sha256),
            mode: Mode::Apply { job_id },
            estimate: Some(&estimate),
            rules: service::rules_input(app, rules.as_ref(), &db_path),
            default_pool: opts.default_pool.as_deref(),
        },
        ahead.worker,
        on_effect,
        &mut |rows| {
            on_rows(rows);
            if pf.total <= 0 && estimate.get() > 0 {
                pf.total = estimate.get() as i64;
            }
            pf.update(rows, false);
        },
    );
    // Nothing of the job is committed before its file is on disk.
    let synced = ahead.stored.map_or(Ok(()), PendingSync::wait);
    let outcome = match (outcome, synced) {
        (Ok(o), Ok(())) => o,
        (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
        (Err(e), Err(s)) => return Err(AppError::internal("running the job", format!("{e}; {s}"))),
    };
    let actor = submitted_by;
    let ev = |action: &'static str, target: String, details: serde_json::Value| Event {
        actor: actor.clone(),
        tenant: Some(tenant.name.clone()),
        action,
        target,
        details,
    };
    let needs_ack = outcome.is_valid() && outcome.warnings > 0 && !opts.acknowledge_warnings;
    // A large deactivation or deletion needs the typed confirmation.
    let confirmation = if outcome.is_valid() && !needs_ack {
        large_change_phrase(&tx, &tenant, op, &outcome, users_before)?.filter(|(phrase, _)| {
            opts.confirm
                .as_deref()
                .is_none_or(|c| !c.trim().eq_ignore_ascii_case(phrase))
        })
    } else {
        None
    };
    let result = serde_json::json!({
        "totals": outcome.totals, "forecast": outcome.forecast,
        "normalisations": outcome.normalisations, "notes": outcome.notes,
    })
    .to_string();
    let details =
        service::upload_details(upload_id, op, &stored, &outcome, opts.acknowledge_warnings);
    if outcome.is_valid() && !needs_ack && confirmation.is_none() {
        service::save_upload_result(&tx, upload_id, "validated", &outcome, &result)?;
        tx.execute(
            "UPDATE jobs SET state = 'succeeded', finished_at = ?2, rows_total = ?3, rows_done = ?3, result = ?4 WHERE id = ?1",
            params![job_id, db::now(), outcome.rows as i64, result],
        )?;
        audit::record(&tx, &ev("upload.validated", file_name.clone(), details))?;
        audit::record_job(&tx, &actor, &tenant.name, job_id)?;
        audit::record(
            &tx,
            &ev(
                "job.succeeded",
                format!("job {job_id}"),
                serde_json::json!({"job": job_id, "totals": outcome.totals, "licence_forecast": outcome.forecast}),
            ),
        )?;
        if opts.getting_started && op == Operation::Add {
            crate::mail::queue_welcomes(
                &tx,
                &app.data,
                &service::mail_config(app)?,
                &actor,
                &tenant,
                crate::mail::Welcome::AddedBy(job_id),
            )?;
        }
        notify_finished(
            app,
            &tx,
            job_id,
            Some(&outcome),
            None,
            Some((
                app.data.results_report(job_id),
                format!("job-{job_id}-results.xlsx"),
            )),
        )?;
        tx.commit()?;
        pf.update(outcome.rows, true);
        if run.flush_audit {
            service::flush_audit(app)?;
        }
        let results_report = if run.results_workbook {
            let path = app.data.results_report(job_id);
            report::write_results_workbook(
                &app.conn,
                job_id,
                &format!("{} users", op.title()),
                &path,
            )?;
            Some(path)
        } else {
            None
        };
        let _ = std::fs::remove_file(&pf.path);
        return Ok(Some(JobRun {
            job_id,
            upload_id,
            applied: true,
            outcome,
            needs_acknowledgement: false,
            needs_confirmation: None,
            error_report: None,
            results_report,
        }));
    }
    // Nothing of the file may stay: roll back every change, then record why.
    tx.rollback()?;
    let reason = if let Some((phrase, why)) = &confirmation {
        format!(
            "{why} needs a typed confirmation; nothing was changed. Submit it again confirming with: {phrase}"
        )
    } else if needs_ack {
        format!(
            "{} warnings need acknowledgement; nothing was changed",
            outcome.warnings
        )
    } else if outcome.refused {
        "the file was refused; nothing was changed".to_string()
    } else {
        format!(
            "the file has {} errors; nothing was changed",
            outcome.errors
        )
    };
    let tx = app.conn.unchecked_transaction()?;
    let status = if outcome.is_valid() {
        "validated"
    } else {
        "rejected"
    };
    service::save_upload_result(&tx, upload_id, status, &outcome, &result)?;
    tx.execute(
        "UPDATE jobs SET state = 'failed', finished_at = ?2, rows_total = ?3, error = ?4, result = ?5 WHERE id = ?1",
        params![job_id, db::now(), outcome.rows as i64, reason, result],
    )?;
    audit::record(
        &tx,
        &ev(
            if outcome.is_valid() {
                "upload.validated"
            } else {
                "upload.rejected"
            },
            file_name.clone(),
            details,
        ),
    )?;
    audit::record(
        &tx,
        &ev(
            "job.failed",
            format!("job {job_id}"),
            serde_json::json!({"job": job_id, "reason": reason}),
        ),
    )?;
    notify_finished(
        app,
        &tx,
        job_id,
        Some(&outcome),
        Some(&reason),
        (!outcome.is_valid()).then(|| {
            (
                app.data.error_report(upload_id),
                format!("{}-errors.xlsx", file_stem(&file_name)),
            )
        }),
    )?;
    tx.commit()?;
    let _ = std::fs::remove_file(&pf.path);
    if run.flush_audit {
        service::flush_audit(app)?;
    }
    let error_report = if outcome.is_valid() {
        None
    } else {
        let path = app.data.error_report(upload_id);
        let lists = service::template_lists(app, &tenant)?;
        report::write_error_workbook(
            &app.reader,
            op,
            &lists,
            &stored.path,
            &file_name,
            &outcome,
            &path,
        )?;
        Some(path)
    };
    Ok(Some(JobRun {
        job_id,
        upload_id,
        applied: false,
        outcome,
        needs_acknowledgement: needs_ack,
        needs_confirmation: confirmation.map(|c| c.0),
        error_report,
        results_report: None,
    }))
}

/// For a deactivation or deletion above the tenant's threshold: the phrase to type and why.
pub fn large_change_phrase(
    conn: &Connection,
    tenant: &db::Tenant,
    op: Operation,
    outcome: &Outcome,
    users_before: i64,
) -> AppResult<Option<(String, String)>> {
    let n = match op {
        Operation::Deactivate => outcome.totals.deactivate,
        Operation::Delete => outcome.totals.delete,
        _ => return Ok(None),
    };
    let s = db::tenant_settings(conn, tenant.id)?;
    let share = n as f64 * 100.0 / users_before.max(1) as f64;
    let over_share = share > f64::from(s.large_change_percent);
    let over_count = s.large_change_count.is_some_and(|c| n > c);
    if n == 0 || !(over_share || over_count) {
        return Ok(None);
    }
    let verb = if op == Operation::Delete {
        "Deleting"
    } else {
        "Deactivating"
    };
    Ok(Some((
        format!("{} {n} USERS", op.title().to_uppercase()),
        format!("{verb} {n} of {users_before} users ({share:.0}%)"),
    )))
}

/// Runs an undo job: one transaction reverting the job's changes, or nothing when any
/// user conflicts.
fn run_undo(app: &App, job_id: i64, of: i64, run: RunOptions) -> AppResult<JobRun> {
    let (tenant_id, tenant_name, actor): (i64, String, String) = app.conn.query_row(
        "SELECT j.tenant_id, t.name, j.submitted_by FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE j.id = ?1",
        [job_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let tenant = db::Tenant {
        id: tenant_id,
        name: tenant_name,
    };
    let ev = |action: &'static str, details: serde_json::Value| Event {
        actor: actor.clone(),
        tenant: Some(tenant.name.clone()),
        action,
        target: format!("job {job_id}"),
        details,
    };
    let tx = rusqlite::Transaction::new_unchecked(&app.conn, TransactionBehavior::Immediate)?;
    let mut outcome = Outcome::empty(Operation::Add);
    match crate::undo::apply(&tx, tenant_id, job_id, of)? {
        Ok(reverted) => {
            let result = serde_json::json!({ "undo_of": of, "reverted": reverted }).to_string();
            tx.execute(
                "UPDATE jobs SET state = 'succeeded', finished_at = ?2, rows_total = ?3, rows_done = ?3, result = ?4 WHERE id = ?1",
                params![job_id, db::now(), reverted as i64, result],
            )?;
            audit::record_job(&tx, &actor, &tenant.name, job_id)?;
            audit::record(
                &tx,
                &ev(
                    "job.succeeded",
                    serde_json::json!({ "job": job_id, "undo_of": of, "reverted": reverted }),
                ),
            )?;
            tx.commit()?;
            if run.flush_audit {
                service::flush_audit(app)?;
            }
            let path = app.data.results_report(job_id);
            report::write_results_workbook(&app.conn, job_id, &format!("Undo of job {of}"), &path)?;
            outcome.rows = reverted;
            Ok(JobRun {
                job_id,
                upload_id: 0,
                applied: true,
                outcome,
                needs_acknowledgement: false,
                needs_confirmation: None,
                error_report: None,
                results_report: Some(path),
            })
        }
        Err(conflicts) => {
            tx.rollback()?;
            let first: Vec<String> = conflicts
                .iter()
                .take(5)
                .map(|c| {
                    if c.row > 0 {
                        format!("row {} ({}): {}", c.row, c.email, c.reason)
                    } else {
                        c.reason.clone()
                    }
                })
                .collect();
            let reason = format!(
                "{} conflicts, nothing was changed: {}{}",
                conflicts.len(),
                first.join("; "),
                if conflicts.len() > 5 { "; ..." } else { "" }
            );
            // The job keeps every conflict; its audit entry the first hundred.
            let result = serde_json::json!({ "undo_of": of, "conflicts": conflicts }).to_string();
            let shown: Vec<_> = conflicts.iter().take(100).collect();
            let tx = app.conn.unchecked_transaction()?;
            tx.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?2, error = ?3, result = ?4 WHERE id = ?1",
                params![job_id, db::now(), reason, result],
            )?;
            audit::record(
                &tx,
                &ev(
                    "job.failed",
                    serde_json::json!({ "job": job_id, "undo_of": of, "conflicts": conflicts.len(), "first_conflicts": shown }),
                ),
            )?;
            tx.commit()?;
            if run.flush_audit {
                service::flush_audit(app)?;
            }
            Ok(JobRun {
                job_id,
                upload_id: 0,
                applied: false,
                outcome,
                needs_acknowledgement: false,
                needs_confirmation: None,
                error_report: None,
                results_report: None,
            })
        }
    }
}

/// Runs `job_id` here when no other process is the worker (jobs ahead of it first), else
/// waits for the worker to finish it. Returns the job's final state and error.
pub fn run_or_wait(app: &App, job_id: i64) -> AppResult<(String, Option<String>)> {
    loop {
        if let Some(_lock) = WorkerLock::try_take(&app.data)? {
            recover(app)?;
            while !is_finished(&app.conn, job_id)? {
                let Some(next) = next_job(&app.conn)? else {
                    break;
                };
                run_job(
                    app,
                    next,
                    RunOptions::default(),
                    Ahead::default(),
                    &mut |_, _, _| {},
                    &mut |_| {},
                )?;
            }
            break;
        }
        if is_finished(&app.conn, job_id)? {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(app.conn.query_row(
        "SELECT state, error FROM jobs WHERE id = ?1",
        [job_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// A file name without its extension, for the names of attached workbooks.
pub fn file_stem(name: &str) -> String {
    let stem = std::path::Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload".into());
    crate::mail::header_text(&stem)
}

/// The context every job message shares, and the address to tell (if the submitter gave one).
fn job_mail_context(
    conn: &Connection,
    job_id: i64,
) -> AppResult<Option<(String, String, serde_json::Value)>> {
    type Row = (String, String, String, Option<String>, Option<i64>);
    let row: Option<Row> = conn
        .query_row(
            "SELECT j.options, t.name, j.operation, u.file_name, u.rows_total
             FROM jobs j JOIN tenants t ON t.id = j.tenant_id LEFT JOIN uploads u ON u.id = j.upload_id
             WHERE j.id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((options, tenant, op, file_name, rows)) = row else {
        return Ok(None);
    };
    let opts: JobOptions = serde_json::from_str(&options).unwrap_or_default();
    let Some(to) = opts.notify.filter(|t| !t.trim().is_empty()) else {
        return Ok(None);
    };
    let operation = op
        .parse::<Operation>()
        .map(|o| format!("{} users", o.title().to_lowercase()))
        .unwrap_or(op);
    let ctx = serde_json::json!({
        "tenant": tenant,
        "job_id": job_id,
        "operation": operation,
        "file_name": file_name.unwrap_or_default(),
        "rows": rows.filter(|r| *r > 0),
    });
    Ok(Some((to, tenant, ctx)))
}

/// Tells the tenant's approvers that a job waits for them (when it does).
pub fn notify_if_awaiting(app: &App, conn: &Connection, job_id: i64) -> AppResult<()> {
    type Row = (
        String,
        i64,
        String,
        String,
        String,
        Option<String>,
        Option<i64>,
    );
    let row: Option<Row> = conn
        .query_row(
            "SELECT j.state, t.id, t.name, j.operation, j.submitted_by, u.file_name, u.rows_total
             FROM jobs j JOIN tenants t ON t.id = j.tenant_id LEFT JOIN uploads u ON u.id = j.upload_id
             WHERE j.id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?;
    let Some((state, tenant_id, tenant, op, submitted_by, file_name, rows)) = row else {
        return Ok(());
    };
    if state != "awaiting_approval" {
        return Ok(());
    }
    let settings = db::tenant_settings(conn, tenant_id)?;
    let operation = op
        .parse::<Operation>()
        .map(|o| format!("{} users", o.title().to_lowercase()))
        .unwrap_or(op);
    let ctx = serde_json::json!({
        "tenant": tenant,
        "job_id": job_id,
        "operation": operation,
        "file_name": file_name.unwrap_or_default(),
        "rows": rows.filter(|r| *r > 0),
        "submitted_by": submitted_by,
    });
    for to in &settings.approvers {
        service::queue_mail(
            app,
            conn,
            "approval_requested",
            &tenant,
            to,
            ctx.clone(),
            None,
        )?;
    }
    Ok(())
}

fn notify_started(app: &App, conn: &Connection, job_id: i64, started: &str) -> AppResult<()> {
    let Some((to, tenant, mut ctx)) = job_mail_context(conn, job_id)? else {
        return Ok(());
    };
    ctx["started_at"] = serde_json::Value::String(started.to_string());
    service::queue_mail(app, conn, "job_started", &tenant, &to, ctx, None)?;
    Ok(())
}

/// Queues the "finished" message of a job: its counts and results workbook, or why it
/// failed, with the problems and the error workbook.
fn notify_finished(
    app: &App,
    conn: &Connection,
    job_id: i64,
    outcome: Option<&Outcome>,
    failure: Option<&str>,
    attachment: Option<(std::path::PathBuf, String)>,
) -> AppResult<()> {
    let Some((to, tenant, mut ctx)) = job_mail_context(conn, job_id)? else {
        return Ok(());
    };
    ctx["succeeded"] = serde_json::Value::Bool(failure.is_none());
    if let Some(o) = outcome {
        let (problems, more) = crate::mail::problem_lines(o, 10);
        ctx["counts"] = serde_json::json!(crate::mail::count_lines(&o.totals));
        ctx["summary"] = serde_json::Value::String(crate::mail::count_lines(&o.totals).join(", "));
        if failure.is_some() {
            ctx["problems"] = serde_json::json!(problems);
            ctx["more_problems"] = serde_json::json!(more);
        }
    }
    if let Some(f) = failure {
        ctx["reason"] = serde_json::Value::String(f.to_string());
    }
    service::queue_mail(app, conn, "job_finished", &tenant, &to, ctx, attachment)?;
    Ok(())
}

fn fail_job(app: &App, job_id: i64, reason: &str) -> AppResult<()> {
    let tenant = db::Tenant {
        id: 0,
        name: app.conn.query_row(
            "SELECT t.name FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE j.id = ?1",
            [job_id],
            |r| r.get(0),
        )?,
    };
    let tx = app.conn.unchecked_transaction()?;
    tx.execute(
        "UPDATE jobs SET state = 'failed', finished_at = ?2, error = ?3 WHERE id = ?1",
        params![job_id, db::now(), reason],
    )?;
    notify_finished(app, &tx, job_id, None, Some(reason), None)?;
    audit::record(
        &tx,
        &Event {
            actor: app.actor.clone(),
            tenant: Some(tenant.name.clone()),
            action: "job.failed",
            target: format!("job {job_id}"),
            details: serde_json::json!({ "job": job_id, "reason": reason }),
        },
    )?;
    tx.commit()?;
    service::flush_audit(app).map(|_| ())
}

/// Runs queued jobs in order while holding the lock, until `done` says so or the queue is
/// empty (with `until_idle`), or `stop` is set. Returns the run of `watch`, if it ran here.
pub fn work(
    app: &App,
    lock: &WorkerLock,
    stop: &AtomicBool,
    until_idle: bool,
    watch: Option<i64>,
    on_effect: &mut EffectSink<'_>,
    on_rows: &mut dyn FnMut(u64),
) -> AppResult<Option<JobRun>> {
    recover(app)?;
    let mut watched = None;
    while !stop.load(Ordering::SeqCst) {
        if let Some(w) = watch
            && is_finished(&app.conn, w)?
        {
            break;
        }
        match next_job(&app.conn)? {
            Some(id) => {
                send_mail(app);
                let run = if Some(id) == watch {
                    run_job(
                        app,
                        id,
                        RunOptions::default(),
                        Ahead::default(),
                        on_effect,
                        on_rows,
                    )?
                } else {
                    run_job(
                        app,
                        id,
                        RunOptions::default(),
                        Ahead::default(),
                        &mut |_, _, _| {},
                        &mut |_| {},
                    )?
                };
                if Some(id) == watch {
                    watched = run;
                }
            }
            None if until_idle || watch.is_some() => {
                // Finish drop-folder files whose jobs ran, and take new ones.
                if until_idle && crate::inbox::scan(app)?.picked > 0 {
                    continue;
                }
                send_mail(app);
                break;
            }
            None => {
                crate::tasks::run_due(app)?;
                send_mail(app);
                // Drop folders are looked at every few seconds while idle.
                if crate::inbox::scan(app)?.picked == 0 {
                    let settle = Duration::from_secs(crate::inbox::SETTLE_SECS);
                    lock.wait(
                        next_due(&app.conn, settle).min(crate::mail::next_due(&app.conn, settle)),
                    );
                }
            }
        }
    }
    Ok(watched)
}

/// Sends the mail that is due (the worker's duty); a failure is logged, not fatal: the
/// messages stay queued and the jobs go on.
pub fn send_mail(app: &App) {
    let cfg = match service::mail_config(app) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rollcall: reading the mail settings: {e}");
            return;
        }
    };
    match crate::mail::send_due(&app.conn, &app.data, &cfg) {
        Ok(s) if s.sent + s.failed > 0 => {
            let _ = service::flush_audit(app);
        }
        Ok(_) => {}
        Err(e) => eprintln!("rollcall: sending mail: {e}"),
    }
}

/// Whether a job reached an end state.
pub fn is_finished(conn: &Connection, job_id: i64) -> AppResult<bool> {
    let state: Option<String> = conn
        .query_row("SELECT state FROM jobs WHERE id = ?1", [job_id], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(matches!(
        state.as_deref(),
        Some("succeeded") | Some("failed") | Some("cancelled") | None
    ))
}

/// The worker thread of `rollcall serve`: waits for the lock, then works until `stop`.
pub fn serve(app: App, stop: std::sync::Arc<AtomicBool>) {
    let lock = loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match WorkerLock::try_take(&app.data) {
            Ok(Some(l)) => break l,
            Ok(None) => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => {
                eprintln!("rollcall: the job worker cannot start: {e}");
                return;
            }
        }
    };
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = work(
            &app,
            &lock,
            &stop,
            false,
            None,
            &mut |_, _, _| {},
            &mut |_| {},
        ) {
            eprintln!("rollcall: job worker: {e}");
            lock.wait(Duration::from_secs(5));
        }
    }
}

/// Stops a waiting `serve` worker promptly.
pub fn nudge(data: &DataDir) {
    wake(data);
}

/// A job as listed.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    pub id: i64,
    pub tenant: String,
    pub operation: String,
    pub state: String,
    pub file_name: String,
    pub submitted_by: String,
    pub submitted_at: String,
    pub not_before: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub rows_total: i64,
    pub error: Option<String>,
    /// Place in the queue (1 = next) for a waiting job.
    pub position: Option<i64>,
    /// Estimated start, seconds from now, for a waiting job (from recent jobs' speed).
    pub estimated_start_secs: Option<f64>,
}

/// Jobs, newest first (optionally of one tenant).
pub fn list(conn: &Connection, tenant_id: Option<i64>, limit: i64) -> AppResult<Vec<JobInfo>> {
    select_jobs(conn, tenant_id, None, limit)
}

/// One job, if it exists (and belongs to the tenant, when one is given).
pub fn get(conn: &Connection, tenant_id: Option<i64>, job_id: i64) -> AppResult<Option<JobInfo>> {
    Ok(select_jobs(conn, tenant_id, Some(job_id), 1)?.pop())
}

fn select_jobs(
    conn: &Connection,
    tenant_id: Option<i64>,
    job_id: Option<i64>,
    limit: i64,
) -> AppResult<Vec<JobInfo>> {
    let mut st = conn.prepare_cached(
        "SELECT j.id, t.name, j.operation, j.state, coalesce(u.file_name, 'undo of job ' || j.undo_of), j.submitted_by, j.submitted_at, j.not_before, j.started_at, j.finished_at, j.rows_total, j.error
         FROM jobs j JOIN tenants t ON t.id = j.tenant_id LEFT JOIN uploads u ON u.id = j.upload_id
         WHERE (?1 IS NULL OR j.tenant_id = ?1) AND (?3 IS NULL OR j.id = ?3) ORDER BY j.id DESC LIMIT ?2",
    )?;
    let mut jobs: Vec<JobInfo> = st
        .query_map(params![tenant_id, limit, job_id], |r| {
            Ok(JobInfo {
                id: r.get(0)?,
                tenant: r.get(1)?,
                operation: r.get(2)?,
                state: r.get(3)?,
                file_name: r.get(4)?,
                submitted_by: r.get(5)?,
                submitted_at: r.get(6)?,
                not_before: r.get(7)?,
                started_at: r.get(8)?,
                finished_at: r.get(9)?,
                rows_total: r.get(10)?,
                error: r.get(11)?,
                position: None,
                estimated_start_secs: None,
            })
        })?
        .collect::<Result<_, _>>()?;
    let rate = recent_rate(conn)?;
    for j in &mut jobs {
        if j.state == "queued" {
            let (ahead, ahead_bytes): (i64, i64) = conn.query_row(
                "SELECT count(*), coalesce(sum(u.file_size), 0) FROM jobs j LEFT JOIN uploads u ON u.id = j.upload_id
                 WHERE j.id < ?1 AND j.state IN ('queued', 'running')",
                [j.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            j.position = Some(ahead + 1);
            j.estimated_start_secs = rate.map(|bytes_per_sec| ahead_bytes as f64 / bytes_per_sec);
        }
    }
    Ok(jobs)
}

/// Bytes of upload processed per second by the last finished jobs (None before any).
fn recent_rate(conn: &Connection) -> AppResult<Option<f64>> {
    let mut st = conn.prepare(
        "SELECT u.file_size, j.started_at, j.finished_at FROM jobs j JOIN uploads u ON u.id = j.upload_id
         WHERE j.state = 'succeeded' AND j.started_at IS NOT NULL ORDER BY j.id DESC LIMIT 5",
    )?;
    let fmt = time::format_description::well_known::Rfc3339;
    let mut bytes = 0f64;
    let mut secs = 0f64;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (size, s, f) = row?;
        if let (Ok(s), Ok(f)) = (
            time::OffsetDateTime::parse(&s, &fmt),
            time::OffsetDateTime::parse(&f, &fmt),
        ) {
            bytes += size as f64;
            secs += (f - s).as_seconds_f64().max(0.001);
        }
    }
    Ok((secs > 0.0).then(|| bytes / secs))
}
