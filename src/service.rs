//! The bulk flow's steps as the CLI (and later the web UI, scheduler and drop folder) use
//! them: the `App` wiring, storing an upload, validating, and importing (validate and apply
//! in one pass inside one transaction, then the results workbook).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};
use sha2::{Digest, Sha256};

use crate::audit::{self, Event};
use crate::bulk::{self, EffectSink, Mode, Outcome, Request};
use crate::config::{Config, DataDir, Loaded};
use crate::db::{self, Tenant};
use crate::error::{AppError, AppResult, StartupError};
use crate::model::{Operation, Severity};
use crate::scheduler;
use crate::sheet::reader::{Pace, ReaderSetup, SheetReader, Starting};
use crate::sheet::template::TemplateLists;

/// Everything a command needs, wired once.
pub struct App {
    pub config: Config,
    pub data: DataDir,
    pub conn: Connection,
    pub reader: ReaderSetup,
    /// Who is acting, for upload and job records (the OS user at the console).
    pub actor: String,
}

impl App {
    /// The same application on a connection of its own (for another thread).
    pub fn reopen(&self) -> Result<App, StartupError> {
        Ok(App {
            config: self.config.clone(),
            data: self.data.clone(),
            conn: db::open(&self.data.database(), &self.config.database)?,
            reader: self.reader.clone(),
            actor: self.actor.clone(),
        })
    }
}

impl App {
    /// Opens the data directory and the database. `worker_exe` is the binary that parses
    /// uploads (normally the running one).
    pub fn open(loaded: &Loaded, worker_exe: PathBuf) -> Result<App, StartupError> {
        let config = loaded.config.clone();
        let root = config.data_dir.clone().ok_or(StartupError::NoDataDir)?;
        let data = DataDir::open(&root)?;
        let conn = db::open(&data.database(), &config.database)?;
        let actor = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .map(|u| format!("console:{u}"))
            .unwrap_or_else(|_| "console".to_string());
        Ok(App {
            reader: ReaderSetup {
                worker_exe,
                limits: config.limits.clone(),
            },
            config,
            data,
            conn,
            actor,
        })
    }
}

/// The tenant's teams and pools for drop-downs, and the custom columns of its rules.
pub fn template_lists(app: &App, tenant: &Tenant) -> AppResult<TemplateLists> {
    let conn = &app.conn;
    let rules = active_rules(app, tenant)?.map(|r| r.description);
    Ok(TemplateLists {
        rules,
        tenant: tenant.name.clone(),
        teams: db::list_teams(conn, tenant.id)?
            .into_iter()
            .map(|t| t.name)
            .collect(),
        pools: db::list_pools(conn, tenant.id)?
            .into_iter()
            .map(|p| p.name)
            .collect(),
    })
}

/// The tenant's rules as they are now (picking up edited scripts; see `rules::active`).
pub fn active_rules(app: &App, tenant: &Tenant) -> AppResult<Option<crate::rules::ActiveRules>> {
    crate::rules::active(&app.conn, &app.data, &app.reader, tenant, &app.actor)
}

/// The mail settings in effect (the configuration with the web UI's changes).
pub fn mail_config(app: &App) -> AppResult<crate::config::MailConfig> {
    crate::settings::mail(&app.conn, &app.config.mail)
}

/// The jobs and retention settings in effect.
pub fn jobs_config(app: &App) -> AppResult<crate::config::JobsConfig> {
    crate::settings::jobs(&app.conn, &app.config.jobs)
}

/// Queues a message of `template` (also its event name) in the caller's transaction.
pub fn queue_mail(
    app: &App,
    conn: &Connection,
    template: &'static str,
    tenant: &str,
    to: &str,
    context: serde_json::Value,
    attachment: Option<(PathBuf, String)>,
) -> AppResult<()> {
    crate::mail::queue(
        conn,
        &app.data,
        &mail_config(app)?,
        &app.actor,
        &crate::mail::Outgoing {
            event: template,
            tenant: Some(tenant),
            to,
            template,
            context,
            attachment,
        },
    )?;
    Ok(())
}

/// What a pass needs to run `rules`.
pub fn rules_input<'a>(
    app: &'a App,
    rules: Option<&'a crate::rules::ActiveRules>,
    database: &'a Path,
) -> Option<bulk::RulesInput<'a>> {
    rules.map(|active| bulk::RulesInput {
        active,
        setup: &app.reader,
        database: Some(database),
    })
}

/// A stored copy of an uploaded file.
#[derive(Debug, Clone)]
pub struct StoredFile {
    pub sha256: String,
    pub size: u64,
    pub path: PathBuf,
}

