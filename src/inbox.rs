//! The drop folder: files placed in `inbox/<tenant>/<operation>/` of the data directory (an
//! HR system's nightly export, say) are picked up by the job worker, validated and — when the
//! tenant's `drop_folder_submit` setting allows — submitted as jobs. Beside each operation's
//! folder:
//!
//! - `processing/`: a file is claimed by moving it here (a rename: nobody else can take it);
//!   its claim and its job are recorded in one transaction, so no file is submitted twice,
//!   even across a crash;
//! - `processed/`: the file once its result is known;
//! - `results/`: `<file>.result.json` (valid or not, counts, problems, job) and the error
//!   workbook or the results workbook.
//!
//! A file whose name starts with `.` or ends with `.partial`/`.tmp`, or that changed in the
//! last `SETTLE_SECS` seconds, is still being written and is left alone: writers should write
//! under a temporary name and rename.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::{OptionalExtension, params};

use crate::db;
use crate::error::{AppError, AppResult};
use crate::model::Operation;
use crate::scheduler::{self, JobOptions};
use crate::service::{self, App};

/// A file must be unchanged this long before it is read.
pub const SETTLE_SECS: u64 = 2;
/// Who drop-folder submissions are recorded as.
pub const ACTOR: &str = "drop-folder";

/// What one scan did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Scan {
    /// Files taken from the folders.
    pub picked: u64,
    /// Files whose result was written (checked only, or their job finished).
    pub finished: u64,
    /// Files left for now (still being written).
    pub waiting: u64,
}

fn io(what: &str, p: &Path, e: std::io::Error) -> AppError {
    AppError::internal(
        format!("{what} {}", p.display()),
        crate::config::describe_io(&e),
    )
}