/// Copies an upload into the data directory under its content hash (once per content),
/// on disk before this returns.
pub fn store_upload(data: &DataDir, src: &Path, file_name: &str) -> AppResult<StoredFile> {
    let (tmp, copy, hashed) = copy_hashed(data, src)?;
    let internal = |e: std::io::Error| AppError::internal("storing the upload", e);
    let stored = copy
        .sync_all()
        .map_err(internal)
        .and_then(|()| place(data, &tmp, hashed.sha256, hashed.size, file_name))
        .and_then(|(stored, names)| names.sync().map_err(internal).map(|()| stored));
    let _ = fs::remove_file(&tmp);
    stored
}

/// `store_upload` without waiting for the disk: the copy is in place under its hash when
/// this returns, and its fsyncs (the file's, then its folder's) run on a thread meanwhile.
/// For an import that runs its job at once (`import`): nothing may commit the job's
/// outcome before `PendingSync::wait` has returned.
pub fn store_upload_unsynced(
    data: &DataDir,
    src: &Path,
    file_name: &str,
) -> AppResult<(StoredFile, PendingSync)> {
    let (tmp, copy, hashed) = copy_hashed(data, src)?;
    drop(copy);
    let placed = place(data, &tmp, hashed.sha256, hashed.size, file_name);
    let _ = fs::remove_file(&tmp);
    let (stored, mut names) = placed?;
    names.file = Some(stored.path.clone());
    let sync = std::thread::Builder::new()
        .name("store-sync".into())
        .spawn(move || names.sync())
        .map_err(|e| AppError::internal("storing the upload", e))?;
    Ok((stored, PendingSync(Some(sync))))
}

/// The fsyncs of an upload stored by `store_upload_unsynced`, running on a thread. Dropped
/// without `wait` (an error on the way), it still waits for them: nothing is reported
/// while the file may not be on disk.
pub struct PendingSync(Option<std::thread::JoinHandle<std::io::Result<()>>>);

impl PendingSync {
    /// The fsyncs running on `thread` (what `store_upload_unsynced` starts; a test can hand
    /// in a thread of its own to watch what waits for it).
    pub fn from_thread(thread: std::thread::JoinHandle<std::io::Result<()>>) -> PendingSync {
        PendingSync(Some(thread))
    }

    /// Waits until the stored file and its name are on disk.
    pub fn wait(mut self) -> AppResult<()> {
        self.join()
    }

    fn join(&mut self) -> AppResult<()> {
        match self.0.take().map(|t| t.join()) {
            None => Ok(()),
            Some(Ok(done)) => done.map_err(|e| AppError::internal("storing the upload", e)),
            Some(Err(_)) => Err(AppError::internal(
                "storing the upload",
                "the thread writing it to disk failed",
            )),
        }
    }
}

impl Drop for PendingSync {
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            eprintln!("rollcall: {e}");
        }
    }
}

/// Copies `src` into a new file in `tmp/`, hashing the bytes written (see `hash_through`).
fn copy_hashed(data: &DataDir, src: &Path) -> AppResult<(PathBuf, fs::File, Hashed)> {
    // The hash is taken of the very bytes written to the copy, in the same pass: a file still
    // changing cannot end up stored under the hash of other content.
    let read = |e: std::io::Error| AppError::Usage(format!("cannot read {}: {e}", src.display()));
    let internal = |e: std::io::Error| AppError::internal("storing the upload", e);
    let tmp = data.tmp_dir().join(format!(
        "upload-{}-{}.partial",
        std::process::id(),
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    ));
    let mut input = fs::File::open(src).map_err(read)?;
    let copied = fs::File::create(&tmp).map_err(internal).and_then(|mut f| {
        let hashed = hash_through(&mut input, &mut f, read, internal)?;
        Ok((f, hashed))
    });
    match copied {
        Ok((f, hashed)) => Ok((tmp, f, hashed)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Stores a file received into the data directory's `tmp/` (a web upload's body) under its
/// content hash by renaming it there: no second copy, and no second read either, since the
/// body was hashed as it arrived (`ContentHash`) and synced to disk. When that content is
/// stored already, `received` is left for its owner to remove.
pub fn store_received(
    data: &DataDir,
    received: &Path,
    hashed: Hashed,
    file_name: &str,
) -> AppResult<StoredFile> {
    let (stored, names) = place(data, received, hashed.sha256, hashed.size, file_name)?;
    names
        .sync()
        .map_err(|e| AppError::internal("storing the upload", e))?;
    Ok(stored)
}

/// The SHA-256 (hex) and size of a file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub sha256: String,
    pub size: u64,
}

/// Hashes bytes as they pass on their way into a file (a web upload's body as it arrives),
/// so that the file is stored under the hash of exactly the bytes written.
#[derive(Default)]
pub struct ContentHash {
    hash: Sha256,
    size: u64,
}

impl ContentHash {
    pub fn update(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.hash.update(bytes);
    }

    /// The bytes hashed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(self) -> Hashed {
        Hashed {
            sha256: hex::encode(self.hash.finalize()),
            size: self.size,
        }
    }
}

/// Reads `input` to its end, handing every byte to `out` and to SHA-256 in the same pass.
/// Errors reading and writing are told apart.
fn hash_through(
    input: &mut impl Read,
    mut out: impl Write,
    read_failed: impl Fn(std::io::Error) -> AppError,
    write_failed: impl Fn(std::io::Error) -> AppError,
) -> AppResult<Hashed> {
    let mut h = ContentHash::default();
    // Small enough to come from the heap's free memory: a larger buffer is mapped afresh
    // for each file, and its first touch costs page faults (1 MiB took 0.35 ms more of a
    // 600 kB upload's 5 ms before its first rows were written).
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_failed(e)),
        };
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(&write_failed)?;
    }
    Ok(h.finish())
}

/// Moves `tmp` (hashed to `sha256`) to its place under `uploads/`, unless that content is
/// stored there already; returns the names to sync before a job may name the file (the
/// caller syncs them: at once, or on a thread while the job starts).
///
/// A stored copy is reused only if its bytes still hash to its name: a power cut between a
/// rename and the fsyncs of an import that was cut short with it (see
/// `store_upload_unsynced`) can leave a damaged file under the name, which the next upload
/// of that content replaces.
fn place(
    data: &DataDir,
    tmp: &Path,
    sha256: String,
    size: u64,
    file_name: &str,
) -> AppResult<(StoredFile, NamesToSync)> {
    let internal = |e: std::io::Error| AppError::internal("storing the upload", e);
    let ext = Path::new(file_name)
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .filter(|e| e.len() <= 5 && e.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "bin".into());
    let path = data.upload_file(&sha256, &ext);
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut names = NamesToSync::default();
    if holds(&path, &sha256, size) {
        // Stored by an earlier upload, perhaps one whose fsyncs still run (another import
        // of the same content, in another process): synced here too, which costs little
        // for what is on disk already.
        names.file = Some(path.clone());
    } else {
        fs::create_dir_all(&dir).map_err(internal)?;
        fs::rename(tmp, &path).map_err(internal)?;
    }
    // The names reach the disk before a job can name the file: a power cut after the job's
    // commit must not lose the rename, nor the folder it went into (which another process
    // may have just made: its parent is synced every time).
    names.dirs.push(dir.clone());
    if let Some(parent) = dir.parent() {
        names.dirs.push(parent.to_path_buf());
    }
    Ok((StoredFile { sha256, size, path }, names))
}

/// Whether a stored upload still holds the bytes it was stored under; else why not, for
/// the administrator (the job cannot run on it).
pub fn check_stored(stored: &StoredFile) -> Result<(), String> {
    if holds(&stored.path, &stored.sha256, stored.size) {
        return Ok(());
    }
    let what = if stored.path.exists() {
        "is damaged: its bytes no longer match the SHA-256 recorded when it was uploaded"
    } else {
        "is missing"
    };
    Err(format!(
        "The stored copy of the upload ({}) {what}, perhaps after a power cut. Nothing was changed; upload the file again.",
        stored.path.display()
    ))
}

/// Whether `path` holds `size` bytes that hash to `sha256`.
fn holds(path: &Path, sha256: &str, size: u64) -> bool {
    if fs::metadata(path).map(|m| m.len()).ok() != Some(size) {
        return false;
    }
    let failed = |e: std::io::Error| AppError::internal("checking a stored upload", e);
    fs::File::open(path)
        .ok()
        .and_then(|mut f| hash_through(&mut f, std::io::sink(), failed, failed).ok())
        .is_some_and(|h| h.sha256 == sha256)
}