fn subdirs(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a file in a drop folder is still being written.
fn unsettled(p: &Path) -> bool {
    let name = name_of(p);
    if name.starts_with('.')
        || name.ends_with(".partial")
        || name.ends_with(".tmp")
        || name.ends_with('~')
    {
        return true;
    }
    match std::fs::metadata(p).and_then(|m| m.modified()) {
        Ok(t) => SystemTime::now()
            .duration_since(t)
            .map(|age| age < Duration::from_secs(SETTLE_SECS))
            .unwrap_or(true),
        Err(_) => true,
    }
}

/// One pass over every tenant's drop folders.
pub fn scan(app: &App) -> AppResult<Scan> {
    let mut scan = Scan::default();
    let root = app.data.inbox_dir();
    if !root.is_dir() {
        return Ok(scan);
    }
    for tenant_dir in subdirs(&root) {
        let Some(tenant) = db::find_tenant(&app.conn, &name_of(&tenant_dir))? else {
            continue;
        };
        for op_dir in subdirs(&tenant_dir) {
            let Ok(op) = name_of(&op_dir).parse::<Operation>() else {
                continue;
            };
            scan_folder(app, &tenant, op, &op_dir, &mut scan)?;
        }
    }
    Ok(scan)
}

fn scan_folder(
    app: &App,
    tenant: &db::Tenant,
    op: Operation,
    dir: &Path,
    scan: &mut Scan,
) -> AppResult<()> {
    let processing = dir.join("processing");
    let processed = dir.join("processed");
    let results = dir.join("results");
    for d in [&processing, &processed, &results] {
        std::fs::create_dir_all(d).map_err(|e| io("creating", d, e))?;
    }
    // Files claimed earlier: finish them, or take them up again after a crash.
    let mut claimed: Vec<PathBuf> = std::fs::read_dir(&processing)
        .map_err(|e| io("reading", &processing, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    claimed.sort();
    for path in claimed {
        let key = path.to_string_lossy().into_owned();
        let claim: Option<Option<i64>> = app
            .conn
            .query_row(
                "SELECT job_id FROM inbox_claims WHERE path = ?1 AND done_at IS NULL",
                [&key],
                |r| r.get(0),
            )
            .optional()?;
        match claim {
            Some(Some(job)) => {
                if scheduler::is_finished(&app.conn, job)? {
                    finish(app, tenant, op, &path, Some(job), &processed, &results)?;
                    scan.finished += 1;
                }
            }
            _ => {
                // Claimed before a crash and not submitted: take it up now.
                scan.picked += 1;
                take_up(app, tenant, op, &path, &processed, &results, scan)?;
            }
        }
    }
    // New files.
    let mut fresh: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io("reading", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    fresh.sort();
    for path in fresh {
        if unsettled(&path) {
            scan.waiting += 1;
            continue;
        }
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let claim = processing.join(format!("{stamp}-{}", name_of(&path)));
        // The rename is the claim: if it fails, the file is gone or someone else took it.
        if std::fs::rename(&path, &claim).is_err() {
            continue;
        }
        scan.picked += 1;
        take_up(app, tenant, op, &claim, &processed, &results, scan)?;
    }
    Ok(())
}

/// The file name as the administrator gave it (without the claim's time stamp).
fn original_name(claim: &Path) -> String {
    let n = name_of(claim);
    match n.split_once('-') {
        Some((stamp, rest)) if stamp.chars().all(|c| c.is_ascii_digit()) => rest.to_string(),
        _ => n,
    }
}

/// Submits a claimed file (or only checks it, per the tenant's setting).
fn take_up(
    app: &App,
    tenant: &db::Tenant,
    op: Operation,
    claim: &Path,
    processed: &Path,
    results: &Path,
    scan: &mut Scan,
) -> AppResult<()> {
    let name = original_name(claim);
    let key = claim.to_string_lossy().into_owned();
    let settings = db::tenant_settings(&app.conn, tenant.id)?;
    if !settings.drop_folder_submit {
        finish(app, tenant, op, claim, None, processed, results)?;
        scan.finished += 1;
        return Ok(());
    }
    let stored = service::store_upload(&app.data, claim, &name)?;
    let tx = app.conn.unchecked_transaction()?;
    let (_, job) = scheduler::submit_in(
        &tx,
        ACTOR,
        tenant,
        op,
        &stored,
        &name,
        &JobOptions::default(),
        None,
    )?;
    scheduler::notify_if_awaiting(app, &tx, job)?;
    tx.execute(
        "INSERT INTO inbox_claims (path, tenant_id, operation, job_id, claimed_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (path) DO UPDATE SET job_id = excluded.job_id",
        params![key, tenant.id, op.as_str(), job, db::now()],
    )?;
    tx.commit()?;
    service::flush_audit(app)?;
    scheduler::wake(&app.data);
    Ok(())
}

/// Writes a claimed file's result beside it and moves it to `processed/`. With no job, the
/// file is checked here (a dry run).
fn finish(
    app: &App,
    tenant: &db::Tenant,
    op: Operation,
    claim: &Path,
    job: Option<i64>,
    processed: &Path,
    results: &Path,
) -> AppResult<()> {
    let name = original_name(claim);
    let stem = name_of(claim);
    let result = match job {
        Some(job) => {
            let (state, error, upload_id): (String, Option<String>, i64) = app.conn.query_row(
                "SELECT state, error, upload_id FROM jobs WHERE id = ?1",
                [job],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let outcome = service::load_outcome(&app.conn, upload_id, op)?;
            let errors = app.data.error_report(upload_id);
            let done = app.data.results_report(job);
            for (from, to) in [(errors, "errors"), (done, "results")] {
                if from.exists() {
                    let dest = results.join(format!("{stem}.{to}.xlsx"));
                    std::fs::copy(&from, &dest).map_err(|e| io("writing", &dest, e))?;
                }
            }
            serde_json::json!({
                "file": name, "job": job, "state": state, "error": error,
                "applied": state == "succeeded", "rows": outcome.rows,
                "errors": outcome.errors, "warnings": outcome.warnings,
                "totals": outcome.totals, "licence_forecast": outcome.forecast,
                "problems": outcome.problems,
            })
        }
        None => {
            let outcome = service::validate(
                app,
                tenant,
                op,
                claim,
                &name,
                &mut |_, _, _| {},
                &mut |_| {},
            )?;
            if !outcome.is_valid() {
                let lists = service::template_lists(app, tenant)?;
                let dest = results.join(format!("{stem}.errors.xlsx"));
                crate::sheet::report::write_error_workbook(
                    &app.reader,
                    op,
                    &lists,
                    claim,
                    &name,
                    &outcome,
                    &dest,
                )?;
            }
            serde_json::json!({
                "file": name, "job": null, "state": "checked",
                "applied": false, "valid": outcome.is_valid(), "rows": outcome.rows,
                "errors": outcome.errors, "warnings": outcome.warnings,
                "message": if outcome.is_valid() { outcome.success_message() } else { outcome.errors_message() },
                "note": "checked only: the tenant's drop_folder_submit setting is off",
                "totals": outcome.totals, "licence_forecast": outcome.forecast,
                "problems": outcome.problems,
            })
        }
    };
    let dest = results.join(format!("{stem}.result.json"));
    let tmp = results.join(format!(".{stem}.result.json.partial"));
    let text = serde_json::to_vec_pretty(&result)
        .map_err(|e| AppError::internal("writing a result", e))?;
    std::fs::write(&tmp, text).map_err(|e| io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &dest).map_err(|e| io("writing", &dest, e))?;
    let moved = processed.join(&stem);
    std::fs::rename(claim, &moved).map_err(|e| io("moving", claim, e))?;
    app.conn.execute(
        "INSERT INTO inbox_claims (path, tenant_id, operation, job_id, claimed_at, done_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
         ON CONFLICT (path) DO UPDATE SET done_at = excluded.done_at",
        params![claim.to_string_lossy(), tenant.id, op.as_str(), job, db::now()],
    )?;
    Ok(())
}