/// What must reach the disk before a job names a stored file: the file's bytes (when they
/// were not synced before the rename), then the folders' entries.
#[derive(Default)]
struct NamesToSync {
    file: Option<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl NamesToSync {
    fn sync(self) -> std::io::Result<()> {
        if let Some(f) = &self.file {
            fs::File::open(f)?.sync_all()?;
        }
        for d in &self.dirs {
            fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    }
}

/// Appends the queued audit entries to the log (fsync'd); returns how many.
pub fn flush_audit(app: &App) -> AppResult<u64> {
    audit::flush(
        &app.conn,
        &app.data.audit_dir(),
        app.config.audit.max_file_mib.saturating_mul(1024 * 1024),
    )
}

/// Records `event` and appends it to the log at once.
pub fn audit_now(app: &App, event: &Event) -> AppResult<()> {
    audit::record(&app.conn, event)?;
    flush_audit(app).map(|_| ())
}

/// Makes a change and its audit entry in one transaction, then appends the entry to the log
/// (fsync'd) before returning: the change is reported done only once it is audited.
pub fn change_audited<T>(
    app: &App,
    action: &'static str,
    change: impl FnOnce(&Connection) -> AppResult<(T, Option<String>, String, serde_json::Value)>,
) -> AppResult<T> {
    let tx = app.conn.unchecked_transaction()?;
    let (value, tenant, target, details) = change(&tx)?;
    audit::record(
        &tx,
        &Event {
            actor: app.actor.clone(),
            tenant,
            action,
            target,
            details,
        },
    )?;
    tx.commit()?;
    flush_audit(app)?;
    Ok(value)
}

/// What the audit log keeps of an upload: the file, its counts and its problems' codes.
pub fn upload_details(
    upload_id: i64,
    op: Operation,
    stored: &StoredFile,
    outcome: &Outcome,
    acknowledged: bool,
) -> serde_json::Value {
    let mut codes: std::collections::BTreeMap<&str, u64> = Default::default();
    for p in &outcome.problems {
        *codes.entry(p.code).or_default() += 1;
    }
    serde_json::json!({
        "upload": upload_id,
        "operation": op.as_str(),
        "sha256": stored.sha256,
        "size": stored.size,
        "format": outcome.format,
        "rows": outcome.rows,
        "errors": outcome.errors,
        "warnings": outcome.warnings,
        "warnings_acknowledged": acknowledged && outcome.warnings > 0,
        "problem_codes": codes,
    })
}

/// One pass over a file that changes nothing (validation and preview), with the given
/// rules and the pool chosen for the file.
#[allow(clippy::too_many_arguments)]
fn dry_run(
    app: &App,
    tenant: &Tenant,
    op: Operation,
    path: &Path,
    file_name: &str,
    file_sha256: Option<&str>,
    rules: Option<&crate::rules::ActiveRules>,
    default_pool: Option<&str>,
    started: Option<Starting>,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Outcome> {
    let db_path = app.data.database();
    bulk::process(
        &app.conn,
        &app.reader,
        &Request {
            tenant,
            op,
            path,
            file_name,
            file_sha256,
            mode: Mode::DryRun,
            estimate: None,
            rules: rules_input(app, rules, &db_path),
            default_pool,
        },
        started,
        on_effect,
        progress,
    )
}

/// Validates a file without storing anything but an audit entry (a dry run).
pub fn validate(
    app: &App,
    tenant: &Tenant,
    op: Operation,
    file: &Path,
    file_name: &str,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Outcome> {
    validate_with(app, tenant, op, file, file_name, None, on_effect, progress)
}

/// `validate` with a licence pool for rows that leave theirs empty.
#[allow(clippy::too_many_arguments)]
pub fn validate_with(
    app: &App,
    tenant: &Tenant,
    op: Operation,
    file: &Path,
    file_name: &str,
    default_pool: Option<&str>,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Outcome> {
    // The file's worker opens the file while it is hashed and the rules are looked up.
    let started =
        SheetReader::start(&app.reader, file, file_name, &op.sheet_name(), Pace::Ahead).ok();
    let sha = store_hash(file)?;
    let rules = active_rules(app, tenant)?;
    let outcome = dry_run(
        app,
        tenant,
        op,
        file,
        file_name,
        Some(&sha),
        rules.as_ref(),
        default_pool,
        started,
        on_effect,
        progress,
    )?;
    audit_now(
        app,
        &Event {
            actor: app.actor.clone(),
            tenant: Some(tenant.name.clone()),
            action: "file.checked",
            target: file_name.to_string(),
            details: serde_json::json!({
                "operation": op.as_str(), "sha256": sha, "format": outcome.format,
                "rows": outcome.rows, "valid": outcome.is_valid(),
                "errors": outcome.errors, "warnings": outcome.warnings,
            }),
        },
    )?;
    Ok(outcome)
}

/// The outcome of trying a file against the tenant's rules as they are on disk now (not
/// necessarily the version in use), storing nothing: `Err((origin, problems))` when the
/// scripts do not load.
#[allow(clippy::type_complexity)]
pub fn test_rules(
    app: &App,
    tenant: &Tenant,
    op: Operation,
    file: &Path,
    file_name: &str,
    on_effect: &mut EffectSink<'_>,
) -> AppResult<Result<(Option<crate::rules::ActiveRules>, Outcome), (String, Vec<String>)>> {
    // The file's worker opens the file while the scripts load.
    let started =
        SheetReader::start(&app.reader, file, file_name, &op.sheet_name(), Pace::Ahead).ok();
    let files = crate::rules::find_files(&app.data, &tenant.name)?;
    let ctx = crate::rules::context(&app.conn, tenant)?;
    let active = if files.scripts.is_empty() {
        None
    } else {
        match crate::rules::describe(&app.reader, &files, &ctx) {
            Ok(description) => Some(crate::rules::ActiveRules {
                folder: files.folder.clone(),
                origin: files.origin.clone(),
                hash: files.hash(),
                scripts: files.scripts.clone(),
                description,
                loaded_at: db::now(),
                notes: vec![],
            }),
            Err(problems) => {
                return Ok(Err((
                    files.origin.clone(),
                    problems.iter().map(|p| p.to_string()).collect(),
                )));
            }
        }
    };
    let outcome = dry_run(
        app,
        tenant,
        op,
        file,
        file_name,
        None,
        active.as_ref(),
        None,
        started,
        on_effect,
        &mut |_| {},
    )?;
    Ok(Ok((active, outcome)))
}

/// What an upload (store and validate, no job yet) found.
#[derive(Debug)]
pub struct Uploaded {
    pub upload_id: i64,
    pub outcome: Outcome,
    pub error_report: Option<PathBuf>,
}

/// Stores a file, validates it against the roster (a dry run) and records the upload with
/// its problems, so it can be submitted later (`scheduler::submit_upload`).
#[allow(clippy::too_many_arguments)]
pub fn upload(
    app: &App,
    tenant: &Tenant,
    op: Operation,
    file: &Path,
    file_name: &str,
    notify: Option<&str>,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Uploaded> {
    upload_with(
        app, tenant, op, file, file_name, notify, None, on_effect, progress,
    )
}

/// `upload` with a licence pool for rows that leave theirs empty (kept with the upload,
/// and used by its job).
#[allow(clippy::too_many_arguments)]
pub fn upload_with(
    app: &App,
    tenant: &Tenant,
    op: Operation,
    file: &Path,
    file_name: &str,
    notify: Option<&str>,
    default_pool: Option<&str>,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Uploaded> {
    let stored = store_upload(&app.data, file, file_name)?;
    upload_stored(
        app,
        tenant,
        op,
        stored,
        file_name,
        notify,
        default_pool,
        on_effect,
        progress,
    )
}

/// `upload_with` of a file stored already (`store_upload`, `store_received`).
#[allow(clippy::too_many_arguments)]
pub fn upload_stored(
    app: &App,
    tenant: &Tenant,
    op: Operation,
    stored: StoredFile,
    file_name: &str,
    notify: Option<&str>,
    default_pool: Option<&str>,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<Uploaded> {
    // The file's worker opens the file while the rules and the pool are looked up.
    let started = SheetReader::start(
        &app.reader,
        &stored.path,
        file_name,
        &op.sheet_name(),
        Pace::Ahead,
    )
    .ok();
    let rules = active_rules(app, tenant)?;
    // Kept as the pool is spelt (any case finds it).
    let canonical: Option<String> = match default_pool {
        Some(name) => {
            Some(db::pool_name(&app.conn, tenant.id, name)?.unwrap_or_else(|| name.to_string()))
        }
        None => None,
    };
    let default_pool = canonical.as_deref();
    let outcome = dry_run(
        app,
        tenant,
        op,
        &stored.path,
        file_name,
        Some(&stored.sha256),
        rules.as_ref(),
        default_pool,
        started,
        on_effect,
        progress,
    )?;
    let status = if outcome.is_valid() {
        "validated"
    } else {
        "rejected"
    };
    let result = serde_json::json!({
        "totals": outcome.totals, "forecast": outcome.forecast,
        "normalisations": outcome.normalisations, "notes": outcome.notes,
        "default_pool": default_pool,
    })
    .to_string();
    let tx = app.conn.unchecked_transaction()?;
    let upload_id =
        scheduler::insert_upload(&tx, &app.actor, tenant, op, &stored, file_name, status)?;
    save_upload_result(&tx, upload_id, status, &outcome, &result)?;
    audit::record(
        &tx,
        &Event {
            actor: app.actor.clone(),
            tenant: Some(tenant.name.clone()),
            action: if outcome.is_valid() {
                "upload.validated"
            } else {
                "upload.rejected"
            },
            target: file_name.to_string(),
            details: upload_details(upload_id, op, &stored, &outcome, false),
        },
    )?;
    if let Some(to) = notify
        && !outcome.is_valid()
    {
        let (problems, more) = crate::mail::problem_lines(&outcome, 10);
        queue_mail(
            app,
            &tx,
            "upload_rejected",
            &tenant.name,
            to,
            serde_json::json!({
                "upload_id": upload_id,
                "file_name": file_name,
                "operation": format!("{} users", op.title().to_lowercase()),
                "errors": outcome.errors,
                "summary": crate::mail::summary(&outcome),
                "problems": problems,
                "more_problems": more,
            }),
            Some((
                app.data.error_report(upload_id),
                format!("{}-errors.xlsx", scheduler::file_stem(file_name)),
            )),
        )?;
    }
    // The workbook is written before the commit: a worker may send the rejection message
    // (which attaches it) as soon as the commit is done.
    let error_report = if outcome.is_valid() && outcome.warnings == 0 {
        None
    } else {
        let path = app.data.error_report(upload_id);
        let lists = template_lists(app, tenant)?;
        crate::sheet::report::write_error_workbook(
            &app.reader,
            op,
            &lists,
            &stored.path,
            file_name,
            &outcome,
            &path,
        )?;
        Some(path)
    };
    tx.commit()?;
    flush_audit(app)?;
    Ok(Uploaded {
        upload_id,
        outcome,
        error_report,
    })
}

fn store_hash(file: &Path) -> AppResult<String> {
    let read = |e: std::io::Error| AppError::Usage(format!("cannot read {}: {e}", file.display()));
    let mut f = fs::File::open(file).map_err(read)?;
    Ok(hash_through(&mut f, std::io::sink(), read, read)?.sha256)
}

/// What an import did.
#[derive(Debug)]
pub struct ImportResult {
    pub upload_id: i64,
    pub job_id: i64,
    /// The job applied the file (it succeeded).
    pub applied: bool,
    /// The job's state when the import returned.
    pub state: String,
    /// The job's reason when it failed.
    pub error: Option<String>,
    pub outcome: Outcome,
    /// Warnings were found and not acknowledged: nothing was applied.
    pub needs_acknowledgement: bool,
    /// A large deactivation or deletion needs this phrase typed to confirm it.
    pub needs_confirmation: Option<String>,
    pub error_report: Option<PathBuf>,
    pub results_report: Option<PathBuf>,
}

/// Choices of an import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Apply although the file has warnings (the administrator acknowledged them).
    pub acknowledge_warnings: bool,
    /// The typed confirmation of a large deactivation or deletion.
    pub confirm: Option<String>,
    /// Write the results workbook after commit (benchmarks time it separately).
    pub results_workbook: bool,
    /// Append the audit entries to the log before returning (benchmarks time it apart).
    pub flush_audit: bool,
    /// The submitter's email address, told when the job starts and ends.
    pub notify: Option<String>,
    /// Send each added user a Getting Started message.
    pub getting_started: bool,
    /// The licence pool of rows whose Licence Pool cell is empty (add, reactivate).
    pub default_pool: Option<String>,
}

impl ImportOptions {
    pub fn new(acknowledge_warnings: bool) -> ImportOptions {
        ImportOptions {
            acknowledge_warnings,
            confirm: None,
            results_workbook: true,
            flush_audit: true,
            notify: None,
            getting_started: false,
            default_pool: None,
        }
    }
}

/// Stores a file and submits it to the job queue, then waits for its job: when no other
/// process is the worker, this one runs the queue (jobs submitted earlier first); else the
/// worker (e.g. `rollcall serve`) runs it and this waits. A file with errors (or warnings
/// not acknowledged) changes nothing.
#[allow(clippy::too_many_arguments)]
pub fn import(
    app: &mut App,
    tenant: &Tenant,
    op: Operation,
    file: &Path,
    file_name: &str,
    opts: ImportOptions,
    on_effect: &mut EffectSink<'_>,
    progress: &mut dyn FnMut(u64),
) -> AppResult<ImportResult> {
    let job_opts = scheduler::JobOptions {
        acknowledge_warnings: opts.acknowledge_warnings,
        confirm: opts.confirm.clone(),
        notify: opts.notify.clone(),
        getting_started: opts.getting_started,
        default_pool: opts.default_pool.clone(),
    };
    // The worker lock is tried first: whether this process runs the job at once decides
    // how the job is recorded.
    let mut held = scheduler::WorkerLock::try_take(&app.data)?;
    if held.is_some() {
        scheduler::recover(app)?;
    }
    let app: &App = app;
    let (upload_id, job_id, mut ahead) = if held.is_some() {
        // This process runs the job now, so nothing waits for the disk before its pass: the
        // file's fsyncs run on a thread, the job is recorded and started without syncing,
        // and the file's worker opens the file meanwhile. The pass's commit waits for all
        // of it (see `scheduler::Ahead`). The submission's audit entry waits in the outbox
        // for the flush after the run.
        let (stored, sync) = store_upload_unsynced(&app.data, file, file_name)?;
        // (A worker that cannot start here is started again, and its reason told, when the
        // job runs.)
        let worker = SheetReader::start(
            &app.reader,
            &stored.path,
            file_name,
            &op.sheet_name(),
            Pace::Asked,
        )
        .ok();
        let unsynced = db::Unsynced::begin(&app.conn)?;
        let (upload_id, job_id) =
            scheduler::submit_to_run(app, tenant, op, &stored, file_name, &job_opts, None)?;
        let ahead = scheduler::Ahead {
            worker,
            stored: Some(sync),
            unsynced: Some(unsynced),
        };
        (upload_id, job_id, Some(ahead))
    } else {
        let stored = store_upload(&app.data, file, file_name)?;
        let (upload_id, job_id) =
            scheduler::submit(app, tenant, op, &stored, file_name, &job_opts, None)?;
        (upload_id, job_id, None)
    };
    let run_opts = scheduler::RunOptions {
        results_workbook: opts.results_workbook,
        flush_audit: opts.flush_audit,
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut ran = None;
    loop {
        // The lock taken above (recovered already), or taken now that another worker has
        // stopped (what it left comes first).
        let lock = match held.take() {
            Some(lock) => Some(lock),
            None => {
                let lock = scheduler::WorkerLock::try_take(&app.data)?;
                if lock.is_some() {
                    scheduler::recover(app)?;
                }
                lock
            }
        };
        if let Some(lock) = lock {
            while !scheduler::is_finished(&app.conn, job_id)? {
                let Some(next) = scheduler::next_job(&app.conn)? else {
                    break;
                };
                let run = if next == job_id {
                    let ahead = ahead.take().unwrap_or_default();
                    scheduler::run_job(app, next, run_opts, ahead, on_effect, progress)?
                } else {
                    // Jobs are ahead of this one: the worker started for it would wait
                    // (its wall-clock limit running) for as long as they take, and they
                    // commit as usual.
                    if let Some(a) = ahead.take() {
                        a.settle()?;
                    }
                    scheduler::run_job(
                        app,
                        next,
                        scheduler::RunOptions::default(),
                        scheduler::Ahead::default(),
                        &mut |_, _, _| {},
                        &mut |_| {},
                    )?
                };
                if next == job_id {
                    ran = run;
                }
            }
            // The job did not run (it awaits approval, or its time has not come).
            if let Some(a) = ahead.take() {
                a.settle()?;
            }
            // This process is the worker for now: it sends the job's messages.
            scheduler::send_mail(app);
            drop(lock);
            let _ = &stop;
            break;
        }
        // Another process is the worker: follow the job's progress until it ends.
        if scheduler::is_finished(&app.conn, job_id)? {
            break;
        }
        if let Some(p) = scheduler::progress(&app.data, job_id) {
            progress(p.rows_done);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The submission's audit entries when no run appended them (a job left awaiting
    // approval): appended before the import reports. (Nothing to do after a run's flush.)
    if opts.flush_audit {
        flush_audit(app)?;
    }
    let (state, error): (String, Option<String>) = app.conn.query_row(
        "SELECT state, error FROM jobs WHERE id = ?1",
        [job_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if let Some(run) = ran {
        return Ok(ImportResult {
            upload_id,
            job_id,
            applied: run.applied,
            state,
            error,
            outcome: run.outcome,
            needs_acknowledgement: run.needs_acknowledgement,
            needs_confirmation: run.needs_confirmation,
            error_report: run.error_report,
            results_report: run.results_report,
        });
    }
    let outcome = load_outcome(&app.conn, upload_id, op)?;
    let applied = state == "succeeded";
    let needs_acknowledgement = !applied && outcome.is_valid() && outcome.warnings > 0;
    let error_report = Some(app.data.error_report(upload_id)).filter(|p| p.exists());
    let results_report = Some(app.data.results_report(job_id)).filter(|p| p.exists());
    Ok(ImportResult {
        upload_id,
        job_id,
        applied,
        state,
        error,
        outcome,
        needs_acknowledgement,
        needs_confirmation: None,
        error_report,
        results_report,
    })
}

/// An upload's outcome as stored (its problems, counts, preview totals and forecast).
pub fn load_outcome(conn: &Connection, upload_id: i64, op: Operation) -> AppResult<Outcome> {
    let (rows, errors, warnings, result): (i64, i64, i64, Option<String>) = conn.query_row(
        "SELECT rows_total, error_count, warning_count, result FROM uploads WHERE id = ?1",
        [upload_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    let mut o = Outcome::empty(op);
    o.rows = rows as u64;
    o.errors = errors as u64;
    o.warnings = warnings as u64;
    let result: serde_json::Value = result
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or_default();
    if let Ok(t) = serde_json::from_value(result["totals"].clone()) {
        o.totals = t;
    }
    if let Ok(f) = serde_json::from_value(result["forecast"].clone()) {
        o.forecast = f;
    }
    if let Ok(n) = serde_json::from_value(result["notes"].clone()) {
        o.notes = n;
    }
    let mut st = conn.prepare(
        "SELECT severity, sheet, row_number, col_letter, col_name, value, code, message FROM upload_problems WHERE upload_id = ?1 ORDER BY seq",
    )?;
    let problems = st.query_map([upload_id], |r| {
        Ok(crate::model::Problem {
            severity: if r.get::<_, String>(0)? == "warning" {
                Severity::Warning
            } else {
                Severity::Error
            },
            sheet: r.get(1)?,
            row: r.get(2)?,
            column: r.get(3)?,
            column_name: r.get(4)?,
            value: r.get(5)?,
            code: crate::model::intern_code(&r.get::<_, String>(6)?),
            message: r.get(7)?,
        })
    })?;
    o.problems = problems.collect::<Result<_, _>>()?;
    o.refused = o
        .problems
        .iter()
        .any(|p| p.row.is_none() && p.severity == Severity::Error && p.code != "licence_pool_full");
    Ok(o)
}

pub fn save_upload_result(
    conn: &Connection,
    upload_id: i64,
    status: &str,
    outcome: &Outcome,
    result: &str,
) -> AppResult<()> {
    conn.execute(
        "UPDATE uploads SET status = ?2, rows_total = ?3, error_count = ?4, warning_count = ?5, result = ?6 WHERE id = ?1",
        params![upload_id, status, outcome.rows as i64, outcome.errors as i64, outcome.warnings as i64, result],
    )?;
    // A job re-checks an upload validated earlier: its findings replace the upload's.
    conn.execute(
        "DELETE FROM upload_problems WHERE upload_id = ?1",
        [upload_id],
    )?;
    let mut st = conn.prepare(
        "INSERT INTO upload_problems (upload_id, seq, severity, sheet, row_number, col_letter, col_name, value, code, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for (i, p) in outcome.problems.iter().enumerate() {
        st.execute(params![
            upload_id,
            i as i64,
            if p.severity == Severity::Error {
                "error"
            } else {
                "warning"
            },
            p.sheet,
            p.row,
            p.column,
            p.column_name,
            p.value,
            p.code,
            p.message
        ])?;
    }
    Ok(())
}

/// Writes every user of a tenant to `.xlsx` or `.csv` (by extension), or CSV to stdout,
/// with the custom columns its rules declare (`custom`) after the built-in fields.
/// Returns the number of users written.
pub fn export_users(
    conn: &Connection,
    tenant: &Tenant,
    custom: &[String],
    output: Option<&Path>,
) -> AppResult<u64> {
    const BUILT_IN: [&str; 11] = [
        "Email",
        "First Name",
        "Last Name",
        "Job Title",
        "Team",
        "Role",
        "Language",
        "Licence Pool",
        "Status",
        "Created",
        "Updated",
    ];
    let mut headers: Vec<&str> = BUILT_IN.to_vec();
    headers.extend(custom.iter().map(String::as_str));
    let is_xlsx = output
        .and_then(|p| p.extension())
        .is_some_and(|e| e.eq_ignore_ascii_case("xlsx"));
    let mut n = 0u64;
    let fields = |u: &db::User| -> Vec<String> {
        let values: serde_json::Map<String, serde_json::Value> = u
            .custom
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let mut v = vec![
            u.email.clone(),
            u.first_name.clone(),
            u.last_name.clone(),
            u.job_title.clone().unwrap_or_default(),
            u.team.clone().unwrap_or_default(),
            u.role.clone(),
            u.language.clone(),
            u.pool.clone(),
            u.status.clone(),
            u.created_at.clone(),
            u.updated_at.clone(),
        ];
        v.extend(custom.iter().map(|c| {
            values
                .get(c)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        }));
        v
    };
    if is_xlsx {
        let Some(path) = output else { return Ok(0) };
        let xerr = |e: rust_xlsxwriter::XlsxError| AppError::internal("writing the export", e);
        let f = crate::sheet::template::Formats::new();
        let mut wb = rust_xlsxwriter::Workbook::new();
        let ws = wb.add_worksheet_with_constant_memory().map_err(xerr)?;
        ws.set_name("Users").map_err(xerr)?;
        for (i, h) in headers.iter().enumerate() {
            ws.write_string_with_format(0, i as u16, crate::sheet::template::echo(h), &f.header)
                .map_err(xerr)?;
            ws.set_column_width(i as u16, 20.0).map_err(xerr)?;
        }
        db::for_each_user(conn, tenant.id, None, |u| {
            n += 1;
            let r = u32::try_from(n).unwrap_or(u32::MAX);
            for (i, v) in fields(u).iter().enumerate() {
                ws.write_string_with_format(r, i as u16, crate::sheet::template::echo(v), &f.text)
                    .map_err(xerr)?;
            }
            Ok(())
        })?;
        crate::sheet::report::save_atomically(&mut wb, path)?;
        return Ok(n);
    }
    let sink: Box<dyn std::io::Write> = match output {
        Some(p) => Box::new(
            fs::File::create(p)
                .map_err(|e| AppError::Usage(format!("cannot write {}: {e}", p.display())))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = csv::Writer::from_writer(sink);
    let cerr = |e: csv::Error| AppError::writing_csv("writing the export", e);
    w.write_record(
        headers
            .iter()
            .map(|h| crate::model::csv_safe(h).into_owned()),
    )
    .map_err(cerr)?;
    db::for_each_user(conn, tenant.id, None, |u| {
        n += 1;
        let row = fields(u);
        w.write_record(row.iter().map(|s| crate::model::csv_safe(s).into_owned()))
            .map_err(cerr)
    })?;
    w.flush()
        .map_err(|e| AppError::writing("writing the export", e))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::PendingSync;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn pending_fsyncs_dropped_unwaited_are_still_waited_for() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let pending = PendingSync(Some(std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            flag.store(true, Ordering::SeqCst);
            Ok(())
        })));
        drop(pending);
        assert!(done.load(Ordering::SeqCst));
    }
}
